"""The architecture report card: dense, MoE, DeepSeek-V3 style and Qwen3-Next style presets trained alike.

Every preset is pretrained from seed 0 on the same prepared data (default: all of ../shared/data/pretrain with one
6400-token tokenizer), for the same steps, batch, sequence length and LR schedule (warm-up a tenth of the steps,
then cosine), each in a process of its own so that its peak memory is its own. Prints one Markdown table: total
and active parameters, KV-cache bytes per token (bf16; the hybrid's gated DeltaNet layers keep a fixed-size state
per sequence instead, reported apart), validation bits per byte at the midpoint and at the end, training tokens/s
(median step) and peak memory (RSS on CPU, torch.cuda.max_memory_allocated on GPU); then a JSON line.

    python benchmarks/arch_report.py [--steps 150] [--batch-size 8] [--seq-len 256] [--device auto] [--dtype bf16]
        [--presets minimind-moe-dense minimind-moe deepseek-v3-mini qwen3-next-mini] [--data FILES_OR_PREPARED_DIR]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import torch
from common import emit, header, pretrain_data, pretrain_preset

PRESETS = ["minimind-moe-dense", "minimind-moe", "deepseek-v3-mini", "qwen3-next-mini"]


def worker(args) -> None:
    """One preset, in this process: train, then write its figures to args.result."""
    from nanomind.device import resolve_device

    device = resolve_device(args.device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model, result, tokens_per_s = pretrain_preset(args.worker, Path(args.prepared), Path(args.runs), args,
                                                  str(device))  # fmt: skip
    if device.type == "cuda":
        peak, kind = torch.cuda.max_memory_allocated(device), "cuda max_memory_allocated"
    else:
        peak, kind = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "peak RSS"  # Linux: KiB
    cfg = model.config
    bpb = {int(e["step"]): e["val_bpb"] for e in result.evals}
    mid = min(bpb, key=lambda s: abs(s - args.steps // 2))
    figures = {
        "preset": args.worker,
        "params": model.num_params(),
        "active": cfg.num_params(active=True),
        "kv_bytes_per_token": cfg.kv_cache_bytes_per_token(2)["cache"],
        "state_bytes_per_seq": cfg.linear_state_bytes(2),
        "bpb_mid": [mid, round(bpb[mid], 4)],
        "bpb_end": [max(bpb), round(bpb[max(bpb)], 4)],
        "tokens_per_s": round(tokens_per_s, 1),
        "peak_memory_bytes": peak,
        "memory": kind,
        "device": str(device),
    }
    Path(args.result).write_text(json.dumps(figures))


def table(rows: list[dict]) -> str:
    def mb(n: int) -> str:
        return f"{n / 2**20:,.0f} MiB"

    lines = ["| preset | params | active | KV cache B/token (bf16) | fixed state B/seq | val bpb (mid) | "
             "val bpb (end) | train tokens/s | peak memory |", "| --- |" + " ---: |" * 8]  # fmt: skip
    for r in rows:
        state = f"{r['state_bytes_per_seq']:,}" if r["state_bytes_per_seq"] else "-"
        lines.append(
            f"| `{r['preset']}` | {r['params'] / 1e6:.1f}M | {r['active'] / 1e6:.1f}M | {r['kv_bytes_per_token']:,} | "
            f"{state} | {r['bpb_mid'][1]:.4f} (step {r['bpb_mid'][0]}) | {r['bpb_end'][1]:.4f} (step "
            f"{r['bpb_end'][0]}) | {r['tokens_per_s']:,.0f} | {mb(r['peak_memory_bytes'])} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--presets", nargs="+", default=PRESETS)
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    p.add_argument("--eval-batches", type=int, default=8)
    p.add_argument("--data", nargs="+", default=None,
                   help="pretraining jsonl files, or one directory made by nanomind prepare "
                        "(default: all of ../shared/data/pretrain)")  # fmt: skip
    for hidden in ("--worker", "--prepared", "--runs", "--result"):  # one preset in a child process
        p.add_argument(hidden, default="", help=argparse.SUPPRESS)
    args = p.parse_args()
    args.eval_every = max(args.steps // 2, 1)  # step 0, the midpoint and the end
    if args.worker:
        return worker(args)
    header("Architecture report card")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        data = pretrain_data(Path(tmp), args.data)
        for name in args.presets:
            result = Path(tmp) / f"{name}.json"
            child = [sys.executable, __file__, "--steps", str(args.steps), "--batch-size", str(args.batch_size),
                     "--seq-len", str(args.seq_len), "--lr", str(args.lr), "--device", args.device, "--dtype",
                     args.dtype, "--eval-batches", str(args.eval_batches), "--worker", name, "--prepared", str(data),
                     "--runs", str(Path(tmp) / "runs"), "--result", str(result)]  # fmt: skip
            subprocess.run(child, check=True)
            rows.append(json.loads(result.read_text()))
    print(f"\n{args.steps} steps of {args.batch_size} x {args.seq_len} tokens, lr {args.lr} (warm-up "
          f"{args.steps // 10} steps, cosine), {args.dtype}, {rows[0]['device']}; "
          f"memory: {rows[0]['memory']}\n")  # fmt: skip
    print(table(rows))
    emit({"benchmark": "arch_report", "steps": args.steps, "batch": args.batch_size, "seq_len": args.seq_len,
          "lr": args.lr, "dtype": args.dtype, "rows": rows})  # fmt: skip


if __name__ == "__main__":
    main()
