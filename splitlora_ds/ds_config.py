"""The DeepSpeed config (ds_config JSON) of each role.

The file governs optimizer, LR scheduler, clipping and precision exactly as in any DeepSpeed job.
Batch sizes are the trainer's: a client's micro-batch is `train.batch_size`, and the server
stages see all C clients' micro-batches at once, so the trainer writes those keys per role.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
from pathlib import Path

import torch

from . import ds_config_schema as schema
from .errors import ConfigError

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")
_SCHEDULERS_WITH_TOTAL = ("WarmupDecayLR", "WarmupCosineLR")
_ADAM_TYPES = ("adam", "adamw")


def load_ds_config(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"deepspeed_config: file not found: {path}")
    try:
        cfg = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"deepspeed_config: {path} is not valid JSON: {e}") from e
    check_ds_config(cfg, path)
    return cfg


def check_ds_config(cfg: dict, path: str) -> None:
    """Reject settings the split engine cannot honour, naming the key."""
    if not isinstance(cfg, dict):
        raise ConfigError(f"deepspeed_config: {path} must hold a JSON object, not {type(cfg).__name__}")
    for key in _BATCH_KEYS:
        if key in cfg and not (key == "gradient_accumulation_steps" and cfg[key] == 1):
            raise ConfigError(
                f"deepspeed_config: {path} sets '{key}'; the trainer derives batch sizes from "
                "train.batch_size (per client) and federation.clients, so remove it")
    if not isinstance(cfg.get("optimizer"), dict) or "type" not in cfg["optimizer"]:
        raise ConfigError(f"deepspeed_config: {path} has no optimizer.type (e.g. AdamW or SGD)")
    schema.check_with_deepspeed_parser(cfg, path)  # unknown keys; sections DeepSpeed validates itself
    if cfg.get("fp16", {}).get("enabled", False):
        raise ConfigError(
            f"deepspeed_config: {path} enables fp16; dynamic loss scaling does not carry across the "
            "split (the scaled gradients would reach the clients), so use bf16 or fp32")
    stage = cfg.get("zero_optimization", {}).get("stage", 0)
    if stage != 0:
        raise ConfigError(
            f"deepspeed_config: {path} sets zero_optimization.stage={stage}; every rank is its own "
            "data-parallel world here, so ZeRO has nothing to shard: use stage 0")
    _check_training_values(cfg, path)


def _check_training_values(cfg: dict, path: str) -> None:
    """Values DeepSpeed would only refuse at deepspeed.initialize (a traceback on some ranks, a
    hang on the others): clipping, optimizer and scheduler, checked against DeepSpeed's classes."""
    schema.check_gradient_clipping(cfg, path)
    schema.check_optimizer(cfg, path)
    sched = cfg.get("scheduler")
    sched_type = sched.get("type") if isinstance(sched, dict) else None
    # role_ds_config fills total_num_steps with the run length for these; any positive count stands in.
    fills = {"total_num_steps": 1} if sched_type in _SCHEDULERS_WITH_TOTAL else {}
    schema.check_scheduler(cfg, path, fills)


def role_ds_config(base: dict, micro_batch: int, max_steps: int, clips_itself: bool = True) -> dict:
    """A copy of `base` with this role's batch size and the run length filled in.
    `clips_itself` False: the trainer clips by the global norm, so the engine must not clip."""
    cfg = copy.deepcopy(base)
    # Spelled out either way: DeepSpeed clips at 1.0 when the key is absent, while here an absent
    # key means no clipping (ds_config_schema), and an engine whose trainer clips by the global
    # norm must not clip its own part again.
    cfg["gradient_clipping"] = float(cfg.get("gradient_clipping", 0.0)) if clips_itself else 0.0
    cfg["train_micro_batch_size_per_gpu"] = micro_batch
    cfg["gradient_accumulation_steps"] = 1
    cfg["train_batch_size"] = micro_batch  # each role is a data-parallel world of one
    cfg.setdefault("steps_per_print", 10**9)  # our own metrics replace DeepSpeed's step prints
    opt = cfg["optimizer"]
    if opt["type"].lower() in _ADAM_TYPES:
        # torch's Adam/AdamW unless the config asks for DeepSpeed's fused one: that op is
        # JIT-compiled at start-up, which needs a CUDA toolkit (nvcc) that a plain pip install
        # of torch does not bring (and ~50 s of compiling on every fresh CPU machine).
        opt.setdefault("params", {}).setdefault("torch_adam", True)
    sched = cfg.get("scheduler")
    if sched and sched.get("type") in _SCHEDULERS_WITH_TOTAL:
        sched.setdefault("params", {}).setdefault("total_num_steps", max_steps)
    return cfg


def precision_dtype(cfg: dict) -> torch.dtype:
    return torch.bfloat16 if cfg.get("bf16", {}).get("enabled", False) else torch.float32


def check_fused_adam(cfg: dict, path: str) -> None:
    """When the config asks for DeepSpeed's fused Adam (`optimizer.params.torch_adam: false`), say
    before the run starts what that needs, instead of failing in a JIT build on every rank."""
    opt = cfg["optimizer"]
    if opt["type"].lower() not in _ADAM_TYPES or opt.get("params", {}).get("torch_adam", True):
        return
    key = "deepspeed_config: optimizer.params.torch_adam"
    if not torch.cuda.is_available():
        raise ConfigError(f"{key}: false in {path} asks for DeepSpeed's FusedAdam, a CUDA kernel; on this "
                          "machine without CUDA use torch's AdamW (torch_adam: true, the default)")
    from deepspeed.git_version_info import installed_ops

    if installed_ops.get("fused_adam"):
        return  # built into this DeepSpeed install: nothing to compile
    cuda_home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH") or "/usr/local/cuda"
    if shutil.which("nvcc") is None and not (Path(cuda_home) / "bin" / "nvcc").is_file():
        raise ConfigError(f"{key}: false in {path} asks for DeepSpeed's FusedAdam, which this DeepSpeed install "
                          "compiles at start-up, but no CUDA toolkit (nvcc, CUDA_HOME) is here: install one that "
                          "matches torch's CUDA, or reinstall DeepSpeed with DS_BUILD_FUSED_ADAM=1, or drop "
                          "torch_adam to use torch's AdamW")
