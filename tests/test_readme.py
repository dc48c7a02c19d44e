"""
The README is a contract: every command in README.md and in the docs/ pages it links runs.

The commands are read from the documents' ```sh blocks (a line continued with a backslash is one command,
`a && b` is two, `# ...` is a comment). Each one must be claimed by a handler below, which says how it runs
here at a tiny size, or by the short CANNOT_RUN list, which says why it cannot; a command added to the docs
that neither knows fails `test_every_command_is_handled` (fast, not marked slow). A block that starts with
`#!` is a script file shown whole (a SLURM batch script): bash must parse it, and the lines it runs are not
extracted.

Then (marked slow) every command runs, document by document in the README's link order and in each
document's own order, in one scratch copy of the repository (the files a clone has), so that a command
finds what the commands before it made, as a reader following the pages would. Tiny sizes come from
overrides appended to the command (later values win), chosen per kind of command by its handler (`shrunk`):
a documented value they would hide is first checked by the script's own check of its settings, and a script
without one is shrunk only through the settings its command leaves unset. What needs
the network here is replaced by stand-ins the test makes: tiny Shakespeare from ../shared, a small random
GPT-2 saved by `transformers` in a Hugging Face cache (so `--init_from=gpt2` finds "gpt2" offline), a few
examples in HellaSwag's release format, and for the hub's datasets an in-memory data set of documents in
the dataset's own columns. A command for N GPUs runs on 2 CPU processes (gloo); one for two nodes runs as
two launches on this machine.

To teach it a new kind of command: add a Handler to HANDLERS (a name, a test on the argument list, and the
function that runs it), or, if it truly cannot run here, an entry with its reason to CANNOT_RUN.
"""

import os
import re
import sys
import json
import shlex
import importlib
import subprocess
from types import SimpleNamespace
from dataclasses import dataclass
from collections.abc import Callable

import pytest

from helpers import REPO, SHARED, free_port, fresh_copy, script_env, shakespeare_input
from common import UserError

TIMEOUT = 300  # seconds for one command
README_LIMIT = 15_500  # bytes: a front page of about nanoGPT's length (its README is ~14 KB)
OPTIONAL_DOCS = {"docs/gpu_check.md"}  # linked before its page lands (written with the GPU check)


# -----------------------------------------------------------------------------
# reading the documents

@dataclass
class Command:
    doc: str  # path relative to the repository
    line: int  # line of the document the command starts on
    argv: list[str]
    script: str = ""  # the whole text, for a block that is a script file

    def __str__(self):
        return f"{self.doc}:{self.line}: {self.script.splitlines()[0] + ' ...' if self.script else shlex.join(self.argv)}"


def documents():
    """README.md, then every docs/*.md page it links, in the order of their first link."""
    with open(os.path.join(REPO, "README.md")) as f:
        readme = f.read()
    linked = []
    for target in re.findall(r"\]\((docs/[^)#\s]+\.md)(?:#[^)]*)?\)", readme):
        if target not in linked and (os.path.exists(os.path.join(REPO, target)) or target not in OPTIONAL_DOCS):
            linked.append(target)
    return ["README.md"] + linked


def commands_of(doc):
    """The commands of a document's sh code blocks, in order."""
    with open(os.path.join(REPO, doc)) as f:
        text = f.read()
    found = []
    for block in re.finditer(r"^([ \t]*)```(?:sh|bash|shell)[ \t]*\n(.*?)^[ \t]*```", text, re.S | re.M):
        first_line = text[:block.start(2)].count("\n") + 1
        indent = len(block.group(1))
        body = "\n".join(line[indent:] if line[:indent].isspace() else line for line in block.group(2).splitlines())
        if body.lstrip().startswith("#!"):
            found.append(Command(doc, first_line, ["bash", "-n"], script=body))
            continue
        pending, start = "", None
        for number, line in enumerate(body.splitlines(), first_line):
            if start is None:
                start = number
            pending += line
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            found.extend(Command(doc, start, argv) for argv in split_and(pending))
            pending, start = "", None
    return found


