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
    # Mixture of experts (model/moe.py); num_experts 0 = dense. Names follow HF Qwen-MoE / DeepSeek-V3.
    num_experts: int = 0  # routed experts per layer
    num_experts_per_tok: int = 2  # top-k
    moe_intermediate_size: int = 0  # each expert's hidden size (0: intermediate_size)
    n_shared_experts: int = 0  # always-on experts (DeepSeek style), each moe_intermediate_size wide
    scoring_func: str = "softmax"  # router scores: softmax (Switch / Qwen) or sigmoid (DeepSeek-V3)
    norm_topk_prob: bool = True  # renormalise the k chosen weights to sum to 1 (only when k > 1, see moe.py)
    router_aux_loss_coef: float = 0.01  # Switch load-balancing loss weight (0: off)
    router_bias_update_rate: float = 0.0  # aux-loss-free balancing (DeepSeek-V3): per-step bias step (0: off)
    first_k_dense_replace: int = 0  # DeepSeek-V3: the first k layers keep a dense MLP even in a MoE model
    # Multi-head latent attention (model/mla.py, DeepSeek-V2/V3; HF DeepseekV3 names). attention "gqa" or "mla".
    attention: str = "gqa"
    q_lora_rank: int = 0  # 0: q_proj straight from the hidden state; else q_a_proj -> norm -> q_b_proj
    kv_lora_rank: int = 0  # width of the compressed KV latent that the cache stores
    qk_nope_head_dim: int = 0  # per-head query/key width without position
    qk_rope_head_dim: int = 0  # per-head width with RoPE (the key part is shared by all heads, cached)
    v_head_dim: int = 0
    # Multi-token prediction (model/mtp.py, DeepSeek-V3): extra blocks predicting token t+1+k, loss weight
    num_nextn_predict_layers: int = 0
    mtp_loss_weight: float = 0.3
    # Gated DeltaNet linear attention (model/linear_attention.py, Qwen3-Next; HF Qwen3Next names).
    # full_attention_interval 0: every layer is full attention; n: layers n-1, 2n-1, ... are full attention and
    # the others gated DeltaNet (Qwen3-Next uses 4: three linear layers, then one full).
    full_attention_interval: int = 0
    linear_num_key_heads: int = 0
    linear_num_value_heads: int = 0
    linear_key_head_dim: int = 0
    linear_value_head_dim: int = 0
    linear_conv_kernel_dim: int = 4

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
        if self.num_experts:
            if not 1 <= self.num_experts_per_tok <= self.num_experts:
                raise ValueError(f"num_experts_per_tok must be in [1, num_experts={self.num_experts}], "
                                 f"got {self.num_experts_per_tok}")  # fmt: skip
            if self.scoring_func not in ("softmax", "sigmoid"):
                raise ValueError(f"scoring_func must be 'softmax' or 'sigmoid', got {self.scoring_func!r}")
            if self.moe_intermediate_size == 0:
                self.moe_intermediate_size = self.intermediate_size
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

    def num_params(self, embeddings: bool = True, active: bool = False) -> int:
        """Parameter count; active: only what one token uses (its top-k experts, not all of them)."""
        h, kv, hd = self.hidden_size, self.num_key_value_heads, self.head_dim
        attn = h * self.num_attention_heads * hd * 2 + h * kv * hd * 2
        if self.qk_norm:
            attn += 2 * hd
        if self.num_experts:
            routed = self.num_experts_per_tok if active else self.num_experts
            mlp = 3 * h * self.moe_intermediate_size * (routed + self.n_shared_experts) + self.num_experts * h
        else:
            mlp = 3 * h * self.intermediate_size
        layer = attn + mlp + 2 * h
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return self.num_hidden_layers * layer + h + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params (lm_head included) + causal attention (PaLM appendix B).
        For MoE models, the active parameters."""
        n = self.num_params(embeddings=False, active=True) + self.vocab_size * self.hidden_size
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
    # minimind's 2024 MoE: the 26M shape with 4 routed experts (top-2) and a shared one
    "minimind-moe": dict(hidden_size=512, intermediate_size=1408, num_hidden_layers=8, num_attention_heads=16,
                         num_key_value_heads=8, num_experts=4, num_experts_per_tok=2, n_shared_experts=1),
    # minimind-moe's dense twin: one MLP as wide as its 3 active experts (2 routed + 1 shared), same active size
    "minimind-moe-dense": dict(hidden_size=512, intermediate_size=4224, num_hidden_layers=8, num_attention_heads=16,
                               num_key_value_heads=8),
    # today's upstream MoE: the 64M shape with 4 experts, top-1 (the router still learns: see moe.py)
    "minimind3-moe": dict(hidden_size=768, intermediate_size=2432, num_hidden_layers=8, num_attention_heads=8,
                          num_key_value_heads=4, qk_norm=True, num_experts=4, num_experts_per_tok=1),
}  # fmt: skip


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def describe_presets() -> str:
    def size(cfg: ModelConfig) -> str:
        total = f"{cfg.num_params() / 1e6:.1f}M"
        return f"{total} ({cfg.num_params(active=True) / 1e6:.1f}M active)" if cfg.num_experts else total

    return ", ".join(f"{name} {size(ModelConfig(**kw))}" for name, kw in PRESETS.items())
