"""Directory checkpoints: model.safetensors + config.json (+ tokenizer files, + train_state.pt for resuming).

A model with LoRA adapters (model/lora.py) saves its frozen base weights in model.safetensors and the adapter
alone, in the PEFT layout, in `adapter/`; loading such a checkpoint puts the adapter back on.

A checkpoint is written into a temporary directory and renamed into place, so a crash never leaves a
half-written directory that looks valid. Loading needs nothing but the directory.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import time
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from nanomind.model import ModelConfig, Transformer, lora
from nanomind.model.reward import RewardModel

ADAPTER_DIR = "adapter"

STEP_DIR = re.compile(r"^step_(\d+)$")


def step_dirs(run_dir: str | Path) -> list[Path]:
    """Finished checkpoints of a run, oldest first."""
    run = Path(run_dir)
    if not run.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in run.iterdir() if (m := STEP_DIR.match(p.name)) and p.is_dir()]
    return [p for _, p in sorted(found)]


def resolve(path: str | Path) -> Path:
    """A checkpoint directory, or a run directory (its newest checkpoint)."""
    p = Path(path)
    if (p / "model.safetensors").is_file():
        return p
    dirs = step_dirs(p)
    if not dirs:
        raise ValueError(f"no checkpoint found at {p} (expected model.safetensors or step_* directories)")
    return dirs[-1]


def save(
    run_dir: str | Path,
    step: int,
    model: Transformer,
    tokenizer_dir: str | Path | None = None,
    train_state: dict[str, Any] | None = None,
    keep_last: int = 0,
    info: dict[str, Any] | None = None,
    weights: dict[str, torch.Tensor] | None = None,
) -> Path:
    """Write run_dir/step_NNNNNNN atomically; keep only the newest `keep_last` (0 = all). `weights`: the full
    state dict when `model` is sharded (FSDP), gathered by the caller; else model.state_dict() is written."""
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    final = run / f"step_{step:07d}"
    tmp = run / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    weights = model.state_dict() if weights is None else weights
    state = {k: v.detach().contiguous() for k, v in weights.items() if not lora.is_adapter_key(k)}
    if lora.lora_layers(model):
        lora.save_adapter(model, tmp / ADAPTER_DIR, base=str((info or {}).get("init") or "") or None)
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # the same tensor as embed_tokens; safetensors refuses shared storage
    save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
    cfg = model.config.to_dict()
    cfg["nanomind"] = {"step": step, "saved": time.strftime("%Y-%m-%dT%H:%M:%S"), **(info or {})}
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    if tokenizer_dir is not None:
        from nanomind.tokenizer import tokenizer_files

        tok = tmp / "tokenizer"
        tok.mkdir()
        for f in tokenizer_files(tokenizer_dir):
            shutil.copy2(f, tok / Path(f).name)
    if train_state is not None:
        torch.save(train_state, tmp / "train_state.pt")
    if final.exists():  # saving the same step again (e.g. after a resume): replace it
        old = run / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        shutil.rmtree(old)
    tmp.rename(final)
    if keep_last > 0:
        for old in step_dirs(run)[:-keep_last]:
            if old != final:  # never the one just written, even if a later-numbered step lies beside it
                shutil.rmtree(old)
    return final


def load_config(ckpt: str | Path) -> ModelConfig:
    path = resolve(ckpt) / "config.json"
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: invalid JSON: {e}") from None
    return ModelConfig.from_dict(data)


def load_model(ckpt: str | Path, device: str | torch.device = "cpu") -> Transformer:
    """The model of a checkpoint, with its LoRA adapter on when it has one; a RewardModel when it has a score head."""
    path = resolve(ckpt)
    with safe_open(str(path / "model.safetensors"), "pt") as f:
        is_reward = "score.weight" in f.keys()  # noqa: SIM118 (safe_open is not a dict)
    model = (RewardModel if is_reward else Transformer)(load_config(path))
    if (path / ADAPTER_DIR).is_dir():
        lora.load_adapter(model, path / ADAPTER_DIR)
    load_weights(model, path)
    return model.to(device)


def load_weights(model: Transformer, ckpt: str | Path) -> None:
    """Load the weights of `ckpt` into `model`; an adapted model also gets the checkpoint's adapter."""
    path = resolve(ckpt)
    state = load_file(str(path / "model.safetensors"))
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not lora.is_adapter_key(k)]
    if model.config.tie_word_embeddings:
        missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not match the config: missing {missing}, unexpected {unexpected}")
    if lora.lora_layers(model):
        if not (path / ADAPTER_DIR).is_dir():
            raise ValueError(f"{path} has no {ADAPTER_DIR}/: it was not saved from a LoRA run")
        lora.load_adapter(model, path / ADAPTER_DIR)


def adapter_dir(path: str | Path) -> Path:
    """A LoRA adapter directory: given directly, or the adapter/ of a checkpoint or of a run's newest one."""
    p = Path(path)
    for candidate in (p, p / ADAPTER_DIR):
        if (candidate / lora.ADAPTER_CONFIG).is_file():
            return candidate
    found = resolve(p) / ADAPTER_DIR
    if not (found / lora.ADAPTER_CONFIG).is_file():
        raise ValueError(f"{path}: no LoRA adapter here (expected {lora.ADAPTER_CONFIG}, or a checkpoint with "
                         f"{ADAPTER_DIR}/)")  # fmt: skip
    return found


def load_train_state(ckpt: str | Path) -> dict[str, Any]:
    path = resolve(ckpt) / "train_state.pt"
    if not path.is_file():
        raise ValueError(f"{path.parent} has no train_state.pt, so it cannot be resumed (use --init to start from it)")
    return torch.load(path, map_location="cpu", weights_only=True)


def tokenizer_dir(ckpt: str | Path) -> Path:
    path = resolve(ckpt) / "tokenizer"
    if not (path / "tokenizer.json").is_file():
        raise ValueError(f"{path.parent} has no tokenizer/ directory; pass --tokenizer")
    return path
