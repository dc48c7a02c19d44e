"""configurator.apply_overrides: --key=value and config files over a script's module-level settings."""

import os
import runpy

import pytest

from common import UserError
from configurator import apply_overrides
from helpers import REPO, assert_user_error, run_script


def settings(**extra):
    """A stand-in for a script's globals(): settings of every supported type, plus the things a module
    also holds (a module, a function, private names) that are not settings."""
    import os
    namespace = dict(
        out_dir="out", n_layer=12, learning_rate=6e-4, compile=False, bias=True, dataset="openwebtext",
        window=None, n_kv_head=None, betas=(0.9, 0.95),
        os=os, helper=lambda: None, _private=1, __name__="__main__",
    )
    namespace.update(extra)
    return namespace


def config_file(tmp_path, source, name="cfg.py"):
    path = tmp_path / name
    path.write_text(source)
    return str(path)


# -----------------------------------------------------------------------------
# --key=value

def test_literal_values():
    ns = settings()
    config = apply_overrides(ns, ["--n_layer=2", "--learning_rate=1e-3", "--compile=True", "--bias=False",
                                  "--betas=(0.8, 0.9)"])
    assert ns["n_layer"] == 2 and type(ns["n_layer"]) is int
    assert ns["learning_rate"] == 1e-3
    assert ns["compile"] is True and ns["bias"] is False
    assert ns["betas"] == (0.8, 0.9)
    # the returned dict: exactly the settings, with their new values
    assert config == dict(out_dir="out", n_layer=2, learning_rate=1e-3, compile=True, bias=False,
                          dataset="openwebtext", window=None, n_kv_head=None, betas=(0.8, 0.9))


def test_string_fallback():
    ns = settings()
    apply_overrides(ns, ["--out_dir=/tmp/some dir/out-x", "--dataset=shakespeare_char", "--dataset='quoted'"])
    assert ns["out_dir"] == "/tmp/some dir/out-x"
    assert ns["dataset"] == "quoted"  # a Python string literal is read as the string it spells
    apply_overrides(ns, ["--dataset=shakespeare_char"])
    assert ns["dataset"] == "shakespeare_char"  # not a literal: taken as is


def test_value_containing_equals_sign():
    ns = settings()
    apply_overrides(ns, ["--out_dir=a=b"])
    assert ns["out_dir"] == "a=b"


def test_bare_flag_sets_true():
    ns = settings()
    apply_overrides(ns, ["--compile"])
    assert ns["compile"] is True


def test_bare_flag_on_non_boolean_is_an_error():
    with pytest.raises(UserError, match="n_layer"):
        apply_overrides(settings(), ["--n_layer"])


def test_int_accepted_for_float():
    ns = settings()
    apply_overrides(ns, ["--learning_rate=1"])
    assert ns["learning_rate"] == 1.0 and type(ns["learning_rate"]) is float


@pytest.mark.parametrize("arg, key", [
    ("--n_layer=2.5", "n_layer"),       # float for an int
    ("--n_layer=True", "n_layer"),      # bool is not an int here
    ("--compile=1", "compile"),         # int for a bool
    ("--learning_rate=fast", "learning_rate"),  # string for a float
])
def test_wrong_type(arg, key):
    ns = settings()
    before = dict(ns)
    with pytest.raises(UserError, match=key):
        apply_overrides(ns, [arg])
    assert ns[key] == before[key]  # nothing changed


def test_unknown_key_names_the_closest():
    with pytest.raises(UserError) as info:
        apply_overrides(settings(), ["--n_layr=2"])
    message = str(info.value)
    assert "--n_layr" in message and "--n_layer" in message
    assert "\n" not in message


def test_unknown_key_far_from_everything():
    with pytest.raises(UserError, match="zzzzqqq"):
        apply_overrides(settings(), ["--zzzzqqq=1"])


@pytest.mark.parametrize("name", ["os", "helper", "_private"])
def test_non_settings_are_not_keys(name):
    """Modules, functions and private names in the namespace cannot be overridden."""
    with pytest.raises(UserError):
        apply_overrides(settings(), [f"--{name}=1"])


