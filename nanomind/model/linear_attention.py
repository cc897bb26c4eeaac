"""Gated DeltaNet linear attention (Yang et al., arXiv 2412.06464), the linear layer of Qwen3-Next.

Each value head keeps a fixed-size state S [Dk, Dv] instead of a KV cache. Per token t, with l2-normalised
q_t, k_t, a decay a_t = exp(g_t) in (0, 1] and a write strength beta_t in (0, 1):

    S_t = a_t * (I - beta_t k_t k_t^T) S_{t-1} + beta_t k_t v_t^T        o_t = S_t^T q_t / sqrt(Dk)

(the delta rule: the state's prediction for k_t is moved a step beta_t towards v_t, after decaying). Training runs
the chunked parallel form (chunks of 64 tokens: a triangular solve per chunk, the "UT transform", then one
sequential pass over chunks); decoding one token at a time runs the recurrence itself. Before the rule, q, k and v
pass a depthwise causal convolution of width `linear_conv_kernel_dim` with SiLU; the output goes through an RMSNorm
gated by silu(z) and out_proj.

Parameter names, shapes and math follow transformers' `Qwen3NextGatedDeltaNet` (in_proj_qkvz, in_proj_ba, conv1d,
dt_bias, A_log, norm, out_proj), so a state dict loads into HF's layer as is (tests/test_linear_attention.py checks).
Differences from HF: documents packed in one row (doc_ids) reset the state and the convolution at each boundary;
the short convolution starts from PyTorch's default init rather than N(0, initializer_range).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from nanomind.model.config import ModelConfig
from nanomind.model.layers import Linear

CHUNK = 64  # tokens per chunk of the parallel form


class LinearState:
    """The fixed-size cache of one GatedDeltaNet layer: the recurrent state [B, Hv, Dk, Dv] in fp32 at least (it
    sums many small updates) and the last kernel-1 inputs of the short convolution [B, conv_dim, kernel-1]."""

    def __init__(self, batch: int, heads: int, dk: int, dv: int, conv_dim: int, kernel: int, dtype, device):
        state_dtype = torch.promote_types(dtype, torch.float32)  # fp32 for bf16/fp32 caches, fp64 for fp64 tests
        self.state = torch.zeros(batch, heads, dk, dv, dtype=state_dtype, device=device)
        self.conv = torch.zeros(batch, conv_dim, kernel - 1, dtype=dtype, device=device)

    def view(self, rows: slice, keys: int) -> LinearState:
        """Rows `rows` of this cache, sharing its memory; `keys` is ignored (the state has no length)."""
        out = object.__new__(LinearState)
        out.state, out.conv = self.state[rows], self.conv[rows]
        return out

    def copy_row(self, src: int, dst: int, length: int) -> None:
        """Copy row src into row dst (continuous batching moves a request into a freed row); `length` is ignored."""
        self.state[dst] = self.state[src]
        self.conv[dst] = self.conv[src]


def l2norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """x / ||x|| over the last dim, with eps inside the root as in FLA (and so HF)."""
    return x * torch.rsqrt(x.pow(2).sum(-1, keepdim=True) + eps)


def recurrent_gated_delta_rule(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, g: torch.Tensor, beta: torch.Tensor, state: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """The rule token by token. q, k [B, H, T, Dk] (normalised, q scaled); v [B, H, T, Dv]; g (log decay) and
    beta [B, H, T]; state [B, H, Dk, Dv] or None (zeros). Returns outputs [B, H, T, Dv] and the final state."""
    B, H, T, Dk = k.shape
    S = q.new_zeros(B, H, Dk, v.shape[-1]) if state is None else state.to(q.dtype)
    out = []
    for t in range(T):
        S = S * g[:, :, t].exp()[..., None, None]
        k_t = k[:, :, t]
        delta = (v[:, :, t] - (k_t[..., None, :] @ S).squeeze(-2)) * beta[:, :, t, None]  # [B, H, Dv]
        S = S + k_t[..., :, None] * delta[..., None, :]
        out.append((q[:, :, t, None, :] @ S).squeeze(-2))
    return torch.stack(out, 2), S


def chunk_gated_delta_rule(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    g: torch.Tensor,
    beta: torch.Tensor,
    state: torch.Tensor | None,
    seg: torch.Tensor | None = None,
    chunk: int = CHUNK,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The same rule in chunked parallel form (same arguments and results as recurrent_gated_delta_rule).

    seg [B, T]: a non-decreasing segment (document) index; the state resets where it changes. Rather than a decay
    of exactly zero (log decay -inf, whose cumulative sums give inf - inf), segments enter as masks: within a chunk
    only pairs of one segment interact, a token reads the incoming state only if it is still in the incoming
    segment, and a token's write reaches the chunk's end only if no segment starts after it. All stays vectorised.

    Inside chunk c, with G_t the cumulative log decay from the chunk's start and S the incoming state, the
    recurrence unrolls to a lower-triangular system (I + L) U = V_beta - W S (L_ij = beta_i k_i.k_j e^(G_i-G_j),
    j < i); solving it once per chunk for V_beta and K_beta e^G gives U and W, the "UT transform" of the paper."""
    B, H, T, Dk = k.shape
    Dv = v.shape[-1]
    pad = -T % chunk
    if pad:  # padded tokens have k = v = beta = 0 and decay 1: they change nothing
        q, k, v = (F.pad(x, (0, 0, 0, pad)) for x in (q, k, v))
        g, beta = F.pad(g, (0, pad)), F.pad(beta, (0, pad))
        if seg is not None:
            seg = torch.cat([seg, seg[:, -1:].expand(B, pad)], 1)
    n = (T + pad) // chunk
    q, k, v = (x.reshape(B, H, n, chunk, -1) for x in (q, k, v))
    g, beta = g.reshape(B, H, n, chunk), beta.reshape(B, H, n, chunk)
    G = g.cumsum(-1)  # [B, H, n, C]
    keep = torch.ones(chunk, chunk, dtype=torch.bool, device=q.device).tril()  # [C, C]: j <= i
    read_in = write_out = through = None
    if seg is not None:
        s = seg.reshape(B, 1, n, chunk)
        s_in = torch.cat([seg[:, :1], seg[:, :-1]], 1).reshape(B, 1, n, chunk)[..., :1]  # segment of incoming state
        keep = keep & (s[..., :, None] == s[..., None, :])  # [B, 1, n, C, C]
        read_in = (s == s_in).to(q.dtype)  # [B, 1, n, C]
        write_out = (s == s[..., -1:]).to(q.dtype)
        through = (s[..., -1] == s_in[..., 0]).to(q.dtype)  # [B, 1, n]
    decay = (G[..., :, None] - G[..., None, :]).masked_fill(~keep, float("-inf")).exp()  # [B, H, n, C, C]
    k_beta = k * beta[..., None]
    decay_in = G.exp() if read_in is None else G.exp() * read_in  # from the chunk's start to t
    decay_out = (G[..., -1:] - G).exp() if write_out is None else (G[..., -1:] - G).exp() * write_out
    decay_chunk = G[..., -1].exp() if through is None else G[..., -1].exp() * through
    # unitriangular: the solver reads only the strict lower triangle of L (the rest of `decay` is 0 or the diagonal)
    L = (k_beta @ k.transpose(-1, -2)) * decay
    rhs = torch.cat([v * beta[..., None], k_beta * decay_in[..., None]], -1)
    U, W = torch.linalg.solve_triangular(L, rhs, upper=False, unitriangular=True).split([Dv, Dk], -1)
    attn = (q @ k.transpose(-1, -2)) * decay  # intra-chunk attention, diagonal included
    q_in = q * decay_in[..., None]
    k_out = k * decay_out[..., None]
    S = q.new_zeros(B, H, Dk, Dv) if state is None else state.to(q.dtype)
    out = []
    for c in range(n):
        u = U[:, :, c] - W[:, :, c] @ S  # [B, H, C, Dv]: what each token writes, net of what S already predicts
        out.append(q_in[:, :, c] @ S + attn[:, :, c] @ u)
        S = S * decay_chunk[:, :, c, None, None] + k_out[:, :, c].transpose(-1, -2) @ u
    return torch.stack(out, 2).reshape(B, H, n * chunk, Dv)[:, :, :T], S


