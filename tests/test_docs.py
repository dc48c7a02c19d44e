"""
The docs name only what the repository has: every function, setting, module and file that README.md or a
docs/*.md page puts in backticks exists, so a rename or a removal that leaves a doc behind fails here,
naming the document, the line and the name.

A backticked span is checked when it looks like code (anything else, a command line, an error message or a
formula, is left to tests/test_readme.py or to the reader):
- a path (`config/train_gpt2.py`, `tests/test_export.py`, `ckpt.dcp/`): it exists in the repository, or it is
  something the code writes (a run's `out_dir/ckpt.pt`, a data set's `train.bin`, an export's
  `config.json`): each part of it is a string in the code (a file name in a literal, a setting like
  `out_dir`), or one of GENERATED below;
- a name, dotted name or call (`load_model(...)`, `common.load_model`, `GPTConfig`, `settings.max_iters`):
  the code defines or imports it (a module, function, class, method, attribute or module-level setting), or
  uses it as a key or value (`val_loss`, `scratch`), or it is a Python builtin, or it starts with an external
  package (EXTERNAL) or is a top-level name of torch, torch.nn or transformers (`AutoTokenizer`);
- a setting on the command line (`--init_from=resume`, `qk_norm=True`): its name is a setting of a script
  (a module-level name of its config block) or a flag the code parses.
The code is the top-level scripts, data/*/prepare.py, config/*.py and experiments/*.py; pyproject.toml
names the optional extras and the test markers.
"""

import ast
import glob
import os
import re
import builtins
import importlib

import pytest

from helpers import REPO

DOCS = ["README.md", *sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "*.md")))]
CODE = ["*.py", "data/*/prepare.py", "config/*.py", "experiments/*.py"]

# names from outside the repository that the docs use: the packages we build on, their modules as the code
# imports them (nn, F, dist), and the command-line tools the docs launch runs with
EXTERNAL = {"torch", "nn", "F", "dist", "transformers", "datasets", "tiktoken", "tokenizers", "safetensors", "wandb",
            "matplotlib", "numpy", "torchrun", "pytest", "ruff", "pip", "python", "bash", "srun", "sbatch", "scancel",
            "kill", "lscpu", "SDPA", "addmm", "mm"}
# the flags of torchrun and sbatch that the launch recipes explain
LAUNCHER_FLAGS = {"nnodes", "node_rank", "master_addr", "master_port", "nproc_per_node", "standalone", "signal"}
# names the docs explain and we do not define: nanoGPT's setting that is gone (a config that sets it is refused),
# transformers' loading flag we promise not to need, torch.distributed.elastic's internals and SLURM's option
# that make the stop deadline
OTHERS = {"always_save_checkpoint", "trust_remote_code", "SignalException", "PContext", "KillWait"}
# files that are written by others and named for what they hold: by transformers' save_pretrained in an export,
# OpenAI's original GPT-2 release, build-nanogpt's notebook and script (cited with their figures), and the batch
# script the SLURM section asks the reader to save
GENERATED = {"model.safetensors", "generation_config.json", "encoder.json", "vocab.bpe", "play.ipynb", "hellaswag.py",
             "train_gpt2.sbatch"}
# words a doc writes for what they stand for, not as a name of ours: indices (k, j), upper-case stand-ins (N, DIR),
# <name> templates and the your_field of "how to add one"
PLACEHOLDER = re.compile(r"^(your_\w*|[A-Za-z]|[A-Z]+|.*<[^>]*>.*)$")

PATH = re.compile(r"^[\w.<>-]*(/[\w.<>-]*)+$|^[\w<>.-]+\.(py|md|pt|dcp|tmp|json|jsonl|bin|txt|toml|sh|sbatch|ipynb|safetensors|png|bpe)$")
NAME = re.compile(r"^(?P<name>[A-Za-z_][\w]*(\.[A-Za-z_]\w*)*)(\(.*\))?$")
SETTING = re.compile(r"^(--)?(?P<key>[a-z_][a-z0-9_]*)(=.*)?$")


def code_files():
    return sorted({p for pattern in CODE for p in glob.glob(os.path.join(REPO, pattern))})


