"""Export checkpoints to transformers and import them back; the architecture table GGUF export shares.

nanomind export hf --ckpt runs/sft --out runs/hf        # AutoModelForCausalLM.from_pretrained("runs/hf") loads it
nanomind import hf --model runs/hf --out runs/imported  # back to a checkpoint any stage can --init from

Our parameter names are HF's, so the weights map one to one. A dense model with qk-norm is a `Qwen3ForCausalLM`,
one without a `LlamaForCausalLM`; both are native classes, so no `trust_remote_code` is needed. A checkpoint with a
LoRA adapter (a LoRA run) is exported merged, as `nanomind export merge-lora` would write it.
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


LLAMA = Arch("LlamaForCausalLM", "LlamaConfig", "llama", "llama", gguf_permute_qk=True)
QWEN3 = Arch("Qwen3ForCausalLM", "Qwen3Config", "qwen3", "qwen3", gguf_permute_qk=False)
# An MoE variant adds its Arch here (e.g. Qwen3MoeForCausalLM / "qwen3moe"), a branch in `architecture`, and its
# expert tensor layout in `hf_state_dict` (and in export_gguf's tensor loop, where llama.cpp stacks experts).
ARCHS = {a.model_type: a for a in (LLAMA, QWEN3)}

# The ModelConfig fields the dense mapping below writes out. A field added later for a new variant (MoE, MLA, ...)
# is refused by `architecture` while it differs from its default, so export never silently drops a feature.
DENSE_FIELDS = {
    "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "head_dim", "max_position_embeddings", "rope_theta", "rope_scaling", "rms_norm_eps",
    "qk_norm", "tie_word_embeddings", "initializer_range",
}  # fmt: skip


def architecture(cfg: ModelConfig) -> Arch:
    """The native architecture for cfg, or a ValueError naming the feature no mapping covers yet."""
    defaults = {f.name: f.default for f in dataclasses.fields(cfg)}
    extra = {k: v for k, v in cfg.to_dict().items() if k not in DENSE_FIELDS and v != defaults.get(k)}
    if extra:
        features = ", ".join(f"{k}={v!r}" for k, v in extra.items())
        raise ValueError(f"export supports dense Llama/Qwen3 models; this one uses {features}: no mapping yet")
    return QWEN3 if cfg.qk_norm else LLAMA


def rope_scaling(cfg: ModelConfig) -> dict | None:
    """cfg.rope_scaling with HF's key `rope_type` (older configs say `type`)."""
    if cfg.rope_scaling is None:
        return None
    rs = {k: v for k, v in cfg.rope_scaling.items() if k != "type"}
    return {"rope_type": cfg.rope_scaling.get("rope_type", cfg.rope_scaling.get("type")), **rs}


def load_dense(ckpt: str | Path) -> tuple[Path, Transformer, Arch]:
    """(checkpoint dir, fp32 model, architecture); the weights are checked against the config on loading.
    A LoRA run's checkpoint loads with its adapter, which is folded in here: the weights `nanomind export
    merge-lora` would write."""
    path = checkpoint.resolve(ckpt)
    arch = architecture(checkpoint.load_config(path))
    model = checkpoint.load_model(path).eval()
    return path, merge_lora(model) if lora_layers(model) else model, arch


def hf_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """Tensors under their transformers names: ours already are, and a tied lm_head is left out (as HF saves it)."""
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        del state["lm_head.weight"]
    return state


def hf_config(cfg: ModelConfig, arch: Arch, tok: Tokenizer, dtype: torch.dtype):
    """The transformers config object (its class writes the config.json layout of the installed version)."""
    import transformers

    cls = getattr(transformers, arch.hf_config)
    extra = {"mlp_bias": False} if arch is LLAMA else {"use_sliding_window": False}
    return cls(
        architectures=[arch.hf_class],
        vocab_size=cfg.vocab_size,
        hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size,
        num_hidden_layers=cfg.num_hidden_layers,
        num_attention_heads=cfg.num_attention_heads,
        num_key_value_heads=cfg.num_key_value_heads,
        head_dim=cfg.head_dim,
        max_position_embeddings=cfg.max_position_embeddings,
        rope_theta=cfg.rope_theta,
        rope_scaling=rope_scaling(cfg),
        rms_norm_eps=cfg.rms_norm_eps,
        tie_word_embeddings=cfg.tie_word_embeddings,
        initializer_range=cfg.initializer_range,
        hidden_act="silu",
        attention_bias=False,
        bos_token_id=tok.eos_id,
        eos_token_id=tok.im_end_id,
        pad_token_id=tok.eos_id,
        torch_dtype=dtype,  # transformers 5 reads it as `dtype`
        **extra,
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

    path, model, arch = load_dense(ckpt)
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
    (out / "config.json").write_text(json.dumps(written, indent=2, sort_keys=True) + "\n")
    state = {k: v.to(DTYPES[dtype]) for k, v in hf_state_dict(model).items()}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    # Stop at the end of an assistant turn or of a document, as `nanomind generate` and `chat` do.
    stop = [tok.im_end_id, tok.eos_id]
    GenerationConfig(bos_token_id=tok.eos_id, eos_token_id=stop, pad_token_id=tok.eos_id).save_pretrained(out)
    for f in tokenizer_files(tok_dir):  # tokenizer_config.json carries the chat template
        shutil.copy2(f, out / Path(f).name)
    return out


@dataclass
class ImportHFConfig:
    model: str = arg(help="transformers model directory (Llama or Qwen3 layout, safetensors weights)")
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


def model_config_from_hf(hf) -> ModelConfig:
    """Our ModelConfig for a transformers Llama/Qwen3 config; anything we cannot run is a ValueError naming it."""
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
        ]
        if bad
    ]
    if problems:
        raise ValueError(f"{hf.model_type} model uses {', '.join(problems)}, which nanomind's model does not have")
    theta, scaling = _rope(hf)
    return ModelConfig(
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
        qk_norm=hf.model_type == "qwen3",
        tie_word_embeddings=bool(hf.tie_word_embeddings),
        initializer_range=hf.initializer_range,
    )


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


def import_hf(model_dir: str | Path, out: str | Path) -> Path:
    """Write a nanomind checkpoint (fp32 weights, tokenizer when it has our special tokens); returns its dir."""
    from transformers import AutoConfig

    src = Path(model_dir)
    if not (src / "config.json").is_file():
        raise ValueError(f"{src}: no config.json; give a transformers model directory")
    hf = AutoConfig.from_pretrained(src)
    cfg, hf_type = model_config_from_hf(hf), hf.model_type
    state = _read_safetensors(src)
    if cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)  # some tied checkpoints store the shared matrix twice
    model = Transformer(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in state.items()}, strict=False)
    missing = [k for k in missing if not (cfg.tie_word_embeddings and k == "lm_head.weight")]
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
    cfg = parse(ImportHFConfig, argv, "nanomind import hf", "Import a transformers Llama/Qwen3 model as a checkpoint.")
    print(f"wrote {import_hf(cfg.model, cfg.out)}")
