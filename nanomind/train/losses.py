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
    """

    @staticmethod
    def forward(ctx, hidden, weight, labels, chunk: int):  # type: ignore[override]
        n_valid = (labels != -100).sum().clamp(min=1)
        acc = torch.promote_types(hidden.dtype, torch.float32)  # softmax precision: fp32 at least
        w = weight.to(hidden.dtype)
        # d loss / d logits for every row, in the compute dtype: [N, V] (half the size of fp32 logits)
        grad_logits = torch.empty(hidden.shape[0], weight.shape[0], dtype=hidden.dtype, device=hidden.device)
        total = torch.zeros((), dtype=acc, device=hidden.device)
        for start in range(0, hidden.shape[0], chunk):
            h, y = hidden[start : start + chunk], labels[start : start + chunk]
            logits = (h @ w.T).to(acc)  # [chunk, V]
            valid = y != -100
            safe_y = y.clamp(min=0)
            lse = torch.logsumexp(logits, dim=-1)
            total += ((lse - logits.gather(1, safe_y[:, None]).squeeze(1)) * valid).sum()
            g = torch.softmax(logits, dim=-1)
            g[torch.arange(len(y), device=y.device), safe_y] -= 1.0
            grad_logits[start : start + chunk] = g * (valid[:, None] / n_valid)
        # two large matmuls instead of one small pair per chunk
        ctx.save_for_backward(grad_logits @ w, (grad_logits.T @ hidden).to(weight.dtype))
        return total / n_valid

    @staticmethod
    def backward(ctx, grad_out):  # type: ignore[override]
        grad_hidden, grad_weight = ctx.saved_tensors
        return grad_hidden * grad_out, grad_weight * grad_out, None, None


def linear_cross_entropy(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, chunk: int = 256
) -> torch.Tensor:
    """Mean cross-entropy of logits = hidden @ weight.T against labels (-100 = ignored).

    hidden [N, C], weight [V, C], labels [N] -> scalar. Equal to F.cross_entropy(hidden @ weight.T, labels)
    but computed chunk by chunk (see _ChunkedLinearCrossEntropy); without grad it just evaluates in chunks.
    """
    assert bool(((labels >= 0) | (labels == -100)).all()), "labels must be token ids or -100 (ignored)"
    if torch.is_grad_enabled() and (hidden.requires_grad or weight.requires_grad):
        return _ChunkedLinearCrossEntropy.apply(hidden, weight, labels, chunk)
    w, acc = weight.to(hidden.dtype), torch.promote_types(hidden.dtype, torch.float32)
    total = sum(
        F.cross_entropy((h @ w.T).to(acc), y, ignore_index=-100, reduction="sum")
        for h, y in zip(hidden.split(chunk), labels.split(chunk), strict=True)
    )
    return total / (labels != -100).sum().clamp(min=1)
