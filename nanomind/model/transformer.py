"""The dense decoder, read top to bottom: KV cache -> attention -> block -> transformer.

Parameter names follow HF Llama/Qwen3 (`model.layers.0.self_attn.q_proj.weight`, ...), so export is an identity map.
The model never sees labels: `forward(ids, cache) -> Output(logits, aux_loss)`; stages compute their own losses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanomind.model.config import ModelConfig
from nanomind.model.layers import MLP, Linear, RMSNorm, apply_rope, rope_tables
from nanomind.model.moe import MoE, moe_layers


class LayerKV:
    """Preallocated keys/values of one attention layer: [B, kv_heads, max_len, head_dim]."""

    def __init__(self, batch: int, max_len: int, kv_heads: int, head_dim: int, dtype: torch.dtype, device):
        self.k = torch.zeros(batch, kv_heads, max_len, head_dim, dtype=dtype, device=device)
        self.v = torch.zeros_like(self.k)

    def update(self, at: int | torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Write k/v [B, kv, T, D] at position `at` and return the keys/values to attend to.

        `at` an int: views of positions 0..at+T. `at` a tensor of positions, [T] shared by every row (static-shape
        decoding under torch.compile) or [B, T] per row (continuous batching, where each row is another request):
        the whole buffers, whose unwritten tail the caller masks out."""
        if isinstance(at, torch.Tensor):
            if at.dim() == 1:
                self.k.index_copy_(2, at, k)
                self.v.index_copy_(2, at, v)
            else:
                index = at[:, None, :, None].expand_as(k)
                self.k.scatter_(2, index, k)
                self.v.scatter_(2, index, v)
            return self.k, self.v
        end = at + k.shape[2]
        self.k[:, :, at:end] = k
        self.v[:, :, at:end] = v
        return self.k[:, :, :end], self.v[:, :, :end]


