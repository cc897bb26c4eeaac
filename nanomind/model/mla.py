"""Multi-head latent attention (DeepSeek-V2, arXiv 2405.04434, section 2.1; used by DeepSeek-V3), with the names and
math of transformers' DeepseekV3Attention (rope_interleave=False: our RoPE rotates halves).

Keys and values come from one low-rank latent per token: kv_a_proj_with_mqa maps x to [latent (kv_lora_rank) |
k_rope (qk_rope_head_dim)], the latent is normalised (kv_a_layernorm) and kv_b_proj expands it into every head's
position-free key part (qk_nope_head_dim) and value (v_head_dim). RoPE is decoupled: only qk_rope_head_dim of each
query head is rotated, and the rotated key part is one vector shared by all heads. Queries come from q_proj, or
(q_lora_rank > 0) from their own latent: q_a_proj -> q_a_layernorm -> q_b_proj. Softmax scale: qk_head_dim**-0.5.

The cache keeps only what is per token: the latent after kv_a_layernorm and the rotated shared key,
kv_lora_rank + qk_rope_head_dim values per token and layer (GQA keeps 2 x kv_heads x head_dim). We store the latent
after the norm, as transformers' DeepseekV3Attention does: the norm is per token, so caching its output is exact and
a decoding step need not normalise every cached position again. A step up-projects the cached latents with
kv_b_proj (the simple form; absorbing kv_b_proj into q and o_proj would avoid it, and is left for later).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanomind.model.config import ModelConfig
from nanomind.model.layers import Linear, RMSNorm, apply_rope


class LatentCache:
    """Preallocated latents [B, max_len, kv_lora_rank] and rotated shared keys [B, max_len, qk_rope_head_dim] of one
    MLA layer. Same write semantics as LayerKV (transformer.py)."""

    rewindable = True  # positions past cache.pos are never read, so moving pos back rolls the cache back

    def __init__(self, batch: int, max_len: int, rank: int, rope_dim: int, dtype: torch.dtype, device):
        self.latent = torch.zeros(batch, max_len, rank, dtype=dtype, device=device)
        self.k_rope = torch.zeros(batch, max_len, rope_dim, dtype=dtype, device=device)

    def update(self, at: int | torch.Tensor, latent: torch.Tensor, k_rope: torch.Tensor):
        """Write latent [B, T, r] and k_rope [B, T, R] at `at` (an int, or positions [T] or [B, T], as in
        LayerKV.update) and return the latents and keys to attend to ([B, keys, r], [B, keys, R])."""
        if isinstance(at, torch.Tensor):
            if at.dim() == 1:
                self.latent.index_copy_(1, at, latent)
                self.k_rope.index_copy_(1, at, k_rope)
            else:
                self.latent.scatter_(1, at[:, :, None].expand_as(latent), latent)
                self.k_rope.scatter_(1, at[:, :, None].expand_as(k_rope), k_rope)
            return self.latent, self.k_rope
        end = at + latent.shape[1]
        self.latent[:, at:end] = latent
        self.k_rope[:, at:end] = k_rope
        return self.latent[:, :end], self.k_rope[:, :end]

    def view(self, rows: slice, keys: int) -> LatentCache:
        out = object.__new__(LatentCache)
        out.latent, out.k_rope = self.latent[rows, :keys], self.k_rope[rows, :keys]
        return out

    def copy_row(self, src: int, dst: int, length: int) -> None:
        self.latent[dst, :length] = self.latent[src, :length]
        self.k_rope[dst, :length] = self.k_rope[src, :length]


class MLA(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.rank = cfg.num_attention_heads, cfg.kv_lora_rank
        self.nope, self.rope, self.v_dim = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = self.nope + self.rope
        if cfg.q_lora_rank:
            self.q_a_proj = Linear(cfg.hidden_size, cfg.q_lora_rank)
            self.q_a_layernorm = RMSNorm(cfg.q_lora_rank, cfg.rms_norm_eps)
            self.q_b_proj = Linear(cfg.q_lora_rank, self.n_heads * qk)
        else:
            self.q_proj = Linear(cfg.hidden_size, self.n_heads * qk)
        self.kv_a_proj_with_mqa = Linear(cfg.hidden_size, self.rank + self.rope)
        self.kv_a_layernorm = RMSNorm(self.rank, cfg.rms_norm_eps)
        self.kv_b_proj = Linear(self.rank, self.n_heads * (self.nope + self.v_dim))
        self.o_proj = Linear(self.n_heads * self.v_dim, cfg.hidden_size)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LatentCache:
        return LatentCache(batch, max_len, self.rank, self.rope, dtype, device)

    def queries(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(self, "q_proj"):
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, x: torch.Tensor, cache: LatentCache | None, ctx) -> torch.Tensor:
        """x [B, T, C]; ctx: the forward's Mixing (transformer.py): RoPE tables [T, R] or [B, 1, T, R], cache
        position `at`, mask None (causal) or [(B, 1,) T, keys] bool."""
        B, T, _ = x.shape
        H = self.n_heads
        q = self.queries(x).view(B, T, H, self.nope + self.rope).transpose(1, 2)  # [B, H, T, qk]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([self.rank, self.rope], dim=-1)  # [B, T, r], [B, T, R]
        latent = self.kv_a_layernorm(latent)
        q_rope = apply_rope(q_rope, ctx.cos, ctx.sin)
        k_rope = apply_rope(k_rope[:, None], ctx.cos, ctx.sin)[:, 0]  # one key part shared by all heads
        if cache is not None:
            latent, k_rope = cache.update(ctx.at, latent, k_rope)  # [B, keys, r], [B, keys, R]
        S = latent.shape[1]
        kv = self.kv_b_proj(latent).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)  # [B, H, S, nope + v]
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)
        k = torch.cat([k_nope, k_rope[:, None].expand(B, H, S, self.rope)], dim=-1)  # [B, H, S, qk]
        q = torch.cat([q_nope, q_rope], dim=-1)
        # SDPA's default scale is 1/sqrt(q's width) = qk_head_dim**-0.5, DeepSeek's; v may be narrower than q/k
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=ctx.mask, is_causal=ctx.mask is None and T > 1)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, H * self.v_dim))
