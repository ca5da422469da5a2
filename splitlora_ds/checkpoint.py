"""Checkpoints of a split run: every rank saves its own part and marks that part complete.

    checkpoint.dir/
      step-000010/
        client0.safetensors      adapters (safetensors)
        client0.state.pt         optimizer, LR scheduler, RNG states, data position, byte counters
        client0.done.json        the part's completion marker, written LAST: step, config and its
        ...                      digest, world layout, sample counts, host and rank (one per role)
      step-000020/ ...

Ranks need not share a filesystem: each host keeps its own ranks' parts under checkpoint.dir as
resolved on that host, and each rank prunes its own parts. A checkpoint is complete for a rank
when that rank's marker is there; with one shared folder it is complete when every role's marker
is. At `--resume` every rank lists the steps complete for it (`prepare`), and the ranks agree on
the newest step complete everywhere with one collective (`hosts.agree`). Every file is written to
a temporary name and renamed into place, the marker after the rank's files, so a crash mid-write
leaves the previous checkpoint as the latest complete one. State files hold only tensors and
plain containers and are read with `torch.load(weights_only=True)`.

Format 1 (before per-rank markers): one `meta.json`, written by rank 0 after a barrier, marked
every role's part complete. Such checkpoints still load where that folder is visible (one host).
"""

from __future__ import annotations

import hashlib
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

from .config import RunConfig
from .errors import ConfigError

META = "meta.json"  # format 1: the one marker of a whole checkpoint
MARK = ".done.json"  # format 2: <role>.done.json marks that role's part complete
PREFIX = "step-"
FORMAT = 2
# Fields that must match for a resume to continue the same trajectory (run length, logging,
# evaluation and checkpointing may change).
_MUST_MATCH = ("mode", "model", "lora", "split", "federation", "data", "train.batch_size", "train.seed",
               "train.label_smoothing", "train.clip_scope", "privacy")
# Fields inside those that change how a step is executed but not its math: free to differ.
_MAY_DIFFER = ("split.micro_batches",)


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
    """Format 1's whole-checkpoint marker (kept for tests and tools that write one folder)."""
    atomic_write(directory / META, lambda p: p.write_text(json.dumps(meta, indent=1, sort_keys=True)))


def write_marker(directory: Path, role_name: str, meta: dict) -> None:
    """Mark `role_name`'s part complete (call after its save_rank returned)."""
    atomic_write(directory / f"{role_name}{MARK}", lambda p: p.write_text(json.dumps(meta, indent=1, sort_keys=True)))


def config_digest(config: dict) -> str:
    """A digest of the fields that must match for a resume to continue the same trajectory."""
    fields = {key: _get(config, key) for key in _MUST_MATCH}
    fields["split"] = {k: v for k, v in (fields["split"] or {}).items() if f"split.{k}" not in _MAY_DIFFER}
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]


def step_of(directory: Path) -> int:
    return int(directory.name[len(PREFIX):])


def step_dirs(root: Path) -> list[Path]:
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX):].isdigit()]
    return sorted(found, key=step_of)


def has_part(directory: Path, role_name: str) -> bool:
    """Whether `role_name`'s part of this step is complete (its marker, or a format-1 meta.json)."""
    return (directory / f"{role_name}{MARK}").is_file() or (directory / META).is_file()


def is_complete(directory: Path) -> bool:
    """Every role's part is in this folder (a format-1 meta.json, or every role's marker)."""
    if (directory / META).is_file():
        return True
    markers = sorted(directory.glob(f"*{MARK}"))
    if not markers:
        return False
    try:
        roles = json.loads(markers[0].read_text())["roles"]
    except (OSError, ValueError, KeyError):
        return False
    return all((directory / f"{r}{MARK}").is_file() for r in roles)


def complete_checkpoints(root: str | os.PathLike) -> list[Path]:
    """Checkpoints under `root` with every role's part, oldest first."""
    return [d for d in step_dirs(Path(root)) if is_complete(d)]


def rank_checkpoints(root: str | os.PathLike, role_name: str) -> list[Path]:
    """Step folders under `root` where `role_name`'s part is complete, oldest first."""
    return [d for d in step_dirs(Path(root)) if has_part(d, role_name)]


