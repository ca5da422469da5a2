"""Fill one built layer from a pretrained HF checkpoint, reading only the tensors it needs."""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from ..errors import ConfigError
from .base import LayerSpec, looks_like_hub_id, named_tensors, strip_peft

SAFE_SINGLE, SAFE_INDEX = "model.safetensors", "model.safetensors.index.json"
BIN_SINGLE, BIN_INDEX = "pytorch_model.bin", "pytorch_model.bin.index.json"


@functools.lru_cache(maxsize=8)
def _download(source: str) -> str:
    # Only reached for hub ids; cached so a stage with many layers asks the hub once.
    from huggingface_hub import snapshot_download

    try:
        path = snapshot_download(source, allow_patterns=["*.json", "*.safetensors"])
        if not any(Path(path).glob("*.safetensors")):  # .bin-only repo: fetch the fallback too
            path = snapshot_download(source, allow_patterns=["*.json", "*.bin"])
    except Exception as e:  # offline, unknown repo, gated, ...: all a user error here
        raise ConfigError(f"model.pretrained: {source!r} is no local directory and the hub failed: {e}") from e
    return path


def resolve_source(source: str) -> Path:
    """Local directory as is; a hub id is downloaded (json + safetensors) into the HF cache."""
    if os.path.isdir(source):
        return Path(source)
    if not looks_like_hub_id(source):
        raise ConfigError(f"model.pretrained: no such directory {source!r}")
    return Path(_download(source))


def _key_index(root: Path, source: str) -> dict[str, Path]:
    """Checkpoint key -> file holding it (headers / index only, no tensor data)."""
    if (root / SAFE_INDEX).is_file():
        weight_map = json.loads((root / SAFE_INDEX).read_text())["weight_map"]
        return {k: root / f for k, f in weight_map.items()}
    if (root / SAFE_SINGLE).is_file():
        with safe_open(str(root / SAFE_SINGLE), framework="pt") as f:
            return {k: root / SAFE_SINGLE for k in f.keys()}
    if (root / BIN_INDEX).is_file():
        weight_map = json.loads((root / BIN_INDEX).read_text())["weight_map"]
        return {k: root / f for k, f in weight_map.items()}
    if (root / BIN_SINGLE).is_file():
        return {k: root / BIN_SINGLE for k in _load_bin(root / BIN_SINGLE)}
    raise ConfigError(
        f"model.pretrained: no checkpoint in {str(root)!r} (expected {SAFE_SINGLE}, {SAFE_INDEX} or {BIN_SINGLE})"
    )


def _load_bin(path: Path) -> dict[str, torch.Tensor]:
    # mmap: only the pages of tensors actually copied are read
    return torch.load(path, map_location="cpu", weights_only=True, mmap=True)


def load_layer_weights(layer: nn.Module, spec: LayerSpec, source: str) -> None:
    """Copy this layer's weights from `source` (local dir or hub id) into `layer`, in place.

    Works before or after LoRA injection (peft's `.base_layer.` is stripped; adapters are skipped).
    Strict for parameters; buffers missing from the checkpoint keep their built value.
    """
    for path, items in _copy_plan(layer, spec, source).items():  # each needed file opened once; others never
        if path.suffix == ".safetensors":
            with safe_open(str(path), framework="pt") as f:
                _copy(items, f.get_tensor, source)
        else:
            state = _load_bin(path)
            _copy(items, state.__getitem__, source)


def check_layer_weights(layer: nn.Module, spec: LayerSpec, source: str) -> None:
    """ConfigError unless `source` holds every parameter of `layer` at its shape (a meta-device
    layer will do): what `load_layer_weights` would refuse, found from headers alone, so that a
    run refuses a wrong checkpoint before its first collective call."""
    for path, items in _copy_plan(layer, spec, source).items():
        if path.suffix != ".safetensors":
            continue  # .bin shapes need the tensors themselves; load_layer_weights checks them
        with safe_open(str(path), framework="pt") as f:
            _check_shapes(items, lambda key: tuple(f.get_slice(key).get_shape()), source)


def _copy_plan(layer: nn.Module, spec: LayerSpec, source: str) -> dict[Path, list[tuple[str, str, torch.Tensor]]]:
    """{checkpoint file: [(layer tensor name, checkpoint key, layer tensor)]} for `layer`."""
    root = resolve_source(source)
    index = _key_index(root, source)
    plan: dict[Path, list[tuple[str, str, torch.Tensor]]] = {}
    for name, tensor, is_param in named_tensors(layer):
        candidates = spec.checkpoint_keys(strip_peft(name))
        key = next((k for k in candidates if k in index), None)
        if key is None:
            if is_param:
                raise ConfigError(
                    f"model.pretrained: {source!r} has no weight for {spec.kind} layer {spec.index} "
                    f"parameter {name!r} (looked for {', '.join(map(repr, candidates))})"
                )
            continue
        plan.setdefault(index[key], []).append((name, key, tensor))
    return plan


def _check_shapes(items: list[tuple[str, str, torch.Tensor]], shape_of, source: str) -> None:
    for name, key, dst in items:
        if shape_of(key) != tuple(dst.shape):
            raise ConfigError(
                f"model.pretrained: {source!r} key {key!r} has shape {shape_of(key)}, "
                f"layer parameter {name!r} needs {tuple(dst.shape)} (check model.config overrides)"
            )


def _copy(items: list[tuple[str, str, torch.Tensor]], get, source: str) -> None:
    with torch.no_grad():
        for item in items:
            src = get(item[1])
            _check_shapes([item], lambda _key: tuple(src.shape), source)
            item[2].copy_(src)
