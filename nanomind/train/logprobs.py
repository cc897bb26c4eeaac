"""Per-token log-probabilities of labelled tokens: what DPO sums per answer and GRPO compares per token."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from nanomind.train.loop import unwrap


def token_logps(
    model: torch.nn.Module, ids: torch.Tensor, labels: torch.Tensor, temperature: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """([R, T] log-probability of each labelled token under softmax(logits / temperature), 0 where labels are
    -100; the MoE balance loss or None). ids, labels [R, T], labels[t] the token predicted at position t.

    Logits are made only at the labelled positions. RL uses the temperature it sampled with, so that the
    log-probs are those of the distribution the tokens were drawn from."""
    out = model(ids, return_hidden=True)
    mask = labels != -100
    logits = (out.hidden[mask] @ unwrap(model).lm_head.weight.to(out.hidden.dtype).T).float()  # [N, V]
    if temperature != 1.0:
        logits = logits / temperature
    picked = -F.cross_entropy(logits, labels[mask], reduction="none")
    logps = torch.zeros(labels.shape, device=ids.device, dtype=picked.dtype).masked_scatter(mask, picked)
    return logps, out.aux_loss
