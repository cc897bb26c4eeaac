"""Export a checkpoint to one GGUF file for llama.cpp (and Ollama), written with the `gguf` package's GGUFWriter.

nanomind export gguf --ckpt runs/sft --out runs/model.gguf --type q8_0 --ollama

llama.cpp needs no patch and no converter: the file carries the architecture (`qwen3` with qk-norm, `llama`
without; for MoE `qwen3moe`, and `llama` with experts, as llama.cpp runs Mixtral), the weights (each layer's
experts stacked into 3-D `ffn_{gate,up,down}_exps` tensors, as llama.cpp stores them), and the tokenizer as
llama.cpp's `gpt2` BPE: tokens, merges, special ids, chat template and `tokenizer.ggml.pre`, the name of the
pre-tokenizer whose split regex llama.cpp runs. A self-trained tokenizer is unknown to llama.cpp's converter (it
identifies tokenizers by a hash of their ids), so we name the pre-tokenizer from tokenizer.json directly, and only
when its regex is exactly one llama.cpp implements.
benchmarks/llamacpp_check.py checks the result against `nanomind generate` in llama.cpp itself.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from nanomind import checkpoint
from nanomind.config import arg, parse
from nanomind.export import (
    GLM4_MOE,
    MIXTRAL,
    QWEN3_MOE,
    QWEN3_NEXT_DIFFERENCES,
    Arch,
    architecture,
    check_weights,
    load_checkpoint,
    rope_scaling,
)
from nanomind.model import ModelConfig, Transformer
from nanomind.tokenizer import CHAT_TEMPLATE, IM_END, Tokenizer

# The GPT-2 split regex: tokenizers' ByteLevel(use_regex=True), our pre-tokenizer. llama.cpp implements it for
# `gpt-2` (llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_GPT2; unicode.cpp unicode_regex_split_custom_gpt2).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"
# Qwen2/Qwen3's split regex (imported Qwen tokenizers): llama.cpp's `qwen2` (LLAMA_VOCAB_PRE_TYPE_QWEN2).
QWEN2_REGEX = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def llamacpp_pre(tokenizer_json: dict) -> str:
    """llama.cpp's name for the pre-tokenizer of a tokenizer.json, or a ValueError if it runs no identical split."""
    pre = tokenizer_json.get("pre_tokenizer") or {}
    if pre == {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}:
        return "gpt-2"
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (
        len(steps) == 2
        and steps[0].get("type") == "Split"
        and steps[0].get("pattern") == {"Regex": QWEN2_REGEX}
        and steps[1].get("type") == "ByteLevel"
        and not steps[1].get("use_regex")
        and not steps[1].get("add_prefix_space")
    ):
        return "qwen2"
    raise ValueError(
        f"no llama.cpp pre-tokenizer is known to split exactly like {json.dumps(pre)[:200]}; "
        "GGUF export supports nanomind's byte-level BPE (gpt-2) and Qwen2-style tokenizers (qwen2)"
    )


def add_tokenizer(w, tok_dir: Path, vocab_size: int) -> None:
    """llama.cpp's `gpt2` (byte-level BPE) tokenizer: tokens by id with types, merges, special ids, chat template."""
    import gguf

    data = json.loads((tok_dir / "tokenizer.json").read_text(encoding="utf-8"))
    tok = Tokenizer.load(tok_dir)
    if data["model"]["type"] != "BPE":
        raise ValueError(f"{tok_dir}: GGUF export needs a BPE tokenizer, got {data['model']['type']}")
    if tok.vocab_size > vocab_size:
        raise ValueError(f"the tokenizer has {tok.vocab_size} tokens but the model only {vocab_size}")
    added = {t["id"]: t for t in data.get("added_tokens", [])}
    tokens, types = [], []
    for i in range(vocab_size):
        if i >= tok.vocab_size:  # rows a model keeps beyond its tokenizer (padded vocabularies)
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        else:
            tokens.append(tok.backend.id_to_token(i))
            special = added.get(i, {}).get("special")
            types.append(
                gguf.TokenType.NORMAL
                if i not in added
                else gguf.TokenType.CONTROL
                if special
                else gguf.TokenType.USER_DEFINED
            )
    merges = [m if isinstance(m, str) else " ".join(m) for m in data["model"]["merges"]]  # [a, b] in newer files
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(llamacpp_pre(data))
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    # eos is the end of an assistant turn, as in the transformers export's generation_config; llama.cpp also stops
    # at <|endoftext|>, which it recognises by name as an end-of-generation token.
    w.add_bos_token_id(tok.eos_id)
    w.add_eos_token_id(tok.im_end_id)
    w.add_pad_token_id(tok.eos_id)
    w.add_add_bos_token(False)  # our ids never start with a BOS token
    w.add_add_eos_token(False)
    config_path = tok_dir / "tokenizer_config.json"
    config = json.loads(config_path.read_text()) if config_path.is_file() else {}
    w.add_chat_template(config.get("chat_template") or CHAT_TEMPLATE)


