"""
The layout the repository keeps, read from the source with ast (nothing imported, nothing run): the top-level
modules import without a cycle, no top-level function is over 60 lines, train.py's functions take at most 6
parameters, train.py and model.py stay readable in length, no helper or constant is defined in two test files
(tests/helpers.py is their one home), and every top-level module has its test file.
"""

import os
import ast
import glob
from collections import defaultdict

import pytest

from helpers import REPO

MAX_FUNCTION_LINES = 60
MAX_TRAIN_PARAMETERS = 6
MAX_LINES = {"train.py": 650, "model.py": 450}

# a module without a tests/test_<module>.py is tested in the file named here, with why
TESTED_IN = {
    "errors.py": "test_common.py",  # UserError and run_main: the one-line error, with the rest of what scripts share
    "durable.py": "test_checkpoint.py",  # atomic writes and the full disk, seen through checkpoint writes
    "hf_bridge.py": "test_export.py",  # reading and writing Hugging Face checkpoints, against transformers
    "export_hf.py": "test_export.py",  # the script of the export
    "runlog.py": "test_train.py",  # the console lines and metrics.jsonl of a real run
}


def top_level_modules():
    return sorted(os.path.basename(p) for p in glob.glob(os.path.join(REPO, "*.py")))


def parse(path):
    with open(path, encoding="utf-8") as f:
        return ast.parse(f.read(), filename=path)


def imported_modules(tree, candidates):
    """The names in `candidates` this module imports, at any depth (an import inside a function is still a dependency)."""
    found = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.add(node.module.split(".")[0])
    return found & candidates


def find_cycle(graph):
    """One import cycle as a list of modules [a, b, ..., a], or None."""
    state, stack = {}, []

    def visit(node):
        state[node] = "open"
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                cycle = visit(nxt)
                if cycle:
                    return cycle
        stack.pop()
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state:
            cycle = visit(node)
            if cycle:
                return cycle
    return None


def test_find_cycle_finds_one_and_only_one():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]


def test_no_import_cycle_among_top_level_modules():
    names = {m[:-3] for m in top_level_modules()}
    graph = {m[:-3]: imported_modules(parse(os.path.join(REPO, m)), names) - {m[:-3]} for m in top_level_modules()}
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


def top_level_functions(tree):
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            yield node
        elif isinstance(node, ast.ClassDef):
            yield from (n for n in node.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)))


@pytest.mark.parametrize("module", top_level_modules())
def test_no_function_over_60_lines(module):
    long = [f"{f.name} ({f.end_lineno - f.lineno + 1} lines)" for f in top_level_functions(parse(os.path.join(REPO, module)))
            if f.end_lineno - f.lineno + 1 > MAX_FUNCTION_LINES]
    assert not long, f"{module}: over {MAX_FUNCTION_LINES} lines: {', '.join(long)}"


def parameter_count(function):
    args = function.args
    names = [a.arg for a in (*args.posonlyargs, *args.args, *args.kwonlyargs)]
    return len([n for n in names if n not in ("self", "cls")]) + (args.vararg is not None) + (args.kwarg is not None)


def test_train_functions_take_at_most_6_parameters():
    many = [f"{f.name} ({parameter_count(f)})" for f in ast.walk(parse(os.path.join(REPO, "train.py")))
            if isinstance(f, (ast.FunctionDef, ast.AsyncFunctionDef)) and parameter_count(f) > MAX_TRAIN_PARAMETERS]
    assert not many, f"train.py: more than {MAX_TRAIN_PARAMETERS} parameters: {', '.join(many)}"


@pytest.mark.parametrize("module", sorted(MAX_LINES))
def test_main_scripts_stay_short(module):
    with open(os.path.join(REPO, module), encoding="utf-8") as f:
        lines = len(f.read().splitlines())
    assert lines <= MAX_LINES[module], f"{module} has {lines} lines, more than {MAX_LINES[module]}"


def top_level_names(tree):
    """Functions, classes and UPPERCASE constants defined at the top of a module."""
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            if node.name != "main":  # a worker script's entry point, one per script
                yield node.name
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in (node.targets if isinstance(node, ast.Assign) else [node.target]):
                if isinstance(target, ast.Name) and target.id.isupper():
                    yield target.id


def test_no_helper_or_constant_defined_in_two_test_files():
    where = defaultdict(list)
    for path in sorted(glob.glob(os.path.join(REPO, "tests", "*.py"))):
        for name in set(top_level_names(parse(path))):
            where[name].append(os.path.basename(path))
    twice = {name: files for name, files in where.items() if len(files) > 1}
    assert not twice, f"defined in several test files (give it one home, tests/helpers.py, or its own name): {twice}"


def test_every_module_has_its_test_file():
    tests = {os.path.basename(p) for p in glob.glob(os.path.join(REPO, "tests", "test_*.py"))}
    untested = [m for m in top_level_modules() if f"test_{m}" not in tests and TESTED_IN.get(m) not in tests]
    assert not untested, f"no tests/test_<module>.py and not in TESTED_IN: {untested}"
    stale = [m for m in TESTED_IN if m not in top_level_modules()]
    assert not stale, f"TESTED_IN names modules that are gone: {stale}"