def split_and(line):
    """The argument lists of a line: comments dropped, `a && b` as two (an && inside quotes is text)."""
    parts = [[]]
    for token in shlex.split(line, comments=True):
        if token == "&&":
            parts.append([])
        else:
            parts[-1].append(token)
    return [p for p in parts if p]


def all_commands():
    return [command for doc in documents() for command in commands_of(doc)]


# -----------------------------------------------------------------------------
# the scratch repository and its stand-ins

class Scratch:
    def __init__(self, root):
        self.root = str(root)
        self.repo = fresh_copy(os.path.join(self.root, "repo"))
        self.tools = os.path.join(self.root, "tools")
        self.env = script_env(HF_HOME=os.path.join(self.root, "hf_home"), HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1",
                              HOME=os.path.join(self.root, "home"))
        os.makedirs(self.env["HOME"], exist_ok=True)
        self.done = []  # documents already run
        self.make_stand_ins()

    def make_stand_ins(self):
        import shutil
        for name in ("shakespeare_char", "shakespeare"):  # what the prepare scripts would download
            shutil.copy(shakespeare_input(), os.path.join(self.repo, "data", name, "input.txt"))
        from helpers import EXAMPLES
        with open(os.path.join(self.repo, "data", "hellaswag", "hellaswag_val.jsonl"), "w") as f:
            f.writelines(json.dumps(example) + "\n" for example in EXAMPLES)
        save_gpt2_stand_in(os.path.join(self.env["HF_HOME"], "hub"))
        os.makedirs(self.tools)
        with open(os.path.join(self.tools, "with_hub_stand_in.py"), "w") as f:
            f.write(HUB_STAND_IN.format(text=shakespeare_input()))
        # train.py's default data set, which the README's FSDP command trains on ("prepare it first", it says)
        prepared = self.run([sys.executable, os.path.join(self.tools, "with_hub_stand_in.py"), "data/openwebtext/prepare.py"])
        assert prepared.returncode == 0, prepared.stderr

    def run(self, argv, timeout=TIMEOUT):
        return subprocess.run(argv, cwd=self.repo, capture_output=True, text=True, env=self.env, timeout=timeout)


def save_gpt2_stand_in(hub_cache):
    """A small random GPT-2 (GPT-2's vocabulary and positions, 2 layers of 32, 4 heads: --n_kv_head=4 divides them)
    where transformers looks for the hub's "gpt2" when offline: HF_HOME/hub/models--gpt2/snapshots/<revision>, refs/main naming it."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel
    revision = "0" * 40
    folder = os.path.join(hub_cache, "models--gpt2")
    torch.manual_seed(0)
    GPT2LMHeadModel(GPT2Config(n_layer=2, n_head=4, n_embd=32)).save_pretrained(os.path.join(folder, "snapshots", revision))
    os.makedirs(os.path.join(folder, "refs"), exist_ok=True)
    with open(os.path.join(folder, "refs", "main"), "w") as f:
        f.write(revision)


# Runs a prepare script with datasets.load_dataset answering from memory: tiny Shakespeare cut into
# documents, in the columns of the dataset asked for (FineWeb-Edu's metadata columns, OpenWebText's text).
HUB_STAND_IN = '''
import sys, runpy, datasets
text = open({text!r}).read()
docs = [text[i:i + 1500] for i in range(0, 300_000, 1500)]
def load_dataset(path, name=None, split=None, streaming=False, **kwargs):
    columns = {{"text": docs}}
    if "fineweb" in path:
        columns.update(id=[f"<urn:uuid:{{i}}>" for i in range(len(docs))], url=["https://example.org/"] * len(docs),
                       language=["en"] * len(docs), token_count=[len(d) // 4 for d in docs], score=[3.0] * len(docs))
    ds = datasets.Dataset.from_dict(columns)
    if streaming:
        ds = ds.to_iterable_dataset(num_shards=2)
    return ds if split else datasets.DatasetDict(train=ds)
datasets.load_dataset = load_dataset
script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''


# -----------------------------------------------------------------------------
# the handlers: how each kind of command runs here

TINY_MODEL = ["--n_layer=2", "--n_head=2", "--n_embd=32", "--block_size=32"]


def python_script(argv, name):
    return len(argv) >= 2 and argv[0] in ("python", "python3") and argv[1] == name


def torchrun_script(argv, name):
    return argv[0] == "torchrun" and name in argv


def script_args(argv, name):
    return argv[argv.index(name) + 1:]


# a script's own check of all its settings: (read_settings' nullable keys, the function), both of the script
SETTINGS_CHECKS = {"train.py": ((), "validate_settings"), "sample.py": (("top_k",), "check_settings"),
                   "bench.py": ((), "check_settings")}


class DocumentedSettingRefused(Exception):
    """A documented command whose own settings its script refuses: reported as that command's failure."""