def prune(root: str | os.PathLike, role_name: str, keep: int) -> None:
    """Delete `role_name`'s parts older than its newest `keep` complete ones. Each rank prunes only
    its own files (so hosts without a shared folder each prune theirs); a step folder left with
    no marker (only gathered copies or temporary files) goes too."""
    for old in rank_checkpoints(root, role_name)[:-keep] if keep > 0 else []:
        for name in (f"{role_name}{MARK}", f"{role_name}.safetensors", f"{role_name}.state.pt", META):
            try:
                (old / name).unlink()
            except FileNotFoundError:
                pass
        try:
            unmarked = not any(old.glob(f"*{MARK}"))
        except FileNotFoundError:  # ranks sharing the folder: another one removed it meanwhile
            continue
        if unmarked:
            shutil.rmtree(old, ignore_errors=True)


def resolve(spec: str, checkpoint_root: Optional[str]) -> Path:
    """`--checkpoint`/`--resume` argument -> one step directory with every role's part:
    'latest' (of checkpoint.dir), a checkpoint.dir (its latest), or a step directory."""
    if spec == "latest":
        if not checkpoint_root:
            raise ConfigError("--resume latest: set checkpoint.dir to say where the checkpoints are")
        spec = checkpoint_root
    path = Path(spec)
    if is_complete(path):
        return path
    found = complete_checkpoints(path)
    if not found:
        raise ConfigError(f"--resume: no complete checkpoint (a {PREFIX}N folder with every role's part) in {spec}")
    return found[-1]


def rank_candidates(spec: str, checkpoint_root: Optional[str], role_name: str) -> list[Path]:
    """`--resume` argument -> the step folders holding `role_name`'s complete part, newest first:
    one step folder as given, or every step of a checkpoint.dir ('latest': checkpoint.dir). Which
    of them the run continues from is agreed with the other ranks (hosts.agree)."""
    if spec == "latest":
        if not checkpoint_root:
            raise ConfigError("--resume latest: set checkpoint.dir to say where the checkpoints are")
        spec = checkpoint_root
    path = Path(spec)
    if path.name.startswith(PREFIX) and path.name[len(PREFIX):].isdigit():
        return [path] if has_part(path, role_name) else []
    return list(reversed(rank_checkpoints(path, role_name)))


@dataclass
class Loaded:
    step: int  # the number of steps done when it was saved
    directory: Path
    meta: dict
    adapters: dict[str, torch.Tensor]
    state: dict


def read_meta(directory: Path, role_name: Optional[str] = None) -> dict:
    """The checkpoint's metadata: `role_name`'s marker (any role's when None), or the format-1
    meta.json."""
    if role_name is not None and (directory / f"{role_name}{MARK}").is_file():
        path = directory / f"{role_name}{MARK}"
    elif (directory / META).is_file():
        path = directory / META
    else:
        markers = sorted(directory.glob(f"*{MARK}")) if role_name is None else []
        path = markers[0] if markers else directory / (f"{role_name}{MARK}" if role_name else META)
    try:
        meta = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise ConfigError(f"--resume: cannot read {path}: {e}") from e
    if meta.get("format", 1) > FORMAT:
        raise ConfigError(f"--resume: {path} is of checkpoint format {meta['format']}; this version reads "
                          f"formats 1..{FORMAT}")
    return meta


def check_compatible(meta: dict, config: dict, clients: int, server_stages: int, directory: Path) -> None:
    """Refuse a checkpoint of another run, naming the first field that differs."""
    layout = meta.get("world", {})
    if (layout.get("clients"), layout.get("server_stages")) != (clients, server_stages):
        raise ConfigError(f"--resume: {directory} was saved by {layout.get('clients')} clients + "
                          f"{layout.get('server_stages')} server stages, this run has {clients} + {server_stages}")
    # A checkpoint written before a field existed ran with that field's default.
    defaults = RunConfig().to_dict()
    saved, config = _with_defaults(meta.get("config", {}), defaults), _with_defaults(config, defaults)
    for key in _MUST_MATCH:
        a, b = _get(saved, key), _get(config, key)
        if a != b:
            for sub, (x, y) in _diff(a, b, key):
                if sub in _MAY_DIFFER:
                    continue
                raise ConfigError(f"--resume: {directory} has {sub}={x!r} but this run has {sub}={y!r}")


def _with_defaults(saved: dict, defaults: dict) -> dict:
    """`saved` with every key it lacks taken from `defaults`, section by section."""
    out = dict(saved)
    for key, value in defaults.items():
        if key not in out:
            out[key] = value
        elif isinstance(value, dict) and isinstance(out[key], dict) and key != "config":
            out[key] = _with_defaults(out[key], value)
    return out


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
    if not has_part(directory, role_name):
        raise ConfigError(f"--resume: {directory} has no {role_name} part (no {role_name}{MARK}: a checkpoint of "
                          f"another world layout, or that part is on another host)")
    meta = read_meta(directory, role_name)
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