@pytest.mark.parametrize("arg, expected", [
    ("--window=(4, None)", (4, None)),
    ("--window=128", 128),
    ("--window=[64, 128]", [64, 128]),
    ("--n_kv_head=4", 4),
])
def test_none_default_accepts_anything(arg, expected):
    ns = settings()
    apply_overrides(ns, [arg])
    key = arg[2:].split("=")[0]
    assert ns[key] == expected


def test_later_arguments_win():
    ns = settings()
    apply_overrides(ns, ["--n_layer=2", "--n_layer=3"])
    assert ns["n_layer"] == 3


# -----------------------------------------------------------------------------
# config files

def test_config_file(tmp_path):
    ns = settings()
    path = config_file(tmp_path, "n_layer = 4\nlearning_rate = 2  # int for a float\nwindow = (8, None)\n")
    apply_overrides(ns, [path, "--n_layer=6"])
    assert ns["n_layer"] == 6  # the command line after the file wins
    assert ns["learning_rate"] == 2.0 and type(ns["learning_rate"]) is float
    assert ns["window"] == (8, None)


def test_config_file_with_import(tmp_path):
    ns = settings()
    path = config_file(tmp_path, "import time\nimport math as _m\nout_dir = 'out-%d' % int(time.time() > 0)\n"
                                 "learning_rate = _m.sqrt(4.0) / 1000\n")
    apply_overrides(ns, [path])
    assert ns["out_dir"] == "out-1"
    assert ns["learning_rate"] == 0.002


def test_config_file_missing(tmp_path):
    with pytest.raises(UserError, match="does not exist"):
        apply_overrides(settings(), [str(tmp_path / "nope.py")])


def test_config_file_that_raises(tmp_path):
    path = config_file(tmp_path, "n_layer = 1 / 0\n")
    with pytest.raises(UserError) as info:
        apply_overrides(settings(), [path])
    assert "ZeroDivisionError" in str(info.value) and path in str(info.value)


def test_config_file_syntax_error(tmp_path):
    path = config_file(tmp_path, "n_layer = = 2\n")
    with pytest.raises(UserError, match="SyntaxError"):
        apply_overrides(settings(), [path])


def test_config_file_unknown_key(tmp_path):
    path = config_file(tmp_path, "n_layers = 4\n")
    with pytest.raises(UserError) as info:
        apply_overrides(settings(), [path])
    assert "n_layers" in str(info.value) and "--n_layer" in str(info.value)


def test_config_file_wrong_type(tmp_path):
    path = config_file(tmp_path, "n_layer = '4'\n")
    with pytest.raises(UserError, match="n_layer"):
        apply_overrides(settings(), [path])


# -----------------------------------------------------------------------------
# through a real script

def test_train_py_unknown_key_is_one_line():
    assert_user_error(run_script("train.py", "--n_layr=2", timeout=120), "n_layer", "n_layr")


def test_train_py_missing_config_file(tmp_path):
    result = run_script("train.py", str(tmp_path / "config_that_is_not_there.py"), f"--out_dir={tmp_path / 'out'}", timeout=120)
    assert_user_error(result, "does not exist")
    assert not (tmp_path / "out").exists()


# -----------------------------------------------------------------------------
# a config that builds on another finds it next to itself, from any working directory

def test_config_file_sees_its_own_path(tmp_path, monkeypatch):
    configs, elsewhere = tmp_path / "configs", tmp_path / "elsewhere"
    configs.mkdir()
    elsewhere.mkdir()
    (configs / "base.py").write_text("n_layer = 3\n")
    config_file(configs, "import os\nexec(open(os.path.join(os.path.dirname(__file__), 'base.py')).read())\n"
                         "out_dir = os.path.basename(__file__)\n", name="child.py")
    monkeypatch.chdir(elsewhere)
    ns = settings(__file__="/the/script.py")
    apply_overrides(ns, [os.path.join("..", "configs", "child.py")])  # a relative path works too
    assert ns["n_layer"] == 3 and ns["out_dir"] == "child.py"
    assert ns["__file__"] == "/the/script.py"  # the script's own __file__ is back
    ns = settings()
    apply_overrides(ns, [str(configs / "child.py")])
    assert "__file__" not in ns  # and none is left where there was none
    ns = settings(__file__="/the/script.py")
    with pytest.raises(UserError, match="ZeroDivisionError"):
        apply_overrides(ns, [config_file(configs, "n_layer = 1 / 0\n", name="bad.py")])
    assert ns["__file__"] == "/the/script.py"  # also after a config that fails


