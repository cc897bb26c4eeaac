"""Reward model training on preference pairs (Bradley-Terry): a transformer with a scalar head learns to score the
chosen answer above the rejected one. Its checkpoint is a GRPO reward: `nanomind grpo --reward model:runs/rm`.

    nanomind reward train --init runs/sft --data ../shared/data/dpo/dpo_hh_harmless_en.jsonl --out runs/rm

Pairs are read as DPO reads them ({"chosen": [messages], "rejected": [messages]}, the same prompt before the final
answer); each side is scored at its last token, the answer's closing <|im_end|>. The body starts from --init (a
pretrained or SFT checkpoint, whose language knowledge the head builds on); the `score` head starts at random.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomind import checkpoint
from nanomind.config import arg
from nanomind.device import resolve_device
from nanomind.model.reward import RewardModel
from nanomind.tokenizer import Tokenizer
from nanomind.train.dpo import PairBatches, Pairs, held_out, load_pairs, make_batch
from nanomind.train.loop import TrainConfig, TrainResult, dist_env, train, unwrap
from nanomind.train.rl_losses import bradley_terry_loss
from nanomind.train.sft import load_init


@dataclass(kw_only=True)
class RewardConfig(TrainConfig):
    init: str = arg(help="checkpoint the reward model's body starts from (pretrained or SFT), or a reward model")
    data: list[str] = arg(help='preference jsonl files: {"chosen": [messages], "rejected": [messages]}')
    out: str = arg("runs/reward", "run directory: checkpoints (step_*/) and TensorBoard logs (tb/)")
    batch_size: int = arg(8, "pairs per micro-batch (each pair is two rows)")
    seq_len: int = arg(512, "tokens per row: prompt + answer")
    lr: float = arg(5e-5, "peak learning rate")
    warmup_steps: int = arg(10, "linear warm-up steps")
    eval_every: int = arg(50, "evaluate every N steps (0 = only at the end)")
    val_fraction: float = arg(0.05, "pairs held out for the ranking accuracy (every Nth one)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError(f"--val-fraction must be in [0, 0.5), got {self.val_fraction}")


def scores(model: torch.nn.Module, ids: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """[R] fp32 rewards of rows ids [R, T], read at positions last [R] (each row's final token). The forward goes
    through `model` (maybe a DDP wrapper, so gradients are synchronised); the head is the unwrapped model's."""
    hidden = model(ids, return_hidden=True).hidden  # [R, T, C]
    h = hidden[torch.arange(len(ids), device=ids.device), last]  # [R, C]
    return unwrap(model).score(h).squeeze(-1).float()


def last_positions(labels: torch.Tensor) -> torch.Tensor:
    """[R] index of each row's last token: one past its last labelled position (labels[t] predicts token t+1)."""
    t = torch.arange(labels.shape[1], device=labels.device)
    return torch.where(labels != -100, t, -1).amax(1) + 1


def pair_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """make_batch's rows: the P chosen answers, then the P rejected ones."""
    r = scores(model, batch["input_ids"], last_positions(batch["labels"]))
    half = len(r) // 2
    loss, acc = bradley_terry_loss(r[:half], r[half:])
    return loss, {"tokens": int(batch["tokens"]), "acc": acc.item()}


def make_eval_fn(data: Pairs, batches: list[list[int]], seq_len: int):
    """Bradley-Terry loss, ranking accuracy and mean margin on held-out pairs."""
    if not batches:
        return None
    fixed = [make_batch(data, pairs, seq_len) for pairs in batches]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        loss = correct = margin = n = 0.0
        for b in fixed:
            r = scores(model, b["input_ids"].to(device), last_positions(b["labels"].to(device)))
            half = len(r) // 2
            pair_loss_, acc = bradley_terry_loss(r[:half], r[half:])
            loss += pair_loss_.item() * half
            correct += acc.item() * half
            margin += (r[:half] - r[half:]).sum().item()
            n += half
        return {"val_loss": loss / n, "val_acc": correct / n, "val_margin": margin / n}

    return evaluate


def load_reward_body(ckpt: str, seq_len: int, device: torch.device) -> RewardModel:
    """A RewardModel from a reward checkpoint, or a language model's checkpoint plus a fresh score head."""
    model = load_init(ckpt, seq_len, device)
    if isinstance(model, RewardModel):
        return model
    scored = RewardModel(model.config)
    missing, unexpected = scored.load_state_dict(model.state_dict(), strict=False)
    assert missing == ["score.weight"] and not unexpected, (missing, unexpected)
    return scored.to(device)


def run(cfg: RewardConfig) -> TrainResult:
    rank, world = dist_env()
    device = resolve_device(cfg.device)
    tok_dir = checkpoint.tokenizer_dir(cfg.init)
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(cfg.seed)
    model = load_reward_body(cfg.init, cfg.seq_len, device)
    data = load_pairs(cfg.data, tok, cfg.seq_len)
    train_index, val_batches = held_out(data, cfg.val_fraction, cfg.batch_size, cfg.eval_batches)
    if rank == 0:
        print(data.summary())
        print(f"{len(train_index)} train / {sum(map(len, val_batches))} evaluated held-out pairs")
        print(f"reward model from {cfg.init}: {model.num_params() / 1e6:.2f}M parameters, device {device}, {cfg.dtype}")
    batches = PairBatches(data, train_index, cfg.batch_size, cfg.seq_len, cfg.seed, rank, world, cfg.grad_accum)
    return train(model, cfg, batches, pair_loss, make_eval_fn(data, val_batches, cfg.seq_len), tokenizer_dir=tok_dir,
                 info={"stage": "reward", "init": str(cfg.init), "data": cfg.data})  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse

    cfg = parse(RewardConfig, argv, "nanomind reward train", __doc__.splitlines()[0])
    result = run(cfg)
    if dist_env()[0] != 0:
        return
    print(f"finished at step {result.step}; checkpoint: {result.checkpoint}")
    if result.evals:
        e = result.evals[-1]
        print(f"held-out pairs: chosen ranked above rejected {e['val_acc']:.1%}, mean margin {e['val_margin']:.3f}, "
              f"loss {e['val_loss']:.4f}")  # fmt: skip
