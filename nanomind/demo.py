"""`nanomind demo`: the whole pipeline in a few minutes on a laptop CPU, on text every user already has.

    nanomind demo                       # built-in corpus: Python's own help topics and standard-library docstrings
    nanomind demo --data corpus.jsonl   # any {"text": ...} jsonl instead

Trains a tokenizer, prepares token shards, pretrains the `tiny` preset for --minutes, prints a sample before and
after training with the validation bits-per-byte curve, then fine-tunes it to chat (SFT) on questions about
Python's documentation plus identity conversations, and prints its answers to three questions.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from nanomind.config import arg
from nanomind.demo_data import python_chats, write_builtin_corpus, write_jsonl


@dataclass
class DemoConfig:
    data: list[str] = arg([], '{"text"} jsonl files (default: the built-in corpus made from Python\'s own docs)')
    out: str = arg("runs/demo", "where the corpus, tokenizer, data and checkpoints go")
    minutes: float = arg(5.0, "pretraining time budget; the step count is sized to fit it")
    sft_minutes: float = arg(2.0, "chat fine-tuning (SFT) time budget, at most 4 passes over the data (0 = skip)")
    preset: str = arg("tiny", "model size")
    vocab_size: int = arg(4096, "tokenizer vocabulary")
    batch_size: int = arg(16, "rows per step")
    seq_len: int = arg(256, "tokens per row")
    lr: float = arg(3e-3, "peak learning rate")
    dtype: str = arg("bf16", "bf16 autocast or fp32", choices=["bf16", "fp32"])
    device: str = arg("auto", "cpu, cuda, mps or auto")
    prompt: str = arg("The list", "prompt for the before/after samples")
    questions: list[str] = arg(
        ["Who are you?", "What is the with statement?", "Explain the json module in Python."],
        "questions for the chat model after SFT",
    )
    seed: int = arg(1337, "seed")

    def __post_init__(self) -> None:
        if self.minutes <= 0 or self.sft_minutes < 0:
            raise ValueError(f"--minutes must be > 0 and --sft-minutes >= 0, got {self.minutes}, {self.sft_minutes}")


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
        print(f"[1/6] built-in corpus: Python's help topics and stdlib docstrings -> {corpus} "
              f"({corpus.stat().st_size / 1e6:.1f} MB)")  # fmt: skip
        data = [str(corpus)]
    else:
        print(f"[1/6] corpus: {', '.join(data)}")
    tok_dir = out / "tokenizer"
    print(f"[2/6] training a {cfg.vocab_size}-token BPE tokenizer -> {tok_dir}")
    train_tokenizer(TokenizerTrainConfig(data=data, vocab_size=cfg.vocab_size, out=str(tok_dir)))
    tok = Tokenizer.load(tok_dir)
    print(f"[3/6] preparing token shards -> {out / 'data'}")
    prepare(PrepareConfig(data=data, tokenizer=str(tok_dir), out=str(out / "data")))

    model_cfg = preset(cfg.preset, vocab_size=tok.vocab_size)
    torch.manual_seed(cfg.seed)
    before = sample_text(Transformer(model_cfg), tok, cfg.prompt, cfg.seed)
    steps = calibrate_steps(cfg, model_cfg, cfg.minutes)
    print(f"[4/6] pretraining `{cfg.preset}` ({model_cfg.num_params() / 1e6:.1f}M parameters) for {steps} steps "
          f"(about {cfg.minutes:g} minutes)")  # fmt: skip
    pcfg = PretrainConfig(
        data=[str(out / "data")], preset=cfg.preset, out=str(out / "pretrain"), steps=steps,
        batch_size=cfg.batch_size, seq_len=cfg.seq_len, lr=cfg.lr, warmup_steps=max(10, steps // 20),
        dtype=cfg.dtype, device=cfg.device, seed=cfg.seed, eval_every=max(1, steps // 10), eval_batches=8,
        save_every=0, keep_last=1, log_every=5, max_minutes=cfg.minutes * 1.5,
    )  # fmt: skip
    shutil.rmtree(pcfg.out, ignore_errors=True)  # the demo owns this directory: start each demo afresh
    result = run(pcfg)
    if result.interrupted:
        print(f"interrupted: checkpoint saved at {result.checkpoint}")
        return
    from nanomind import checkpoint

    model = checkpoint.load_model(result.checkpoint)  # type: ignore[arg-type]
    after = sample_text(model, tok, cfg.prompt, cfg.seed)
    print(f"\nbefore training:\n  {before!r}\n\nafter training:\n  {after!r}\n")
    print("validation bits per byte:")
    for e in result.evals:
        print(f"  step {int(e['step']):>6}  {e['val_bpb']:.3f}")
    bpb = [e["val_bpb"] for e in result.evals]
    print(f"  curve {sparkline(bpb)}  {bpb[0]:.3f} -> {bpb[-1]:.3f}")
    print(f"\npretrained checkpoint: {result.checkpoint}")
    final = result.checkpoint
    if cfg.sft_minutes > 0:
        final = chat_stage(cfg, out, model_cfg, result.checkpoint)
    print(f"\ntry: nanomind generate --ckpt {result.checkpoint} --prompt {cfg.prompt!r}")
    if cfg.sft_minutes > 0:
        print(f"     nanomind chat --ckpt {final}")
    print(f"total time {(time.perf_counter() - t_start) / 60:.1f} minutes")


def chat_stage(cfg: DemoConfig, out: Path, model_cfg, pretrained: Path) -> Path:
    """SFT on the built-in chat data, then three questions."""
    from nanomind import checkpoint
    from nanomind.chat import ChatConfig, Session
    from nanomind.conversations import load_chat, pack
    from nanomind.tokenizer import Tokenizer
    from nanomind.train.sft import SFTConfig, run

    chats = write_jsonl(out / "chats.jsonl", [{"conversations": c} for c in python_chats()])
    seq_len = 256
    steps = calibrate_steps(replace(cfg, seq_len=seq_len), model_cfg, cfg.sft_minutes)
    # more than ~4 passes over this small chat set only overfits (measured: held-out loss 3.30 after 4 passes,
    # 3.96 after 16), so the time budget is an upper bound
    lengths = [len(i) for i in load_chat([str(chats)], Tokenizer.load(out / "tokenizer"), seq_len).ids]
    steps = min(steps, max(20, 4 * len(pack(lengths, seq_len)) // cfg.batch_size))
    print(f"[5/6] chat fine-tuning (SFT) on {chats} for {steps} steps (at most {cfg.sft_minutes:g} minutes)")
    scfg = SFTConfig(
        init=str(pretrained), data=[str(chats)], out=str(out / "sft"), steps=steps, batch_size=cfg.batch_size,
        seq_len=seq_len, lr=cfg.lr / 3, warmup_steps=max(5, steps // 20), dtype=cfg.dtype, device=cfg.device,
        seed=cfg.seed, eval_every=max(1, steps // 4), eval_batches=4, save_every=0, keep_last=1, log_every=5,
        max_minutes=cfg.sft_minutes * 1.5, val_fraction=0.05,
    )  # fmt: skip
    shutil.rmtree(scfg.out, ignore_errors=True)
    result = run(scfg)
    print("[6/6] questions for the chat model")
    model = checkpoint.load_model(result.checkpoint).eval()  # type: ignore[arg-type]
    tok = Tokenizer.load(checkpoint.tokenizer_dir(result.checkpoint))  # type: ignore[arg-type]
    session = Session(model, tok, ChatConfig(ckpt=str(result.checkpoint), max_new_tokens=80, temperature=0.7,
                                             top_k=40, repetition_penalty=1.2, seed=cfg.seed))  # fmt: skip
    for q in cfg.questions:
        print(f"\nyou> {q}\nbot> ", end="")
        session.reply(q)
        session.history = []  # each question on its own
    return result.checkpoint  # type: ignore[return-value]
