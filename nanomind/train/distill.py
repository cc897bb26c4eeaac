"""Knowledge distillation: a student learns from a teacher's full next-token distributions on chat data.

    nanomind distill --teacher runs/big_sft --init runs/small_pt --data chat.jsonl --out runs/distill --steps 500

White-box KD (Hinton et al., arXiv 1503.02531) on the SFT pipeline: the same packed conversations and loss mask,
and per trained token `alpha * CE + (1 - alpha) * T^2 * KL(teacher || student)` at temperature T (`--alpha`,
`--temperature`). Teacher and student may differ in size and shape but must share the tokenizer, so that their
logits index the same vocabulary. The teacher runs frozen, without gradients, on each batch; the validation loss
is the student's assistant-token cross-entropy, comparable with `nanomind sft`'s.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from nanomind import checkpoint
from nanomind.config import arg
from nanomind.device import autocast, resolve_device
from nanomind.model import Transformer
from nanomind.tokenizer import Tokenizer
from nanomind.train.loop import TrainResult, dist_env, train, unwrap
from nanomind.train.losses import distill_loss
from nanomind.train.sft import SFTConfig, chat_data, load_init


@dataclass(kw_only=True)
class DistillConfig(SFTConfig):
    teacher: str = arg(help="teacher checkpoint (any size or shape; must share the student's tokenizer)")
    init: str = arg(help="student checkpoint to start from (e.g. a pretraining run)")
    out: str = arg("runs/distill", "run directory: checkpoints (step_*/) and TensorBoard logs (tb/)")
    alpha: float = arg(0.5, "weight of the cross-entropy on the data; 1 - alpha goes to the KL to the teacher")
    temperature: float = arg(1.0, "softmax temperature of teacher and student in the KL term")

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--alpha must be in [0, 1], got {self.alpha}")
        if self.temperature <= 0:
            raise ValueError(f"--temperature must be > 0, got {self.temperature}")


def check_same_tokenizer(teacher: str, student: str) -> None:
    """A clear error when teacher and student were trained with different tokenizers."""
    a, b = Tokenizer.load(checkpoint.tokenizer_dir(teacher)), Tokenizer.load(checkpoint.tokenizer_dir(student))
    va, vb = checkpoint.load_config(teacher).vocab_size, checkpoint.load_config(student).vocab_size
    if a.backend.to_str() != b.backend.to_str() or va != vb:
        raise ValueError(f"teacher {teacher} (tokenizer vocab {a.vocab_size}, model vocab {va}) and student {student} "
                         f"(tokenizer vocab {b.vocab_size}, model vocab {vb}) must share one tokenizer; distil into "
                         "a student trained with the teacher's tokenizer")  # fmt: skip


def make_loss_fn(teacher: Transformer, alpha: float, temperature: float):
    def loss_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, dict[str, float]]:
        ids, doc_ids, labels = batch["input_ids"], batch.get("doc_ids"), batch["labels"]
        mask = labels != -100  # logits only where there is a target
        out = model(ids, doc_ids=doc_ids, return_hidden=True)
        hidden = out.hidden[mask]  # [N, C]
        student = hidden @ unwrap(model).lm_head.weight.to(hidden.dtype).T  # [N, V]
        with torch.no_grad():
            t_hidden = teacher(ids, doc_ids=doc_ids, return_hidden=True).hidden[mask]
            t_logits = t_hidden @ teacher.lm_head.weight.to(t_hidden.dtype).T
        scale = batch["loss_scale"][mask] if "loss_scale" in batch else None
        loss, _, _ = distill_loss(student, t_logits, labels[mask], alpha, temperature, scale)
        if out.aux_loss is not None:  # MoE load balancing
            loss = loss + out.aux_loss
        return loss, {"tokens": int((doc_ids >= 0).sum()) if doc_ids is not None else ids.numel()}

    return loss_fn


def run(cfg: DistillConfig) -> TrainResult:
    rank, world = dist_env()
    device = resolve_device(cfg.device)
    check_same_tokenizer(cfg.teacher, cfg.init)
    tok_dir = checkpoint.tokenizer_dir(cfg.init)
    torch.manual_seed(cfg.seed)
    model = load_init(cfg.init, cfg.seq_len, device)
    teacher = load_init(cfg.teacher, cfg.seq_len, device, "teacher").eval().requires_grad_(False)
    batches, eval_fn = chat_data(cfg, Tokenizer.load(tok_dir), rank, world)
    if rank == 0:
        print(f"student: {cfg.init}, {model.num_params() / 1e6:.2f}M parameters; teacher: {cfg.teacher}, "
              f"{teacher.num_params() / 1e6:.2f}M; device {device}, {cfg.dtype}")  # fmt: skip
        if eval_fn is not None:
            with torch.no_grad(), autocast(device, cfg.dtype):
                print(f"teacher validation: assistant-token loss {eval_fn(teacher)['val_loss']:.4f}")
    info = {"stage": "distill", "init": str(cfg.init), "teacher": str(cfg.teacher), "data": cfg.data}
    return train(model, cfg, batches, make_loss_fn(teacher, cfg.alpha, cfg.temperature), eval_fn, tok_dir, info)


def main(argv: list[str] | None = None) -> None:
    from nanomind.config import parse

    cfg = parse(DistillConfig, argv, "nanomind distill", __doc__.splitlines()[0])
    result = run(cfg)
    if dist_env()[0] != 0:
        return  # under torchrun, rank 0 reports
    print(f"finished at step {result.step}; checkpoint: {result.checkpoint}")
    if result.evals:
        print(f"validation: student assistant-token loss {result.evals[-1]['val_loss']:.4f}")
