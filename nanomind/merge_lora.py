"""`nanomind export merge-lora`: fold a LoRA adapter into its base weights and write an ordinary checkpoint.

    nanomind export merge-lora --ckpt runs/sft --lora runs/lora --out runs/merged
    nanomind export merge-lora --ckpt runs/lora --out runs/merged    # a LoRA run: its own adapter

The result loads like any checkpoint (chat, eval, export hf) and gives the logits of base + adapter.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from nanomind import checkpoint
from nanomind.config import arg
from nanomind.model.lora import load_adapter, lora_layers, merge_lora


@dataclass
class MergeConfig:
    ckpt: str = arg(help="base checkpoint, or a LoRA run / checkpoint (its adapter is merged)")
    out: str = arg(help="output run directory: the merged checkpoint is written to OUT/step_N")
    lora: str = arg("", "adapter to merge: a PEFT-layout directory or a LoRA run / checkpoint (default: --ckpt's)")


def merge(cfg: MergeConfig) -> Path:
    base = checkpoint.resolve(cfg.ckpt)
    model = checkpoint.load_model(base)  # with its own adapter, if it was saved by a LoRA run
    adapter = str(base / checkpoint.ADAPTER_DIR) if lora_layers(model) else ""
    if cfg.lora:
        merge_lora(model)
        adapter = str(checkpoint.adapter_dir(cfg.lora))
        load_adapter(model, adapter)
    if not lora_layers(model):
        raise ValueError(f"{base} has no LoRA adapter; pass --lora ADAPTER")
    merge_lora(model)
    step = json.loads((base / "config.json").read_text()).get("nanomind", {}).get("step", 0)
    tok = base / "tokenizer"
    info = {"stage": "merge-lora", "init": str(base), "adapter": adapter}
    return checkpoint.save(cfg.out, step, model, tok if tok.is_dir() else None, info=info)


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse

    cfg = parse(MergeConfig, argv, "nanomind export merge-lora", __doc__.splitlines()[0])
    print(f"merged checkpoint: {merge(cfg)}")
