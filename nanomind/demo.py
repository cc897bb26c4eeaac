"""`nanomind demo`: the whole pipeline in a few minutes on a laptop CPU, on text every user already has.

    nanomind demo                       # built-in corpus: Python's own help topics and standard-library docstrings
    nanomind demo --data corpus.jsonl   # any {"text": ...} jsonl instead

Trains a tokenizer, prepares token shards, pretrains the `tiny` preset for --minutes, and prints a sample
before and after training with the validation bits-per-byte curve.
"""

from __future__ import annotations

import ast
import json
import shutil
import sysconfig
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanomind.config import arg


@dataclass
class DemoConfig:
    data: list[str] = arg([], '{"text"} jsonl files (default: the built-in corpus made from Python\'s own docs)')
    out: str = arg("runs/demo", "where the corpus, tokenizer, data and checkpoints go")
    minutes: float = arg(5.0, "pretraining time budget; the step count is sized to fit it")
    preset: str = arg("tiny", "model size")
    vocab_size: int = arg(4096, "tokenizer vocabulary")
    batch_size: int = arg(16, "rows per step")
    seq_len: int = arg(256, "tokens per row")
    lr: float = arg(3e-3, "peak learning rate")
    dtype: str = arg("bf16", "bf16 autocast or fp32", choices=["bf16", "fp32"])
    device: str = arg("auto", "cpu, cuda, mps or auto")
    prompt: str = arg("The list", "prompt for the before/after samples")
    seed: int = arg(1337, "seed")

    def __post_init__(self) -> None:
        if self.minutes <= 0:
            raise ValueError(f"--minutes must be > 0, got {self.minutes}")


def python_docs(max_bytes: int = 3_000_000) -> list[str]:
    """English prose that ships with every Python: the help() topics and the docstrings of the standard
    library (read with ast, never imported), in a fixed order."""
    from pydoc_data.topics import topics

    texts = [topics[k].strip() for k in sorted(topics)]
    size = sum(len(t) for t in texts)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip.intersection(path.relative_to(stdlib).parts) or size >= max_bytes:
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, OSError):
            continue  # a few stdlib files are templates or deliberately broken
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node)
                if doc and len(doc) >= 200:
                    texts.append(doc.strip())
                    size += len(doc)
    return texts


def write_builtin_corpus(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as fh:
        for text in python_docs():
            fh.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
    return path


def calibrate_steps(cfg, model_cfg, minutes: float) -> int:
    """Time a few steps on a throwaway model so the LR schedule can end exactly when the time budget does."""
    from nanomind.device import autocast, resolve_device
    from nanomind.model import Transformer
    from nanomind.train.loop import keep_freed_memory
    from nanomind.train.pretrain import cross_entropy

    device = resolve_device(cfg.device)
    keep_freed_memory()
    model = Transformer(model_cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    ids = torch.randint(0, model_cfg.vocab_size, (cfg.batch_size, cfg.seq_len + 1), device=device)
    batch = {"input_ids": ids[:, :-1], "labels": ids[:, 1:]}
    times = []
    for _ in range(6):
        t0 = time.perf_counter()
        with autocast(device, cfg.dtype):
            loss, _ = cross_entropy(model, batch)
        loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - t0)
    # the first steps pay one-off kernel set-up; the fastest later step plus 15% for evaluation and logging
    per_step = min(times[2:]) * 1.15
    return max(20, int(minutes * 60 / per_step))


def sample_text(model, tok, prompt: str, seed: int) -> str:
    from nanomind.generate import SamplingConfig, generate

    s = SamplingConfig(max_new_tokens=60, temperature=0.8, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=seed)
    ids = list(generate(model.eval(), tok.encode(prompt), s, stop_ids=(tok.eos_id,)))
    return prompt + tok.decode(ids)


def sparkline(values: list[float]) -> str:
    bars = "▁▂▃▄▅▆▇█"
    lo, hi = min(values), max(values)
    return "".join(bars[int((v - lo) / (hi - lo + 1e-12) * (len(bars) - 1))] for v in values)


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse
    from nanomind.data import PrepareConfig, prepare
    from nanomind.model import Transformer, preset
    from nanomind.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
    from nanomind.train.pretrain import PretrainConfig, run

    cfg = parse(DemoConfig, argv, "nanomind demo", __doc__.splitlines()[0])
    t_start = time.perf_counter()
    out = Path(cfg.out)
    data = cfg.data
    if not data:
        corpus = write_builtin_corpus(out / "corpus.jsonl")
        print(f"[1/5] built-in corpus: Python's help topics and stdlib docstrings -> {corpus} "
              f"({corpus.stat().st_size / 1e6:.1f} MB)")  # fmt: skip
        data = [str(corpus)]
    else:
        print(f"[1/5] corpus: {', '.join(data)}")
    tok_dir = out / "tokenizer"
    print(f"[2/5] training a {cfg.vocab_size}-token BPE tokenizer -> {tok_dir}")
    train_tokenizer(TokenizerTrainConfig(data=data, vocab_size=cfg.vocab_size, out=str(tok_dir)))
    tok = Tokenizer.load(tok_dir)
    print(f"[3/5] preparing token shards -> {out / 'data'}")
    prepare(PrepareConfig(data=data, tokenizer=str(tok_dir), out=str(out / "data")))

    model_cfg = preset(cfg.preset, vocab_size=tok.vocab_size)
    torch.manual_seed(cfg.seed)
    before = sample_text(Transformer(model_cfg), tok, cfg.prompt, cfg.seed)
    steps = calibrate_steps(cfg, model_cfg, cfg.minutes)
    print(f"[4/5] pretraining `{cfg.preset}` ({model_cfg.num_params() / 1e6:.1f}M parameters) for {steps} steps "
          f"(about {cfg.minutes:g} minutes)")  # fmt: skip
    pcfg = PretrainConfig(
        data=[str(out / "data")], preset=cfg.preset, out=str(out / "pretrain"), steps=steps,
        batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, warmup_steps=max(10, steps // 20),
        dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, eval_every=max(1, steps // 10), eval_batches=8,
        save_every=0, keep_last=1, log_every=5, max_minutes=cfg.minutes * 1.5,
    )  # fmt: skip
    shutil.rmtree(pcfg.out, ignore_errors=True)  # the demo owns this directory: start each demo afresh
    result = run(pcfg)
    from nanomind import checkpoint

    model = checkpoint.load_model(result.checkpoint)  # type: ignore[arg-type]
    after = sample_text(model, tok, cfg.prompt, cfg.seed)
    print("[5/5] results")
    print(f"\nbefore training:\n  {before!r}\n\nafter training:\n  {after!r}\n")
    print("validation bits per byte:")
    for e in result.evals:
        print(f"  step {int(e['step']):>6}  {e['val_bpb']:.3f}")
    bpb = [e["val_bpb"] for e in result.evals]
    print(f"  curve {sparkline(bpb)}  {bpb[0]:.3f} -> {bpb[-1]:.3f}")
    print(f"\ncheckpoint: {result.checkpoint}")
    print(f"try: nanomind generate --ckpt {result.checkpoint} --prompt {cfg.prompt!r}")
    print(f"total time {(time.perf_counter() - t_start) / 60:.1f} minutes")
