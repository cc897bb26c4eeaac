"""ModelConfig (HF Llama/Qwen3 field names) and the named size presets."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any


@dataclass
class ModelConfig:
    vocab_size: int = 6400
    hidden_size: int = 512
    intermediate_size: int = 1408
    num_hidden_layers: int = 8
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int = 0  # 0: hidden_size // num_attention_heads
    max_position_embeddings: int = 2048
    rope_theta: float = 1e6
    # HF-style dict, e.g. {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 2048}
    rope_scaling: dict[str, Any] | None = None
    rms_norm_eps: float = 1e-6
    qk_norm: bool = False  # Qwen3 style RMSNorm on each head's q and k
    tie_word_embeddings: bool = True
    initializer_range: float = 0.02

    def __post_init__(self) -> None:
        if self.head_dim == 0:
            if self.hidden_size % self.num_attention_heads:
                raise ValueError(
                    f"hidden_size {self.hidden_size} is not divisible by num_attention_heads "
                    f"{self.num_attention_heads}; set head_dim explicitly"
                )
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(
                f"num_attention_heads {self.num_attention_heads} must be a multiple of "
                f"num_key_value_heads {self.num_key_value_heads}"
            )
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("rope_type", self.rope_scaling.get("type"))
            if kind not in ("linear", "yarn"):
                raise ValueError(f"rope_scaling.rope_type must be 'linear' or 'yarn', got {kind!r}")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def num_params(self, embeddings: bool = True) -> int:
        h, kv, hd = self.hidden_size, self.num_key_value_heads, self.head_dim
        attn = h * self.num_attention_heads * hd * 2 + h * kv * hd * 2
        if self.qk_norm:
            attn += 2 * hd
        layer = attn + 3 * h * self.intermediate_size + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + h + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params (lm_head included) + causal attention (PaLM appendix B)."""
        n = self.num_params(embeddings=False) + self.vocab_size * self.hidden_size
        attn = (
            6 * self.num_hidden_layers * self.num_attention_heads * self.head_dim * seq_len
        )  # 12*L*H*T, halved: causal
        return 6 * n + attn


PRESETS: dict[str, dict[str, Any]] = {
    # ~0.5M params: tests and golden runs
    "debug": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=512),
    # a few M params: the CPU demo
    "tiny": dict(hidden_size=256, intermediate_size=704, num_hidden_layers=4, num_attention_heads=8,
                 num_key_value_heads=4, qk_norm=True, max_position_embeddings=1024),
    # minimind's 2024 small model (26M)
    "minimind-26m": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=8),
    # minimind's 2024 base model (104M)
    "minimind-104m": dict(hidden_size=768, intermediate_size=2048, num_hidden_layers=16, num_attention_heads=16,
                          num_key_value_heads=8),
    # today's upstream minimind at hidden 512 (Qwen3-like, 30.0M): the benchmark model
    "minimind3-30m": dict(hidden_size=512, intermediate_size=1664, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4, head_dim=64, qk_norm=True),
    # Qwen3-like 64M
    "minimind3-64m": dict(hidden_size=768, intermediate_size=2432, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4, qk_norm=True),
}  # fmt: skip


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def describe_presets() -> str:
    return ", ".join(f"{name} {ModelConfig(**kw).num_params() / 1e6:.1f}M" for name, kw in PRESETS.items())
