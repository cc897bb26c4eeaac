"""Batch-1 decode speed of nanomind.generate for the 30.0M `minimind3-30m` model: 128-token prompt,
256 new tokens (stop tokens ignored), fp32 and bf16 weights, eager and torch.compile'd decoding step.

    python benchmarks/generate_speed.py [--repeats 3] [--dtypes fp32 bf16] [--modes eager compile]
"""

from __future__ import annotations

import argparse
import time

import torch
from common import emit, header

from nanomind.generate import SamplingConfig, generate
from nanomind.model import Transformer, preset


def measure(dtype: str, prompt_len: int, new_tokens: int, repeats: int, compile: bool) -> dict:
    torch.manual_seed(0)
    model = Transformer(preset("minimind3-30m")).eval()
    if dtype == "bf16":
        model.to(torch.bfloat16)
    prompt = torch.randint(0, model.config.vocab_size, (prompt_len,)).tolist()
    s = SamplingConfig(max_new_tokens=new_tokens, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.1,
                       ignore_eos=True)  # fmt: skip
    best_decode, best_prefill = 0.0, float("inf")
    for _ in range(repeats + 1):  # the first run warms up
        stamps = []
        t0 = time.perf_counter()
        for _tok in generate(model, prompt, s, compile=compile):
            stamps.append(time.perf_counter())
        assert len(stamps) == new_tokens
        best_prefill = min(best_prefill, stamps[0] - t0)
        best_decode = max(best_decode, (len(stamps) - 1) / (stamps[-1] - stamps[0]))
    return {"decode_tokens_per_s": best_decode, "prefill_s": best_prefill}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--new-tokens", type=int, default=256)
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"])
    p.add_argument("--modes", nargs="+", default=["eager", "compile"], help="eager and/or torch.compile'd decoding")
    args = p.parse_args()
    header("batch-1 decode speed, minimind3-30m")
    figures: dict = {"benchmark": "generate_speed", "prompt": args.prompt_len, "new_tokens": args.new_tokens}
    for mode in args.modes:
        for dtype in args.dtypes:
            r = measure(dtype, args.prompt_len, args.new_tokens, args.repeats, compile=mode == "compile")
            rate = r["decode_tokens_per_s"]
            print(f"{dtype} {mode}: {rate:.1f} tokens/s decode ({1000 / rate:.2f} ms/token), "
                  f"prefill {r['prefill_s'] * 1000:.1f} ms")  # fmt: skip
            figures[f"{dtype}_{mode}"] = {k: round(v, 4) for k, v in r.items()}
    emit(figures)


if __name__ == "__main__":
    main()
