"""Questions per second of `nanomind eval choice` on CMMLU (11,582 questions) with a minimind-26m-sized model.

    python benchmarks/eval_speed.py                           # the whole file, letter method, fp32 and bf16
    python benchmarks/eval_speed.py --limit 2000 --methods letter loglik --dtypes bf16
    python benchmarks/eval_speed.py --ckpt runs/pt            # a trained checkpoint instead of random weights

Without --ckpt it trains a 6400-token tokenizer on ../shared/data/tokenizer/tokenizer_corpus.jsonl and saves a
randomly initialised minimind-26m into a temporary directory: speed does not depend on the weights. The timing is
that of the command (prompts, tokenization, batched forward passes, aggregation), without loading the model;
with --limit the full-file time is extrapolated. Target: the whole file in <= 10 minutes on 2 CPU cores.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import emit, header

from nanomind import checkpoint
from nanomind.eval_choice import ChoiceConfig, evaluate, read_questions
from nanomind.jsonl import BadLines
from nanomind.model import Transformer, preset
from nanomind.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def make_checkpoint(root: Path, tokenizer: str) -> str:
    """A random minimind-26m with a 6400-token tokenizer (trained here unless --tokenizer is given)."""
    if not tokenizer:
        tokenizer = str(root / "tok")
        corpus = DATA / "tokenizer" / "tokenizer_corpus.jsonl"
        train_tokenizer(TokenizerTrainConfig(data=[str(corpus)], out=tokenizer, vocab_size=6400))
    torch.manual_seed(0)
    model = Transformer(preset("minimind-26m", vocab_size=Tokenizer.load(tokenizer).vocab_size))
    return str(checkpoint.save(root / "ckpt", 0, model, tokenizer_dir=tokenizer))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(DATA / "eval" / "cmmlu_test.jsonl"))
    p.add_argument("--ckpt", default="", help="checkpoint to evaluate (default: a random minimind-26m)")
    p.add_argument("--tokenizer", default="", help="tokenizer for the random model (default: train one)")
    p.add_argument("--limit", type=int, default=0, help="a random sample of this many questions (0 = all)")
    p.add_argument("--methods", nargs="+", default=["letter"], choices=["letter", "loglik"])
    p.add_argument("--dtypes", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    p.add_argument("--shots", type=int, default=0)
    p.add_argument("--batch-tokens", type=int, default=8192)
    args = p.parse_args()
    header("eval choice speed, minimind-26m")
    total = len(read_questions(args.data, BadLines()))
    figures: dict = {"benchmark": "eval_speed", "data": Path(args.data).name, "questions_in_file": total,
                     "limit": args.limit, "shots": args.shots}  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        ckpt = args.ckpt or make_checkpoint(Path(tmp), args.tokenizer)
        dev = str(DATA / "eval" / "cmmlu_dev.jsonl") if args.shots else ""
        for method in args.methods:
            for dtype in args.dtypes:
                cfg = ChoiceConfig(ckpt=ckpt, data=[args.data], limit=args.limit, method=method, dtype=dtype,
                                   shots=args.shots, dev=dev, batch_tokens=args.batch_tokens, out=tmp,
                                   device="cpu")  # fmt: skip
                t0 = time.perf_counter()
                r = evaluate(cfg)
                wall = time.perf_counter() - t0
                n, rate = r["overall"]["n"], r["overall"]["n"] / r["seconds"]
                full = total / rate
                how = "measured" if n == total else "extrapolated"
                print(f"{method} {dtype}: {n} questions in {r['seconds']:.1f}s = {rate:.1f} questions/s (with model "
                      f"loading {wall:.1f}s); whole file: {full / 60:.1f} min {how}; accuracy "
                      f"{r['overall']['accuracy']:.3f}")  # fmt: skip
                figures[f"{method}_{dtype}"] = {"questions": n, "seconds": r["seconds"], "full_file_min":
                                                round(full / 60, 2), "questions_per_s": round(rate, 2)}  # fmt: skip
    emit(figures)


if __name__ == "__main__":
    main()