class GatedRMSNorm(nn.Module):
    """RMSNorm of each head's output, then times silu(z) (HF Qwen3NextRMSNormGated; plain weight, init 1)."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
        dtype, f = x.dtype, torch.promote_types(x.dtype, torch.float32)
        x = x.to(f)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return (self.weight * x.to(dtype) * F.silu(z.to(f))).to(dtype)


class GatedDeltaNet(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.layer_idx = layer_idx
        self.hk, self.hv = cfg.linear_num_key_heads, cfg.linear_num_value_heads
        self.dk, self.dv = cfg.linear_key_head_dim, cfg.linear_value_head_dim
        if not self.hk or not self.hv or self.hv % self.hk:
            raise ValueError(
                f"linear_num_value_heads ({self.hv}) must be a positive multiple of linear_num_key_heads ({self.hk})"
            )
        self.kernel = cfg.linear_conv_kernel_dim
        self.key_dim, self.value_dim = self.hk * self.dk, self.hv * self.dv
        self.conv_dim = 2 * self.key_dim + self.value_dim
        self.in_proj_qkvz = Linear(cfg.hidden_size, 2 * self.key_dim + 2 * self.value_dim)
        self.in_proj_ba = Linear(cfg.hidden_size, 2 * self.hv)
        # depthwise: one filter per channel of [q | k | v]; held as nn.Conv1d for HF's name and weight shape
        self.conv1d = nn.Conv1d(self.conv_dim, self.conv_dim, self.kernel, groups=self.conv_dim, bias=False,
                                padding=self.kernel - 1)  # fmt: skip
        self.dt_bias = nn.Parameter(torch.ones(self.hv))
        self.A_log = nn.Parameter(torch.empty(self.hv))
        self.norm = GatedRMSNorm(self.dv, cfg.rms_norm_eps)
        self.out_proj = Linear(self.value_dim, cfg.hidden_size)
        self.reset_parameters()

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Everything but the three projections (those take the model's N(0, std) init): decay rates
        A = exp(A_log) ~ U(0.01, 16) and dt_bias = 1 as HF, gate norm 1, conv PyTorch's default."""
        self.A_log.copy_(torch.empty_like(self.A_log).uniform_(0.01, 16).log())
        nn.init.ones_(self.dt_bias)
        nn.init.ones_(self.norm.weight)
        self.conv1d.reset_parameters()

    def new_cache(self, batch: int, max_len: int, dtype: torch.dtype, device) -> LinearState:
        return LinearState(batch, self.hv, self.dk, self.dv, self.conv_dim, self.kernel, dtype, device)

    def _split(self, x: torch.Tensor):
        """HF's layout: in_proj_qkvz is grouped by key head, [q | k | v | z] per group, the group's Hv/Hk value
        heads together; in_proj_ba is [b | a] per group."""
        B, T, _ = x.shape
        r = self.hv // self.hk
        qkvz = self.in_proj_qkvz(x).view(B, T, self.hk, 2 * self.dk + 2 * r * self.dv)
        q, k, v, z = qkvz.split([self.dk, self.dk, r * self.dv, r * self.dv], -1)
        b, a = self.in_proj_ba(x).view(B, T, self.hk, 2 * r).split([r, r], -1)
        qkv = torch.cat([q.reshape(B, T, -1), k.reshape(B, T, -1), v.reshape(B, T, -1)], -1)  # [B, T, conv_dim]
        return qkv, z.reshape(B, T, self.hv, self.dv), b.reshape(B, T, self.hv), a.reshape(B, T, self.hv)

    def _conv(self, x: torch.Tensor, pos: torch.Tensor | None) -> torch.Tensor:
        """Causal depthwise conv + SiLU. x [B, D, K-1+T] (the K-1 previous inputs first) -> [B, D, T].
        pos [B, T] (position of each token in its document) or None: tap `lag` reads the input lag tokens back,
        so it is masked where pos < lag and no token sees the previous document. Written as K shifted products
        (K is ~4): on CPU that is as fast as F.conv1d in fp32, whose depthwise fp64 path is 50x slower."""
        K = self.kernel
        T = x.shape[-1] - K + 1
        w = self.conv1d.weight[:, 0].to(x.dtype)  # [D, K]; tap j reads lag K-1-j
        y = x[..., K - 1 :] * w[:, K - 1, None]
        for j in range(K - 1):
            tap = x[..., j : j + T] * w[:, j, None]
            y = y + (tap if pos is None else tap * (pos >= K - 1 - j)[:, None, :].to(x.dtype))
        return F.silu(y)

    def forward(
        self, x: torch.Tensor, cache: LinearState | None, at: int | torch.Tensor, doc_ids: torch.Tensor | None
    ) -> torch.Tensor:
        """x [B, T, C] -> [B, T, C]. With a cache: `at` an int 0 starts each row afresh (its cache rows are
        overwritten), an int > 0 or a tensor of positions ([T] or [B, T]) continues every row from its stored
        state; the cache is updated in place. doc_ids [B, T] (packed training rows, no cache): state and
        convolution restart at each change of doc id, as if each document ran alone."""
        B, T, _ = x.shape
        K = self.kernel
        fresh = cache is None or (not isinstance(at, torch.Tensor) and at == 0)
        qkv, z, b, a = self._split(x)
        qkv = qkv.transpose(1, 2)  # [B, conv_dim, T]
        prev = qkv.new_zeros(B, self.conv_dim, K - 1) if fresh else cache.conv.to(qkv.dtype)
        qkv = torch.cat([prev, qkv], -1)  # [B, conv_dim, K-1+T]
        if cache is not None:
            cache.conv.copy_(qkv[..., qkv.shape[-1] - (K - 1) :])
        pos = seg = None
        if doc_ids is not None:
            assert cache is None, "doc_ids are for training on packed rows"
            t = torch.arange(T, device=x.device)
            new_doc = torch.zeros_like(doc_ids, dtype=torch.bool)
            new_doc[:, 1:] = doc_ids[:, 1:] != doc_ids[:, :-1]
            pos = t - torch.where(new_doc, t, 0).cummax(1).values  # [B, T] position in its document
            seg = new_doc.cumsum(1)  # [B, T] document index within the row
        qkv = self._conv(qkv, pos).transpose(1, 2)  # [B, T, conv_dim]
        q, k, v = qkv.split([self.key_dim, self.key_dim, self.value_dim], -1)
        r = self.hv // self.hk  # each q/k head serves r consecutive value heads
        f = torch.promote_types(qkv.dtype, torch.float32)  # the rule runs in fp32 (fp64 when the input is)
        q = l2norm(q.reshape(B, T, self.hk, self.dk).to(f)).repeat_interleave(r, 2) * self.dk**-0.5
        k = l2norm(k.reshape(B, T, self.hk, self.dk).to(f)).repeat_interleave(r, 2)
        v = v.reshape(B, T, self.hv, self.dv).to(f)
        beta = b.to(f).sigmoid()
        g = -self.A_log.to(f).exp() * F.softplus(a.to(f) + self.dt_bias)  # [B, T, Hv] log decay <= 0
        q, k, v, g, beta = (u.transpose(1, 2) for u in (q, k, v, g, beta))  # heads first
        state = None if fresh else cache.state
        if T == 1:
            o, state = recurrent_gated_delta_rule(q, k, v, g, beta, state)
        else:
            o, state = chunk_gated_delta_rule(q, k, v, g, beta, state, seg)
        if cache is not None:
            cache.state.copy_(state)
        o = self.norm(o.transpose(1, 2).to(z.dtype), z)  # [B, T, Hv, Dv]
        return self.out_proj(o.reshape(B, T, self.value_dim))


def linear_layer_params(cfg: ModelConfig) -> int:
    """Parameters of one GatedDeltaNet."""
    h, hv = cfg.hidden_size, cfg.linear_num_value_heads
    key_dim, value_dim = cfg.linear_num_key_heads * cfg.linear_key_head_dim, hv * cfg.linear_value_head_dim
    conv_dim = 2 * key_dim + value_dim
    return (
        h * (2 * key_dim + 2 * value_dim)  # in_proj_qkvz
        + h * 2 * hv  # in_proj_ba
        + conv_dim * cfg.linear_conv_kernel_dim  # conv1d
        + 2 * hv  # dt_bias, A_log
        + cfg.linear_value_head_dim  # norm
        + value_dim * h  # out_proj
    )