def permute_qk(w: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Reorder each head's rows from HF's rotate-half RoPE layout to the adjacent pairs llama.cpp's `llama` ropes:
    row j of a head's first half and row j of its second half become rows 2j and 2j+1 (as llama.cpp's converter)."""
    return w.reshape(n_heads, 2, w.shape[0] // n_heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


# llama.cpp's GLM-4.5 graph (`glm4moe`) runs the MoE its `qwen3moe` and `llama` graphs compute differently: those
# always renormalise the top-k weights to sum 1 (no file key turns it off for them), so top-1 routing (the expert
# weighted by its router probability) and norm_topk_prob=False need `glm4moe`, which reads expert_weights_norm
# from the file, as it reads the gating function (softmax or sigmoid), the selection bias (exp_probs_b) and
# shared experts. Its post-attention norm is stored as `post_attention_norm`.


def gguf_architecture(model: Transformer) -> Arch:
    """The llama.cpp architecture for the model: that of its transformers export where llama.cpp computes that
    exactly, else, for MoE, `glm4moe`; a ValueError names a feature neither covers."""
    cfg = model.config
    if cfg.full_attention_interval:
        raise ValueError(
            f"GGUF export does not map gated DeltaNet hybrids (full_attention_interval={cfg.full_attention_interval}): "
            f"llama.cpp's qwen3next graph computes transformers' Qwen3-Next, which differs from nanomind's hybrid: "
            f"{QWEN3_NEXT_DIFFERENCES}"
        )
    if cfg.attention == "mla":
        raise ValueError("GGUF export does not map multi-head latent attention (attention='mla') yet; "
                         "use `nanomind export hf` (DeepseekV3ForCausalLM)")  # fmt: skip
    if not cfg.num_experts:
        return architecture(cfg)
    try:
        arch = architecture(cfg)
        check_weights(model, arch)
        if arch in (QWEN3_MOE, MIXTRAL) and cfg.num_experts_per_tok > 1 and cfg.norm_topk_prob:
            return arch
    except ValueError:
        architecture(dataclasses.replace(cfg, num_experts=0))  # anything besides the MoE fields is still refused
    return GLM4_MOE


def add_hparams(w, cfg: ModelConfig, arch: Arch) -> None:
    import gguf

    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_block_count(cfg.num_hidden_layers)
    # llama.cpp's `llama` sizes its experts by feed_forward_length; `qwen3moe` by expert_feed_forward_length
    w.add_feed_forward_length(cfg.moe_intermediate_size if arch is MIXTRAL else cfg.intermediate_size)
    if cfg.num_experts:
        w.add_expert_count(cfg.num_experts)
        w.add_expert_used_count(cfg.num_experts_per_tok)
        w.add_expert_feed_forward_length(cfg.moe_intermediate_size)
    if arch is GLM4_MOE:
        w.add_leading_dense_block_count(0)
        w.add_expert_shared_count(max(cfg.n_shared_experts, 1))  # none: one of zeros (see gguf_tensors)
        w.add_expert_weights_norm(cfg.norm_topk_prob and cfg.num_experts_per_tok > 1)  # as moe.py: never at k = 1
        w.add_expert_weights_scale(1.0)
        func = gguf.ExpertGatingFuncType.SOFTMAX if cfg.scoring_func == "softmax" else gguf.ExpertGatingFuncType.SIGMOID
        w.add_expert_gating_func(func)
        w.add_nextn_predict_layers(0)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_key_length(cfg.head_dim)
    w.add_value_length(cfg.head_dim)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_theta)
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    rs = rope_scaling(cfg)
    if rs is None:
        return
    # llama.cpp takes YaRN's beta_fast/beta_slow only from its run-time options, so a file cannot carry other values
    custom = sorted(k for k in ("beta_fast", "beta_slow", "attention_factor", "mscale") if rs.get(k) is not None)
    if custom:
        raise ValueError(f"GGUF export cannot express rope_scaling {custom} (llama.cpp reads them at run time only)")
    w.add_rope_scaling_factor(float(rs["factor"]))
    if rs["rope_type"] == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    else:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_orig_ctx_len(int(rs.get("original_max_position_embeddings") or cfg.max_position_embeddings))


FILE_TYPES = ("f32", "f16", "q8_0")


def export_gguf(ckpt: str | Path, out: str | Path, type: str = "f32", tokenizer: str | Path | None = None,
                name: str = "") -> Path:  # fmt: skip
    """Write one GGUF file; returns its path. Norms and MoE routers stay f32; the other matrices (experts
    included) become `type` (q8_0: rows of whole 32-blocks)."""
    import gguf

    if type not in FILE_TYPES:
        raise ValueError(f"--type must be one of {FILE_TYPES}, got {type!r}")
    path, model = load_checkpoint(ckpt)
    arch, cfg = gguf_architecture(model), model.config
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    w = gguf.GGUFWriter(str(out), arch.gguf_arch)
    w.add_name(name or out.stem)
    ftype = gguf.LlamaFileType
    w.add_file_type({"f32": ftype.ALL_F32, "f16": ftype.MOSTLY_F16, "q8_0": ftype.MOSTLY_Q8_0}[type])
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    add_hparams(w, cfg, arch)
    add_tokenizer(w, Path(tokenizer) if tokenizer else checkpoint.tokenizer_dir(path), cfg.vocab_size)
    if cfg.num_nextn_predict_layers:
        print(f"note: the {cfg.num_nextn_predict_layers} multi-token prediction module(s) (model.mtp.*) are left out")
    state = {k: v for k, v in model.state_dict().items() if not k.startswith("model.mtp.")}
    for gguf_name, tensor in gguf_tensors(state, arch, cfg):
        data = tensor.float().numpy()
        # the MoE router stays f32, as in llama.cpp's converter: rounding it would change which experts are chosen
        if data.ndim == 1 or type == "f32" or ".ffn_gate_inp." in gguf_name:
            w.add_tensor(gguf_name, data)
        elif type == "q8_0" and data.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
            q = gguf.quants.quantize(data, gguf.GGMLQuantizationType.Q8_0)
            w.add_tensor(gguf_name, q, raw_shape=q.shape, raw_dtype=gguf.GGMLQuantizationType.Q8_0)
        else:  # f16, and q8_0 rows that are not whole blocks (as llama.cpp's converter does)
            w.add_tensor(gguf_name, data.astype(np.float16))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return out


def stack_experts(state: dict[str, torch.Tensor], cfg: ModelConfig, arch: Arch) -> dict[str, torch.Tensor]:
    """Each MoE layer's `mlp.experts.{j}.{gate,up,down}_proj.weight` stacked over j into one [E, out, in] tensor
    `mlp.experts.{gate,up,down}_proj.weight` (gguf's table maps it to `ffn_*_exps`). The balancing bias is left out
    (unused: `gguf_architecture` checked it) except for `glm4moe`, which always adds it for choosing: there it is
    the bias, or zeros while moe.py ignores it; and `glm4moe` always runs a shared expert: without ours, one of zeros
    (SwiGLU of zero weights adds exactly 0)."""
    out: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if key.endswith("e_score_correction_bias"):
            if arch is GLM4_MOE:
                out[key] = tensor if cfg.router_bias_update_rate else torch.zeros_like(tensor)
            continue
        if arch is GLM4_MOE and not cfg.n_shared_experts and key.endswith(".mlp.gate.weight"):
            layer = key.removesuffix(".gate.weight")
            c, i = cfg.hidden_size, cfg.moe_intermediate_size
            for proj, shape in [("gate_proj", (i, c)), ("up_proj", (i, c)), ("down_proj", (c, i))]:
                out[f"{layer}.shared_experts.{proj}.weight"] = torch.zeros(shape)
        head, sep, tail = key.partition(".mlp.experts.")
        if not sep:
            out[key] = tensor
        elif tail.startswith("0."):  # expert 0 stands for the stack
            proj = tail.removeprefix("0.").removesuffix(".weight")
            out[f"{head}.mlp.experts.{proj}.weight"] = torch.stack(
                [state[f"{head}.mlp.experts.{j}.{proj}.weight"] for j in range(cfg.num_experts)]
            )
    return out


def gguf_tensors(state: dict[str, torch.Tensor], arch: Arch, cfg: ModelConfig):
    """(GGUF name, tensor) pairs, named by gguf's own HF -> GGUF table; a tied lm_head is left out, since llama.cpp
    falls back to token_embd for the output when `output.weight` is missing. Experts come stacked, [E, out, in]
    (GGUF's reversed dims: {in, out, E}, llama.cpp's layout)."""
    import gguf

    model_arch = next(k for k, v in gguf.MODEL_ARCH_NAMES.items() if v == arch.gguf_arch)
    names = gguf.get_tensor_name_map(model_arch, cfg.num_hidden_layers)
    if cfg.num_experts:
        state = stack_experts(state, cfg, arch)
    for key, tensor in state.items():
        if key == "lm_head.weight" and cfg.tie_word_embeddings:
            continue
        if key.endswith(".mlp.e_score_correction_bias"):  # llama.cpp's converter: `exp_probs_b.bias`
            key = key.replace(".mlp.e_score_correction_bias", ".mlp.gate.e_score_correction.bias")
        name = names.get_name(key, try_suffixes=(".weight", ".bias"))
        assert name is not None, f"gguf has no name for {key}"
        if arch.gguf_permute_qk and key.endswith("q_proj.weight"):
            tensor = permute_qk(tensor, cfg.num_attention_heads)
        elif arch.gguf_permute_qk and key.endswith("k_proj.weight"):
            tensor = permute_qk(tensor, cfg.num_key_value_heads)
        yield name, tensor


def modelfile(gguf_path: Path) -> str:
    """An Ollama Modelfile for the exported file: our ChatML template in Ollama's Go template syntax, stop tokens.
    It renders what CHAT_TEMPLATE renders with add_generation_prompt=True (reasoning_content is not passed on)."""
    template = (
        "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
    )
    stops = "".join(f'PARAMETER stop "{t}"\n' for t in (IM_END, "<|endoftext|>"))
    return f'FROM ./{gguf_path.name}\nTEMPLATE """{template}"""\n{stops}'


@dataclass
class ExportGGUFConfig:
    ckpt: str = arg(help="checkpoint directory (or a run directory: its newest checkpoint)")
    out: str = arg(help="output .gguf file")
    type: str = arg("f32", "tensor type of the matrices: f32 (exact), f16, q8_0 (8-bit)", choices=list(FILE_TYPES))
    tokenizer: str = arg("", "tokenizer directory; empty: the checkpoint's tokenizer/")
    name: str = arg("", "model name stored in the file; empty: the output file's name without .gguf")
    ollama: bool = arg(False, "also write an Ollama Modelfile beside the .gguf (then: ollama create NAME -f ...)")


def main(argv: list[str] | None = None) -> None:
    cfg = parse(ExportGGUFConfig, argv, "nanomind export gguf", "Export a checkpoint to a GGUF file for llama.cpp.")
    out = export_gguf(cfg.ckpt, cfg.out, cfg.type, cfg.tokenizer or None, cfg.name)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB, {cfg.type})")
    if cfg.ollama:
        mf = out.with_suffix(".Modelfile")
        mf.write_text(modelfile(out))
        print(f"wrote {mf}; run: ollama create {cfg.name or out.stem} -f {mf}")
