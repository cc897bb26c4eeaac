"""Speed of `nanomind prepare` (MB of text per second), next to the tokenizers library's own batch encoder on the
same texts (the ceiling: prepare adds JSON parsing, the split, and writing shards).

    python benchmarks/prepare_speed.py [--data a.jsonl ...] [--tokenizer DIR] [--repeats 2]

Default data: ../shared/data/pretrain/*.jsonl; default tokenizer: a 6400-token BPE trained on
../shared/data/tokenizer/tokenizer_corpus.jsonl into a temporary directory.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from pathlib import Path

from common import emit, header

from nanomind.data import PrepareConfig, prepare, read_jsonl
from nanomind.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def library_speed(tok: Tokenizer, texts: list[str], method: str, batch: int) -> float:
    """Seconds for the tokenizers library alone to encode `texts` (ids only) in batches."""
    encode = getattr(tok.backend, method)
    t0 = time.perf_counter()
    for i in range(0, len(texts), batch):
        for e in encode(texts[i : i + batch], add_special_tokens=False):
            e.ids  # noqa: B018 - fetching ids is part of the work prepare must do
    return time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=sorted(str(f) for f in (SHARED / "pretrain").glob("*.jsonl")))
    p.add_argument("--tokenizer", default="", help="tokenizer directory (default: train one at vocab 6400)")
    p.add_argument("--repeats", type=int, default=2, help="runs of each measurement; the best is reported")
    p.add_argument("--batch-docs", type=int, default=1024)
    args = p.parse_args()
    if not args.data:
        raise SystemExit(f"no data: {SHARED / 'pretrain'} has no jsonl files; pass --data")
    header("prepare_speed")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = args.tokenizer
        if not tok_dir:
            tok_dir = f"{tmp}/tokenizer"
            corpus = str(SHARED / "tokenizer" / "tokenizer_corpus.jsonl")
            with contextlib.redirect_stdout(io.StringIO()):
                train_tokenizer(TokenizerTrainConfig(data=[corpus], out=tok_dir, vocab_size=6400))
        tok = Tokenizer.load(tok_dir)
        texts = [t for path in args.data for _, t in read_jsonl(path)]
        mb = sum(len(t.encode()) for t in texts) / 1e6
        print(f"data: {len(args.data)} files, {len(texts)} documents, {mb:.1f} MB of text; vocab {tok.vocab_size}")
        best = {"prepare": float("inf"), "encode_batch": float("inf"), "encode_batch_fast": float("inf")}
        for r in range(args.repeats):  # interleaved, so drift in machine load hits all three alike
            cfg = PrepareConfig(data=args.data, tokenizer=tok_dir, out=f"{tmp}/prepared", batch_docs=args.batch_docs)
            t0 = time.perf_counter()
            with contextlib.redirect_stdout(io.StringIO()):
                meta = prepare(cfg)
            seconds = {"prepare": time.perf_counter() - t0}
            for method in ("encode_batch", "encode_batch_fast"):
                seconds[method] = library_speed(tok, texts, method, args.batch_docs)
            print(f"run {r + 1}: " + ", ".join(f"{k} {mb / s:.2f} MB/s" for k, s in seconds.items()))
            best = {k: min(v, seconds[k]) for k, v in best.items()}
    tokens = sum(s["tokens"] for s in meta["splits"].values())
    figures = {
        "prepare_mb_per_s": round(mb / best["prepare"], 2),
        "encode_batch_mb_per_s": round(mb / best["encode_batch"], 2),
        "encode_batch_fast_mb_per_s": round(mb / best["encode_batch_fast"], 2),
        "text_mb": round(mb, 2),
        "documents": len(texts),
        "tokens": tokens,
        "bytes_per_token": round(mb * 1e6 / tokens, 3),
        "vocab_size": tok.vocab_size,
    }
    print(f"prepare: {figures['prepare_mb_per_s']} MB/s (whole call: read, encode, write, hash, copy); tokenizers "
          f"encode_batch {figures['encode_batch_mb_per_s']} MB/s, encode_batch_fast "
          f"{figures['encode_batch_fast_mb_per_s']} MB/s (in-memory texts, ids only)")  # fmt: skip
    emit(figures)


if __name__ == "__main__":
    main()
