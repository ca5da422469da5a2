"""Helpers for tests that start several ranks: free ports, the deepspeed launcher, tiny recipes."""

from __future__ import annotations

import functools
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml
from safetensors.torch import load_file

from _zygote import Zygote
from splitlora_ds.bench.runs import free_port
from splitlora_ds.metrics import read_scalars

ROOT = Path(__file__).resolve().parent.parent


def deepspeed_bin() -> str:
    local = Path(sys.executable).parent / "deepspeed"
    return str(local) if local.exists() else shutil.which("deepspeed")


def rank_env() -> dict:
    env = dict(os.environ)
    env["OMP_NUM_THREADS"] = "1"  # ranks share 2 cores; more threads each only fight
    env["PYTHONUNBUFFERED"] = "1"
    # The interpreter running the tests, and its deepspeed, come first (also when not activated).
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    return env


@functools.cache
def _zygote() -> Zygote:
    return Zygote(ROOT)


def _cuda_visible() -> bool:
    """Whether ranks may use CUDA. A process forked from the zygote cannot initialise CUDA (its
    parent imported DeepSpeed, which queries the driver: "Cannot re-initialize CUDA in forked
    subprocess"), so where CUDA is visible every rank is a fresh process started by the real
    launcher. The CPU suite hides the GPUs (conftest.py) and keeps the fast zygote."""
    import torch

    return torch.cuda.is_available()


def launch(nprocs: int, args: list[str], script: str | None = None, timeout: float = 300,
           cwd: Path | None = None, env: dict | None = None, real: bool = False) -> subprocess.CompletedProcess:
    """Run N ranks of splitlora_ds.train (or a script) with their own master port (in `cwd`, the
    project root unless given; `env`: rank_env() unless given): forked from a process that has
    imported everything already (tests/_zygote.py), or, `real` or wherever CUDA is visible (the
    GPU suite), under `deepspeed --num_gpus N`."""
    real = real or _cuda_visible()
    if not real:
        return _zygote().run(nprocs, args, script, timeout, cwd or ROOT, env or rank_env())
    target = [script] if script else ["--module", "splitlora_ds.train"]
    cmd = [deepspeed_bin(), "--num_gpus", str(nprocs), "--master_port", str(free_port()), *target, *args]
    return subprocess.run(cmd, cwd=cwd or ROOT, env=env or rank_env(), capture_output=True, text=True, timeout=timeout)


def run_single(args: list[str], timeout: float = 300, real: bool = False,
               script: str | None = None) -> subprocess.CompletedProcess:
    """One process without launcher variables (mode=centralized), forked like `launch`'s ranks,
    or, `real` or wherever CUDA is visible, as `python -m splitlora_ds.train` (or `python script`)."""
    real = real or _cuda_visible()
    if not real:
        return _zygote().run(1, args, script, timeout, ROOT, rank_env(), ranks_env=False)
    cmd = [sys.executable, *([script] if script else ["-m", "splitlora_ds.train"]), *args]
    return subprocess.run(cmd, cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=timeout)


def tiny_model(family: str) -> dict:
    """A 4-block model small enough for multi-rank tests, with every dropout off (exactness)."""
    if family == "gpt2":
        config = {"n_layer": 4, "n_embd": 32, "n_head": 4, "n_positions": 320, "vocab_size": 257,
                  "bos_token_id": 256, "eos_token_id": 256,
                  "resid_pdrop": 0.0, "embd_pdrop": 0.0, "attn_pdrop": 0.0}
    else:
        config = {"num_hidden_layers": 4, "hidden_size": 32, "intermediate_size": 64, "num_attention_heads": 4,
                  "num_key_value_heads": 2, "max_position_embeddings": 320, "vocab_size": 257,
                  "bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256}
    return {"family": family, "config": config, "attn_implementation": "sdpa"}


def write_recipe(tmp_path: Path, family: str = "gpt2", **sections) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    recipe = {
        "deepspeed_config": str(ROOT / "ds_configs" / "cpu-sgd.json"),
        "model": tiny_model(family),
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "split": {"client_layers": 2, "server_stages": 1},
        "federation": {"clients": 1, "aggregate_every": 1},
        "data": {"num_samples": 64, "max_length": 320},
        "train": {"max_steps": 4, "batch_size": 4, "seed": 7},
        "log": {"dir": str(tmp_path / "tb"), "print_every": 1},
        "dist": {"timeout_s": 60},
    }
    for name, values in sections.items():
        if isinstance(values, dict):
            recipe.setdefault(name, {}).update(values)
        else:
            recipe[name] = values
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def check(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\n--- stdout\n{proc.stdout[-4000:]}\n--- stderr\n{proc.stderr[-4000:]}"


def scalars(run_dir: Path, tag: str = "train/loss") -> list[float]:
    """The values of one TensorBoard tag of one role's run, in step order."""
    return [v for _, v in read_scalars(str(run_dir), tag)]


def load_adapters(out_dir: Path, roles: list[str]) -> dict:
    """The final adapters the given roles wrote to train.output_dir, merged into one state dict."""
    merged = {}
    for role in roles:
        merged.update(load_file(str(out_dir / f"{role}.safetensors")))
    return merged