def in_scratch(scratch, function, *args):
    """function(*args) in the scratch repository, where the commands run (config files, out_dir, folders)."""
    cwd = os.getcwd()
    os.chdir(scratch.repo)
    try:
        return function(*args)
    finally:
        os.chdir(cwd)


def script_settings(scratch, script, args, assigned=None):
    """A script's settings after these arguments (config files and overrides), read as the script reads them;
    `assigned` receives the names the arguments set."""
    from configurator import apply_overrides
    module = importlib.import_module(script.removesuffix(".py"))
    nullable = SETTINGS_CHECKS.get(script, ((), None))[0]
    return in_scratch(scratch, apply_overrides, dict(vars(module)), args, nullable, assigned)


def train_settings(scratch, args):
    """train.py's settings after these arguments (config files and overrides), read as train.py reads them."""
    return script_settings(scratch, "train.py", args)


def shrunk(scratch, script, args, tiny):
    """
    A command's arguments with the test's tiny overrides after them. An override of a setting the command leaves
    unset hides nothing the docs say; one of a setting it sets (on its line or in its config file) would hide the
    documented value, so the script's own check (SETTINGS_CHECKS) first takes the command's settings as written
    (DocumentedSettingRefused if it refuses them). A script without such a check keeps every value its command sets.
    """
    if not tiny:
        return list(args)
    assigned = set()
    settings = script_settings(scratch, script, args, assigned)
    hidden = assigned & {override[2:].split("=", 1)[0] for override in tiny}
    if not hidden:
        return [*args, *tiny]
    if script not in SETTINGS_CHECKS:
        return [*args, *(override for override in tiny if override[2:].split("=", 1)[0] not in hidden)]
    module = importlib.import_module(script.removesuffix(".py"))
    try:
        in_scratch(scratch, getattr(module, SETTINGS_CHECKS[script][1]), SimpleNamespace(**settings))
    except UserError as e:
        raise DocumentedSettingRefused(f"{script} refuses the command's own settings (before the test shrinks "
                                       f"{', '.join(sorted(hidden))}): {e}") from None
    return [*args, *tiny]


