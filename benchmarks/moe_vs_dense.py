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
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import emit, header

from nanomind.data import PackedBatches, PrepareConfig, TokenShards, eval_batches, prepare
from nanomind.model import Transformer, preset
from nanomind.model.moe import load_stats, moe_layers
from nanomind.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from nanomind.train.loop import TrainConfig, train
from nanomind.train.pretrain import cross_entropy, make_eval_fn

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def run(name: str, data: Path, args, out: Path) -> dict:
    tok = Tokenizer.load(data / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(preset(name, vocab_size=tok.vocab_size))
    stamps: list[float] = []

    def timed(m, b):
        stamps.append(time.perf_counter())
        return cross_entropy(m, b)

    cfg = TrainConfig(out=str(out / name), steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      lr=args.lr, warmup_steps=args.steps // 10, dtype=args.dtype, eval_every=args.eval_every,
                      eval_batches=args.eval_batches, save_every=0, tensorboard=False, log_every=10)  # fmt: skip
    val = TokenShards(data, "val")
    evaluate = make_eval_fn(val, torch.tensor(tok.token_bytes()), args.batch_size, args.seq_len, args.eval_batches)
    batches = PackedBatches(TokenShards(data, "train"), args.batch_size, args.seq_len, seed=0)
    result = train(model, cfg, batches, timed, evaluate)
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    step_s = statistics.median(steps[2:]) if len(steps) > 3 else float("nan")
    held_out = {}
    if moe_layers(model):  # expert loads of the final model on held-out text
        model.train()
        for m in moe_layers(model):
            m.load.zero_()
        with torch.no_grad():
            for b in eval_batches(val, args.batch_size, args.seq_len, args.eval_batches):
                model(b["input_ids"])
        held_out = {k: v for k, v in load_stats(model).items() if k.startswith("moe/")}
    return {"preset": name, "params": model.num_params(), "active": model.config.num_params(active=True),
            "tokens_per_s": args.batch_size * args.seq_len / step_s,
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
        data = Path(args.data) if args.data else Path(tmp) / "data"
        if not args.data:
            tok_dir = str(Path(tmp) / "tok")
            train_tokenizer(TokenizerTrainConfig(data=[str(SHARED / "tokenizer" / "tokenizer_corpus.jsonl")],
                                                 vocab_size=6400, out=tok_dir))  # fmt: skip
            files = sorted(str(f) for f in (SHARED / "pretrain").glob("*.jsonl"))
            prepare(PrepareConfig(data=files, tokenizer=tok_dir, out=str(data)))
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
