"""
Command-line configuration, nanoGPT style. A script keeps its settings as module-level variables (its
config block, at the top of the file) and its main() reads them once into one object that it passes on:

    settings = read_settings(globals(), sys.argv[1:])   # then settings.out_dir, settings.seed, ...

Each argument is either a config file (a Python file of assignments, run in the script's namespace
with __file__ set to the config's path, e.g. config/train_shakespeare_char.py) or --key=value. Values
are parsed with ast.literal_eval, falling back to a plain string; a bare --flag sets a boolean to True.
A value must have the type of the default (an int is accepted for a float, and anything for a default
of None).
"""

import ast
import os
import difflib
import types
from collections.abc import Collection

from common import UserError


def _closest(key, names):
    close = difflib.get_close_matches(key, names, n=3, cutoff=0.5)
    return f" (did you mean {', '.join('--' + c for c in close)}?)" if close else ""


def _check_type(key, value, default, nullable):
    if default is None or (value is None and key in nullable):
        return value
    if value is None:
        raise UserError(f"--{key} cannot be None (default {default!r})")
    if isinstance(default, bool):
        if not isinstance(value, bool):
            raise UserError(f"--{key} takes True or False, got {value!r}")
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return value
    if type(value) is not type(default):
        raise UserError(f"--{key} expects a {type(default).__name__} (default {default!r}), got {value!r}")
    return value


def names_assigned_in(source: str) -> set[str]:
    """Every name a config file's code assigns (the file has run already, so it parses)."""
    return {node.id for node in ast.walk(ast.parse(source)) if isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store)}


def apply_overrides(namespace: dict, args: list[str], nullable: Collection[str] = (), assigned: set | None = None) -> dict:
    """Apply config files and --key=value overrides to namespace (a script's globals()). Returns
    the dict of the configurable keys (the upper-level names that were there before) and their values.
    nullable: keys that may be set to None although their default is not (None switches them off).
    assigned: a set that receives the keys a config file or the command line set (even to the default's
    value), e.g. to tell a setting the user chose from one a resumed run may take from its checkpoint."""
    assigned = set() if assigned is None else assigned
    # settings are the lower-case module-level values; UPPER_CASE names are the script's constants
    keys = [k for k, v in namespace.items()
            if not k.startswith("_") and not k.isupper() and isinstance(v, (int, float, bool, str, tuple, list, type(None)))]
    for arg in args:
        if not arg.startswith("--"):
            if not os.path.isfile(arg):
                raise UserError(f"config file {arg!r} does not exist (configs live in config/, e.g. config/train_shakespeare_char.py)")
            try:
                with open(arg, encoding="utf-8") as f:  # Python source is UTF-8, whatever the locale
                    source = f.read()
            except UnicodeDecodeError as e:
                raise UserError(f"config file {arg} is not UTF-8 text ({e.reason} at byte {e.start}): "
                                f"a config is a Python file of assignments; save it as UTF-8") from None
            before = {k: namespace[k] for k in keys}
            existing = set(namespace)
            # the config sees its own path as __file__, so that it finds the configs next to it from any
            # working directory; the script's own __file__ comes back afterwards
            had_file, script_file = "__file__" in namespace, namespace.get("__file__")
            namespace["__file__"] = os.path.abspath(arg)
            try:
                exec(compile(source, arg, "exec"), namespace)
            except Exception as e:
                raise UserError(f"config file {arg} failed to run: {type(e).__name__}: {e}") from None
            finally:
                if had_file:
                    namespace["__file__"] = script_file
                else:
                    namespace.pop("__file__", None)
            for k in list(namespace):
                value = namespace[k]
                if k not in existing and not k.startswith("_") and not callable(value) and not isinstance(value, types.ModuleType):
                    raise UserError(f"config file {arg} sets unknown key {k!r}{_closest(k, keys)}")
            assigned.update(set(keys) & names_assigned_in(source))
            for k in keys:
                if namespace[k] is not before[k]:
                    namespace[k] = _check_type(k, namespace[k], before[k], nullable)
            continue
        if "=" in arg:
            key, raw = arg[2:].split("=", 1)
            try:
                value = ast.literal_eval(raw)
            except (SyntaxError, ValueError):
                value = raw
            if isinstance(namespace.get(key), str) and not isinstance(value, str):
                value = raw  # a text setting takes the text as written: --start=42, --out_dir=2024
        else:
            key, value = arg[2:], True
        if key not in keys:
            raise UserError(f"unknown config key --{key}{_closest(key, keys)}")
        namespace[key] = _check_type(key, value, namespace[key], nullable)
        assigned.add(key)
    return {k: namespace[k] for k in keys}


def read_settings(namespace: dict, args: list[str], nullable: Collection[str] = (), assigned: set | None = None) -> types.SimpleNamespace:
    """A script's settings after its config files and --key=value overrides (apply_overrides), as one object:
    settings.out_dir. main() makes it and passes it to the functions that need a setting. The script's globals
    keep their defaults (a copy is overridden), so a second main() in one process starts from them again."""
    return types.SimpleNamespace(**apply_overrides(dict(namespace), args, nullable, assigned))
