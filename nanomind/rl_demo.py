"""`nanomind demo grpo`: reinforcement learning that visibly works on a laptop CPU (about 6 minutes on 2 cores).

    nanomind demo grpo                      # the whole run: data, tokenizer, SFT from scratch, GRPO, the table
    nanomind demo grpo --grpo-steps 0       # stop after SFT (the starting point alone)

The toy task is two-number addition (operands 0-99) asked in a few phrasings, on three disjoint sets of operand
pairs: SFT conversations, RL prompts and held-out prompts. The SFT answers come in three styles, only one of which
ends with a \\boxed{} answer, so the `tiny` model learns to add but rarely boxes its answer. GRPO then optimises the
rule reward `numeric,format_boxed:0.5` (1 for the right sum, +0.5 for ending with \\boxed{...}) on the RL prompts.
The held-out prompts are answered before and after, greedily and by sampling, and the table reports the reward,
the accuracy and the boxed share.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from nanomind.config import arg

QUESTIONS = ["What is {a} + {b}?", "Compute {a} plus {b}.", "{a} + {b} = ?", "Add {a} and {b}."]
ANSWERS = ["{a} + {b} = {c}.", "The answer is {c}.", "{a} + {b} = {c}, so the answer is \\boxed{{{c}}}."]


@dataclass
class RLDemoConfig:
    out: str = arg("runs/demo-grpo", "where the data, tokenizer and checkpoints go")
    preset: str = arg("tiny", "model size")
    max_number: int = arg(99, "operands are drawn from 0..max_number")
    heldout: int = arg(128, "held-out questions (operand pairs used neither in SFT nor in RL)")
    sft_steps: int = arg(1500, "SFT steps from scratch (at 1,000 the tiny model could not yet add)")
    grpo_steps: int = arg(60, "GRPO steps (0: stop after SFT)")
    batch_size: int = arg(8, "GRPO prompts per step")
    group_size: int = arg(8, "GRPO samples per prompt")
    lr: float = arg(1e-4, "GRPO learning rate")
    kl_beta: float = arg(0.02, "GRPO KL weight")
    loss: str = arg("grpo", "policy loss", choices=["grpo", "dr_grpo", "cispo"])
    reward: str = arg("numeric,format_boxed:0.5", "GRPO reward spec (rewards.py)")
    dtype: str = arg("bf16", "bf16 autocast or fp32", choices=["bf16", "fp32"])
    device: str = arg("auto", "cpu, cuda, mps or auto")
    seed: int = arg(1337, "seed")


def make_data(out: Path, max_number: int, heldout: int, seed: int) -> dict[str, Path]:
    """SFT conversations, RL prompts and held-out prompts on three disjoint sets of operand pairs, and the
    tokenizer's training text, as jsonl."""
    rng = random.Random(seed)
    pairs = [(a, b) for a in range(max_number + 1) for b in range(max_number + 1)]
    rng.shuffle(pairs)
    held, rest = pairs[:heldout], pairs[heldout:]
    # RL prompts are sums SFT never showed: on memorised ones a reward teaches nothing that carries over
    sft, rl = rest[: len(rest) * 3 // 5], rest[len(rest) * 3 // 5 :]

    def question(a: int, b: int) -> str:
        return rng.choice(QUESTIONS).format(a=a, b=b)

    files = {name: out / f"{name}.jsonl" for name in ("sft", "prompts", "heldout", "text")}
    out.mkdir(parents=True, exist_ok=True)
    with open(files["sft"], "w") as f:
        for a, b in sft:
            turns = [{"role": "user", "content": question(a, b)},
                     {"role": "assistant", "content": rng.choice(ANSWERS).format(a=a, b=b, c=a + b)}]  # fmt: skip
            f.write(json.dumps({"conversations": turns}) + "\n")
    # The tokenizer learns the words from texts whose numbers are lone digits, so it has no multi-digit tokens:
    # with one token per digit, addition is a rule the model can learn, not a table of 10,000 facts.
    with open(files["text"], "w") as f:
        for _ in range(2000):
            a, b, c = (rng.choice("0123456789") for _ in range(3))
            text = f"{question(a, b)}\n{rng.choice(ANSWERS).format(a=a, b=b, c=c)}"
            f.write(json.dumps({"text": text}) + "\n")
    for name, items in (("prompts", rl), ("heldout", held)):
        with open(files[name], "w") as f:
            for a, b in items:
                f.write(json.dumps({"prompt": question(a, b), "answer": str(a + b)}) + "\n")
    return files


def score(ckpt: Path, heldout: Path, device: torch.device, temperature: float, spec: str) -> dict[str, float]:
    """Held-out reward, accuracy and boxed share of one answer per prompt (greedy at temperature 0)."""
    from nanomind import checkpoint
    from nanomind.rewards import format_boxed, numeric, parse_reward_spec
    from nanomind.tokenizer import Tokenizer
    from nanomind.train.grpo import answer_texts, load_prompts, sample_groups

    tok = Tokenizer.load(checkpoint.tokenizer_dir(ckpt))
    model = checkpoint.load_model(ckpt, device).eval()
    prompts = load_prompts([str(heldout)], tok, 96, True)
    outs = sample_groups(model, [p.ids for p in prompts], 1, 32, temperature, tok.im_end_id, list(range(len(prompts))))
    texts = answer_texts(tok, outs)
    reward = parse_reward_spec(spec)
    n = len(texts)
    return {
        "reward": sum(reward(t, p.answer) for t, p in zip(texts, prompts, strict=True)) / n,
        "accuracy": sum(numeric(t, p.answer) for t, p in zip(texts, prompts, strict=True)) / n,
        "boxed": sum(format_boxed(t) for t in texts) / n,
    }


def main(argv: list[str] | None = None) -> None:
    from nanomind import checkpoint
    from nanomind.config import parse
    from nanomind.device import resolve_device
    from nanomind.model import Transformer, preset
    from nanomind.tokenizer import Tokenizer, TokenizerTrainConfig, train_tokenizer
    from nanomind.train.grpo import GRPOConfig
    from nanomind.train.grpo import run as run_grpo
    from nanomind.train.sft import SFTConfig
    from nanomind.train.sft import run as run_sft

    cfg = parse(RLDemoConfig, argv, "nanomind demo grpo", __doc__.splitlines()[0])
    t0 = time.perf_counter()
    out = Path(cfg.out)
    device = resolve_device(cfg.device)
    files = make_data(out / "data", cfg.max_number, cfg.heldout, cfg.seed)
    print(f"[1/4] toy addition data -> {out / 'data'}")
    tok_dir = out / "tokenizer"
    train_tokenizer(TokenizerTrainConfig(data=[str(files["text"])], vocab_size=400, out=str(tok_dir)))
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(cfg.seed)
    model = Transformer(preset(cfg.preset, vocab_size=tok.vocab_size, max_position_embeddings=256))
    init = checkpoint.save(out / "init", 0, model, tok_dir, info={"stage": "init"})
    print(f"[2/4] SFT of a fresh `{cfg.preset}` model ({model.num_params() / 1e6:.1f}M) for {cfg.sft_steps} steps")
    run_sft(SFTConfig(init=str(init), data=[str(files["sft"])], out=str(out / "sft"), steps=cfg.sft_steps,
                          batch_size=16, seq_len=128, lr=2e-3, warmup_steps=20, eval_every=0, save_every=0,
                          device=cfg.device, dtype=cfg.dtype, seed=cfg.seed, tensorboard=False))  # fmt: skip
    rows = {"SFT": [score(out / "sft", files["heldout"], device, t, cfg.reward) for t in (0.0, 1.0)]}
    if cfg.grpo_steps:
        print(f"[3/4] GRPO for {cfg.grpo_steps} steps: {cfg.batch_size} prompts x {cfg.group_size} samples, "
              f"reward {cfg.reward}")  # fmt: skip
        run_grpo(GRPOConfig(init=str(out / "sft"), data=[str(files["prompts"])],
                                 eval_data=[str(files["heldout"])], reward=cfg.reward,
                                 out=str(out / "grpo"), steps=cfg.grpo_steps, batch_size=cfg.batch_size,
                                 group_size=cfg.group_size, max_new_tokens=32, seq_len=128, lr=cfg.lr,
                                 kl_beta=cfg.kl_beta, loss=cfg.loss, eval_every=0, save_every=0,
                                 device=cfg.device, dtype=cfg.dtype, seed=cfg.seed))  # fmt: skip
        rows["GRPO"] = [score(out / "grpo", files["heldout"], device, t, cfg.reward) for t in (0.0, 1.0)]
    print(f"[4/4] {cfg.heldout} held-out questions, one answer each ({(time.perf_counter() - t0) / 60:.1f} min):")
    print(f"{'model':<6} {'greedy reward':>13} {'accuracy':>9} {'boxed':>6}   {'sampled reward':>14} {'accuracy':>9} "
          f"{'boxed':>6}")  # fmt: skip
    for name, (g, s) in rows.items():
        print(f"{name:<6} {g['reward']:>13.3f} {g['accuracy']:>9.1%} {g['boxed']:>6.1%}   {s['reward']:>14.3f} "
              f"{s['accuracy']:>9.1%} {s['boxed']:>6.1%}")  # fmt: skip
    print(json.dumps({k: {"greedy": g, "sampled": s} for k, (g, s) in rows.items()}))
