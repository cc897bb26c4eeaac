from nanomind.model.config import PRESETS, ModelConfig, describe_presets, preset
from nanomind.model.transformer import KVCache, Output, Transformer

__all__ = ["KVCache", "ModelConfig", "Output", "PRESETS", "Transformer", "describe_presets", "preset"]
