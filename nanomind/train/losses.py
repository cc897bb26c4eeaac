"""Loss functions: small and pure, shapes in the docstrings."""

from __future__ import annotations

import torch
import torch.nn.functional as F


class _ChunkedLinearCrossEntropy(torch.autograd.Function):
    """Cross-entropy of `hidden @ weight.T` without materialising the [N, V] logits of the whole batch.

    Rows are processed in chunks: each chunk's fp32 logits are made and turned into (softmax - one_hot) / n_valid,
    stored in the compute dtype; two matmuls then give the gradients of hidden and weight, which backward returns
    scaled by the incoming gradient. The loss is the last op of a step, so computing its gradient in forward costs
    nothing extra, and the [N, V] fp32 logits, their log-softmax and its gradient (3 x 105 MB at 4096 x 6400) are
    never allocated. On CPUs this removes the largest memory-bound ops of a small model's step.
    `scale` [N] (optional) multiplies each row's loss: the result is sum(scale * ce) / (number of valid rows).
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int, scale=None):  # type: ignore[override]
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax precision: fp32 at least
        n_valid = (labels != -100).sum().clamp(min=1)
        row_w = (labels != -100).to(acc) * (1.0 if scale is None else scale)  # [N] each row's share of the loss
        w = weight.to(hidden.dtype)
        # d loss / d logits for every row, in the compute dtype: [N, V] (half the size of fp32 logits)
        grad_logits = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ w.T).to(acc)  # [chunk, V]
            valid = row_w[start : start + chunk]
            safe_y = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe_y[:, None]).squeeze(1)) * valid).sum()
            g = torch.softmax(logits, dim=-1)
            g[torch.arange(len(y), device=y.device), safe_y] -= 1.0
            grad_logits[start : start + chunk] = g * (valid[:, None] / n_valid)
        # two large matmuls instead of one small pair per chunk; none for a frozen lm_head (LoRA)
        grad_weight = (grad_logits.T @ hidden).to(weight.dtype) if weight.requires_grad else None
        ctx.save_for_backward(grad_logits @ w, grad_weight)
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, None if grad_weight is None else grad_weight * grad_out, None, None, None


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    chunk: int = 256,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T against labels (-100 = ignored).

    hidden [N, C], weight [V, C], labels [N] -> scalar. Equal to F.cross_entropy(hidden @ weight.T, labels)
    but computed chunk by chunk (see _ChunkedLinearCrossEntropy); without grad it just evaluates in chunks.
    scale [N] (optional): per-token loss multipliers: sum(scale * ce) / (number of valid labels).
    """
    assert bool(((labels >= 0) | (labels == -100)).all()), "labels must be token ids or -100 (ignored)"
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk, scale)
    w, acc = weight.to(hidden.dtype), torch.promote_types(hidden.dtype, torch.float32)
    ce = torch.cat([F.cross_entropy((h @ w.T).to(acc), y, ignore_index=-100, reduction="none")
                    for h, y in zip(hidden.split(chunk), labels.split(chunk), strict=True)])  # fmt: skip
    return (ce if scale is None else ce * scale).sum() / (labels != -100).sum().clamp(min=1)


def dpo_loss(
    pc: torch.Tensor, pr: torch.Tensor, rc: torch.Tensor, rr: torch.Tensor, beta: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct preference optimisation (arXiv 2305.18290, eq. 7).

    pc, pr [B]: the policy's log-probabilities of the chosen / rejected answers (sums over their tokens);
    rc, rr [B]: the frozen reference's. Returns (loss: mean of -log sigmoid(beta * (reward gap)), chosen rewards
    [B], rejected rewards [B]) where a reward is beta * (policy - reference) log-probability."""
    chosen, rejected = beta * (pc - rc), beta * (pr - rr)
    return -F.logsigmoid(chosen - rejected).mean(), chosen.detach(), rejected.detach()


def distill_loss(
    student: torch.Tensor,
    teacher: torch.Tensor,
    labels: torch.Tensor,
    alpha: float,
    temperature: float,
    scale: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """White-box knowledge distillation (Hinton et al., arXiv 1503.02531) on the trained tokens.

    student, teacher [N, V]: logits at the N trained positions; labels [N] (all valid); scale [N] optional per-token
    multipliers. Per token: alpha * CE(student, label) + (1 - alpha) * T^2 * KL(softmax(teacher / T) ||
    softmax(student / T)); T^2 keeps the KL gradient's size independent of T. Returns (mean loss, mean CE,
    mean KL)."""
    s, t = student.float(), teacher.float()
    ce = F.cross_entropy(s, labels, reduction="none")
    log_t = F.log_softmax(t / temperature, dim=-1)
    kl = (log_t.exp() * (log_t - F.log_softmax(s / temperature, dim=-1))).sum(-1)
    per_token = alpha * ce + (1 - alpha) * temperature**2 * kl
    if scale is not None:
        per_token = per_token * scale
    return per_token.mean(), ce.mean().detach(), kl.mean().detach()


def mtp_loss(
    hidden: list[torch.Tensor],
    weight: torch.Tensor,
    labels: torch.Tensor,
    loss_weight: float,
    doc_ids: torch.Tensor | None = None,
    scale: torch.Tensor | None = None,
) -> torch.Tensor:
    """DeepSeek-V3's multi-token prediction loss (arXiv 2412.19437, eq. 24): loss_weight x the mean over depths of
    each depth's cross-entropy, computed with linear_cross_entropy.

    hidden: one [B, T - k, C] per depth k = 1..D (Output.mtp_hidden); weight [V, C] the lm_head; labels [B, T]
    next-token targets (-100 ignored), so depth k at position i predicts labels[:, i + k]. doc_ids [B, T] (packed
    rows): a target from another document than position i's is ignored. scale [B, T]: per-token multipliers of the
    target tokens (as linear_cross_entropy's), shifted with them."""
    losses = []
    for k, h in enumerate(hidden, start=1):
        n = h.shape[1]
        assert n == labels.shape[1] - k, f"depth {k}: {n} positions for {labels.shape[1]} labels"
        target = labels[:, k:]
        if doc_ids is not None:
            target = target.masked_fill(doc_ids[:, k:] != doc_ids[:, :n], -100)
        s = scale[:, k:].flatten() if scale is not None else None
        losses.append(linear_cross_entropy(h.flatten(0, 1), weight, target.flatten(), scale=s))
    if not losses:
        return weight.new_zeros(())
    return loss_weight * torch.stack(losses).mean()
