"""Speed-up of greedy speculative decoding with the model's MTP modules over plain greedy decoding, batch 1.

An MLA + MoE model with `--depth` MTP modules (default: `debug-mla` widened to 128 x 4 layers, 2.3M parameters) is
pretrained from seed 0 through nanomind's own loop on real text (default: tiny Shakespeare, tokenized by the shared
6400-token BPE) so that its drafts are sometimes right. Then, for `--prompts` prompts cut from the validation split,
`generate()` (temperature 0, no penalties, top-k/top-p off) and `generate_speculative()` each decode
`--max-new-tokens` tokens (stop tokens ignored); the two outputs must be identical. Prints decode tokens/s of each
(median over the prompts, after one warm-up, prefill excluded), the draft acceptance rate, tokens per verifying
forward, and the speed-up; then a JSON line.

    python benchmarks/speculative_speed.py [--steps 300] [--max-new-tokens 128] [--prompts 8] [--depth 1]
        [--device cpu] [--dtype fp32] [--preset debug-mla-wide] [--data FILES_OR_PREPARED_DIR]
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch
from common import SHARED, emit, header, pretrain_data, pretrain_preset

from nanomind.data import TokenShards
from nanomind.generate import SamplingConfig, generate
from nanomind.model.config import PRESETS
from nanomind.speculative import generate_speculative
from nanomind.tokenizer import Tokenizer

# debug-mla a little wider and deeper: 4 main layers against 1-2 MTP blocks, so a draft costs a fraction of a forward
WIDE = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, q_lora_rank=64, kv_lora_rank=64,
            qk_nope_head_dim=32, qk_rope_head_dim=16, v_head_dim=32, moe_intermediate_size=128)  # fmt: skip


def register(name: str, depth: int) -> str:
    """A preset of this process only (pretrain_preset builds presets by name): `name` with `depth` MTP modules;
    `debug-mla-wide` is debug-mla widened by WIDE."""
    base = {**PRESETS["debug-mla"], **WIDE} if name == "debug-mla-wide" else PRESETS[name]
    PRESETS[f"{name}-mtp{depth}"] = {**base, "num_nextn_predict_layers": depth}
    return f"{name}-mtp{depth}"


def decode(tokens) -> tuple[list[int], float]:
    """Drain a token iterator: (tokens, decode tokens/s from the first token to the last, prefill excluded)."""
    out, stamps = [], []
    for t in tokens:
        out.append(t)
        stamps.append(time.perf_counter())
    return out, (len(out) - 1) / (stamps[-1] - stamps[0])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300, help="pretraining steps")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--prompts", type=int, default=8, help="prompts measured (plus one warm-up)")
    p.add_argument("--prompt-len", type=int, default=32)
    p.add_argument("--depth", type=int, default=1, help="MTP modules, i.e. tokens drafted per step")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"], help="weights precision for decoding")
    p.add_argument("--preset", default="debug-mla-wide", help="debug-mla-wide or any MLA/GQA preset")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--train-dtype", default="bf16", choices=["bf16", "fp32"], help="pretraining precision")
    p.add_argument("--data", nargs="+", default=[str(SHARED / "pretrain" / "en_tinyshakespeare.jsonl")],
                   help="jsonl files, or one directory made by nanomind prepare")  # fmt: skip
    args = p.parse_args()
    if args.depth < 1 or args.prompts < 1 or args.max_new_tokens < 2:
        p.error("--depth and --prompts must be >= 1, --max-new-tokens >= 2")
    header(f"MTP speculative decoding vs greedy, {args.preset} depth {args.depth}")
    name = register(args.preset, args.depth)
    train_args = argparse.Namespace(steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                                    dtype=args.train_dtype, eval_every=0, eval_batches=4)  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        data = pretrain_data(Path(tmp), args.data)
        t0 = time.perf_counter()
        model, result, train_tps = pretrain_preset(name, data, Path(tmp) / "runs", train_args, args.device)
        train_s = time.perf_counter() - t0
        tok, val = Tokenizer.load(data / "tokenizer"), TokenShards(data, "val")
        span = len(val) - args.prompt_len
        if span < 0:
            raise SystemExit(f"the validation split has {len(val)} tokens, fewer than --prompt-len {args.prompt_len}")
        prompts = [val.get(i * span // args.prompts, args.prompt_len).tolist() for i in range(args.prompts + 1)]
    model.eval()
    if args.dtype == "bf16":
        model.to(torch.bfloat16)
    mtp = [m["mtp"] for m in result.metrics if "mtp" in m]
    val_bpb = result.evals[-1]["val_bpb"] if result.evals else float("nan")
    mtp_ce = mtp[-1] / model.config.mtp_loss_weight if mtp and model.config.mtp_loss_weight else float("nan")
    print(f"{name}: {model.num_params() / 1e6:.2f}M parameters ({model.config.num_params(active=True) / 1e6:.2f}M "
          f"active), {args.steps} steps in {train_s:.0f} s ({train_tps:,.0f} tokens/s); last step's loss "
          f"{result.losses[-1] - (mtp[-1] if mtp else 0):.3f} next token, {mtp_ce:.3f} MTP (mean over depths); "
          f"val bpb {val_bpb:.4f}")  # fmt: skip

    greedy = SamplingConfig(max_new_tokens=args.max_new_tokens, temperature=0, top_k=0, top_p=1,
                            repetition_penalty=1, ignore_eos=True)  # fmt: skip
    rates: dict[str, list[float]] = {"greedy": [], "speculative": []}
    totals = {"steps": 0, "drafted": 0, "accepted": 0}
    sample = ""
    for i, prompt in enumerate(prompts):  # prompts[0] warms up
        ref, rate = decode(generate(model, prompt, greedy))
        stats: dict[str, int] = {}
        spec, spec_rate = decode(generate_speculative(model, prompt, args.max_new_tokens, (), stats))
        assert len(ref) == args.max_new_tokens, f"generate() gave {len(ref)} tokens"
        diff = next((j for j, (a, b) in enumerate(zip(ref, spec, strict=False)) if a != b), min(len(ref), len(spec)))
        assert spec == ref, (f"prompt {i}: speculative decoding differs from greedy at token {diff} "
                             f"({spec[diff:diff + 4]} vs {ref[diff:diff + 4]}, {args.dtype})")  # fmt: skip
        if i == 1:
            sample = tok.decode(prompt) + " ||| " + tok.decode(ref)
        if i:
            rates["greedy"].append(rate)
            rates["speculative"].append(spec_rate)
            for k in totals:
                totals[k] += stats[k]
    g, s = statistics.median(rates["greedy"]), statistics.median(rates["speculative"])
    acceptance = totals["accepted"] / max(totals["drafted"], 1)
    per_forward = (totals["steps"] + totals["accepted"]) / max(totals["steps"], 1)

    print(f"\n{args.prompts} prompts of {args.prompt_len} validation tokens, {args.max_new_tokens} new tokens each, "
          f"{args.dtype} weights on {args.device}; outputs identical. The first (prompt ||| greedy reply):\n"
          f"{sample[:400]!r}\n")  # fmt: skip
    print("| decoding | tokens/s (median) | ms/token | draft acceptance | tokens/forward | speed-up |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| greedy generate() | {g:.1f} | {1000 / g:.2f} | - | 1.00 | 1.00x |")
    print(f"| speculative, {args.depth} MTP draft{'s' * (args.depth > 1)} | {s:.1f} | {1000 / s:.2f} | "
          f"{acceptance:.1%} | {per_forward:.2f} | {s / g:.2f}x |")  # fmt: skip
    emit({"benchmark": "speculative_speed", "preset": name, "params": model.num_params(), "depth": args.depth,
          "steps": args.steps, "val_bpb": round(val_bpb, 4), "device": args.device, "dtype": args.dtype,
          "prompts": args.prompts, "max_new_tokens": args.max_new_tokens,
          "greedy_tokens_per_s": round(g, 2), "speculative_tokens_per_s": round(s, 2), "speedup": round(s / g, 4),
          "acceptance": round(acceptance, 4), "tokens_per_forward": round(per_forward, 4)})  # fmt: skip


if __name__ == "__main__":
    main()
