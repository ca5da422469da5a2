"""Checkpoints of a split run: every rank saves its own part, one metadata file marks it complete.

    checkpoint.dir/
      step-000010/
        client0.safetensors      adapters (safetensors)
        client0.state.pt         optimizer, LR scheduler, RNG states, data position, byte counters
        ...                      (one pair per role)
        meta.json                step, config, world layout, sample counts: written LAST
      step-000020/ ...

Every file is written to a temporary name and renamed into place, and meta.json appears only
after every rank has finished (a barrier), so a crash mid-write leaves the previous checkpoint
as the latest complete one. State files hold only tensors and plain containers and are read with
`torch.load(weights_only=True)`.
"""

from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .errors import ConfigError

META = "meta.json"
PREFIX = "step-"
# Fields that must match for a resume to continue the same trajectory (run length, logging,
# evaluation and checkpointing may change).
_MUST_MATCH = ("mode", "model", "lora", "split", "federation", "data", "train.batch_size", "train.seed",
               "train.label_smoothing")


def step_dir(root: str | os.PathLike, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:06d}"


def atomic_write(path: Path, write) -> None:
    """`write(tmp)` then rename into place: readers see the old file or the whole new one."""
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_rank(directory: Path, role_name: str, adapters: dict[str, torch.Tensor], state: dict[str, Any]) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {n: t.detach().cpu().contiguous() for n, t in adapters.items()}
    atomic_write(directory / f"{role_name}.safetensors", lambda p: save_file(tensors, str(p)))
    atomic_write(directory / f"{role_name}.state.pt", lambda p: torch.save(state, p))


def write_meta(directory: Path, meta: dict) -> None:
    """Mark the checkpoint complete (call after every rank's save_rank returned)."""
    atomic_write(directory / META, lambda p: p.write_text(json.dumps(meta, indent=1, sort_keys=True)))


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Complete checkpoints under `root`, oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and (p / META).is_file()]
    return sorted(found, key=lambda p: p.name)


def prune(root: str | os.PathLike, keep: int) -> None:
    for old in complete_checkpoints(root)[:-keep] if keep > 0 else []:
        shutil.rmtree(old, ignore_errors=True)


def resolve(spec: str, checkpoint_root: Optional[str]) -> Path:
    """`--resume` argument -> one step directory: 'latest' (of checkpoint.dir), a checkpoint.dir
    (its latest), or a step directory."""
    if spec == "latest":
        if not checkpoint_root:
            raise ConfigError("--resume latest: set checkpoint.dir to say where the checkpoints are")
        spec = checkpoint_root
    path = Path(spec)
    if (path / META).is_file():
        return path
    found = complete_checkpoints(path)
    if not found:
        raise ConfigError(f"--resume: no complete checkpoint (a {PREFIX}N folder with {META}) in {spec}")
    return found[-1]


@dataclass
class Loaded:
    step: int  # the number of steps done when it was saved
    directory: Path
    meta: dict
    adapters: dict[str, torch.Tensor]
    state: dict


def read_meta(directory: Path) -> dict:
    try:
        return json.loads((directory / META).read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume: cannot read {directory / META}: {e}") from e


def check_compatible(meta: dict, config: dict, clients: int, server_stages: int, directory: Path) -> None:
    """Refuse a checkpoint of another run, naming the first field that differs."""
    layout = meta.get("world", {})
    if (layout.get("clients"), layout.get("server_stages")) != (clients, server_stages):
        raise ConfigError(f"--resume: {directory} was saved by {layout.get('clients')} clients + "
                          f"{layout.get('server_stages')} server stages, this run has {clients} + {server_stages}")
    saved = meta.get("config", {})
    for key in _MUST_MATCH:
        a, b = _get(saved, key), _get(config, key)
        if a != b:
            for sub, (x, y) in _diff(a, b, key):
                raise ConfigError(f"--resume: {directory} has {sub}={x!r} but this run has {sub}={y!r}")


def _get(d: dict, dotted: str) -> Any:
    for part in dotted.split("."):
        d = d.get(part) if isinstance(d, dict) else None
    return d


def _diff(a: Any, b: Any, prefix: str):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in sorted(set(a) | set(b)):
            yield from _diff(a.get(k), b.get(k), f"{prefix}.{k}")
    elif a != b:
        yield prefix, (a, b)


def load_rank(directory: Path, role_name: str) -> Loaded:
    meta = read_meta(directory)
    adapters_path, state_path = directory / f"{role_name}.safetensors", directory / f"{role_name}.state.pt"
    for p in (adapters_path, state_path):
        if not p.is_file():
            raise ConfigError(f"--resume: {directory} has no {p.name} (a checkpoint of another world layout?)")
    try:
        adapters = load_file(str(adapters_path))
    except (SafetensorError, OSError) as e:
        raise ConfigError(f"--resume: {adapters_path} is damaged or truncated: {e}") from e
    try:
        state = torch.load(state_path, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, pickle errors: all mean the same to the user
        raise ConfigError(f"--resume: {state_path} is damaged or truncated: {type(e).__name__}: {e}") from e
    return Loaded(int(meta["step"]), directory, meta, adapters, state)


def rng_state() -> dict:
    version, internal, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": [version, list(internal), gauss]}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