def tiny_train_args(scratch, args, processes=1):
    """Overrides that make a train.py command a few steps of a tiny model, keeping what it is: the data set,
    where it starts from (scratch, a checkpoint, GPT-2, and for init_from=auto whichever it finds) and its mode
    (DDP, FSDP, eval_only). A new model from scratch gets tiny shapes; a resume takes its checkpoint's (a resume
    that asked for other shapes, a config file's included, would be refused), and a pretrained model keeps its own."""
    s = train_settings(scratch, args)
    from checkpoint import current_checkpoint
    checkpoint = current_checkpoint(os.path.join(scratch.repo, s["out_dir"], "ckpt.pt"))  # ckpt.pt, or FSDP's ckpt.dcp/
    has_checkpoint = checkpoint is not None
    resumes = s["init_from"] == "resume" or (s["init_from"] == "auto" and has_checkpoint)
    source = "resume" if resumes else s["auto_from"] if s["init_from"] == "auto" else s["init_from"]
    extra = ["--device=cpu", "--compile=False", "--eval_iters=1", "--log_interval=1", "--batch_size=2",
             f"--gradient_accumulation_steps={processes}", "--warmup_iters=1"]
    steps = 4 if resumes else 2  # a resume trains two more steps
    extra += [f"--max_iters={steps}", f"--lr_decay_iters={steps}", "--eval_interval=2"]
    if s["hellaswag_interval"]:
        extra += ["--hellaswag_interval=2", "--hellaswag_max_examples=4"]
    if source == "resume":
        return extra + checkpoint_shapes(checkpoint)
    if source == "scratch":
        extra += TINY_MODEL
    else:  # a pretrained model: its shapes, a shorter context
        extra.append("--block_size=32")
    # the command's own attention settings, cut to the tiny models (2 layers, 2 or 4 heads, 32 positions)
    if s["n_kv_head"] is not None:
        extra.append(f"--n_kv_head={min(s['n_kv_head'], 2)}")
    if isinstance(s["window"], (tuple, list)):
        extra.append(f"--window={tuple(s['window'][-2:])}")  # one entry per layer: the last two of them
    elif s["window"]:
        extra.append(f"--window={min(s['window'], 16)}")
    return extra


def checkpoint_shapes(path):
    """Overrides that restate the architecture of the checkpoint at `path` (a file, or a sharded folder whose
    checkpoint.json holds everything but the tensors), over those of the command's config."""
    import torch
    from durable import SHARDED_INDEX_NAME
    from checkpoint import ARCHITECTURE_SETTINGS
    if os.path.isdir(path):
        with open(os.path.join(path, SHARDED_INDEX_NAME)) as f:
            saved = json.load(f)["model_args"]
    else:
        saved = torch.load(path, map_location="cpu", weights_only=True, mmap=True)["model_args"]
    return [f"--{key}={tuple(saved[key]) if isinstance(saved[key], list) else saved[key]!r}"
            for key in ARCHITECTURE_SETTINGS if key in saved]


def run_train(scratch, argv):
    args = script_args(argv, "train.py")
    return [scratch.run([sys.executable, "train.py", *shrunk(scratch, "train.py", args, tiny_train_args(scratch, args))])]


def torchrun_argv(argv, script, script_argv, processes, **launcher):
    """A torchrun command as `python -m torch.distributed.run`, with processes per node and launcher options replaced,
    running script with script_argv."""
    split = argv.index(script)
    options = [a for a in argv[1:split] if a.split("=")[0].lstrip("-") not in {"nproc_per_node", *launcher}]
    options += [f"--nproc_per_node={processes}"] + [f"--{k}={v}" for k, v in launcher.items()]
    return [sys.executable, "-m", "torch.distributed.run", *options, script, *script_argv]