def known_from_code():
    """(defined names, qualified names 'module.name' and 'Class.name', strings the code holds)."""
    names, qualified, strings = set(), set(), set()
    for path in code_files():
        module = os.path.splitext(os.path.basename(path))[0]
        names.add(module)
        with open(path, encoding="utf-8") as f:
            tree = ast.parse(f.read())
        for node in tree.body:  # module level: what `module.name` may name
            for target in getattr(node, "targets", [getattr(node, "target", None)]):
                if isinstance(target, ast.Name):
                    qualified.add(f"{module}.{target.id}")
            if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
                qualified.add(f"{module}.{node.name}")
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                names.add(node.name)
            if isinstance(node, ast.ClassDef):
                for item in node.body:
                    member = getattr(item, "name", None) or getattr(getattr(item, "target", None), "id", None)
                    members = [member] + [t.id for t in getattr(item, "targets", []) if isinstance(t, ast.Name)]
                    for member in filter(None, members):
                        names.add(member)
                        qualified.add(f"{node.name}.{member}")
            elif isinstance(node, ast.Name) and isinstance(node.ctx, ast.Store):
                names.add(node.id)
            elif isinstance(node, ast.Attribute) and isinstance(node.ctx, ast.Store):
                names.add(node.attr)  # self.start_ids = ...
            elif isinstance(node, ast.keyword) and node.arg:
                names.add(node.arg)  # dict(val_loss=...), the keys of metrics.jsonl
            elif isinstance(node, (ast.Import, ast.ImportFrom)):
                names.update((alias.asname or alias.name).split(".")[0] for alias in node.names)
            elif isinstance(node, ast.Constant) and isinstance(node.value, str):
                # "ckpt.pt", "--num_docs", and the words of each: "q_proj" of "self_attn.q_proj"
                strings.update(re.findall(r"[\w.-]+", node.value) + re.findall(r"\w+", node.value))
    with open(os.path.join(REPO, "pyproject.toml"), encoding="utf-8") as f:
        strings.update(re.findall(r"[\w.-]+", f.read()))  # the extras (plot) and the test markers (slow)
    names.update(dir(builtins))
    return names, qualified, strings


def is_external(name):
    """A top-level name of torch, torch.nn or transformers (imported only for the few names that need it)."""
    return any(hasattr(importlib.import_module(package), name) for package in ("torch", "torch.nn", "transformers"))


@pytest.fixture(scope="module")
def known():
    return known_from_code()


def spans(doc):
    """(line, text) of each backticked span of a document, outside its code blocks."""
    with open(os.path.join(REPO, doc), encoding="utf-8") as f:
        text = f.read()
    text = re.sub(r"^[ \t]*```.*?^[ \t]*```", lambda m: "\n" * m.group(0).count("\n"), text, flags=re.S | re.M)
    for match in re.finditer(r"`([^`\n]+)`", text):
        yield text[:match.start()].count("\n") + 1, match.group(1).strip()


def missing_name(span, known):
    """The name in a backticked span that the repository does not have, or None (also for spans that are not
    code names)."""
    names, qualified, strings = known
    if PATH.match(span):
        if os.path.exists(os.path.join(REPO, span.rstrip("/"))):
            return None
        parts = [p for p in span.rstrip("/").split("/") if not PLACEHOLDER.match(p)]
        for part in parts:
            if not (part in names or part in strings or part in GENERATED):
                return part if part == parts[-1] or len(parts) == 1 else span
        return None
    if " " not in span.split("(")[0] and (match := NAME.match(span)):
        name = match["name"]
        head, *rest = name.split(".")
        if head in EXTERNAL or head in OTHERS or PLACEHOLDER.match(name) or name in names or name in qualified:
            return None
        if not rest:
            return None if name in strings or is_external(name) else name
        if head in names and all(part in names or PLACEHOLDER.match(part) for part in rest):
            return None  # an object's attribute: settings.max_iters, model.configure_optimizers, GPT.generate
        return None if is_external(head) else name
    if match := SETTING.match(span):  # --key=value, key=value
        key = match["key"]
        return None if key in names or f"--{key}" in strings or key in LAUNCHER_FLAGS else key
    return None


def test_missing_name_is_found(known):
    """The rule catches what it is for (a function, a setting, a module attribute, a file) and passes what exists."""
    for span in ("write_checkpoint", "write_checkpoint(state)", "--no_such_setting=1", "common.no_such_helper", "config/nothing.py"):
        assert missing_name(span, known) is not None, span
    for span in ("load_model(init_from, out_dir, overrides=...)", "common.load_model", "--init_from=resume", "qk_norm=True",
                 "out_dir/ckpt.pt", "ckpt.dcp/", "config/train_gpt2.py", "torch.load(path, weights_only=True)", "val_loss"):
        assert missing_name(span, known) is None, span


@pytest.mark.parametrize("doc", DOCS)
def test_docs_name_only_what_exists(doc, known):
    missing = [f"{doc}:{line}: `{span}` names {name!r}, which the repository does not have"
               for line, span in spans(doc) if (name := missing_name(span, known)) is not None]
    assert not missing, "\n".join(missing)
