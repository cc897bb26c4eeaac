"""Supervised fine-tuning for chat: the loss is on assistant tokens only, conversations are packed without
cross-talk (each attends to itself only, positions restart per conversation).

    nanomind sft --init runs/pretrain --data chat.jsonl --out runs/sft --steps 500

Reasoning SFT is the same stage: assistant turns with `reasoning_content` train `<think>...</think>` and the answer,
and `--tag-weight 10` multiplies the loss on the <think> / </think> tokens by 10 (minimind's reasoning trainer
does this for its <think>/<answer> tags; our template has no answer tags: the answer is what follows </think>).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from nanomind import checkpoint
from nanomind.config import arg
from nanomind.conversations import ChatBatches, ChatData, load_chat
from nanomind.device import resolve_device
from nanomind.model import Transformer
from nanomind.tokenizer import Tokenizer
from nanomind.train.loop import EvalFn, TrainConfig, TrainResult, dist_env, train, unwrap
from nanomind.train.losses import linear_cross_entropy, mtp_loss


@dataclass(kw_only=True)
class SFTConfig(TrainConfig):
    init: str = arg(help="checkpoint to fine-tune (a pretraining run or step directory)")
    data: list[str] = arg(help='conversation jsonl files: {"conversations": [{"role", "content"}, ...]}')
    out: str = arg("runs/sft", "run directory: checkpoints (step_*/) and TensorBoard logs (tb/)")
    seq_len: int = arg(512, "tokens per row; longer conversations are cut at a turn boundary or dropped")
    lr: float = arg(3e-4, "peak learning rate")
    warmup_steps: int = arg(20, "linear warm-up steps")
    packing: bool = arg(True, "pack several conversations per row (--no-packing: one per row, padded)")
    val_fraction: float = arg(0.02, "conversations held out for the validation loss (every Nth one)")
    name: str = arg("nanomind", "fills {{name}} placeholders in the data (identity conversations)")
    author: str = arg("the nanomind project", "fills {{author}} placeholders in the data")
    tag_weight: float = arg(1.0, "reasoning SFT: loss multiplier on the <think> and </think> tokens (1 = off)")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.val_fraction < 0.5:
            raise ValueError(f"--val-fraction must be in [0, 0.5), got {self.val_fraction}")
        if self.tag_weight <= 0:
            raise ValueError(f"--tag-weight must be > 0, got {self.tag_weight}")


def sft_loss(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean cross-entropy over the trained (assistant) tokens; labels are -100 elsewhere. With a `loss_scale`
    [B, T] in the batch (TagWeighted), each token's loss is multiplied by it; the mean still divides by the
    number of trained tokens. Models with MTP modules add their weighted loss (logged as "mtp")."""
    out = model(batch["input_ids"], doc_ids=batch.get("doc_ids"), return_hidden=True, mtp=True)
    scale = batch["loss_scale"].flatten() if "loss_scale" in batch else None
    head = unwrap(model).lm_head.weight
    loss = linear_cross_entropy(out.hidden.flatten(0, 1), head, batch["labels"].flatten(), scale=scale)
    tokens = int((batch["doc_ids"] >= 0).sum()) if "doc_ids" in batch else batch["input_ids"].numel()
    metrics: dict[str, float] = {"tokens": tokens}
    if out.mtp_hidden:  # multi-token prediction (model/mtp.py), within each conversation
        mtp = mtp_loss(out.mtp_hidden, head, batch["labels"], unwrap(model).config.mtp_loss_weight,
                       batch.get("doc_ids"), batch.get("loss_scale"))  # fmt: skip
        loss = loss + mtp
        metrics["mtp"] = mtp.detach()
    if out.aux_loss is not None:  # MoE load balancing
        loss = loss + out.aux_loss
    return loss, metrics


class TagWeighted:
    """SFT batches with a `loss_scale`: `weight` where the label is one of `tag_ids`, 1 elsewhere."""

    def __init__(self, source: ChatBatches, tag_ids: list[int], weight: float):
        self.source, self.tag_ids, self.weight = source, torch.tensor(tag_ids), weight

    def next(self) -> dict[str, torch.Tensor]:
        batch = self.source.next()
        batch["loss_scale"] = torch.where(torch.isin(batch["labels"], self.tag_ids), self.weight, 1.0)
        return batch

    def state_dict(self) -> dict:
        return self.source.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.source.load_state_dict(state)


