"""MoE against the dense model of the same active size: the same data, steps, batches, seed and schedule.

`minimind-moe` (4 routed experts top-2 + 1 shared, 96.1M parameters, 61.5M active) against `minimind-moe-dense`
(one MLP as wide as the 3 active experts, 61.5M), pretrained on all of ../shared/data/pretrain with a 6400-token
tokenizer. Prints the validation bits-per-byte curves, the experts' max/min load ratio (per step while training,
and per layer on held-out text at the end) and training tokens/s.

    python benchmarks/moe_vs_dense.py [--steps 150] [--batch-size 8] [--seq-len 256] [--data PREPARED_DIR]
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import torch
from common import emit, header, pretrain_data, pretrain_preset

from nanomind.data import TokenShards, eval_batches
from nanomind.model.moe import load_stats, moe_layers


def run(name: str, data: Path, args, out: Path) -> dict:
    model, result, tokens_per_s = pretrain_preset(name, data, out, args)
    held_out = {}
    if moe_layers(model):  # expert loads of the final model on held-out text
        model.train()
        for m in moe_layers(model):
            m.load.zero_()
        with torch.no_grad():
            for b in eval_batches(TokenShards(data, "val"), args.batch_size, args.seq_len, args.eval_batches):
                model(b["input_ids"].to(next(model.parameters()).device))
        held_out = {k: v for k, v in load_stats(model).items() if k.startswith("moe/")}
    return {"preset": name, "params": model.num_params(), "active": model.config.num_params(active=True),
            "tokens_per_s": tokens_per_s,
            "bpb": [(int(e["step"]), round(e["val_bpb"], 4)) for e in result.evals],
            "train_load_max_min": result.moe_load, "held_out_load_max_min": held_out}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--eval-every", type=int, default=25)
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--data", default="", help="a directory made by nanomind prepare (default: prepare the shared)")
    p.add_argument("--presets", nargs="+", default=["minimind-moe", "minimind-moe-dense"])
    args = p.parse_args()
    header("MoE vs dense of equal active size")
    with tempfile.TemporaryDirectory() as tmp:
        data = pretrain_data(Path(tmp), [args.data] if args.data else None)
        rows = [run(name, data, args, Path(tmp) / "runs") for name in args.presets]
    for r in rows:
        loads = [x for x in r["train_load_max_min"] if not math.isnan(x)]
        load = f", expert load max/min {loads[0]:.2f} at step 1 -> {loads[-1]:.2f} at the end" if loads else ""
        print(f"{r['preset']}: {r['params'] / 1e6:.1f}M parameters ({r['active'] / 1e6:.1f}M active), "
              f"{r['tokens_per_s']:,.0f} tokens/s{load}")  # fmt: skip
        print("  val bpb: " + ", ".join(f"step {s} {b:.4f}" for s, b in r["bpb"]))
        if r["held_out_load_max_min"]:
            print("  held-out load max/min per layer: " +
                  ", ".join(f"{v:.2f}" for v in r["held_out_load_max_min"].values()))  # fmt: skip
    emit({"benchmark": "moe_vs_dense", "steps": args.steps, "batch": args.batch_size, "seq_len": args.seq_len,
          "rows": [{k: v for k, v in r.items() if k != "train_load_max_min"} for r in rows]})  # fmt: skip


if __name__ == "__main__":
    main()
