"""The decoder, read top to bottom: KV cache -> attention -> block -> transformer.

Parameter names follow HF Llama/Qwen3 (`model.layers.0.self_attn.q_proj.weight`, ...), so export is an identity map.
The model never sees labels: `forward(ids, cache) -> Output(logits, aux_loss)`; stages compute their own losses.

Each block's token mixer is chosen at construction: `self_attn` is GQA `Attention` or `MLA` (model/mla.py,
cfg.attention), and layers that cfg.is_linear_attention() names have `linear_attn`, a gated DeltaNet
(model/linear_attention.py), as in HF Qwen3-Next. A mixer offers `new_cache(batch, max_len, dtype, device)`, a layer
cache with `view(rows, keys)` and `copy_row(src, dst, length)`; `model.new_cache` builds one per layer into a KVCache.
The attention mixers take `forward(x, cache, ctx)` with the forward's `Mixing` (RoPE tables, cache position, mask);
gated DeltaNet takes `forward(x, cache, at, doc_ids)`. Multi-token prediction modules (model/mtp.py) live in
`model.mtp` and run with `return_hidden` (see forward).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from nanomind.model.config import ModelConfig
from nanomind.model.layers import MLP, Linear, RMSNorm, apply_rope, rope_tables
from nanomind.model.mla import MLA
from nanomind.model.moe import MoE
from nanomind.model.mtp import MTPModule


class LayerKV:
    """Preallocated keys/values of one attention layer: [B, kv_heads, max_len, head_dim]."""

    rewindable = True  # positions past cache.pos are never read, so moving pos back rolls the cache back

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

    def view(self, rows: slice, keys: int) -> LayerKV:
        """Rows `rows` and the first `keys` positions, sharing this cache's memory."""
        out = object.__new__(LayerKV)
        out.k, out.v = self.k[rows, :, :keys], self.v[rows, :, :keys]
        return out

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src's first `length` positions into row dst (the engine moving a request)."""
        self.k[dst, :, :length] = self.k[src, :, :length]
        self.v[dst, :, :length] = self.v[src, :, :length]


class KVCache:
    """One cache per layer (each from its mixer's new_cache) plus the shared write position; the model advances
    `pos` after each forward. `rewindable`: every layer's cache can be rolled back by lowering `pos` (attention
    caches; not gated DeltaNet's recurrent state)."""

    def __init__(self, layers: list, max_len: int):
        self.layers, self.max_len, self.pos = layers, max_len, 0

    def view(self, rows: slice, keys: int) -> KVCache:
        """A cache over rows `rows` and the first `keys` positions of this one, sharing its memory (a request's
        slot for prefill, or the running batch's rows for a decoding step that attends to `keys` positions)."""
        return KVCache([layer.view(rows, keys) for layer in self.layers], keys)

    def copy_row(self, src: int, dst: int, length: int) -> None:
        for layer in self.layers:
            layer.copy_row(src, dst, length)

    @property
    def rewindable(self) -> bool:
        return all(getattr(layer, "rewindable", False) for layer in self.layers)


@dataclass
class Mixing:
    """What the token mixers of one forward share, computed once by the Transformer."""

    cos: torch.Tensor  # RoPE tables [T, R], or [B, 1, T, R] with per-row positions
    sin: torch.Tensor
    at: int | torch.Tensor  # cache write position: an int, or positions [T] / [B, T] (see LayerKV.update)
    mask: torch.Tensor | None  # None: causal; else [(B, 1,) T, keys] bool
    doc_ids: torch.Tensor | None = None  # [B, T] for packed training rows


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

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LayerKV:
        return LayerKV(batch, max_len, self.n_kv, self.head_dim, dtype, device)

    def forward(self, x: torch.Tensor, kv: LayerKV | None, ctx: Mixing) -> torch.Tensor:
        """x [B, T, C]; kv and ctx.at (see LayerKV.update); ctx.mask: None (causal) or [(B, 1,) T, keys] bool."""
        B, T, _ = x.shape
        q = self.q_norm(self.q_proj(x).view(B, T, self.n_heads, self.head_dim)).transpose(1, 2)  # [B, H, T, D]
        k = self.k_norm(self.k_proj(x).view(B, T, self.n_kv, self.head_dim)).transpose(1, 2)  # [B, KV, T, D]
        v = self.v_proj(x).view(B, T, self.n_kv, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, ctx.cos, ctx.sin), apply_rope(k, ctx.cos, ctx.sin)
        if kv is not None:
            k, v = kv.update(ctx.at, k, v)  # [B, KV, keys, D]
        gqa = self.n_kv != self.n_heads  # SDPA shares each k/v head among n_heads / n_kv query heads
        mask = ctx.mask
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=mask is None and T > 1, enable_gqa=gqa)
        return self.o_proj(y.transpose(1, 2).reshape(B, T, self.n_heads * self.head_dim))


