"""Export checkpoints to transformers and import them back; the architecture table GGUF export shares.

nanomind export hf --ckpt runs/sft --out runs/hf        # AutoModelForCausalLM.from_pretrained("runs/hf") loads it
nanomind import hf --model runs/hf --out runs/imported  # back to a checkpoint any stage can --init from

Our parameter names are HF's, so the weights map one to one. A dense model with qk-norm is a `Qwen3ForCausalLM`,
one without a `LlamaForCausalLM`; both are native classes, so no `trust_remote_code` is needed. A checkpoint with a
LoRA adapter (a LoRA run) is exported merged, as `nanomind export merge-lora` would write it.

Mixture of experts (model/moe.py), softmax routing over k of E SwiGLU experts with no balancing bias in use:
- with qk-norm and no shared experts: `Qwen3MoeForCausalLM` (norm_topk_prob=False at k = 1, where moe.py weighs
  the expert by its router probability and HF's renormalisation would make it 1.0);
- without qk-norm, with shared experts: `Qwen2MoeForCausalLM`. Its shared expert is scaled by a sigmoid gate of
  its own; the gate is written as zeros (sigmoid(0) = 0.5 exactly) and the shared down_proj doubled, which is
  exact in floating point (powers of two), so it adds what ours adds; q/k/v get the zero biases it may carry;
- without qk-norm and shared experts, top-k > 1 renormalised: `MixtralForCausalLM`, the Llama-family MoE.
Weights are written in the per-expert layout of the Hub's checkpoints, which every transformers version loads
(5.x fuses them into 3-D `experts.gate_up_proj` / `down_proj` on loading and writes them back per expert on
saving); import reads both. Sigmoid scoring (DeepSeek-V3 style: with or without shared experts, qk-norm and the
aux-loss-free balancing bias) is a `Glm4MoeForCausalLM` (GLM-4.5), with full-width RoPE, no leading dense layers
and one expert group; its router always adds `e_score_correction_bias` for choosing, so that is written as ours
while moe.py uses it (router_bias_update_rate > 0) and as zeros otherwise. Refused, as no native class computes
them as we do: Mixtral always renormalises (so softmax top-1 or norm_topk_prob=False without qk-norm and shared
experts), no softmax class has qk-norm with shared experts (Qwen3-MoE has none), and a selection bias in use with
softmax scores (GLM-4.5 and DeepSeek-V3 score by sigmoid). GGUF export covers all of these (export_gguf.py).

Multi-head latent attention (model/mla.py) is a `DeepseekV3ForCausalLM` (rope_interleave=False: our RoPE rotates
halves; q_lora_rank 0 is its None), dense or with a sigmoid-scored MoE after first_k_dense_replace dense layers, mapped
like GLM-4.5's (one expert group, routed_scaling_factor 1, the bias always added). Multi-token prediction modules
(model/mtp.py) exist in no transformers class: every export leaves them out, with a printed note.
Import of DeepSeek-V3 and GGUF export of MLA are not implemented.

Gated DeltaNet hybrids (model/linear_attention.py, full_attention_interval > 0) with qk-norm are a
`Qwen3NextForCausalLM`, which names and computes the DeltaNet layers as we do but the rest differently
(QWEN3_NEXT_DIFFERENCES); each difference is mapped exactly (`qwen3_next_state`): the output gate's rows of q_proj are
zeros (sigmoid(0) = 0.5) and o_proj is doubled, partial_rotary_factor is 1.0, the zero-centred RMSNorms get w - 1
(the DeltaNet's gated norm is a plain weight and stays), and the shared expert gets Qwen2-MoE's zero gate and
doubled down_proj. Dense hybrids (num_experts 0) and leading dense layers (mlp_only_layers) map too; refused: no
qk-norm, MLA, sigmoid scoring. GGUF export refuses the hybrid (llama.cpp's `qwen3next`); import does not map it.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from nanomind import checkpoint
from nanomind.config import arg, parse
from nanomind.model import ModelConfig, Transformer
from nanomind.model.lora import lora_layers, merge_lora
from nanomind.tokenizer import Tokenizer, tokenizer_files


@dataclass(frozen=True)
class Arch:
    """One native architecture that a family of our configs maps to, in transformers and in llama.cpp."""

    hf_class: str  # transformers model class, written to config.json "architectures"
    hf_config: str  # transformers config class
    model_type: str  # config.json "model_type"
    gguf_arch: str  # llama.cpp architecture name
    # llama.cpp's `llama` ropes adjacent pairs (GPT-J style) where HF rotates halves (NeoX style), so GGUF export
    # permutes the rows of q_proj and k_proj for it, as llama.cpp's own converter does; `qwen3` ropes NeoX style.
    gguf_permute_qk: bool
    moe: bool = False  # routed experts in every layer (`model.layers.{i}.mlp` is a MoE)
    qk_norm: bool = False


LLAMA = Arch("LlamaForCausalLM", "LlamaConfig", "llama", "llama", gguf_permute_qk=True)
QWEN3 = Arch("Qwen3ForCausalLM", "Qwen3Config", "qwen3", "qwen3", gguf_permute_qk=False, qk_norm=True)
QWEN3_MOE = Arch("Qwen3MoeForCausalLM", "Qwen3MoeConfig", "qwen3_moe", "qwen3moe", gguf_permute_qk=False, moe=True,
                 qk_norm=True)  # fmt: skip
# llama.cpp runs Mixtral as `llama` with stacked expert tensors
MIXTRAL = Arch("MixtralForCausalLM", "MixtralConfig", "mixtral", "llama", gguf_permute_qk=True, moe=True)
QWEN2_MOE = Arch("Qwen2MoeForCausalLM", "Qwen2MoeConfig", "qwen2_moe", "qwen2moe", gguf_permute_qk=False, moe=True)
# qk-norm optional (use_qk_norm); also llama.cpp's graph for every MoE its qwen3moe / llama graphs cannot run
GLM4_MOE = Arch("Glm4MoeForCausalLM", "Glm4MoeConfig", "glm4_moe", "glm4moe", gguf_permute_qk=False, moe=True)
# gated DeltaNet hybrids, dense or MoE (not in ARCHS: import does not map it back yet; GGUF export refuses them)
QWEN3_NEXT = Arch("Qwen3NextForCausalLM", "Qwen3NextConfig", "qwen3_next", "qwen3next", gguf_permute_qk=False,
                  moe=True, qk_norm=True)  # fmt: skip
# MLA, dense or MoE (not in ARCHS: import does not map it back yet)
DEEPSEEK_V3 = Arch("DeepseekV3ForCausalLM", "DeepseekV3Config", "deepseek_v3", "deepseek2", gguf_permute_qk=False,
                   moe=True)  # fmt: skip
ARCHS = {a.model_type: a for a in (LLAMA, QWEN3, QWEN3_MOE, MIXTRAL, QWEN2_MOE, GLM4_MOE)}
BIAS_RATE = 1e-3  # router_bias_update_rate of an imported model whose selection bias is nonzero (DeepSeek-V3's)

# The ModelConfig fields the dense mapping below writes out. A field added later for a new variant (MoE, MLA, ...)
# is refused by `architecture` while it differs from its default, so export never silently drops a feature.
DENSE_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
    "qk_norm", "tie_word_embeddings", "initializer_range",
}  # fmt: skip
# ... and those the MoE mappings add (router_bias_update_rate: the bias it moves is checked in `check_weights`)
MOE_FIELDS = {"num_experts", "num_experts_per_tok", "moe_intermediate_size", "norm_topk_prob", "router_aux_loss_coef",
              "router_bias_update_rate", "n_shared_experts", "scoring_func"}  # fmt: skip
# ... those of DeepSeek-V3's MLA mapping, and the MTP fields, whose modules every export leaves out
MLA_FIELDS = {"attention", "q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim",
              "first_k_dense_replace"}  # fmt: skip
MTP_FIELDS = {"num_nextn_predict_layers", "mtp_loss_weight"}
# ... and those of the Qwen3-Next mapping (first_k_dense_replace: its mlp_only_layers)
HYBRID_FIELDS = {"full_attention_interval", "linear_num_key_heads", "linear_num_value_heads", "linear_key_head_dim",
                 "linear_value_head_dim", "linear_conv_kernel_dim", "first_k_dense_replace"}  # fmt: skip


# What Qwen3-Next computes beyond our hybrid; `export hf` maps each exactly (hf_state_dict), GGUF export refuses.
QWEN3_NEXT_DIFFERENCES = (
    "its full-attention layers gate their output (q_proj also produces a per-head sigmoid gate) and rotate only "
    "a quarter of each head (partial_rotary_factor 0.25), its RMSNorm weights are zero-centred (scale 1 + w), "
    "and its shared expert is scaled by a sigmoid gate (shared_expert_gate)"
)


def architecture(cfg: ModelConfig) -> Arch:
    """The native architecture for cfg, or a ValueError naming the feature no mapping covers."""
    if cfg.full_attention_interval:
        hybrid = f"this gated DeltaNet hybrid (full_attention_interval={cfg.full_attention_interval})"
        if cfg.attention == "mla":
            raise ValueError(f"export cannot map {hybrid}: it uses attention='mla', and Qwen3NextForCausalLM's "
                             "full-attention layers are GQA")  # fmt: skip
        if not cfg.qk_norm:
            raise ValueError(f"export cannot map {hybrid}: it uses qk_norm=False, and Qwen3NextForCausalLM's "
                             "full-attention layers always normalise each head's q and k")  # fmt: skip
        if cfg.num_experts and cfg.scoring_func != "softmax":
            raise ValueError(f"export cannot map {hybrid}: it uses scoring_func={cfg.scoring_func!r}; "
                             "Qwen3NextForCausalLM's router scores experts by softmax")  # fmt: skip
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    # a dense model (num_experts 0) never reads the MoE fields, whatever their values
    known = DENSE_FIELDS | MOE_FIELDS | MTP_FIELDS | (MLA_FIELDS if cfg.attention == "mla" else set())
    known |= HYBRID_FIELDS if cfg.full_attention_interval else set()
    extra = {k: v for k, v in cfg.to_dict().items() if k not in known and v != defaults.get(k)}
    if extra:
        features = "; ".join(f"{k}={v!r}" for k, v in extra.items())
        raise ValueError(f"export cannot map this model: it uses {features}: no mapping for it")
    if cfg.full_attention_interval:
        return QWEN3_NEXT
    if cfg.attention == "mla":
        if cfg.qk_norm:
            raise ValueError("export cannot map this MLA model: it uses qk_norm=True, and DeepSeek-V3's attention "
                             "has no per-head q/k norm")  # fmt: skip
        if cfg.num_experts and cfg.scoring_func != "sigmoid":
            raise ValueError(f"export cannot map this MLA model: it uses scoring_func={cfg.scoring_func!r}; "
                             "DeepSeek-V3's router scores experts by sigmoid")  # fmt: skip
        if cfg.num_experts == 1:
            raise ValueError("export cannot map a sigmoid-scored MoE of one expert (DeepSeek-V3's router needs two)")
        return DEEPSEEK_V3
    if not cfg.num_experts:
        return QWEN3 if cfg.qk_norm else LLAMA
    if cfg.scoring_func == "sigmoid":
        if cfg.num_experts < 2:  # its router takes the top 2 scores of each expert group
            raise ValueError("export cannot map a sigmoid-scored MoE of one expert (GLM-4.5's router needs two)")
        return GLM4_MOE
    if cfg.n_shared_experts and cfg.qk_norm:
        raise ValueError(
            f"export cannot map this MoE model: it uses n_shared_experts={cfg.n_shared_experts} with qk_norm, and no "
            "native class has both (Qwen3-MoE has no shared experts; Qwen2-MoE, which has, no qk-norm)"
        )
    if cfg.n_shared_experts:
        return QWEN2_MOE
    if cfg.qk_norm:
        return QWEN3_MOE
    k = cfg.num_experts_per_tok
    if k == 1 or not cfg.norm_topk_prob:
        feature = "num_experts_per_tok=1 (the expert weighted by its router probability)" if k == 1 else (
            "norm_topk_prob=False")  # fmt: skip
        raise ValueError(
            f"export cannot map this MoE model without qk_norm or shared experts: it uses {feature}, and Mixtral, "
            "the Llama-family MoE class, always renormalises the top-k weights to sum 1 (Qwen3-MoE, which need not, "
            "has qk_norm; Qwen2-MoE shared experts)"
        )
    return MIXTRAL


def check_weights(model: Transformer, arch: Arch) -> None:
    """Refuse what the config alone does not show: a balancing bias that changes which experts are chosen, for a
    class without one (all but GLM-4.5's)."""
    if not model.config.router_bias_update_rate or arch in (GLM4_MOE, DEEPSEEK_V3):
        return  # the bias is not used (moe.py adds it only while the update rate is nonzero), or mapped
    for name, buf in model.named_buffers():
        if name.endswith("e_score_correction_bias") and buf.any():
            raise ValueError(
                f"export cannot map this model: {name} is nonzero (aux-loss-free balancing, "
                f"router_bias_update_rate={model.config.router_bias_update_rate}) with softmax scores; the bias "
                "that picks experts exists natively only with sigmoid scores (GLM-4.5, DeepSeek-V3)"
            )


def rope_scaling(cfg: ModelConfig) -> dict | None:
    """cfg.rope_scaling with HF's key `rope_type` (older configs say `type`)."""
    if cfg.rope_scaling is None:
        return None
    rs = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
    return {"rope_type": cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")), **rs}


def load_checkpoint(ckpt: str | Path) -> tuple[Path, Transformer]:
    """(checkpoint dir, fp32 model); the weights are checked against the config on loading. A LoRA run's
    checkpoint loads with its adapter, which is folded in here: the weights `nanomind export merge-lora` writes."""
    path = checkpoint.resolve(ckpt)
    model = checkpoint.load_model(path).eval()
    return path, merge_lora(model) if lora_layers(model) else model


def load_for_export(ckpt: str | Path) -> tuple[Path, Transformer, Arch]:
    """(checkpoint dir, fp32 model, its transformers architecture)."""
    architecture(checkpoint.load_config(checkpoint.resolve(ckpt)))  # before loading weights
    path, model = load_checkpoint(ckpt)
    arch = architecture(model.config)
    check_weights(model, arch)
    return path, model, arch


# Mixtral's Hub names for our MoE tensors (transformers' own conversion renames them on loading)
MIXTRAL_NAMES = [(".mlp.", ".block_sparse_moe."), (".gate_proj.", ".w1."), (".down_proj.", ".w2."),
                 (".up_proj.", ".w3.")]  # fmt: skip


def hf_state_dict(model: Transformer, arch: Arch) -> dict[str, torch.Tensor]:
    """Tensors under their transformers names: ours already are (Qwen3-MoE's per-expert ones included); Mixtral's,
    Qwen2-MoE's shared expert and GLM-4.5's bias (kept in its router) are renamed. A tied lm_head is left out (as HF
    saves it), and so is the balancing bias of classes without one (`check_weights` found it unused)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if not k.startswith("model.mtp.")}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    if arch in (GLM4_MOE, DEEPSEEK_V3):  # its router always adds the bias: ours while moe.py uses it, else zeros
        use = model.config.router_bias_update_rate
        state = {k.replace(".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction_bias"): v if use or not
                 k.endswith("e_score_correction_bias") else torch.zeros_like(v) for k, v in state.items()}  # fmt: skip
    state = {k: v for k, v in state.items() if not k.endswith(".mlp.e_score_correction_bias")}
    if arch is QWEN2_MOE:
        state = sigmoid_gated_shared_expert(state)
        for k, v in list(state.items()):  # q/k/v: zero biases (transformers 4.x's Qwen2-MoE always has them)
            if k.endswith(("q_proj.weight", "k_proj.weight", "v_proj.weight")):
                state[k.removesuffix("weight") + "bias"] = torch.zeros(v.shape[0])
    if arch is QWEN3_NEXT:
        state = qwen3_next_state(state, model.config)
    if arch is MIXTRAL:
        for ours, theirs in MIXTRAL_NAMES:
            state = {k.replace(ours, theirs) if ".mlp." in k or ".block_sparse_moe." in k else k: v
                     for k, v in state.items()}  # fmt: skip
    return state


def sigmoid_gated_shared_expert(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Qwen2-MoE / Qwen3-Next: the shared expert (`shared_expert`, singular) is scaled by
    sigmoid(shared_expert_gate(x)); ours is always on, so the gate is written as zeros (sigmoid(0) = 0.5) and its
    down_proj doubled, both exact."""
    out = {}
    for k, v in state.items():
        if ".mlp.shared_experts." in k:
            out[k.replace(".shared_experts.", ".shared_expert.")] = v * 2 if k.endswith("down_proj.weight") else v
        else:
            out[k] = v
        if k.endswith(".mlp.gate.weight"):
            out[k.replace(".gate.", ".shared_expert_gate.")] = torch.zeros(1, v.shape[1])
    return out


# Qwen3NextRMSNorm scales by 1 + w (zero-centred); the gated DeltaNet's own norm (linear_attn.norm) by w, as ours
ZERO_CENTRED_NORMS = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_norm.weight",
                      "self_attn.k_norm.weight")  # fmt: skip


def qwen3_next_state(state: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our hybrid's tensors as Qwen3-Next computes the same function: its RMSNorms get w - 1 (1 + (w - 1) is w
    exactly for w in [0.5, 2], within an ulp otherwise); its full attention's q_proj yields, per head, the query
    followed by an output gate (`view(..., heads, 2 * head_dim).chunk(2)`), written as zero rows, so the output is
    scaled by sigmoid(0) = 0.5, which the doubled o_proj undoes; its shared expert is gated (zero gate, doubled
    down_proj). A MoE without shared experts gets a zero-width one, which adds nothing."""
    out = {}
    for k, v in state.items():
        if k == "model.norm.weight" or k.endswith(ZERO_CENTRED_NORMS):
            v = v - 1
        elif k.endswith("self_attn.q_proj.weight"):
            heads = v.view(cfg.num_attention_heads, cfg.head_dim, -1)
            v = torch.cat([heads, torch.zeros_like(heads)], dim=1).reshape(-1, v.shape[1])
        elif k.endswith("self_attn.o_proj.weight"):
            v = v * 2
        out[k] = v
        if k.endswith(".mlp.gate.weight") and not cfg.n_shared_experts:
            shared = k.removesuffix("gate.weight") + "shared_experts."
            h = cfg.hidden_size
            out |= {shared + "gate_proj.weight": torch.zeros(0, h), shared + "up_proj.weight": torch.zeros(0, h),
                    shared + "down_proj.weight": torch.zeros(h, 0)}  # fmt: skip
    return sigmoid_gated_shared_expert(out)


def hf_moe_fields(cfg: ModelConfig, arch: Arch) -> dict:
    """The config fields of the MoE classes (none for dense ones)."""
    if arch is QWEN3_MOE:
        return dict(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            # at k = 1 our weight is the raw probability: HF's renormalisation would make it 1.0
            norm_topk_prob=cfg.norm_topk_prob and cfg.num_experts_per_tok > 1,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            use_sliding_window=False,
        )
    if arch is QWEN2_MOE:  # qkv_bias: written as zeros, since transformers 4.x's Qwen2-MoE always has the bias
        return dict(
            num_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            shared_expert_intermediate_size=cfg.n_shared_experts * cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob and cfg.num_experts_per_tok > 1,
            decoder_sparse_step=1,
            mlp_only_layers=[],
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            use_sliding_window=False,
            qkv_bias=True,
        )
    if arch is GLM4_MOE:  # plain top-k (one group), no leading dense layers, no MTP layer, RoPE on all of head_dim
        return dict(
            n_routed_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            moe_intermediate_size=cfg.moe_intermediate_size,
            n_shared_experts=cfg.n_shared_experts,  # 0: a zero-width shared MLP, which adds nothing
            norm_topk_prob=cfg.norm_topk_prob and cfg.num_experts_per_tok > 1,
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=0,
            use_qk_norm=cfg.qk_norm,
            partial_rotary_factor=1.0,
            num_nextn_predict_layers=0,
            router_aux_loss_coef=cfg.router_aux_loss_coef,  # not a Glm4MoeConfig field; kept for import
        )
    if arch is DEEPSEEK_V3:  # as GLM-4.5 (one group, scaling 1), plus MLA and the leading dense layers
        L, moe = cfg.num_hidden_layers, cfg.num_experts > 0
        return dict(
            n_routed_experts=cfg.num_experts if moe else 2,  # a dense model: never built (all layers dense)
            num_experts_per_tok=cfg.num_experts_per_tok if moe else 1,
            moe_intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size,
            n_shared_experts=cfg.n_shared_experts,  # 0: a zero-width shared MLP, which adds nothing
            norm_topk_prob=cfg.norm_topk_prob and cfg.num_experts_per_tok > 1,
            routed_scaling_factor=1.0,
            n_group=1,
            topk_group=1,
            first_k_dense_replace=cfg.first_k_dense_replace if moe else L,
            q_lora_rank=cfg.q_lora_rank or None,
            kv_lora_rank=cfg.kv_lora_rank,
            qk_nope_head_dim=cfg.qk_nope_head_dim,
            qk_rope_head_dim=cfg.qk_rope_head_dim,
            v_head_dim=cfg.v_head_dim,
            rope_interleave=False,  # our RoPE rotates halves (model/layers.py)
            num_nextn_predict_layers=0,  # the MTP modules are not exported
            router_aux_loss_coef=cfg.router_aux_loss_coef,  # not a DeepseekV3Config field; kept for import
        )
    if arch is QWEN3_NEXT:  # RoPE on all of head_dim (our rope_tables' rotate_half layout, as its own)
        moe = cfg.num_experts > 0
        return dict(
            layer_types=[
                "linear_attention" if cfg.is_linear_attention(i) else "full_attention"
                for i in range(cfg.num_hidden_layers)
            ],  # fmt: skip
            linear_num_key_heads=cfg.linear_num_key_heads,
            linear_num_value_heads=cfg.linear_num_value_heads,
            linear_key_head_dim=cfg.linear_key_head_dim,
            linear_value_head_dim=cfg.linear_value_head_dim,
            linear_conv_kernel_dim=cfg.linear_conv_kernel_dim,
            num_experts=cfg.num_experts,  # 0: every layer a dense Qwen3NextMLP of intermediate_size
            num_experts_per_tok=cfg.num_experts_per_tok if moe else 1,
            moe_intermediate_size=cfg.moe_intermediate_size or cfg.intermediate_size,
            shared_expert_intermediate_size=cfg.n_shared_experts * cfg.moe_intermediate_size,
            norm_topk_prob=cfg.norm_topk_prob and cfg.num_experts_per_tok > 1,
            decoder_sparse_step=1,
            mlp_only_layers=list(range(cfg.first_k_dense_replace)) if moe else [],
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            partial_rotary_factor=1.0,
        )
    if arch is MIXTRAL:  # its experts are intermediate_size wide; it always renormalises (see `architecture`)
        return dict(
            num_local_experts=cfg.num_experts,
            num_experts_per_tok=cfg.num_experts_per_tok,
            intermediate_size=cfg.moe_intermediate_size,
            router_aux_loss_coef=cfg.router_aux_loss_coef,
            router_jitter_noise=0.0,
            sliding_window=None,
        )
    return {"mlp_bias": False} if arch is LLAMA else {"use_sliding_window": False}


def hf_config(cfg: ModelConfig, arch: Arch, tok: Tokenizer, dtype: torch.dtype):
    """The transformers config object (its class writes the config.json layout of the installed version)."""
    import transformers

    cls = getattr(transformers, arch.hf_config)
    fields = dict(intermediate_size=cfg.intermediate_size) | hf_moe_fields(cfg, arch)
    # MLA: every head has its own keys (kv_b_proj), and DeepseekV3Config's head_dim is the RoPE width
    heads = (cfg.num_attention_heads, cfg.qk_rope_head_dim) if arch is DEEPSEEK_V3 else (
        cfg.num_key_value_heads, cfg.head_dim)  # fmt: skip
    if arch not in (MIXTRAL, QWEN2_MOE):  # their configs have no attention_bias field
        fields["attention_bias"] = False
    return cls(
        architectures=[arch.hf_class],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=heads[0],
        head_dim=heads[1],
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_scaling=rope_scaling(cfg),
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        hidden_act="silu",
        bos_token_id=tok.eos_id,
        eos_token_id=tok.im_end_id,
        pad_token_id=tok.eos_id,
        torch_dtype=dtype,  # transformers 5 reads it as `dtype`
        **fields,
    )


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class ExportHFConfig:
    ckpt: str = arg(help="checkpoint directory (or a run directory: its newest checkpoint)")
    out: str = arg(help="output directory for config.json, model.safetensors, tokenizer and generation config")
    tokenizer: str = arg("", "tokenizer directory; empty: the checkpoint's tokenizer/")
    dtype: str = arg("fp32", "precision of the exported weights (fp32 is exact)", choices=list(DTYPES))


def export_hf(ckpt: str | Path, out: str | Path, tokenizer: str | Path | None = None, dtype: str = "fp32") -> Path:
    """Write a transformers model directory; returns it."""
    from transformers import GenerationConfig

    path, model, arch = load_for_export(ckpt)
    if model.config.num_nextn_predict_layers:
        print(f"note: the {model.config.num_nextn_predict_layers} multi-token prediction module(s) (model.mtp.*) are "
              f"left out: {arch.hf_class} has none")  # fmt: skip
    tok_dir = Path(tokenizer) if tokenizer else checkpoint.tokenizer_dir(path)
    tok = Tokenizer.load(tok_dir)
    if tok.vocab_size > model.config.vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model only {model.config.vocab_size}")
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    hf_config(model.config, arch, tok, DTYPES[dtype]).save_pretrained(out)
    # transformers 5 writes RoPE as `rope_parameters` only; older transformers read `rope_theta`/`rope_scaling`
    # (and would silently fall back to their default theta), so the file carries both layouts.
    written = json.loads((out / "config.json").read_text())
    written.setdefault("rope_theta", model.config.rope_theta)
    written.setdefault("rope_scaling", rope_scaling(model.config))
    if arch in (GLM4_MOE, QWEN3_NEXT):  # transformers 4.x reads it here, and defaults to 0.5 / 0.25
        written.setdefault("partial_rotary_factor", 1.0)
    (out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    state = {k: v.to(DTYPES[dtype]) for k, v in hf_state_dict(model, arch).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # Stop at the end of an assistant turn or of a document, as `nanomind generate` and `chat` do.
    stop = [tok.im_end_id, tok.eos_id]
    GenerationConfig(bos_token_id=tok.eos_id, eos_token_id=stop, pad_token_id=tok.eos_id).save_pretrained(out)
    for f in tokenizer_files(tok_dir):  # tokenizer_config.json carries the chat template
        shutil.copy2(f, out / Path(f).name)
    return out


@dataclass
class ImportHFConfig:
    model: str = arg(help="transformers model directory (Llama, Qwen3, Qwen3-MoE, Qwen2-MoE, Mixtral, GLM-4.5 MoE)")
    out: str = arg(help="run directory to write the checkpoint into (as step_0000000/)")


def _rope(hf) -> tuple[float, dict | None]:
    """(rope_theta, rope_scaling) from a transformers config of either layout (4.x fields or 5.x rope_parameters)."""
    params = getattr(hf, "rope_parameters", None)
    if params:
        theta, rs = params["rope_theta"], {k: v for k, v in params.items() if k != "rope_theta"}
    else:
        theta, rs = hf.rope_theta, dict(hf.rope_scaling or {})
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return float(theta), None
    if kind not in ("linear", "yarn"):
        raise ValueError(f"rope_type {kind!r} is not supported (nanomind has default, linear and yarn RoPE)")
    return float(theta), {"rope_type": kind, **{k: v for k, v in rs.items() if v is not None and k != "type"}}


def moe_config_from_hf(hf) -> dict:
    """Our MoE fields for a transformers Qwen3-MoE, Qwen2-MoE, Mixtral or GLM-4.5 config (none for a dense one)."""
    if hf.model_type == "glm4_moe":
        rope = getattr(hf, "rope_parameters", None) or {}
        partial = rope.get("partial_rotary_factor", getattr(hf, "partial_rotary_factor", 1.0))
        problems = [
            name
            for name, bad in [
                (f"first_k_dense_replace={hf.first_k_dense_replace} (dense leading layers)", hf.first_k_dense_replace),
                (f"group-limited routing (n_group={hf.n_group}, topk_group={hf.topk_group})",
                 hf.topk_group < hf.n_group),
                (f"routed_scaling_factor={hf.routed_scaling_factor}", hf.routed_scaling_factor != 1.0),
                (f"partial_rotary_factor={partial}", partial != 1.0),
            ]
            if bad
        ]  # fmt: skip
        if problems:
            raise ValueError(f"glm4_moe model uses {', '.join(problems)}, which nanomind's model does not have")
        k = hf.num_experts_per_tok
        return dict(
            num_experts=hf.n_routed_experts,
            num_experts_per_tok=k,
            moe_intermediate_size=hf.moe_intermediate_size,
            n_shared_experts=hf.n_shared_experts,
            scoring_func="sigmoid",
            norm_topk_prob=bool(hf.norm_topk_prob) or k == 1,
            router_aux_loss_coef=getattr(hf, "router_aux_loss_coef", ModelConfig.router_aux_loss_coef),
            qk_norm=bool(hf.use_qk_norm),
        )
    if hf.model_type in ("qwen3_moe", "qwen2_moe"):
        mixed = list(getattr(hf, "mlp_only_layers", None) or [])
        step = getattr(hf, "decoder_sparse_step", 1)
        if mixed or (step != 1 and step < hf.num_hidden_layers + 1):
            raise ValueError(
                f"qwen3_moe model mixes dense and MoE layers (mlp_only_layers={mixed}, decoder_sparse_step={step}); "
                "nanomind's MoE model has experts in every layer"
            )
        k = hf.num_experts_per_tok
        if k == 1 and hf.norm_topk_prob:
            raise ValueError(
                "qwen3_moe model uses num_experts_per_tok=1 with norm_topk_prob=True (every token's expert weighted "
                "1.0); nanomind's top-1 MoE weighs the expert by its router probability"
            )
        shared = {}
        if hf.model_type == "qwen2_moe":
            size, width = hf.shared_expert_intermediate_size, hf.moe_intermediate_size
            if size % width:
                raise ValueError(
                    f"qwen2_moe model's shared expert is {size} wide, not a multiple of its experts' {width}; "
                    "nanomind's shared experts are n_shared_experts x moe_intermediate_size"
                )
            shared = {"n_shared_experts": size // width}
        # at k = 1 norm_topk_prob has no effect in nanomind: keep our default
        return shared | dict(num_experts=hf.num_experts, num_experts_per_tok=k,
                    moe_intermediate_size=hf.moe_intermediate_size, norm_topk_prob=bool(hf.norm_topk_prob) or k == 1,
                    router_aux_loss_coef=hf.router_aux_loss_coef)  # fmt: skip
    if hf.model_type == "mixtral":
        if hf.num_experts_per_tok == 1:
            raise ValueError(
                "mixtral model uses num_experts_per_tok=1 (Mixtral weighs the one expert 1.0); nanomind's top-1 MoE "
                "weighs the expert by its router probability"
            )
        return dict(num_experts=hf.num_local_experts, num_experts_per_tok=hf.num_experts_per_tok,
                    moe_intermediate_size=hf.intermediate_size, norm_topk_prob=True,
                    router_aux_loss_coef=hf.router_aux_loss_coef)  # fmt: skip
    return {}


def model_config_from_hf(hf) -> ModelConfig:
    """Our ModelConfig for a transformers Llama/Qwen3/Qwen3-MoE/Mixtral config; anything we cannot run is a
    ValueError naming it."""
    if hf.model_type not in ARCHS:
        raise ValueError(
            f"model_type {hf.model_type!r} ({', '.join(hf.architectures or [])}) is not supported; "
            f"import supports {sorted(ARCHS)}"
        )
    problems = [
        name
        for name, bad in [
            ("attention_bias", getattr(hf, "attention_bias", False)),
            ("mlp_bias", getattr(hf, "mlp_bias", False)),
            (f"hidden_act={hf.hidden_act!r}", hf.hidden_act != "silu"),
            ("use_sliding_window", getattr(hf, "use_sliding_window", False)),
            ("sliding_window", hf.model_type == "mixtral" and getattr(hf, "sliding_window", None) is not None),
        ]
        if bad
    ]
    if problems:
        raise ValueError(f"{hf.model_type} model uses {', '.join(problems)}, which nanomind's model does not have")
    theta, scaling = _rope(hf)
    fields = dict(
        vocab_size=hf.vocab_size,
        hidden_size=hf.hidden_size,
        intermediate_size=hf.intermediate_size,
        num_hidden_layers=hf.num_hidden_layers,
        num_attention_heads=hf.num_attention_heads,
        num_key_value_heads=hf.num_key_value_heads or hf.num_attention_heads,
        head_dim=getattr(hf, "head_dim", None) or hf.hidden_size // hf.num_attention_heads,
        max_position_embeddings=hf.max_position_embeddings,
        rope_theta=theta,
        rope_scaling=scaling,
        rms_norm_eps=hf.rms_norm_eps,
        qk_norm=ARCHS[hf.model_type].qk_norm,
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        initializer_range=hf.initializer_range,
    )
    return ModelConfig(**fields | moe_config_from_hf(hf))


def _read_safetensors(model_dir: Path) -> dict[str, torch.Tensor]:
    """All tensors of a transformers directory: model.safetensors or the shards its index names."""
    index = model_dir / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (model_dir / "model.safetensors").is_file():
        shards = ["model.safetensors"]
    else:
        raise ValueError(f"{model_dir}: no model.safetensors; re-save the model with save_pretrained (safetensors)")
    state: dict[str, torch.Tensor] = {}
    for shard in shards:
        state.update(load_file(str(model_dir / shard)))
    return state


def our_names(state: dict[str, torch.Tensor], arch: Arch) -> dict[str, torch.Tensor]:
    """An MoE checkpoint's tensors under our names: Mixtral's Hub names renamed, and experts fused by transformers 5
    (`experts.gate_up_proj` [E, 2I, C] = gate rows then up rows, `experts.down_proj` [E, C, I]) split per expert.
    Qwen2-MoE's shared expert comes back ungated (its gate must be zero: sigmoid 0.5, undone by halving down_proj)
    and its q/k/v biases must be zero (nanomind's attention has none)."""
    if arch is QWEN2_MOE:
        nonzero = [k for k, v in state.items() if k.endswith(("shared_expert_gate.weight", "_proj.bias")) and v.any()]
        if nonzero:
            raise ValueError(
                f"qwen2_moe weights {nonzero[:3]}{' ...' if len(nonzero) > 3 else ''} are nonzero: a gated shared "
                "expert or attention biases, which nanomind's model does not have"
            )
        state = {
            k.replace(".shared_expert.", ".shared_experts."): v / 2 if ".shared_expert.down_proj" in k else v
            for k, v in state.items()
            if not k.endswith(("shared_expert_gate.weight", "_proj.bias"))
        }
    if arch is GLM4_MOE:
        state = {k.replace(".mlp.gate.e_score_correction_bias", ".mlp.e_score_correction_bias"): v
                 for k, v in state.items()}  # fmt: skip
    state = {k: v for k, v in state.items() if not (v.numel() == 0 and ".shared_expert" in k)}  # zero-width
    if arch is MIXTRAL:
        for ours, theirs in MIXTRAL_NAMES:
            state = {k.replace(theirs, ours) if ".block_sparse_moe." in k or ".mlp." in k else k: v
                     for k, v in state.items()}  # fmt: skip
    out = {}
    for key, t in state.items():
        base, _, last = key.rpartition(".")
        if arch.moe and base.endswith(".mlp.experts") and last in ("gate_up_proj", "down_proj") and t.dim() == 3:
            parts = {"gate_proj": t[:, : t.shape[1] // 2], "up_proj": t[:, t.shape[1] // 2 :]} if last == (
                "gate_up_proj") else {"down_proj": t}  # fmt: skip
            for proj, stacked in parts.items():
                for j, w in enumerate(stacked):
                    out[f"{base}.{j}.{proj}.weight"] = w.contiguous()
        else:
            out[key] = t
    return out


def import_hf(model_dir: str | Path, out: str | Path) -> Path:
    """Write a nanomind checkpoint (fp32 weights, tokenizer when it has our special tokens); returns its dir."""
    from transformers import AutoConfig

    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: no config.json; give a transformers model directory")
    hf = AutoConfig.from_pretrained(src)
    cfg, hf_type = model_config_from_hf(hf), hf.model_type
    state = our_names(_read_safetensors(src), ARCHS[hf_type])
    if any(v.any() for k, v in state.items() if k.endswith("e_score_correction_bias")):
        cfg = dataclasses.replace(cfg, router_bias_update_rate=BIAS_RATE)  # moe.py uses the bias only while > 0
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")
               and not k.endswith("e_score_correction_bias")]  # fmt: skip  # a buffer HF has not: stays zero
    if missing or unexpected:
        name = ARCHS[hf_type].hf_class
        raise ValueError(f"{src}: weights do not match {name}: missing {missing}, unexpected {unexpected}")
    tok_dir = src if (src / "tokenizer.json").is_file() else None
    if tok_dir is not None:
        try:  # our stages need <|endoftext|>, <|im_start|> and <|im_end|>
            Tokenizer.load(tok_dir)
        except ValueError as e:
            raise ValueError(f"{src}: its tokenizer cannot serve nanomind's stages: {e}") from None
    return checkpoint.save(out, 0, model, tokenizer_dir=tok_dir, info={"imported_from": str(src)})


def export_main(argv: list[str] | None = None) -> None:
    cfg = parse(ExportHFConfig, argv, "nanomind export hf", "Export a checkpoint as a transformers model directory.")
    out = export_hf(cfg.ckpt, cfg.out, cfg.tokenizer or None, cfg.dtype)
    print(f"wrote {out} ({json.loads((out / 'config.json').read_text())['architectures'][0]}, {cfg.dtype})")


def import_main(argv: list[str] | None = None) -> None:
    cfg = parse(ImportHFConfig, argv, "nanomind import hf", "Import a transformers model as a checkpoint.")
    print(f"wrote {import_hf(cfg.model, cfg.out)}")
