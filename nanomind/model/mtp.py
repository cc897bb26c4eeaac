"""Multi-token prediction (DeepSeek-V3, arXiv 2412.19437, section 2.2): module k (0-based) predicts the token
k + 2 places ahead, i.e. at position i the label of position i + k + 1.

At position i, depth k combines the previous depth's hidden state h_i (depth 0: the main model's final-norm output)
with the embedding of the token at i + k + 1:
    x_i = eh_proj([enorm(embed(t_{i+k+1})); hnorm(h_i)])     (2C -> C; embedding first, as DeepSeek's released
                                                              weights and vLLM order them)
    h'_i = block(x_i)    one transformer block like the main model's last layer, causal over positions 0..i
and predicts with the shared lm_head applied to norm(h'_i); h' is the next depth's input. Embedding and lm_head are
the main model's. Names (our choice; HF's DeepseekV3 model has no MTP): `model.mtp.{k}.enorm`, `.hnorm`,
`.eh_proj`, `.block` (a Block: `.block.self_attn.*`, `.block.mlp.*`, ...), `.norm`.
"""

from __future__ import annotations

import torch
from torch import nn

from nanomind.model.config import ModelConfig
from nanomind.model.layers import Linear, RMSNorm


class MTPModule(nn.Module):
    def __init__(self, cfg: ModelConfig, block: nn.Module):
        super().__init__()
        self.enorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.hnorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.eh_proj = Linear(2 * cfg.hidden_size, cfg.hidden_size)
        self.block = block
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h: torch.Tensor, emb: torch.Tensor, cache, ctx) -> tuple[torch.Tensor, torch.Tensor]:
        """h [B, T, C] previous depth's states at positions i; emb [B, T, C] embeddings of the tokens at i + k + 1;
        cache / ctx as for a Block. Returns (h' [B, T, C] for the next depth, norm(h') for lm_head)."""
        x = self.eh_proj(torch.cat([self.enorm(emb), self.hnorm(h)], dim=-1))
        x = self.block(x, cache, ctx)
        return x, self.norm(x)