class Block(nn.Module):
    """Pre-norm block: x + mixer(norm(x)), then x + mlp(norm(x)); layer_idx picks the mixer and MLP kinds."""

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.linear = cfg.is_linear_attention(layer_idx)
        if self.linear:  # imported here: only models with gated DeltaNet layers need it
            from nanomind.model.linear_attention import GatedDeltaNet

            self.linear_attn = GatedDeltaNet(cfg, layer_idx)
        else:
            self.self_attn = MLA(cfg) if cfg.attention == "mla" else Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MoE(cfg) if cfg.is_moe_layer(layer_idx) else MLP(cfg)

    @property
    def mixer(self) -> nn.Module:
        return self.linear_attn if self.linear else self.self_attn

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device):
        return self.mixer.new_cache(batch, max_len, dtype, device)

    def forward(self, x: torch.Tensor, cache, ctx: Mixing) -> torch.Tensor:
        h = self.input_layernorm(x)
        h = self.linear_attn(h, cache, ctx.at, ctx.doc_ids) if self.linear else self.self_attn(h, cache, ctx)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x))


class Decoder(nn.Module):
    """HF's `model.` prefix: embeddings, layers, final norm (+ the MTP modules, which HF's classes lack)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        if cfg.num_nextn_predict_layers:
            last = cfg.num_hidden_layers - 1  # each MTP block is of the last layer's kind
            self.mtp = nn.ModuleList(MTPModule(cfg, Block(cfg, last)) for _ in range(cfg.num_nextn_predict_layers))


@dataclass
class Output:
    logits: torch.Tensor | None  # [B, T, vocab] (T = 1 when last_only); None when return_hidden
    aux_loss: torch.Tensor | None = None  # load-balancing losses of MoE variants; None for dense models
    hidden: torch.Tensor | None = None  # [B, T, C] final-norm output, only when return_hidden
    # MTP depth k's normed states [B, T - 1 - k, C] (position i predicts the label at i + 1 + k); with return_hidden,
    # no cache and cfg.num_nextn_predict_layers > 0
    mtp_hidden: list[torch.Tensor] | None = None


class Transformer(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.model = Decoder(cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        cos, sin = rope_tables(cfg, cfg.max_position_embeddings)  # [max_pos, cfg.rope_dim()]
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """N(0, 0.02) for matrices; residual output projections shrunk by 1/sqrt(2 * layers) (GPT-2) so the
        residual stream's variance does not grow with depth; norms start at 1. A module with parameters of another
        kind (gated DeltaNet's decay and conv weights) defines its own reset_parameters(), called afterwards."""
        std = self.config.initializer_range
        out_std = std / math.sqrt(2 * self.config.num_hidden_layers)
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight", "out_proj.weight")):
                nn.init.normal_(p, 0.0, out_std)
            elif p.dim() == 2:
                nn.init.normal_(p, 0.0, std)
            else:
                nn.init.ones_(p)
        for m in self.modules():
            if m is not self and "reset_parameters" in type(m).__dict__ and type(m).__module__.startswith("nanomind"):
                m.reset_parameters()

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> KVCache:
        """A KVCache of each layer's mixer cache (what `forward(ids, cache)` fills)."""
        return self._cache(self.model.layers, batch, max_len, dtype)

    def new_mtp_caches(self, batch: int, max_len: int, dtype: torch.dtype | None = None) -> list[KVCache]:
        """One single-layer KVCache per MTP depth, for `mtp_step` (speculative decoding)."""
        return [self._cache([m.block], batch, max_len, dtype) for m in self.model.mtp]

    def _cache(self, blocks, batch: int, max_len: int, dtype: torch.dtype | None) -> KVCache:
        if max_len > self.config.max_position_embeddings:
            raise ValueError(
                f"cache length {max_len} exceeds max_position_embeddings {self.config.max_position_embeddings}; "
                "use rope_scaling (linear or yarn) with a larger max_position_embeddings"
            )
        p = self.model.embed_tokens.weight
        return KVCache([b.new_cache(batch, max_len, dtype or p.dtype, p.device) for b in blocks], max_len)

    def _mixing(self, T: int, device, dtype, cache: KVCache | None, positions, doc_ids) -> Mixing:
        """RoPE tables, cache position and mask for T new tokens (see forward for the three cases)."""
        if doc_ids is not None:
            assert cache is None and positions is None, "doc_ids are for training on packed rows"
            t = torch.arange(T, device=device)
            new_doc = torch.ones_like(doc_ids, dtype=torch.bool)
            new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            start = torch.where(new_doc, t, 0).cummax(dim=1).values  # [B, T] index where each token's doc starts
            pos = t - start
            cos, sin = self.rope_cos[pos].to(dtype)[:, None], self.rope_sin[pos].to(dtype)[:, None]  # [B, 1, T, R]
            same = doc_ids[:, :, None] == doc_ids[:, None, :]
            mask = (same & (t[:, None] >= t[None, :]))[:, None]  # [B, 1, T, T]: own document, causal
            return Mixing(cos, sin, 0, mask, doc_ids)
        if positions is not None:
            assert cache is not None, "positions are for decoding with a cache"
            cos, sin = self.rope_cos[positions].to(dtype), self.rope_sin[positions].to(dtype)  # [(B,) T, R]
            keys = torch.arange(cache.max_len, device=device)
            mask = keys <= positions[..., None]  # [(B,) T, max_len]
            if positions.dim() == 2:  # per row: broadcast over heads
                cos, sin, mask = cos[:, None], sin[:, None], mask[:, None]
            return Mixing(cos, sin, positions, mask)
        at = cache.pos if cache is not None else 0
        if at + T > self.config.max_position_embeddings:
            raise ValueError(f"sequence of {at + T} tokens exceeds max_position_embeddings")
        if cache is not None and at + T > cache.max_len:
            raise ValueError(f"the KV cache holds {cache.max_len} tokens; {at + T} do not fit")
        cos, sin = self.rope_cos[at : at + T].to(dtype), self.rope_sin[at : at + T].to(dtype)
        mask = None
        if at > 0 and T > 1:  # chunked prefill: query i sees keys 0..at+i
            mask = torch.ones(T, at + T, dtype=torch.bool, device=device).tril(diagonal=at)
        return Mixing(cos, sin, at, mask)

    def forward(
        self,
        ids: torch.Tensor,
        cache: KVCache | None = None,
        last_only: bool = False,
        return_hidden: bool = False,
        positions: torch.Tensor | None = None,
        doc_ids: torch.Tensor | None = None,
        mtp: bool = False,
    ) -> Output:
        """ids: [B, T] token ids. With a cache, positions continue from cache.pos and the cache advances.

        positions [T] (with a cache): write and attend at these positions over the whole cache, with shapes that
        never change, so one torch.compile graph serves every decoding step; the caller tracks the position.
        positions [B, T]: the same with a position per row (continuous batching: each row is another request).
        doc_ids [B, T] (training on packed rows, no cache): which document each token belongs to; a token attends
        only to earlier tokens of its own document and positions restart at each document, so a packed row gives
        the same logits as its documents run one by one.
        return_hidden skips lm_head and returns the final hidden states, for losses that apply lm_head.weight
        themselves in chunks (train/losses.py). mtp (with return_hidden, no cache) also runs the MTP modules
        (Output.mtp_hidden): only the stages that train them ask, so DPO, distillation or RL on a model with MTP
        modules do not pay for them."""
        B, T = ids.shape
        x = self.model.embed_tokens(ids)  # [B, T, C]
        dtype = torch.get_autocast_dtype(x.device.type) if torch.is_autocast_enabled(x.device.type) else x.dtype
        ctx = self._mixing(T, x.device, dtype, cache, positions, doc_ids)
        for i, layer in enumerate(self.model.layers):
            x = layer(x, cache.layers[i] if cache is not None else None, ctx)
        if cache is not None and positions is None:
            cache.pos += T
        x = self.model.norm(x)
        blocks = list(self.model.layers)
        states = None
        if mtp and return_hidden and cache is None and self.config.num_nextn_predict_layers:
            states, h = [], x
            for k, module in enumerate(self.model.mtp):
                n = T - 1 - k  # positions whose token k + 1 places ahead is in the row
                if n <= 0:
                    break
                sub = self._mixing(n, x.device, dtype, None, None, doc_ids[:, :n] if doc_ids is not None else None)
                h, normed = module(h[:, :n], self.model.embed_tokens(ids[:, k + 1 :]), None, sub)
                states.append(normed)
                blocks.append(module.block)
        aux = [b.mlp.aux_loss for b in blocks if isinstance(b.mlp, MoE) and b.mlp.aux_loss is not None]
        aux_loss = torch.stack(aux).sum() if aux else None
        if return_hidden:
            return Output(None, aux_loss, hidden=x, mtp_hidden=states)
        if last_only:
            x = x[:, -1:]
        return Output(self.lm_head(x), aux_loss)

    def mtp_step(
        self, depth: int, h: torch.Tensor, ids: torch.Tensor, cache: KVCache
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """MTP depth `depth` over T new positions with its cache (from new_mtp_caches): h [B, T, C] the previous
        depth's states there, ids [B, T] the tokens depth + 1 places ahead. Returns (h' for the next depth,
        normed states for lm_head), both [B, T, C]; the cache advances."""
        T = ids.shape[1]
        ctx = self._mixing(T, h.device, h.dtype, cache, None, None)
        out = self.model.mtp[depth](h, self.model.embed_tokens(ids), cache.layers[0], ctx)
        cache.pos += T
        return out

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())
