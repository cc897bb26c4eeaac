"""LoRA (arXiv 2106.09685) as a model transform: any stage trains low-rank adapters instead of the weights.

    nanomind sft --init runs/pt --data chat.jsonl --lora-rank 8 --lora-targets q_proj,v_proj

`apply_lora` swaps the chosen projections for `LoRALinear`: the frozen weight (same Parameter, same state_dict
key) plus `scaling * B @ A`, B starting at zero so training starts from the base model exactly. Only A and B
train. An adapter saves on its own in the PEFT layout (`adapter_config.json` + `adapter_model.safetensors`,
keys `base_model.model.<module>.lora_A.weight`), so `peft.PeftModel.from_pretrained` loads it onto the HF model
(our parameter names are the HF ones); `merge_lora` folds it into plain weights.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from nanomind.model.layers import Linear

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PEFT_PREFIX = "base_model.model."  # PeftModel -> LoraModel -> the HF model


class LoRALinear(Linear):
    """y = x W^T + scaling * (x A^T) B^T with W frozen; A [rank, in], B [out, rank]."""

    def __init__(self, base: Linear, rank: int, alpha: float):
        nn.Module.__init__(self)  # not Linear.__init__: keep the base's weight rather than allocate a new one
        self.in_features, self.out_features = base.in_features, base.out_features
        self.weight = base.weight
        self.weight.requires_grad_(False)
        self.register_parameter("bias", None)
        self.rank, self.alpha, self.scaling = rank, alpha, alpha / rank
        w = base.weight
        self.lora_A = nn.Parameter(torch.empty(rank, self.in_features, device=w.device, dtype=w.dtype))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, rank, device=w.device, dtype=w.dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # PEFT's default init for A

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x) + F.linear(F.linear(x, self.lora_A), self.lora_B) * self.scaling

    def merged(self) -> Linear:
        """A plain Linear with W + scaling * B @ A (computed in fp32)."""
        with torch.device("meta"):  # no allocation or random init for a weight that is replaced at once
            out = Linear(self.in_features, self.out_features)
        delta = self.lora_B.detach().float() @ self.lora_A.detach().float() * self.scaling
        out.weight = nn.Parameter((self.weight.detach().float() + delta).to(self.weight.dtype))
        return out


def lora_layers(model: nn.Module) -> dict[str, LoRALinear]:
    """{module path: layer} of the adapted projections, e.g. 'model.layers.0.self_attn.q_proj'."""
    return {name: m for name, m in model.named_modules() if isinstance(m, LoRALinear)}


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def apply_lora(model: nn.Module, rank: int, alpha: float, targets: list[str] | tuple[str, ...] = TARGETS) -> int:
    """Put adapters on every Linear whose name ends in one of `targets` and freeze everything else.
    Returns the number of adapter parameters."""
    assert rank > 0 and not lora_layers(model), "rank must be positive and the model not adapted yet"
    chosen = [n for n, m in model.named_modules() if isinstance(m, Linear) and n.rpartition(".")[2] in targets]
    if not chosen:
        raise ValueError(f"--lora-targets {','.join(targets)} match no layer; choose from {','.join(TARGETS)}")
    for p in model.parameters():
        p.requires_grad_(False)
    for name in chosen:
        _replace(model, name, LoRALinear(model.get_submodule(name), rank, alpha))
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its weight (in place); the model is then a plain Transformer again."""
    for name, layer in lora_layers(model).items():
        _replace(model, name, layer.merged())
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def is_adapter_key(key: str) -> bool:
    """True for the state_dict keys of adapter weights (`...q_proj.lora_A`)."""
    return key.endswith((".lora_A", ".lora_B"))


def save_adapter(model: nn.Module, directory: str | Path, base: str | None = None) -> None:
    """Write the adapter alone in the PEFT layout; `base` is recorded as base_model_name_or_path."""
    layers = lora_layers(model)
    assert layers, "the model has no adapter"
    first = next(iter(layers.values()))
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    tensors = {}
    for name, layer in layers.items():
        for part in ("lora_A", "lora_B"):
            tensors[f"{PEFT_PREFIX}{name}.{part}.weight"] = getattr(layer, part).detach().contiguous()
    save_file(tensors, str(out / ADAPTER_WEIGHTS), metadata={"format": "pt"})
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": first.rank, "lora_alpha": first.alpha,
        "target_modules": sorted({n.rpartition(".")[2] for n in layers}), "lora_dropout": 0.0, "bias": "none",
        "fan_in_fan_out": False, "use_rslora": False, "use_dora": False, "inference_mode": True,
        "base_model_name_or_path": base,
    }  # fmt: skip
    (out / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")


def read_adapter_config(directory: str | Path) -> dict:
    path = Path(directory) / ADAPTER_CONFIG
    if not path.is_file():
        raise ValueError(f"{directory}: no {ADAPTER_CONFIG} here; is this a LoRA adapter directory?")
    cfg = json.loads(path.read_text())
    unsupported = {k: cfg.get(k) for k in ("use_dora", "use_rslora", "fan_in_fan_out", "rank_pattern",
                                           "alpha_pattern") if cfg.get(k)}  # fmt: skip
    if cfg.get("peft_type") != "LORA" or cfg.get("bias", "none") != "none" or unsupported:
        raise ValueError(f"{path}: only plain LoRA adapters (no bias, DoRA, rsLoRA or per-layer ranks) are supported")
    return cfg


def load_adapter(model: nn.Module, directory: str | Path) -> None:
    """Load a PEFT-layout adapter into `model`, putting the adapters on first if it has none."""
    cfg = read_adapter_config(directory)
    if not lora_layers(model):
        targets = cfg["target_modules"]
        apply_lora(model, int(cfg["r"]), float(cfg["lora_alpha"]), [targets] if isinstance(targets, str) else targets)
    layers = lora_layers(model)
    if any(layer.alpha != float(cfg["lora_alpha"]) for layer in layers.values()):
        raise ValueError(f"{directory}: lora_alpha {cfg['lora_alpha']} differs from the model's adapters")
    tensors = load_file(str(Path(directory) / ADAPTER_WEIGHTS))
    expected = {f"{PEFT_PREFIX}{n}.{part}.weight" for n in layers for part in ("lora_A", "lora_B")}
    if set(tensors) != expected:
        missing, unexpected = sorted(expected - set(tensors))[:4], sorted(set(tensors) - expected)[:4]
        raise ValueError(f"{directory}: adapter does not fit this model: missing {missing}, unexpected {unexpected}")
    with torch.no_grad():
        for name, layer in layers.items():
            for part in ("lora_A", "lora_B"):
                value, param = tensors[f"{PEFT_PREFIX}{name}.{part}.weight"], getattr(layer, part)
                if value.shape != param.shape:
                    raise ValueError(f"{directory}: {name}.{part} is {list(value.shape)}, "
                                     f"the model expects {list(param.shape)}")  # fmt: skip
                param.copy_(value)
