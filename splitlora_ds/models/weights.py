"""Fill one built layer from a pretrained HF checkpoint, reading only the tensors it needs.

From a hub id a rank downloads the index (or the single weights file) and then only the shard
files that hold its own layers' tensors, never the whole repo."""

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


def _hub_file(source: str, filename: str) -> Path:
    """One file of a hub repo, into the HF cache (FileNotFoundError when the repo has no such file)."""
    from huggingface_hub import hf_hub_download
    from huggingface_hub.utils import EntryNotFoundError, LocalEntryNotFoundError

    try:
        return Path(hf_hub_download(source, filename))
    except EntryNotFoundError as e:
        if isinstance(e, LocalEntryNotFoundError):  # offline and not cached: not "no such file"
            raise ConfigError(f"model.pretrained: {source!r} is no local directory and the hub is unreachable "
                              f"({filename} is not cached): {e}") from e
        raise FileNotFoundError(filename) from e
    except Exception as e:  # offline, unknown repo, gated, ...: all a user error here
        raise ConfigError(f"model.pretrained: {source!r} is no local directory and the hub failed on "
                          f"{filename}: {e}") from e


@functools.lru_cache(maxsize=8)
def _hub_weight_map(source: str) -> tuple[tuple[str, str], ...]:
    """(checkpoint key, file name) pairs of a hub repo, from its index alone: a rank then fetches
    only the shards holding its own layers, not every shard of the model. Without an index the single file is the whole model. Cached: a stage with
    many layers asks the hub once."""
    for index_name, single in ((SAFE_INDEX, SAFE_SINGLE), (BIN_INDEX, BIN_SINGLE)):
        try:
            weight_map = json.loads(_hub_file(source, index_name).read_text())["weight_map"]
            return tuple(sorted(weight_map.items()))
        except FileNotFoundError:
            pass
        try:
            path = _hub_file(source, single)
        except FileNotFoundError:
            continue
        return tuple((k, single) for k in _file_keys(path))
    raise ConfigError(f"model.pretrained: hub repo {source!r} has no {SAFE_INDEX}, {SAFE_SINGLE}, {BIN_INDEX} "
                      f"or {BIN_SINGLE}")


def shards_for(weight_map: dict[str, str], keys) -> list[str]:
    """The files of `weight_map` (key -> file) that hold `keys`, each once, sorted."""
    return sorted({weight_map[k] for k in keys if k in weight_map})


def _file_keys(path: Path) -> list[str]:
    if path.suffix == ".safetensors":
        with safe_open(str(path), framework="pt") as f:
            return list(f.keys())
    return list(_load_bin(path))


def _key_index(source: str) -> dict[str, str]:
    """Checkpoint key -> name of the file holding it (headers / index only, no tensor data)."""
    if not os.path.isdir(source):
        if not looks_like_hub_id(source):
            raise ConfigError(f"model.pretrained: no such directory {source!r}")
        return dict(_hub_weight_map(source))
    root = Path(source)
    for index_name in (SAFE_INDEX, BIN_INDEX):
        if (root / index_name).is_file():
            return json.loads((root / index_name).read_text())["weight_map"]
    for single in (SAFE_SINGLE, BIN_SINGLE):
        if (root / single).is_file():
            return {k: single for k in _file_keys(root / single)}
    raise ConfigError(
        f"model.pretrained: no checkpoint in {str(root)!r} (expected {SAFE_SINGLE}, {SAFE_INDEX} or {BIN_SINGLE})"
    )


def _file_path(source: str, name: str) -> Path:
    """A file of the checkpoint on this disk: from the local directory, or fetched from the hub
    (only the files a layer needs are ever asked for)."""
    if os.path.isdir(source):
        return Path(source) / name
    try:
        return _hub_file(source, name)
    except FileNotFoundError as e:
        raise ConfigError(f"model.pretrained: hub repo {source!r} lists {name} in its index but has no such file") from e


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
    index = _key_index(source)
    plan: dict[str, list[tuple[str, str, torch.Tensor]]] = {}
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
    return {_file_path(source, name): items for name, items in plan.items()}


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