class KVCache:
    """One LayerKV per layer plus the shared write position; the model advances `pos` after each forward."""

    def __init__(self, cfg: ModelConfig, batch: int, max_len: int, dtype: torch.dtype, device):
        if max_len > cfg.max_position_embeddings:
            raise ValueError(
                f"cache length {max_len} exceeds max_position_embeddings {cfg.max_position_embeddings}; "
                "use rope_scaling (linear or yarn) with a larger max_position_embeddings"
            )
        self.max_len = max_len
        self.pos = 0
        self.layers = [
            LayerKV(batch, max_len, cfg.num_key_value_heads, cfg.head_dim, dtype, device)
            for _ in range(cfg.num_hidden_layers)
        ]

    def view(self, rows: slice, keys: int) -> KVCache:
        """A cache over rows `rows` and the first `keys` positions of this one, sharing its memory (a request's
        slot for prefill, or the running batch's rows for a decoding step that attends to `keys` positions)."""
        out = object.__new__(KVCache)
        out.max_len, out.pos = keys, 0
        out.layers = []
        for layer in self.layers:
            view = object.__new__(LayerKV)
            view.k, view.v = layer.k[rows, :, :keys], layer.v[rows, :, :keys]
            out.layers.append(view)
        return out


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv, self.head_dim = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        self.q_proj = Linear(cfg.hidden_size, self.n_heads * self.head_dim)
        self.k_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim)
        self.v_proj = Linear(cfg.hidden_size, self.n_kv * self.head_dim)
        self.o_proj = Linear(self.n_heads * self.head_dim, cfg.hidden_size)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        else:
            self.q_norm = self.k_norm = nn.Identity()

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv: LayerKV | None, at, mask
    ) -> torch.Tensor:
        """x [B, T, C]; cos/sin [T, D]; kv and `at` (see LayerKV.update); mask: None (causal) or [T, keys] bool."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # [B, KV, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if kv is not None:
            k, v = kv.update(at, k, v)  # [B, KV, keys, D]
        gqa = self.n_kv != self.n_heads  # SDPA shares each k/v head among n_heads / n_kv query heads
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.num_experts else MLP(cfg)

    def forward(self, x, cos, sin, kv: LayerKV | None, at, mask) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, kv, at, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)


@dataclass
class Output:
    logits: torch.Tensor | None  # [B, T, vocab] (T = 1 when last_only); None when return_hidden
    aux_loss: torch.Tensor | None = None  # load-balancing losses of MoE variants; None for dense models
    hidden: torch.Tensor | None = None  # [B, T, C] final-norm output, only when return_hidden


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.02) for matrices; residual output projections shrunk by 1/sqrt(2 * layers) (GPT-2) so the
        residual stream's variance does not grow with depth; norms start at 1."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        p = self.model.embed_tokens.weight
        return KVCache(self.config, batch, max_len, dtype or p.dtype, p.device)

    def forward(
        self,
        ids: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
    ) -> Output:
        """ids: [B, T] token ids. With a cache, positions continue from cache.pos and the cache advances.

        positions [T] (with a cache): write and attend at these positions over the whole cache, with shapes that
        never change, so one torch.compile graph serves every decoding step; the caller tracks the position.
        positions [B, T]: the same with a position per row (continuous batching: each row is another request).
        doc_ids [B, T] (training on packed rows, no cache): which document each token belongs to; a token attends
        only to earlier tokens of its own document and positions restart at each document, so a packed row gives
        the same logits as its documents run one by one.
        return_hidden skips lm_head and returns the final hidden states, for losses that apply lm_head.weight
        themselves in chunks (train/losses.py)."""
        B, T = ids.shape
        x = self.model.embed_tokens(ids)  # [B, T, C]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        mask = None
        if doc_ids is not None:
            assert cache is None and positions is None, "doc_ids are for training on packed rows"
            t = torch.arange(T, device=ids.device)
            new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
            new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            start = torch.where(new_doc, t, 0).cummax(dim=1).values  # [B, T] index where each token's doc starts
            pos = t - start
            cos, sin = self.rope_cos[pos].to(dtype)[:, None], self.rope_sin[pos].to(dtype)[:, None]  # [B, 1, T, D]
            same = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (same & (t[:, None] >= t[None, :]))[:, None]  # [B, 1, T, T]: own document, causal
            at: int | torch.Tensor = 0
        elif positions is not None:
            assert cache is not None, "positions are for decoding with a cache"
            cos, sin = self.rope_cos[positions].to(dtype), self.rope_sin[positions].to(dtype)  # [(B,) T, D]
            keys = torch.arange(cache.max_len, device=ids.device)
            mask = keys <= positions[..., None]  # [(B,) T, max_len]
            if positions.dim() == 2:  # per row: broadcast over heads
                cos, sin, mask = cos[:, None], sin[:, None], mask[:, None]
            at = positions
        else:
            at = cache.pos if cache is not None else 0
            if at + T > self.config.max_position_embeddings:
                raise ValueError(f"sequence of {at + T} tokens exceeds max_position_embeddings")
            if cache is not None and at + T > cache.max_len:
                raise ValueError(f"the KV cache holds {cache.max_len} tokens; {at + T} do not fit")
            cos, sin = self.rope_cos[at : at + T].to(dtype), self.rope_sin[at : at + T].to(dtype)
            if at > 0 and T > 1:  # chunked prefill: query i sees keys 0..at+i
                mask = torch.ones(T, at + T, dtype=torch.bool, device=x.device).tril(diagonal=at)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cos, sin, cache.layers[i] if cache is not None else None, at, mask)
        if cache is not None and positions is None:
            cache.pos += T
        x = self.model.norm(x)
        aux = [m.aux_loss for m in moe_layers(self) if m.aux_loss is not None] if self.config.num_experts else []
        aux_loss = torch.stack(aux).sum() if aux else None
        if return_hidden:
            return Output(None, aux_loss, hidden=x)
        if last_only:
            x = x[:, -1:]
        return Output(self.lm_head(x), aux_loss)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