# config -> the settings it must give on a CPU and on a GPU (GPU-sized: 6 x 384, block 256)
BPE_CONFIGS = {
    "train_shakespeare.py": ({}, {}),
    "train_rope.py": (dict(rope=True), dict(rope=True)),
    "train_gqa.py": (dict(n_kv_head=2), dict(n_kv_head=2)),
    "train_window.py": (dict(window=16), dict(window=64)),
    "train_rope_gqa_window.py": (dict(rope=True, n_kv_head=2, window=(16, 16, 16, None)),
                                 dict(rope=True, n_kv_head=2, window=(64, 64, 64, 64, 64, None))),
}


@pytest.fixture(scope="module")
def train_defaults():
    """train.py's settings with their defaults, from its own module-level code (main() does not run)."""
    return runpy.run_path(os.path.join(REPO, "train.py"), run_name="train_defaults")


@pytest.mark.parametrize("cuda", [False, True], ids=["cpu", "cuda"])
@pytest.mark.parametrize("name", list(BPE_CONFIGS))
def test_variant_configs_train_on_bpe_shakespeare_from_any_directory(train_defaults, tmp_path, monkeypatch, name, cuda):
    import torch
    from model import GPTConfig, PADDED_GPT2_VOCAB_SIZE
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)  # the configs size the model for the device
    monkeypatch.chdir(tmp_path)
    ns = dict(train_defaults)
    config = apply_overrides(ns, [os.path.join(REPO, "config", name)])
    assert config["dataset"] == "shakespeare"  # what python data/shakespeare/prepare.py writes
    sizes = dict(n_layer=6, n_embd=384, block_size=256) if cuda else dict(n_layer=4, n_embd=128, block_size=64)
    flags = dict(dict(rope=False, n_kv_head=None, window=None), **BPE_CONFIGS[name][cuda])
    assert {k: config[k] for k in [*sizes, *flags]} == {**sizes, **flags}
    # a model these settings describe is valid (heads divide, rope's head size is even)
    GPTConfig(**{k: config[k] for k in ns["MODEL_SETTINGS"]}, vocab_size=PADDED_GPT2_VOCAB_SIZE)


def test_none_only_where_a_setting_can_be_switched_off():
    ns = settings(top_k=200)
    with pytest.raises(UserError, match="n_layer cannot be None"):
        apply_overrides(ns, ["--n_layer=None"])
    assert ns["n_layer"] == 12
    with pytest.raises(UserError, match="top_k cannot be None"):
        apply_overrides(ns, ["--top_k=None"])
    apply_overrides(ns, ["--top_k=None"], nullable={"top_k"})
    assert ns["top_k"] is None


def test_text_setting_takes_numbers_as_text():
    ns = settings()
    apply_overrides(ns, ["--out_dir=2024", "--dataset=42"])
    assert ns["out_dir"] == "2024" and ns["dataset"] == "42"


@pytest.mark.parametrize("script, left_out", [("train.py", {"vocab_size"}), ("bench.py", set())])
def test_model_settings_are_gptconfig_fields_with_its_defaults(script, left_out):
    """The model settings a script lists in its config block are GPTConfig's fields with GPTConfig's defaults
    (train.py takes vocab_size from the data): a new field fails here until it is listed."""
    from dataclasses import fields
    from model import GPTConfig
    namespace = runpy.run_path(os.path.join(REPO, script), run_name="settings_only")
    expected = {f.name: f.default for f in fields(GPTConfig) if f.name not in left_out}
    listed = namespace["MODEL_SETTINGS"]
    assert sorted(listed) == sorted(expected) and len(set(listed)) == len(listed)
    for name, default in expected.items():
        assert namespace[name] == default and type(namespace[name]) is type(default), name