def run_torchrun(scratch, argv):
    script = "train.py" if "train.py" in argv else "eval_hellaswag.py"
    args = script_args(argv, script)
    if script == "train.py":
        script_argv = shrunk(scratch, script, args, tiny_train_args(scratch, args, processes=2))
    else:
        script_argv = shrunk(scratch, script, args, EVAL_TINY)
    if not any(a.startswith("--nnodes") for a in argv):
        return [scratch.run(torchrun_argv(argv, script, script_argv, 2))]
    # two nodes: both launches on this machine, one process each, meeting at a free local port
    port = free_port()
    nodes = [subprocess.Popen(torchrun_argv(argv, script, script_argv, 1, node_rank=rank, master_addr="127.0.0.1", master_port=port),
                              cwd=scratch.repo, env=scratch.env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for rank in (0, 1)]
    results = []
    for node in nodes:
        try:
            out, _ = node.communicate(timeout=TIMEOUT)
        except subprocess.TimeoutExpired:
            for other in nodes:
                other.kill()
            out, _ = node.communicate(timeout=30)
        results.append(subprocess.CompletedProcess(node.args, node.returncode, out, ""))
    return results


def run_with_overrides(script, extra):
    def run(scratch, argv):
        return [scratch.run([sys.executable, script, *shrunk(scratch, script, script_args(argv, script), extra)])]
    return run


SAMPLE_TINY = ["--device=cpu", "--num_samples=1", "--max_new_tokens=8"]
EVAL_TINY = ["--device=cpu", "--max_examples=4"]
BENCH_TINY = [*TINY_MODEL, "--device=cpu", "--batch_size=2", "--steps=1", "--warmup_steps=1", "--seq_lens=(64, 128)",
              "--bench_window=16", "--attn_repeats=1", "--prompt_len=4", "--new_tokens=8", "--gen_batch_size=2", "--gen_repeats=1"]


def run_prepare(scratch, argv):
    script = argv[1]
    if script.startswith(("data/openwebtext/", "data/fineweb_edu/")):  # the hub's data sets: the stand-in answers
        extra = ["--val_tokens=2000"] if "fineweb_edu" in script else []
        return [scratch.run([sys.executable, os.path.join(scratch.tools, "with_hub_stand_in.py"), *argv[1:], *extra])]
    return [scratch.run([sys.executable, *argv[1:]])]


def check_script(scratch, command):
    path = os.path.join(scratch.root, "script.sh")
    with open(path, "w") as f:
        f.write(command.script)
    return [scratch.run(["bash", "-n", path])]


@dataclass
class Handler:
    name: str
    claims: Callable[[list[str]], bool]
    run: Callable  # (scratch, argv) -> [CompletedProcess]


HANDLERS = [
    Handler("data preparation", lambda a: len(a) >= 2 and a[0] == "python" and re.fullmatch(r"data/\w+/prepare\.py", a[1]) is not None,
            run_prepare),
    Handler("train.py", lambda a: python_script(a, "train.py"), run_train),
    Handler("torchrun", lambda a: torchrun_script(a, "train.py") or torchrun_script(a, "eval_hellaswag.py"), run_torchrun),
    Handler("sample.py", lambda a: python_script(a, "sample.py"), run_with_overrides("sample.py", SAMPLE_TINY)),
    Handler("export_hf.py", lambda a: python_script(a, "export_hf.py"), run_with_overrides("export_hf.py", [])),
    Handler("eval_hellaswag.py", lambda a: python_script(a, "eval_hellaswag.py"), run_with_overrides("eval_hellaswag.py", EVAL_TINY)),
    Handler("bench.py", lambda a: python_script(a, "bench.py"), run_with_overrides("bench.py", BENCH_TINY)),
    Handler("plot.py", lambda a: python_script(a, "plot.py"), run_with_overrides("plot.py", [])),
]

# commands that cannot run here, each with its reason
CANNOT_RUN = [
    (lambda a: a[:2] == ["pip", "install"], "installs packages into the environment the tests run in (.ci/run does it)"),
    (lambda a: a[:3] == ["python", "-m", "pytest"], "the test suite itself"),
    (lambda a: a[:2] == ["git", "clone"], "downloads a repository from GitHub (no network)"),
    (lambda a: a[0] == "sbatch", "needs a SLURM cluster (the batch script it submits is checked with bash -n)"),
    (lambda a: python_script(a, "experiments/gpu_check.py") and "--dry_run" not in a,
     "needs a CUDA GPU (its --dry_run runs the same code paths)"),
    (lambda a: python_script(a, "experiments/gpu_check.py") and "--dry_run" in a,
     "runs in full in tests/test_gpu_check.py, which also checks its reports (2 minutes on 2 cores: not run twice)"),
]


# what a command must print (stdout or stderr), besides exiting 0: (test on the Command, text)
EXPECTED_OUTPUT = [
    (lambda c: python_script(c.argv, "sample.py") and "--checkpoint=last" in c.argv, "ckpt.pt (step"),
    (lambda c: python_script(c.argv, "export_hf.py") and "--checkpoint=best" in c.argv, "best.pt (step"),
    (lambda c: python_script(c.argv, "sample.py") and "--out_dir=out-fsdp-async" in c.argv, "best.dcp (step"),
    # the fine-tune of docs/training.md is relaunched in fault_tolerance.md: the same command resumes it
    (lambda c: c.doc == "docs/training.md" and c.argv == ["python", "train.py", "config/finetune_shakespeare.py"], "init_from=gpt2"),
    (lambda c: c.doc == "docs/fault_tolerance.md" and c.argv == ["python", "train.py", "config/finetune_shakespeare.py"],
     "init_from=resume at step 2"),
    (lambda c: python_script(c.argv, "train.py") and "--auto_from=gpt2" in c.argv, "init_from=gpt2"),
]


def expected_output(command):
    return [text for claims, text in EXPECTED_OUTPUT if not command.script and claims(command)]


def handler_for(command):
    if command.script:
        return Handler("script file (bash -n)", lambda a: True, None)
    return next((h for h in HANDLERS if h.claims(command.argv)), None)


def cannot_run_reason(command):
    return next((reason for claims, reason in CANNOT_RUN if not command.script and claims(command.argv)), None)


# -----------------------------------------------------------------------------
# fast: what the documents hold

def test_every_command_is_handled():
    commands = all_commands()
    assert len(commands) > 20, "the documents' commands were not found"
    unhandled = [str(c) for c in commands if handler_for(c) is None and cannot_run_reason(c) is None]
    assert not unhandled, ("commands in the docs that tests/test_readme.py does not know how to run (add a Handler, "
                           "or a CANNOT_RUN entry with the reason):\n" + "\n".join(unhandled))
    both = [str(c) for c in commands if handler_for(c) is not None and cannot_run_reason(c) is not None]
    assert not both, both
    for claims, text in EXPECTED_OUTPUT:  # a command renamed in the docs must not drop its check silently
        assert any(claims(c) for c in commands if not c.script), f"no command of the docs is expected to print {text!r}"


def test_extraction():
    readme = commands_of("README.md")
    lines = [shlex.join(c.argv) for c in readme]
    for four in ("python data/shakespeare/prepare.py", "python train.py config/train_rope.py",
                 "torchrun --standalone --nproc_per_node=8 train.py --fsdp=True", "python sample.py --init_from=gpt2"):
        assert four in lines, f"the user's command {four!r} is not in the README's sh blocks"
    suite = next(line for line in lines if line.startswith("python -m pytest"))
    with open(os.path.join(REPO, ".ci", "run")) as f:
        assert suite in f.read().splitlines(), f".ci/run does not run the README's test command {suite!r}"
    assert split_and("a --x='1 && 2' && b   # c && d") == [["a", "--x=1 && 2"], ["b"]]


def test_extraction_of_blocks(tmp_path, monkeypatch):
    doc = tmp_path / "doc.md"
    doc.write_text("text `python not_this.py`\n\n```sh\npython a.py --x=1 \\\n    --y=2   # why\n\n# only a comment\n"
                   "pip install x && python b.py\n```\n\n```python\nprint('not a command')\n```\n\n"
                   "  ```sh\n  #!/bin/bash\n  echo hi\n  ```\n")
    monkeypatch.setattr(sys.modules[__name__], "REPO", str(tmp_path))
    found = commands_of("doc.md")
    assert [(c.line, c.argv) for c in found if not c.script] == [(4, ["python", "a.py", "--x=1", "--y=2"]),
                                                                (8, ["pip", "install", "x"]), (8, ["python", "b.py"])]
    assert found[-1].script == "#!/bin/bash\necho hi"


def test_shrinking_never_hides_a_documented_value_unchecked():
    """A documented value the tiny overrides would replace is first checked by the script's own check; a script
    without one keeps the documented value."""
    here = SimpleNamespace(repo=REPO)
    assert shrunk(here, "sample.py", ["--start=ROMEO:"], SAMPLE_TINY) == ["--start=ROMEO:", *SAMPLE_TINY]
    assert shrunk(here, "sample.py", ["--num_samples=2"], SAMPLE_TINY) == ["--num_samples=2", *SAMPLE_TINY]
    with pytest.raises(DocumentedSettingRefused, match="num_samples"):
        shrunk(here, "sample.py", ["--num_samples=0"], SAMPLE_TINY)
    with pytest.raises(DocumentedSettingRefused, match="gen_repeats"):
        shrunk(here, "bench.py", ["--gen_repeats=0"], BENCH_TINY)
    with pytest.raises(DocumentedSettingRefused, match="min_lr"):  # a config file's values are documented values too
        shrunk(here, "train.py", ["config/train_shakespeare_char_cpu.py", "--min_lr=1.0"], ["--max_iters=2"])
    assert shrunk(here, "eval_hellaswag.py", ["--max_examples=10"], EVAL_TINY) == ["--max_examples=10", "--device=cpu"]


def test_readme_is_a_front_page():
    size = os.path.getsize(os.path.join(REPO, "README.md"))
    assert size <= README_LIMIT, f"README.md is {size:,} bytes: move details to docs/ (limit {README_LIMIT:,})"
    docs = documents()
    on_disk = {f"docs/{name}" for name in os.listdir(os.path.join(REPO, "docs")) if name.endswith(".md")}
    assert on_disk <= set(docs), f"pages in docs/ that the README does not link: {sorted(on_disk - set(docs))}"
    for doc in docs:  # every image and every local link of every page points at a file that is there
        with open(os.path.join(REPO, doc)) as f:
            text = f.read()
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text):
            path = os.path.normpath(os.path.join(REPO, os.path.dirname(doc), target))
            if not target.startswith(("http://", "https://")) and os.path.relpath(path, REPO) not in OPTIONAL_DOCS:
                assert os.path.exists(path), f"{doc} links {target}, which is not in the repository"


