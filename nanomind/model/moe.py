"""Mixture of experts: a router picks k of E SwiGLU experts per token; optional always-on shared experts.

Routing: scores = softmax or sigmoid of `gate(x)`; the top-k by score (plus, for choosing only, a per-expert
balancing bias) are used, weighted by their scores. Two faults of minimind's MoE are avoided here: the balance
loss is returned and added to the training loss, and at k = 1 the weight is the raw score rather than the score
renormalised over one expert (always exactly 1, so the router never got a gradient).

Dispatch sorts the (token, expert) pairs by expert and runs each expert once on its contiguous slice: a loop over
experts, never over tokens. Every expert runs every step, on zero rows if no token chose it, so all parameters are
in the graph (DDP needs that) and training and inference share one path.

Balancing: the Switch loss `coef * E * sum_i f_i * P_i` (f_i: share of assignments to expert i, P_i: its mean
score), and DeepSeek-V3's aux-loss-free bias: after each optimizer step, `after_step()` moves each expert's bias
by `rate` towards balance (up when under-loaded, down when over-loaded); the bias changes who is chosen, never
the weights.
"""

from __future__ import annotations

import torch
from torch import nn

from nanomind.model.config import ModelConfig
from nanomind.model.layers import MLP, Linear


class MoE(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.num_experts, self.k = cfg.num_experts, cfg.num_experts_per_tok
        self.scoring, self.norm_topk = cfg.scoring_func, cfg.norm_topk_prob
        self.aux_coef, self.bias_rate = cfg.router_aux_loss_coef, cfg.router_bias_update_rate
        self.gate = Linear(cfg.hidden_size, cfg.num_experts)
        self.experts = nn.ModuleList(MLP(cfg, cfg.moe_intermediate_size) for _ in range(cfg.num_experts))
        shared = cfg.n_shared_experts * cfg.moe_intermediate_size
        self.shared_experts = MLP(cfg, shared) if shared else None
        # DeepSeek-V3's name; a buffer, not a parameter: it moves by after_step(), not by gradients
        self.register_buffer("e_score_correction_bias", torch.zeros(cfg.num_experts))
        self.register_buffer("load", torch.zeros(cfg.num_experts), persistent=False)  # assignments since reset
        self.aux_loss: torch.Tensor | None = None  # of the last forward

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [N, C] -> (expert ids [N, k], weights [N, k], scores [N, E] normalised to sum 1 per token)."""
        logits = self.gate(x).float()
        scores = logits.softmax(-1) if self.scoring == "softmax" else logits.sigmoid()
        choose = scores + self.e_score_correction_bias if self.bias_rate else scores
        idx = choose.topk(self.k, dim=-1).indices
        weights = scores.gather(-1, idx)
        if self.norm_topk and self.k > 1:  # at k = 1 this would be 1.0 and cut the router's gradient
            weights = weights / weights.sum(-1, keepdim=True)
        probs = scores if self.scoring == "softmax" else scores / scores.sum(-1, keepdim=True)
        return idx, weights, probs

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])  # [N, C]
        idx, weights, probs = self.route(x)
        flat = idx.flatten()  # [N * k]: the expert of each (token, slot) pair
        order = flat.argsort(stable=True)
        counts = torch.bincount(flat, minlength=self.num_experts)
        token = order // self.k
        inputs = x[token]  # pairs grouped by expert
        outputs = [expert(chunk) for expert, chunk in zip(self.experts, inputs.split(counts.tolist()), strict=True)]
        out = torch.cat(outputs) * weights.flatten()[order, None].to(x.dtype)
        y = torch.zeros_like(x).index_add_(0, token, out)
        if self.shared_experts is not None:
            y = y + self.shared_experts(x)
        if self.training:
            self.load += counts.detach().float()
        share = counts.float() / flat.numel()  # f_i
        self.aux_loss = self.aux_coef * self.num_experts * (share * probs.mean(0)).sum() if self.aux_coef else None
        return y.reshape(shape)

    @torch.no_grad()
    def after_step(self) -> None:
        """Aux-loss-free balancing after an optimizer step (loads summed over ranks first, so biases agree)."""
        if self.bias_rate and self.load.sum() > 0:
            load = self.load.clone()
            if torch.distributed.is_available() and torch.distributed.is_initialized():
                torch.distributed.all_reduce(load)
            self.e_score_correction_bias += self.bias_rate * torch.sign(load.mean() - load)
        self.load.zero_()


def moe_layers(model: nn.Module) -> list[MoE]:
    return [m for m in model.modules() if isinstance(m, MoE)]


def load_stats(model: nn.Module) -> dict[str, float]:
    """Expert load since the last after_step(): the worst max/min assignment ratio over layers (1 = balanced;
    inf when an expert got nothing) and each layer's ratio."""
    out: dict[str, float] = {}
    for i, m in enumerate(moe_layers(model)):
        lo, hi = m.load.min().item(), m.load.max().item()
        if hi > 0:
            out[f"moe/load_max_min/{i}"] = hi / lo if lo > 0 else float("inf")
    if out:
        out["moe_load_max_min"] = max(out.values())
    return out
