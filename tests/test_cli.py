"""The command line and the package layout: flags derived from configs, TOML overrides, one-way imports."""

from __future__ import annotations

import ast
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from nanomind.config import arg, parse

PACKAGE = Path(__file__).resolve().parents[1] / "nanomind"

# DESIGN.md rule 11: config/tokenizer -> model -> data/checkpoint/generate -> loop -> stages -> cli
LAYERS = {
    "nanomind.config": 0, "nanomind.jsonl": 0, "nanomind.device": 0, "nanomind.tokenizer": 1,
    "nanomind.model": 2, "nanomind.data": 3, "nanomind.checkpoint": 3, "nanomind.generate": 3,
    "nanomind.speculative": 3,
    "nanomind.conversations": 3, "nanomind.openai_protocol": 1, "nanomind.engine": 4, "nanomind.serve": 5,
    "nanomind.train.loop": 4, "nanomind.train.losses": 4, "nanomind.train.rl_losses": 4, "nanomind.rewards": 4,
    "nanomind.eval": 4, "nanomind.eval_choice": 4,
    "nanomind.report": 4, "nanomind.plot": 4, "nanomind.corpus": 1,
    "nanomind.train.pretrain": 5, "nanomind.train.sft": 5, "nanomind.chat": 5,
    "nanomind.train.dpo": 5, "nanomind.train.distill": 5, "nanomind.merge_lora": 5, "nanomind.train.logprobs": 4,
    "nanomind.train.reward_model": 5, "nanomind.train.grpo": 5, "nanomind.rl_demo": 6,
    "nanomind.export": 5, "nanomind.export_gguf": 5,
    "nanomind.demo_data": 5, "nanomind.demo": 6, "nanomind.cli": 7, "nanomind.__main__": 7,
}  # fmt: skip


def layer(module: str) -> int:
    for prefix in sorted(LAYERS, key=len, reverse=True):
        if module == prefix or module.startswith(prefix + "."):
            return LAYERS[prefix]
    raise AssertionError(f"{module} has no layer in LAYERS: add it")


def test_imports_point_one_way():
    wrong = []
    for path in PACKAGE.rglob("*.py"):
        module = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts).removesuffix(".__init__")
        if module == "nanomind":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("nanomind"):
                targets = [node.module]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names if a.name.startswith("nanomind")]
            else:
                continue
            wrong += [f"{module} -> {t}" for t in targets if t != "nanomind" and layer(t) > layer(module)]
    assert wrong == []


def test_help_is_instant_and_does_not_import_torch():
    code = "import sys; from nanomind.cli import main; main(['--help']); assert 'torch' not in sys.modules"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    for command in ("demo", "tokenizer train", "prepare", "pretrain", "generate"):
        assert f"  {command} " in out


def test_pretrain_help_lists_every_flag_and_preset_sizes():
    out = subprocess.run([sys.executable, "-m", "nanomind", "pretrain", "--help"], capture_output=True, text=True)
    assert out.returncode == 0
    for flag in ("--data", "--preset", "--steps", "--batch-size", "--seq-len", "--lr", "--resume", "--dtype", "--seed"):
        assert flag in out.stdout
    assert "minimind-26m 26.9M" in out.stdout  # parameter count at vocab 6400, hand-computed in test_model


def test_unknown_command_is_a_clear_error():
    out = subprocess.run([sys.executable, "-m", "nanomind", "pretrian"], capture_output=True, text=True)
    assert out.returncode == 2 and "unknown command 'pretrian'" in out.stderr
    out = subprocess.run([sys.executable, "-m", "nanomind", "eval"], capture_output=True, text=True)
    assert out.returncode == 2 and "eval ppl, eval choice, eval compare" in out.stderr


def test_a_missing_input_file_is_a_message_not_a_traceback(tmp_path, tokenizer_dir):
    from nanomind import checkpoint
    from nanomind.model import Transformer, preset

    ckpt = checkpoint.save(tmp_path / "run", 0, Transformer(preset("debug", vocab_size=400)), tokenizer_dir)
    missing = str(tmp_path / "nope.jsonl")
    common = ["--init", str(ckpt), "--data", missing, "--seq-len", "64"]
    for command in (["reward", "train"], ["grpo", "--max-new-tokens", "8"]):
        out = subprocess.run([sys.executable, "-m", "nanomind", *command, *common], capture_output=True, text=True,
                             cwd=tmp_path)  # fmt: skip
        assert out.returncode == 2, out.stderr
        assert out.stderr.strip().endswith(f"No such file or directory: '{missing}'") and "Traceback" not in out.stderr


@dataclass
class Example:
    data: list[str] = arg(help="inputs")
    steps: int = arg(10, "steps")
    lr: float = arg(1e-3, "learning rate")
    compile: bool = arg(False, "compile")
    name: str = arg("x", "name", choices=["x", "y"])


def test_flags_override_toml_which_overrides_defaults(tmp_path):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = 50\nlr = 0.5\ndata = ["a.jsonl"]\n')
    cfg = parse(Example, ["--config", str(toml), "--lr", "0.1", "--compile"], "test")
    assert cfg == Example(data=["a.jsonl"], steps=50, lr=0.1, compile=True, name="x")
    assert parse(Example, ["--data", "b", "c"], "test") == Example(data=["b", "c"])


def test_config_errors_name_the_problem(tmp_path, capsys):
    toml = tmp_path / "bad.toml"
    toml.write_text("stepz = 5\n")
    with pytest.raises(SystemExit):
        parse(Example, ["--config", str(toml), "--data", "a"], "test")
    assert "unknown option(s) ['stepz']" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(Example, [], "test")
    assert "missing required option(s): --data" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse(Example, ["--data", "a", "--name", "z"], "test")
    assert "invalid choice: 'z'" in capsys.readouterr().err


def test_toml_values_are_type_checked(tmp_path, capsys):
    toml = tmp_path / "run.toml"
    toml.write_text('steps = "20"\ndata = ["a"]\n')
    with pytest.raises(SystemExit):
        parse(Example, ["--config", str(toml)], "test")
    assert "steps must be int, got '20'" in capsys.readouterr().err
    toml.write_text('data = "one.jsonl"\nlr = 1\n')  # a lone string becomes a list; an int is a fine float
    assert parse(Example, ["--config", str(toml)], "test") == Example(data=["one.jsonl"], lr=1.0)