def split(data: ChatData, val_fraction: float) -> tuple[ChatData, ChatData]:
    """Every Nth conversation goes to validation (deterministic, independent of batch size)."""
    every = max(2, round(1 / val_fraction)) if val_fraction > 0 else 0
    train, val = ChatData(bad=data.bad), ChatData()
    for i, (ids, trained) in enumerate(zip(data.ids, data.trained, strict=True)):
        target = val if every and i % every == every - 1 else train
        target.ids.append(ids)
        target.trained.append(trained)
    return train, val


def make_eval_fn(val: ChatData, batch_size: int, seq_len: int, max_batches: int):
    """Assistant-token loss on held-out conversations (packed the same way, fixed order)."""
    if not val.ids:
        return None
    source = ChatBatches(val, batch_size, seq_len, seed=0)
    pick = np.random.default_rng(0).permutation(len(source.rows))[: batch_size * max_batches]
    rows = pick[np.argsort(-source.row_len[pick], kind="stable")].tolist()  # similar lengths share a batch
    fixed = [source.batch(rows[i : i + batch_size]) for i in range(0, len(rows), batch_size)]

    def evaluate(model: torch.nn.Module) -> dict[str, float]:
        device = next(model.parameters()).device
        nats = count = 0.0
        for b in fixed:
            logits = model(b["input_ids"].to(device), doc_ids=b["doc_ids"].to(device)).logits.float()
            labels = b["labels"].to(device)
            nats += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
            count += (labels != -100).sum().item()
        loss = nats / max(count, 1.0)
        return {"val_loss": loss, "val_ppl": math.exp(min(loss, 50.0))}

    return evaluate


def chat_data(cfg: SFTConfig, tok: Tokenizer, rank: int, world: int) -> tuple[ChatBatches | TagWeighted, EvalFn | None]:
    """Training batches and the held-out evaluation of cfg.data (shared by sft and distill)."""
    data = load_chat(cfg.data, tok, cfg.seq_len, {"name": cfg.name, "author": cfg.author})
    train_data, val_data = split(data, cfg.val_fraction)
    batches = ChatBatches(train_data, cfg.batch_size, cfg.seq_len, cfg.seed, cfg.packing, rank, world, cfg.grad_accum)
    if rank == 0:
        print(data.summary())
        print(f"{len(train_data.ids)} train / {len(val_data.ids)} validation conversations; "
              f"{len(batches.rows)} rows of up to {cfg.seq_len}, {batches.fill():.1%} of computed positions used "
              f"({'packed' if cfg.packing else 'one conversation per row'})")  # fmt: skip
    eval_fn = make_eval_fn(val_data, cfg.batch_size, cfg.seq_len, cfg.eval_batches)
    if cfg.tag_weight == 1.0:
        return batches, eval_fn
    return TagWeighted(batches, [tok.token_id("<think>"), tok.token_id("</think>")], cfg.tag_weight), eval_fn


def load_init(ckpt: str, seq_len: int, device: torch.device, what: str = "model") -> Transformer:
    """A checkpoint to train from (or with), refused when its context is shorter than the rows."""
    model = checkpoint.load_model(ckpt, device)
    if seq_len > model.config.max_position_embeddings:
        raise ValueError(f"--seq-len {seq_len} exceeds the {what}'s max_position_embeddings "
                         f"{model.config.max_position_embeddings}")  # fmt: skip
    return model


def run(cfg: SFTConfig) -> TrainResult:
    rank, world = dist_env()
    device = resolve_device(cfg.device)
    tok_dir = checkpoint.tokenizer_dir(cfg.init)
    tok = Tokenizer.load(tok_dir)
    torch.manual_seed(cfg.seed)
    model = load_init(cfg.init, cfg.seq_len, device)
    batches, eval_fn = chat_data(cfg, tok, rank, world)
    if rank == 0:
        print(f"model: {cfg.init}, {model.num_params() / 1e6:.2f}M parameters, device {device}, {cfg.dtype}")
    return train(model, cfg, batches, sft_loss, eval_fn, tokenizer_dir=tok_dir,
                 info={"stage": "sft", "init": str(cfg.init), "data": cfg.data})  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse

    cfg = parse(SFTConfig, argv, "nanomind sft", __doc__.splitlines()[0])
    result = run(cfg)
    if dist_env()[0] != 0:
        return  # under torchrun, rank 0 reports
    print(f"finished at step {result.step}; checkpoint: {result.checkpoint}")
    if result.evals:
        print(f"validation: assistant-token loss {result.evals[-1]['val_loss']:.4f}")
