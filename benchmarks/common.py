"""Shared by the benchmark scripts: machine description, the final JSON line, and the shared pretraining data and
run that the architecture comparisons (moe_vs_dense.py, arch_report.py) train every preset on."""

from __future__ import annotations

import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    info = {"cpu": cpu, "cores": os.cpu_count(), "threads": torch.get_num_threads(), "torch": torch.__version__}
    if torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def header(name: str) -> None:
    print(f"# {name}")
    print(f"command: {' '.join([os.path.basename(sys.executable)] + sys.argv)}")
    print(f"machine: {machine()}")
    print(f"date: {time.strftime('%Y-%m-%d %H:%M')}")


def matmul_peak(dtype: torch.dtype, device: str = "cpu", n: int = 2048, seconds: float = 2.0) -> float:
    """Best sustained FLOP/s of a square matmul: the 100% of MFU."""
    a = torch.randn(n, n, dtype=dtype, device=device)
    b = torch.randn(n, n, dtype=dtype, device=device)
    best = 0.0
    t_end = time.perf_counter() + seconds
    while time.perf_counter() < t_end:
        t0 = time.perf_counter()
        a @ b
        if device != "cpu":
            torch.cuda.synchronize()
        best = max(best, 2 * n**3 / (time.perf_counter() - t0))
    return best


def emit(figures: dict) -> None:
    print(json.dumps(figures))


def pretrain_data(work: Path, data: list[str] | None = None, vocab_size: int = 6400) -> Path:
    """A prepared data directory: `data` itself when it is one directory made by `nanomind prepare`, else the jsonl
    files `data` (default: all of ../shared/data/pretrain) tokenized into `work`/data by a `vocab_size` BPE trained
    on ../shared/data/tokenizer, one tokenizer for every model compared."""
    from nanomind.data import PrepareConfig, prepare
    from nanomind.tokenizer import TokenizerTrainConfig, train_tokenizer

    if data and len(data) == 1 and (Path(data[0]) / "meta.json").is_file():
        return Path(data[0])
    tok_dir = str(work / "tok")
    train_tokenizer(TokenizerTrainConfig(data=[str(SHARED / "tokenizer" / "tokenizer_corpus.jsonl")],
                                         vocab_size=vocab_size, out=tok_dir))  # fmt: skip
    files = data or sorted(str(f) for f in (SHARED / "pretrain").glob("*.jsonl"))
    prepare(PrepareConfig(data=files, tokenizer=tok_dir, out=str(work / "data")))
    return work / "data"


def pretrain_preset(name: str, data: Path, out: Path, args, device: str = "auto"):
    """Pretrain preset `name` from seed 0 on prepared `data` through the real loop: args.steps steps of
    args.batch_size x args.seq_len tokens, peak lr args.lr (warm-up a tenth of the steps, then cosine), args.dtype,
    validation every args.eval_every steps on args.eval_batches batches. Returns (model, TrainResult, training
    tokens/s of the median step)."""
    from nanomind.data import PackedBatches, TokenShards
    from nanomind.device import resolve_device
    from nanomind.model import Transformer, preset
    from nanomind.tokenizer import Tokenizer
    from nanomind.train.loop import TrainConfig, train
    from nanomind.train.pretrain import cross_entropy, make_eval_fn

    tok = Tokenizer.load(data / "tokenizer")
    torch.manual_seed(0)
    model = Transformer(preset(name, vocab_size=tok.vocab_size))
    stamps: list[float] = []

    def timed(m, b):
        stamps.append(time.perf_counter())
        return cross_entropy(m, b)

    cfg = TrainConfig(out=str(out / name), steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len,
                      lr=args.lr, warmup_steps=args.steps // 10, dtype=args.dtype, eval_every=args.eval_every,
                      eval_batches=args.eval_batches, save_every=0, tensorboard=False, log_every=10,
                      device=device)  # fmt: skip
    model.to(resolve_device(device))
    val = TokenShards(data, "val")
    evaluate = make_eval_fn(val, torch.tensor(tok.token_bytes()), args.batch_size, args.seq_len, args.eval_batches)
    batches = PackedBatches(TokenShards(data, "train"), args.batch_size, args.seq_len, seed=0)
    result = train(model, cfg, batches, timed, evaluate)
    steps = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    step_s = statistics.median(steps[2:]) if len(steps) > 3 else statistics.median(steps or [float("nan")])
    return model, result, args.batch_size * args.seq_len / step_s
