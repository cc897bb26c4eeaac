"""llama.cpp runs our GGUF export as nanomind runs the checkpoint: tokenization, greedy tokens and logits compared.

    pip install -e '.[export,llamacpp]'   # llama-cpp-python compiles llama.cpp on install (~3 min on 2 cores)
    python benchmarks/llamacpp_check.py --ckpt runs/demo/pretrain [--types f32 f16 q8_0] [--new-tokens 32]

Dense and MoE checkpoints alike (MoE: llama.cpp's qwen3moe, llama with experts, or glm4moe; see export_gguf.py).

For each prompt, nanomind's greedy tokens are those of `nanomind generate --temperature 0 --repetition-penalty 1
--ignore-eos --max-new-tokens 32` (the same `generate`, called in-process; the first prompt also runs the command
itself and compares its text). Each export type is loaded by llama-cpp-python with an f32 KV cache (its default f16
cache alone moves logits by ~1e-2) and decodes greedily; logits are compared teacher-forced on nanomind's sequence,
since positions after a divergence are not comparable. f32 must match exactly (exit 1 otherwise); f16 and q8_0
round the weights, so the script reports how close they stay. Ends with one JSON line of the figures.
"""

from __future__ import annotations

import argparse
import contextlib
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from common import emit, header

from nanomind import checkpoint
from nanomind.export_gguf import export_gguf, gguf_architecture
from nanomind.generate import SamplingConfig, generate
from nanomind.tokenizer import Tokenizer

PROMPTS = ["Once upon a time", "The function returns", "import os\n\ndef main():\n    ", "床前明月光，", "In 1999, the"]
# tokenization probes beyond the prompts: whitespace runs, digits, accents, CJK, emoji, special tokens in text
PROBES = PROMPTS + [
    "  two  spaces\n\n\n\tand a tab 3.14159 and 1234567890",
    "naïve café über e\u0301 — “quotes” 'don't' it's",
    "你好，世界！中文分词 😀🚀",
    "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n",
]


@contextlib.contextmanager
def weight_repacking(enabled: bool):
    """llama.cpp repacks quantized weights for the CPU (AMX / AVX-512 kernels: `use_extra_bufts`). On this machine
    (Xeon with AMX) evaluating any q8_0 file with it segfaults, the converter's own q8_0 output of the same model
    included (its tensors are byte-identical to ours), so it is off unless --repack. Llama() has no argument for
    it, hence the patched default parameters while the model loads."""
    from llama_cpp import llama

    original = llama.llama_cpp.llama_model_default_params

    def params():
        p = original()
        p.use_extra_bufts = enabled
        return p

    llama.llama_cpp.llama_model_default_params = params
    try:
        yield
    finally:
        llama.llama_cpp.llama_model_default_params = original


