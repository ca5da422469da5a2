"""Model families: causal LMs as flat lists of lazily built layers (embed, blocks, head)."""

from __future__ import annotations

from ..errors import ConfigError
from .base import LayerSpec, ModelFamily, build_layer, derive_seed
from .gpt2 import GPT2Family
from .llama import LlamaFamily
from .lora import build_lora_layer, inject_lora, lora_state_dict, target_modules_in_family
from .weights import load_layer_weights

_FAMILIES: dict[str, type[ModelFamily]] = {"gpt2": GPT2Family, "llama": LlamaFamily}


def get_family(name: str) -> ModelFamily:
    """The family object for `model.family`; ConfigError for unknown names."""
    try:
        return _FAMILIES[name]()
    except (KeyError, TypeError):
        raise ConfigError(f"model.family: unknown family {name!r}; known: {', '.join(_FAMILIES)}") from None


__all__ = [
    "LayerSpec",
    "ModelFamily",
    "get_family",
    "build_layer",
    "build_lora_layer",
    "derive_seed",
    "inject_lora",
    "lora_state_dict",
    "target_modules_in_family",
    "load_layer_weights",
]
