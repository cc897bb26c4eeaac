"""SFT throughput packed vs padded, through the real loop: minimind3-30m (random init), rows of 512 tokens,
batch 8, bf16, on ../shared/data/sft/*.jsonl with a 6400-token tokenizer trained on the shared tokenizer corpus.

Reports real (non-padding) tokens/s, trained (assistant) tokens/s, and the time one pass over all conversations
takes, which is what packing buys: fewer rows for the same conversations.

    python benchmarks/sft_throughput.py [--steps 6] [--data a.jsonl ...] [--tokenizer DIR]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from common import emit, header

from nanomind.conversations import ChatBatches, load_chat
from nanomind.model import Transformer, preset
from nanomind.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
from nanomind.train.loop import TrainConfig, train
from nanomind.train.sft import sft_loss

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def measure(batches: ChatBatches, steps: int, warmup: int, seq_len: int) -> dict:
    torch.manual_seed(0)
    model = Transformer(preset("minimind3-30m"))
    stamps, trained, positions = [], [], []

    def timed(m, b):
        stamps.append(time.perf_counter())
        trained.append(int(b["n_targets"]))
        positions.append(b["input_ids"].numel())  # packed batches are cut to their longest row
        return sft_loss(m, b)

    with tempfile.TemporaryDirectory() as out:
        cfg = TrainConfig(out=out, steps=warmup + steps + 1, batch_size=batches.batch_size, seq_len=seq_len,
                          eval_every=0, save_every=0, tensorboard=False, log_every=1000)  # fmt: skip
        train(model, cfg, batches, timed)
    span = slice(warmup, warmup + steps)
    seconds = stamps[warmup + steps] - stamps[warmup]
    return {
        "step_s": seconds / steps,
        "rows": len(batches.rows),
        "fill": batches.fill(),
        "positions_per_s": sum(positions[span]) / seconds,
        "trained_per_s": sum(trained[span]) / seconds,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", nargs="+", default=sorted(str(f) for f in (SHARED / "sft").glob("*.jsonl")))
    p.add_argument("--tokenizer", default="")
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=512)
    args = p.parse_args()
    header("SFT throughput, packed vs padded, minimind3-30m")
    with tempfile.TemporaryDirectory() as tmp:
        tok_dir = args.tokenizer
        if not tok_dir:
            tok_dir = str(Path(tmp) / "tok")
            corpus = str(SHARED / "tokenizer" / "tokenizer_corpus.jsonl")
            train_tokenizer(TokenizerTrainConfig(data=[corpus], vocab_size=6400, out=tok_dir))
        data = load_chat(args.data, Tokenizer.load(tok_dir), args.seq_len)
    print(data.summary())
    total = sum(len(i) for i in data.ids)
    figures: dict = {"benchmark": "sft_throughput", "conversations": len(data.ids), "tokens": total}
    for packed in (True, False):
        batches = ChatBatches(data, args.batch_size, args.seq_len, seed=0, packed=packed)
        r = measure(batches, args.steps, args.warmup, args.seq_len)
        name = "packed" if packed else "padded"
        positions = r["positions_per_s"]
        real = positions * r["fill"]
        epoch_min = total / real / 60  # every conversation token once, at the measured rate
        print(f"{name}: {r['rows']} rows, {r['fill']:.1%} of computed positions real, {r['step_s']:.3f} s/step, "
              f"{positions:,.0f} positions/s, {real:,.0f} real tokens/s, {r['trained_per_s']:,.0f} trained tokens/s, "
              f"one pass over the data {epoch_min:.1f} min")  # fmt: skip
        figures[name] = {"rows": r["rows"], "fill": round(r["fill"], 4), "step_s": round(r["step_s"], 4),
                         "real_tokens_per_s": round(real, 1), "epoch_minutes": round(epoch_min, 2)}  # fmt: skip
    emit(figures)


if __name__ == "__main__":
    main()
