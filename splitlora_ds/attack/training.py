"""Training one attack setting as a real split run, recorded from the server's side (record.py).

Each setting is its own job under the `deepspeed` launcher, like a benchmark mode: its console
goes to DIR/runs/<setting>/log.txt, its TensorBoard logs to tb/, the server's view to view/. The
validation loss and the epsilons come from the job's own logs.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..bench.runs import command, main_role
from ..config import RunConfig, load_config
from ..metrics import read_scalars
from .record import VICTIM


@dataclass
class TrainedSetting:
    run_dir: Path
    val_loss: Optional[float]
    epsilons: dict[str, float] = field(default_factory=dict)  # the victim's privacy/epsilon_* at the end
    wall_seconds: float = 0.0

    @property
    def view_dir(self) -> Path:
        return self.run_dir / "view"


def train_setting(recipe: str, sets: list[str], run_dir: Path, record_steps: list[int], threads: int,
                  timeout: Optional[float], reuse: bool) -> TrainedSetting:
    """Train and record one setting (or, with `reuse`, read the recorded run already in run_dir)."""
    cfg = load_config(recipe, sets)
    if not (reuse and any((run_dir / "view").glob("view-*.pt"))):
        _launch(cfg, recipe, sets, run_dir, record_steps, threads, timeout)
    return read_trained(cfg, run_dir)


def _launch(cfg: RunConfig, recipe: str, sets: list[str], run_dir: Path, record_steps: list[int], threads: int,
            timeout: Optional[float]) -> None:
    if run_dir.exists():
        shutil.rmtree(run_dir)  # a rerun must not mix with an earlier run's logs or views
    run_dir.mkdir(parents=True)
    sets = [*sets, f"log.dir={run_dir / 'tb'}", "checkpoint.dir=null", "train.output_dir=null"]
    cmd = command(cfg, recipe, sets, [], module="splitlora_ds.attack.record",
                  module_args=("--view-dir", str(run_dir / "view"), "--view-steps", ",".join(map(str, record_steps))))
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    t0 = time.perf_counter()
    log_file = run_dir / "log.txt"
    with open(log_file, "w") as log:
        try:
            code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except subprocess.TimeoutExpired:
            code = 124
    (run_dir / "wall_seconds").write_text(f"{time.perf_counter() - t0:.1f}\n")
    if code != 0:
        tail = log_file.read_text().strip().splitlines()[-5:]
        raise RuntimeError(f"training {run_dir.name} failed (exit {code}); the last lines of {log_file}:\n"
                           + "\n".join(tail))


def read_trained(cfg: RunConfig, run_dir: Path) -> TrainedSetting:
    tb = run_dir / "tb"
    losses = read_scalars(str(tb / main_role(cfg)), "eval/loss") if cfg.eval.every else []
    epsilons = {}
    victim_log = str(tb / f"client{VICTIM}")
    for tag in ("privacy/epsilon_activations", "privacy/epsilon_tail_gradients"):
        try:
            epsilons[tag.split("/", 1)[1]] = read_scalars(victim_log, tag)[-1][1]
        except KeyError:
            pass
    wall = run_dir / "wall_seconds"
    return TrainedSetting(run_dir, losses[-1][1] if losses else None, epsilons,
                          float(wall.read_text()) if wall.exists() else 0.0)