# -----------------------------------------------------------------------------
# slow: every command runs

@pytest.fixture(scope="module")
def scratch(tmp_path_factory):
    if not os.path.isdir(os.path.join(SHARED, "tiktoken_cache")) and "TIKTOKEN_CACHE_DIR" not in os.environ:
        pytest.skip("GPT-2's BPE files are not available offline")
    return Scratch(tmp_path_factory.mktemp("readme"))


def run_document(scratch, doc):
    """Runs every command of doc, and first the documents before it (once each). Returns the failures."""
    failures = []
    for earlier in documents():
        if earlier in scratch.done:
            continue
        for command in commands_of(earlier):
            if cannot_run_reason(command):
                continue
            handler = handler_for(command)
            assert handler is not None, f"no handler for {command}"
            try:
                results = check_script(scratch, command) if command.script else handler.run(scratch, command.argv)
            except DocumentedSettingRefused as e:
                failures.append((earlier, f"{command}\n  {e}"))
                continue
            for result in results:
                missing = [text for text in expected_output(command) if text not in result.stdout + result.stderr]
                if result.returncode != 0 or missing:
                    failures.append((earlier, f"{command}\n  ran: {shlex.join(map(str, result.args))}\n  exit {result.returncode}"
                                              + "".join(f", did not print {text!r}" for text in missing) +
                                              f"\n{result.stdout[-2000:]}\n{result.stderr[-3000:]}"))
        scratch.done.append(earlier)
        if earlier == doc:
            break
    return [text for d, text in failures if d == doc] + [f"(an earlier page) {text}" for d, text in failures if d != doc]


@pytest.mark.slow
@pytest.mark.parametrize("doc", documents())
def test_document_commands_run(scratch, doc):
    failures = run_document(scratch, doc)
    assert not failures, f"{len(failures)} command(s) of {doc} failed:\n\n" + "\n\n".join(failures)
    if doc == "README.md":  # what the user's four commands and the quick start leave behind
        import torch
        checkpoint = torch.load(os.path.join(scratch.repo, "out-rope", "ckpt.pt"), weights_only=True)
        assert checkpoint["model_args"]["rope"] is True and checkpoint["config"]["dataset"] == "shakespeare"
        with open(os.path.join(scratch.repo, "out", "metrics.jsonl")) as f:
            records = [json.loads(line) for line in f]
        assert any(r.get("world_size") == 2 for r in records)
        assert os.path.getsize(os.path.join(scratch.repo, "quick_start.png")) > 10_000
