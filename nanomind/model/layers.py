"""Building blocks: RMSNorm, rotary position embeddings (plain, linear, YaRN) and the SwiGLU MLP."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from nanomind.model.config import ModelConfig


class Linear(nn.Linear):
    """nn.Linear without bias, plus a matrix-vector path for a single row (batch-1 decoding).

    One-row matmuls are bound by reading the weight; on CPU `torch.mv` streams it at ~40 GB/s where the
    general GEMM path reaches ~30 GB/s (measured with fp32 and bf16, see docs/PERF.md)."""

    def __init__(self, in_features: int, out_features: int):
        super().__init__(in_features, out_features, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() == self.in_features and x.device.type == "cpu" and not torch.is_autocast_enabled("cpu"):
            return torch.mv(self.weight, x.reshape(-1)).view(*x.shape[:-1], self.out_features)
        return F.linear(x, self.weight)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Under autocast, hand the next matmuls their compute dtype once here; otherwise q/k/v (and gate/up)
        # would each cast the same fp32 activations again. The weight follows x so the fused kernel is used.
        if torch.is_autocast_enabled(x.device.type):
            x = x.to(torch.get_autocast_dtype(x.device.type))
        # Written out rather than F.rms_norm: on CPU its backward is a slower composite (measured 2x, docs/PERF.md).
        # The mean of squares accumulates in fp32 inside the reduction even for bf16 x.
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight.to(x.dtype)


def _yarn_inv_freq(cfg: ModelConfig, base_inv_freq: torch.Tensor) -> tuple[torch.Tensor, float]:
    """YaRN (arXiv 2309.00071), written to match transformers' `_compute_yarn_parameters`:
    high-frequency dims keep their frequency, low-frequency dims are interpolated by `factor`,
    a linear ramp between them, and attention is scaled by 0.1*ln(factor)+1."""
    rs = cfg.rope_scaling or {}
    factor = float(rs["factor"])
    dim = cfg.rope_dim()
    orig_max = rs.get("original_max_position_embeddings") or cfg.max_position_embeddings
    beta_fast, beta_slow = rs.get("beta_fast") or 32, rs.get("beta_slow") or 1
    attention_factor = rs.get("attention_factor") or (0.1 * math.log(factor) + 1.0 if factor > 1 else 1.0)

    def correction_dim(rotations: float) -> float:
        return dim * math.log(orig_max / (rotations * 2 * math.pi)) / (2 * math.log(cfg.rope_theta))

    low = max(math.floor(correction_dim(beta_fast)), 0)
    high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # 1: extrapolate (keep the trained frequency), 0: interpolate
    inv_freq = base_inv_freq / factor * (1 - keep) + base_inv_freq * keep
    return inv_freq, float(attention_factor)


def rope_tables(cfg: ModelConfig, length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and signed sin of shape [length, rope width] in fp32, halves duplicated (HF `rotate_half` layout); the
    width is head_dim, or qk_rope_head_dim for MLA (cfg.rope_dim())."""
    dim = cfg.rope_dim()
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))
    scale = 1.0
    kind = (cfg.rope_scaling or {}).get("rope_type", (cfg.rope_scaling or {}).get("type"))
    if kind == "linear":
        inv_freq = inv_freq / float(cfg.rope_scaling["factor"])  # type: ignore[index]
    elif kind == "yarn":
        inv_freq, scale = _yarn_inv_freq(cfg, inv_freq)
    t = torch.arange(length, dtype=torch.float32)
    freqs = torch.outer(t, inv_freq)
    # sin carries rotate_half's sign: rotate_half(x) * sin == roll(x, D/2) * [-sin, sin]
    return torch.cat([freqs, freqs], dim=-1).cos() * scale, torch.cat([-freqs, freqs], dim=-1).sin() * scale


def apply_rope(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """x: [B, H, T, D]; cos, signed_sin: [T, D] from rope_tables, already in x's dtype.
    Equals HF's x * cos + rotate_half(x) * sin, in 4 ops instead of 7 (this runs 16 times per decoded token)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * signed_sin


class MLP(nn.Module):
    """SwiGLU: down(silu(gate(x)) * up(x))."""

    def __init__(self, cfg: ModelConfig, intermediate: int = 0):
        super().__init__()
        inner = intermediate or cfg.intermediate_size
        self.gate_proj = Linear(cfg.hidden_size, inner)
        self.up_proj = Linear(cfg.hidden_size, inner)
        self.down_proj = Linear(inner, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))
