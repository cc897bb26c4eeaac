"""RL losses, small pure functions with shapes in the docstrings: the GRPO family and the reward model's.

Shapes: P prompts x G samples per prompt are flattened to B = P * G rows; completions are padded to T tokens.
logp, old_logp, ref_logp [B, T]: per-token log-probabilities of the sampled tokens under the policy being trained,
the policy that sampled them (behaviour) and the frozen reference; mask [B, T] 1 on completion tokens, 0 on
padding; adv [B] one advantage per completion (see group_advantages). Each loss returns (scalar loss, metrics) with
metrics["clip_fraction"] (share of completion tokens whose ratio was clipped) and metrics["kl"] (mean k3 estimate
of KL(policy || reference) per completion token), both detached.

Deviations from the papers:
- GRPO (arXiv 2402.03300): the KL term uses the k3 estimator exp(ref - logp) - (ref - logp) - 1 per token, as in
  the paper; the loss is the per-sequence token mean, then the mean over sequences.
- Dr.GRPO (arXiv 2503.20783): the paper drops the KL term; we keep it with weight kl_beta (pass 0 for the paper's
  loss). Token sums are divided by a constant max_len, not by each sequence's length.
- CISPO (MiniMax-M1, arXiv 2506.13585): only the upper clip of the importance weight is applied (the paper's
  eps_low is unused there too), and the loss is the mean over all completion tokens of the batch; a KL term with
  weight kl_beta is added (0 gives the paper's loss).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

EPS = 1e-4


def group_advantages(rewards: torch.Tensor, normalise_std: bool = True, eps: float = EPS) -> torch.Tensor:
    """rewards [P, G] (G samples per prompt) -> advantages [P, G]: (r - group mean) / (group std + eps).

    The std is the unbiased one (torch.std default). normalise_std=False gives Dr.GRPO's r - group mean."""
    if rewards.dim() != 2:
        raise ValueError(f"rewards must be [prompts, samples per prompt], got shape {tuple(rewards.shape)}")
    centred = rewards - rewards.mean(dim=1, keepdim=True)
    if not normalise_std:
        return centred
    std = rewards.std(dim=1, keepdim=True) if rewards.shape[1] > 1 else torch.zeros_like(rewards[:, :1])
    return centred / (std + eps)


def k3_kl(logp: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """[B, T] per-token k3 estimate of KL(policy || reference): exp(ref - logp) - (ref - logp) - 1, always >= 0."""
    d = ref_logp - logp
    return torch.exp(d) - d - 1


def _clipped_pg(
    logp: torch.Tensor, old_logp: torch.Tensor, adv: torch.Tensor, clip_eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """([B, T] PPO clipped surrogate loss -min(r A, clip(r, 1-eps, 1+eps) A), [B, T] bool: the clipped term won)."""
    ratio = torch.exp(logp - old_logp)
    a = adv[:, None]
    unclipped, clipped = ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a
    return -torch.minimum(unclipped, clipped), clipped < unclipped


def _metrics(clipped: torch.Tensor, kl: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    n = mask.sum().clamp(min=1)
    return {"clip_fraction": ((clipped * mask).sum() / n).detach(), "kl": ((kl * mask).sum() / n).detach()}


def grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float = 0.2,
    kl_beta: float = 0.04,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """GRPO: per token -min(r A, clip(r, 1 +- clip_eps) A) + kl_beta * k3, r = exp(logp - old_logp);
    averaged over each sequence's completion tokens, then over the B sequences. Shapes: module docstring."""
    mask = mask.to(logp.dtype)
    pg, clipped = _clipped_pg(logp, old_logp, adv, clip_eps)
    kl = k3_kl(logp, ref_logp)
    per_seq = ((pg + kl_beta * kl) * mask).sum(1) / mask.sum(1).clamp(min=1)  # [B]
    return per_seq.mean(), _metrics(clipped, kl, mask)


def dr_grpo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    max_len: int,
    clip_eps: float = 0.2,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Dr.GRPO: the GRPO per-token loss summed over all completion tokens and divided by B * max_len (a constant),
    so long and short answers are not weighted by 1/length. adv should come from
    group_advantages(..., normalise_std=False). Shapes: module docstring."""
    mask = mask.to(logp.dtype)
    pg, clipped = _clipped_pg(logp, old_logp, adv, clip_eps)
    kl = k3_kl(logp, ref_logp)
    loss = ((pg + kl_beta * kl) * mask).sum() / (logp.shape[0] * max_len)
    return loss, _metrics(clipped, kl, mask)


def cispo_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    ref_logp: torch.Tensor,
    adv: torch.Tensor,
    mask: torch.Tensor,
    eps_high: float = 0.2,
    kl_beta: float = 0.0,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """CISPO: per token -(min(r, 1 + eps_high).detach() * A * logp) + kl_beta * k3, averaged over all completion
    tokens of the batch. Clipping the (detached) weight instead of the update keeps every token's gradient.
    Shapes: module docstring."""
    mask = mask.to(logp.dtype)
    ratio = torch.exp(logp - old_logp)
    weight = ratio.clamp(max=1 + eps_high).detach()
    kl = k3_kl(logp, ref_logp)
    per_token = -(weight * adv[:, None] * logp) + kl_beta * kl
    loss = (per_token * mask).sum() / mask.sum().clamp(min=1)
    return loss, _metrics(ratio > 1 + eps_high, kl, mask)


def bradley_terry_loss(chosen: torch.Tensor, rejected: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Reward-model loss on preference pairs: chosen, rejected [P] scalar rewards -> (mean -log sigmoid(chosen -
    rejected), accuracy: the share of pairs ranked right, ties counting as wrong). The Bradley-Terry model says
    P(chosen preferred) = sigmoid(r_chosen - r_rejected); the loss is its negative log-likelihood."""
    margin = chosen.float() - rejected.float()
    return -F.logsigmoid(margin).mean(), (margin > 0).float().mean().detach()