def llama_greedy(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    for t in llm.generate(prompt, temp=0.0, repeat_penalty=1.0, reset=True):  # greedy; it never stops by itself
        if len(out) == n:
            break
        out.append(t)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--ckpt", required=True, help="checkpoint (or run) directory with a tokenizer/")
    p.add_argument("--types", nargs="+", default=["f32", "f16", "q8_0"], help="GGUF types to export and check")
    p.add_argument("--new-tokens", type=int, default=32, help="greedy tokens to compare per prompt")
    p.add_argument("--prompts", nargs="+", default=PROMPTS, help="prompts to continue")
    p.add_argument("--repack", action="store_true", help="let llama.cpp repack weights (crashes q8_0 with AMX)")
    args = p.parse_args()
    import llama_cpp  # here, so --help works without it

    header("llama.cpp check of the GGUF export")
    ckpt = checkpoint.resolve(args.ckpt)
    tok = Tokenizer.load(checkpoint.tokenizer_dir(ckpt))
    model = checkpoint.load_model(ckpt).eval()
    cfg = model.config
    moe = (f", {cfg.num_experts} experts top-{cfg.num_experts_per_tok} ({cfg.scoring_func}) + {cfg.n_shared_experts} "
           f"shared" if cfg.num_experts else "")  # fmt: skip
    print(f"checkpoint: {ckpt} ({model.num_params() / 1e6:.2f}M params, vocab {cfg.vocab_size}, qk_norm "
          f"{cfg.qk_norm}, tied {cfg.tie_word_embeddings}{moe}); GGUF architecture "
          f"{gguf_architecture(model).gguf_arch}; llama-cpp-python {llama_cpp.__version__}")  # fmt: skip
    greedy = SamplingConfig(max_new_tokens=args.new_tokens, temperature=0.0, repetition_penalty=1.0, ignore_eos=True)
    prompts = [tok.encode(t) for t in args.prompts]
    ours = [list(generate(model, ids, greedy)) for ids in prompts]
    with torch.no_grad():
        ref = [model(torch.tensor([ids + gen[:-1]])).logits[0].numpy() for ids, gen in zip(prompts, ours)]

    command = [sys.executable, "-m", "nanomind", "generate", "--ckpt", str(ckpt), "--prompt", args.prompts[0],
               "--temperature", "0", "--repetition-penalty", "1", "--ignore-eos", "--max-new-tokens",
               str(args.new_tokens), "--device", "cpu"]  # fmt: skip
    # bytes, not text=True: universal newlines would turn a generated "\r" into "\n"
    cli_text = subprocess.run(command, capture_output=True, check=True).stdout.decode().rstrip("\n")
    print(f"nanomind generate: {cli_text!r}")

    figures: dict = {"ckpt": str(ckpt), "prompts": len(prompts), "new_tokens": args.new_tokens}
    failed = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.types:
            t0 = time.perf_counter()
            path = export_gguf(ckpt, Path(tmp) / f"model-{kind}.gguf", kind)
            export_s = time.perf_counter() - t0
            # f32 KV cache (type 0); n_ctx covers the longest prompt plus the new tokens
            n_ctx = max(len(ids) for ids in prompts) + args.new_tokens + 8
            with weight_repacking(args.repack):
                llm = llama_cpp.Llama(str(path), n_ctx=n_ctx, n_threads=2, type_k=0, type_v=0, logits_all=True,
                                      verbose=False)  # fmt: skip
            tok_ok = sum(llm.tokenize(t.encode(), add_bos=False, special=True) == tok.encode(t) for t in PROBES)
            same, prefix, diffs, agree, total, margins = 0, [], [], 0, 0, [0.0]
            for i, (ids, gen) in enumerate(zip(prompts, ours)):
                theirs = llama_greedy(llm, ids, args.new_tokens)
                same += theirs == gen
                prefix.append(next((j for j, (a, b) in enumerate(zip(theirs, gen)) if a != b), len(gen)))
                llm.reset()
                llm.eval(ids + gen[:-1])
                scores = np.asarray(llm.scores[: len(ref[i])])
                diffs.append(float(np.abs(scores - ref[i]).max()))
                hit = scores.argmax(-1) == ref[i].argmax(-1)
                agree += int(hit.sum())
                top2 = np.sort(ref[i], axis=-1)[:, -2:]
                margins += (top2[:, 1] - top2[:, 0])[~hit].tolist()  # nanomind's own top-1 lead where they differ
                total += len(ref[i])
                if i == 0:
                    text = args.prompts[0] + tok.decode(theirs)
                    print(f"llama.cpp {kind:>4}:  {text!r}  ({'same text' if text == cli_text else 'DIFFERENT text'})")
            row = {"size_mb": round(path.stat().st_size / 1e6, 2), "export_s": round(export_s, 2),
                   "tokenize_ok": f"{tok_ok}/{len(PROBES)}", "greedy_identical": f"{same}/{len(prompts)}",
                   "first_divergence": prefix, "max_abs_logit_diff": max(diffs),
                   "top1_agreement": round(agree / total, 4),
                   "max_margin_where_top1_differs": round(max(margins), 4)}  # fmt: skip
            figures[kind] = row
            print(f"{kind:>4}: " + ", ".join(f"{k} {v}" for k, v in row.items()))
            if kind == "f32" and (same != len(prompts) or tok_ok != len(PROBES) or max(diffs) > 1e-3):
                failed.append(kind)
    scale = float(np.abs(np.concatenate([r.ravel() for r in ref])).max())
    print(f"largest |logit| of the reference: {scale:.2f}")
    print("RESULT: " + ("FAIL (f32 differs)" if failed else "OK: f32 matches nanomind exactly"))
    emit(figures)
    if failed:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
