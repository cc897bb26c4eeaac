"""Training throughput of the real loop (nanomind.train.loop.train) for a preset (default the 30.0M
`minimind3-30m`), batch 16 x 256, bf16 and fp32: real (non-padding) tokens/s and MFU against this machine's
measured matmul peak (MoE presets: MFU of the active parameters).

    python benchmarks/train_throughput.py [--preset minimind3-30m] [--steps 12] [--warmup 3] [--dtypes bf16 fp32]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import torch
from common import emit, header, matmul_peak

from nanomind.model import Transformer, preset
from nanomind.train.loop import TrainConfig, train
from nanomind.train.pretrain import cross_entropy


class RandomRows:
    """Packed rows of random tokens: every position is a real target, as in packed pretraining."""

    def __init__(self, batch: int, seq_len: int, vocab: int):
        self.g = torch.Generator().manual_seed(0)
        self.shape, self.vocab = (batch, seq_len + 1), vocab

    def next(self):
        ids = torch.randint(0, self.vocab, self.shape, generator=self.g)
        return {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}

    def state_dict(self):
        return {}

    def load_state_dict(self, state):
        pass


def measure(name: str, dtype: str, steps: int, warmup: int, batch: int, seq_len: int, compile: bool) -> dict:
    torch.manual_seed(0)
    cfg_m = preset(name)
    model = Transformer(cfg_m)
    stamps: list[float] = []

    def timed_loss(m, b):
        stamps.append(time.perf_counter())
        return cross_entropy(m, b)

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, steps=warmup + steps + 1, batch_size=batch, seq_len=seq_len, dtype=dtype,
                          eval_every=0, save_every=0, tensorboard=False, compile=compile, log_every=1000)  # fmt: skip
        train(model, cfg, RandomRows(batch, seq_len, cfg_m.vocab_size), timed_loss)
    step_times = [b - a for a, b in zip(stamps[warmup:], stamps[warmup + 1 :], strict=False)]
    median = statistics.median(step_times)
    tok_s = batch * seq_len / median
    return {"params": model.num_params(), "step_s": median, "tokens_per_s": tok_s,
            "flops_per_token": cfg_m.flops_per_token(seq_len)}  # fmt: skip


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", default="minimind3-30m")
    p.add_argument("--steps", type=int, default=12)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--dtypes", nargs="+", default=["bf16", "fp32"])
    p.add_argument("--compile", action="store_true")
    args = p.parse_args()
    header(f"train throughput, {args.preset}")
    figures: dict = {"benchmark": "train_throughput", "preset": args.preset, "batch": args.batch_size,
                     "seq_len": args.seq_len, "compile": args.compile}  # fmt: skip
    for dtype in args.dtypes:
        peak = matmul_peak(torch.bfloat16 if dtype == "bf16" else torch.float32)
        r = measure(args.preset, dtype, args.steps, args.warmup, args.batch_size, args.seq_len, args.compile)
        mfu = r["tokens_per_s"] * r["flops_per_token"] / peak
        print(f"{dtype}: {r['params'] / 1e6:.1f}M params, {r['step_s']:.3f} s/step, "
              f"{r['tokens_per_s']:,.0f} real tokens/s, "
              f"matmul peak {peak / 1e9:.0f} GFLOP/s, MFU {mfu:.1%}")  # fmt: skip
        figures[dtype] = {"tokens_per_s": round(r["tokens_per_s"], 1), "mfu": round(mfu, 4),
                          "peak_gflops": round(peak / 1e9, 1), "step_s": round(r["step_s"], 4)}  # fmt: skip
    emit(figures)


if __name__ == "__main__":
    main()
