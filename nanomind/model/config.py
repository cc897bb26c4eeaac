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
        if self.attention not in ("gqa", "mla"):
            raise ValueError(f"attention must be 'gqa' or 'mla', got {self.attention!r}")
        if self.attention == "mla":
            widths = dict(kv_lora_rank=self.kv_lora_rank, qk_nope_head_dim=self.qk_nope_head_dim,
                          qk_rope_head_dim=self.qk_rope_head_dim, v_head_dim=self.v_head_dim)  # fmt: skip
            if any(v <= 0 for v in widths.values()):
                raise ValueError(f"attention='mla' needs kv_lora_rank, qk_nope_head_dim, qk_rope_head_dim and "
                                 f"v_head_dim > 0, got {widths}")  # fmt: skip
            if self.q_lora_rank < 0:
                raise ValueError(f"q_lora_rank must be >= 0 (0: no query compression), got {self.q_lora_rank}")
            if self.qk_rope_head_dim % 2:
                raise ValueError(f"qk_rope_head_dim must be even for RoPE, got {self.qk_rope_head_dim}")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            raise ValueError(f"first_k_dense_replace must be in [0, num_hidden_layers={self.num_hidden_layers}], "
                             f"got {self.first_k_dense_replace}")  # fmt: skip
        if self.num_nextn_predict_layers < 0 or self.mtp_loss_weight < 0:
            raise ValueError("num_nextn_predict_layers and mtp_loss_weight must be >= 0")
        if self.full_attention_interval < 0:
            raise ValueError(f"full_attention_interval must be >= 0, got {self.full_attention_interval}")
        if self.full_attention_interval:
            lin = dict(linear_num_key_heads=self.linear_num_key_heads,
                       linear_num_value_heads=self.linear_num_value_heads,
                       linear_key_head_dim=self.linear_key_head_dim, linear_value_head_dim=self.linear_value_head_dim,
                       linear_conv_kernel_dim=self.linear_conv_kernel_dim)  # fmt: skip
            if any(v <= 0 for v in lin.values()):
                raise ValueError(f"full_attention_interval > 0 (gated DeltaNet layers) needs {sorted(lin)} > 0, "
                                 f"got {lin}")  # fmt: skip
            if self.linear_num_value_heads % self.linear_num_key_heads:
                raise ValueError(f"linear_num_value_heads {self.linear_num_value_heads} must be a multiple of "
                                 f"linear_num_key_heads {self.linear_num_key_heads}")  # fmt: skip

    def is_linear_attention(self, layer: int) -> bool:
        """Whether layer `layer` mixes tokens with gated DeltaNet (Qwen3-Next's layout; also the MTP block's kind
        when asked for layer num_hidden_layers - 1)."""
        n = self.full_attention_interval
        return n > 0 and (layer + 1) % n != 0

    def is_moe_layer(self, layer: int) -> bool:
        """Whether layer `layer` has routed experts (DeepSeek-V3: the first first_k_dense_replace layers stay dense)."""
        return self.num_experts > 0 and layer >= self.first_k_dense_replace

    def rope_dim(self) -> int:
        """The width RoPE rotates: head_dim, or for MLA only the decoupled qk_rope_head_dim part."""
        return self.qk_rope_head_dim if self.attention == "mla" else self.head_dim

    def kv_cache_bytes_per_token(self, dtype_bytes: int = 2) -> dict[str, int]:
        """Cache bytes per token over all layers: {"cache": this config's, "gqa": what GQA (k and v of
        num_key_value_heads x head_dim) would store in the same layers}. MLA stores a kv_lora_rank latent plus the
        shared rope key; gated DeltaNet layers store nothing per token (their fixed-size state: linear_state_bytes)."""
        full = sum(not self.is_linear_attention(i) for i in range(self.num_hidden_layers))
        gqa = 2 * self.num_key_value_heads * self.head_dim
        per_layer = self.kv_lora_rank + self.qk_rope_head_dim if self.attention == "mla" else gqa
        return {"cache": full * per_layer * dtype_bytes, "gqa": full * gqa * dtype_bytes}

    def linear_state_bytes(self, dtype_bytes: int = 2) -> int:
        """Bytes per sequence of the gated DeltaNet layers' fixed-size cache, whatever the length: the recurrent
        state (linear_num_value_heads x key x value head dims, kept in fp32 at least) and the short convolution's
        last kernel - 1 inputs of q, k and v (in the cache dtype). 0 without such layers."""
        linear = sum(self.is_linear_attention(i) for i in range(self.num_hidden_layers))
        state = self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim
        conv_dim = 2 * self.linear_num_key_heads * self.linear_key_head_dim + self.linear_num_value_heads * (
            self.linear_value_head_dim)  # fmt: skip
        return linear * (state * max(dtype_bytes, 4) + conv_dim * (self.linear_conv_kernel_dim - 1) * dtype_bytes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelConfig:
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def _attention_params(self) -> int:
        h, H = self.hidden_size, self.num_attention_heads
        if self.attention == "mla":
            qk = self.qk_nope_head_dim + self.qk_rope_head_dim
            q = h * self.q_lora_rank + self.q_lora_rank + self.q_lora_rank * H * qk if self.q_lora_rank else h * H * qk
            kv = h * (self.kv_lora_rank + self.qk_rope_head_dim) + self.kv_lora_rank  # kv_a_proj_with_mqa + norm
            kv += self.kv_lora_rank * H * (self.qk_nope_head_dim + self.v_head_dim)  # kv_b_proj
            return q + kv + H * self.v_head_dim * h
        attn = h * H * self.head_dim * 2 + h * self.num_key_value_heads * self.head_dim * 2
        return attn + (2 * self.head_dim if self.qk_norm else 0)

    def _linear_attention_params(self) -> int:
        """Gated DeltaNet (HF Qwen3NextGatedDeltaNet): in_proj_qkvz, in_proj_ba, depthwise conv1d over q/k/v,
        dt_bias, A_log, the gated norm (head_v_dim) and out_proj."""
        key = self.linear_num_key_heads * self.linear_key_head_dim
        value = self.linear_num_value_heads * self.linear_value_head_dim
        h, hv = self.hidden_size, self.linear_num_value_heads
        conv = (2 * key + value) * self.linear_conv_kernel_dim
        return h * (2 * key + 2 * value) + h * 2 * hv + conv + 2 * hv + self.linear_value_head_dim + value * h

    def _layer_params(self, i: int, active: bool) -> int:
        h = self.hidden_size
        mixer = self._linear_attention_params() if self.is_linear_attention(i) else self._attention_params()
        if self.is_moe_layer(i):
            routed = self.num_experts_per_tok if active else self.num_experts
            mlp = 3 * h * self.moe_intermediate_size * (routed + self.n_shared_experts) + self.num_experts * h
        else:
            mlp = 3 * h * self.intermediate_size
        return mixer + mlp + 2 * h

    def num_params(self, embeddings: bool = True, active: bool = False, mtp: bool = True) -> int:
        """Parameter count; active: only what one token uses (its top-k experts, not all of them); mtp: with the
        multi-token prediction modules (each: two norms, eh_proj, one block like the last layer, a norm)."""
        h = self.hidden_size
        n = sum(self._layer_params(i, active) for i in range(self.num_hidden_layers)) + h
        if mtp:
            last = self._layer_params(self.num_hidden_layers - 1, active)
            n += self.num_nextn_predict_layers * (2 * h * h + 3 * h + last)
        emb = self.vocab_size * h * (1 if self.tie_word_embeddings else 2)
        return n + (emb if embeddings else 0)

    def flops_per_token(self, seq_len: int) -> float:
        """Training FLOPs per token: 6 x matmul params (lm_head included, once per MTP depth too) + causal
        attention (PaLM appendix B: 12 * H * head_dim * T per layer, halved for causality; MLA with its q/k and v
        widths). For MoE models, the active parameters. Gated DeltaNet layers count their state update and readout
        (2 x 2 * dk * dv per value head per token, times 3 for training) instead of a T-long attention."""
        depths = 1 + self.num_nextn_predict_layers
        n = self.num_params(embeddings=False, active=True) + depths * self.vocab_size * self.hidden_size
        H = self.num_attention_heads
        qk, v = ((self.qk_nope_head_dim + self.qk_rope_head_dim, self.v_head_dim) if self.attention == "mla"
                 else (self.head_dim, self.head_dim))  # fmt: skip
        layers = [self.is_linear_attention(i) for i in range(self.num_hidden_layers)]
        layers += [self.is_linear_attention(self.num_hidden_layers - 1)] * self.num_nextn_predict_layers
        attn = 0.0
        for linear in layers:
            if linear:
                attn += 12 * self.linear_num_value_heads * self.linear_key_head_dim * self.linear_value_head_dim
            else:
                attn += 3 * H * (qk + v) * seq_len
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
    # debug with DeepSeek-V3's pieces: MLA, a sigmoid-scored MoE (4 experts, top-2, a shared one, bias balancing)
    # after one dense layer, one MTP module
    "debug-mla": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
                      num_key_value_heads=4, max_position_embeddings=512, attention="mla", q_lora_rank=32,
                      kv_lora_rank=32, qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16, num_experts=4,
                      num_experts_per_tok=2, moe_intermediate_size=64, n_shared_experts=1, scoring_func="sigmoid",
                      router_aux_loss_coef=0.0, router_bias_update_rate=1e-3, first_k_dense_replace=1,
                      num_nextn_predict_layers=1),
    # DeepSeek-V3 in miniature (187M, 50M active; 169M without its MTP module): MLA caching 160 values per token
    # and layer where GQA at this width would cache 1280, 16 sigmoid-scored experts (top-2) + a shared one with
    # aux-loss-free balancing, a dense first layer, one MTP module
    "deepseek-v3-mini": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=10, num_attention_heads=10,
                             num_key_value_heads=10, attention="mla", q_lora_rank=256, kv_lora_rank=128,
                             qk_nope_head_dim=64, qk_rope_head_dim=32, v_head_dim=64, num_experts=16,
                             num_experts_per_tok=2, moe_intermediate_size=512, n_shared_experts=1,
                             scoring_func="sigmoid", router_aux_loss_coef=0.0, router_bias_update_rate=1e-3,
                             first_k_dense_replace=1, num_nextn_predict_layers=1),
    # debug with Qwen3-Next's pieces: 3 gated DeltaNet layers then one full-attention layer (qk-norm, 4 q / 2 kv
    # heads), a softmax MoE of 4 experts (top-2) + a shared one in every layer
    "debug-next": dict(hidden_size=64, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                       num_key_value_heads=2, qk_norm=True, max_position_embeddings=512, full_attention_interval=4,
                       linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=16,
                       linear_value_head_dim=16, num_experts=4, num_experts_per_tok=2, moe_intermediate_size=64,
                       n_shared_experts=1),
    # Qwen3-Next in miniature (170M, 46M active; deepseek-v3-mini's width and total): 12 layers, each three gated
    # DeltaNet layers (4 q/k heads, 8 value heads, 64 wide) then one GQA layer with qk-norm (10 q / 2 kv heads),
    # so only 3 layers cache keys and values (1,536 bytes per token in bf16); every layer a softmax MoE of 16
    # experts (top-2, renormalised) + a shared one. No MTP: speculative decoding cannot roll a recurrent state back
    "qwen3-next-mini": dict(hidden_size=640, intermediate_size=1728, num_hidden_layers=12, num_attention_heads=10,
                            num_key_value_heads=2, head_dim=64, qk_norm=True, full_attention_interval=4,
                            linear_num_key_heads=4, linear_num_value_heads=8, linear_key_head_dim=64,
                            linear_value_head_dim=64, num_experts=16, num_experts_per_tok=2, moe_intermediate_size=384,
                            n_shared_experts=1, router_aux_loss_coef=0.001),
}  # fmt: skip


def preset(name: str, **overrides: Any) -> ModelConfig:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(**{**PRESETS[name], **{k: v for k, v in overrides.items() if v is not None}})


def describe_presets() -> str:
    def size(cfg: ModelConfig) -> str:
        total = f"{cfg.num_params() / 1e6:.1f}M"
        if cfg.num_experts:
            total += f" ({cfg.num_params(active=True) / 1e6:.1f}M active)"
        total += " MLA" if cfg.attention == "mla" else ""
        return total + (" hybrid (gated DeltaNet)" if cfg.full_attention_interval else "")

    return ", ".join(f"{name} {size(ModelConfig(**kw))}" for name, kw in PRESETS.items())
