"""A rank that dies or hangs mid-run makes the others exit non-zero within dist.timeout_s, each
with one line naming the lost role, its rank and the step, and no traceback."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from _launch import ROOT, free_port, rank_env, write_recipe

pytestmark = pytest.mark.launcher
TIMEOUT_S = 5
HANG_GUARD_S = 600  # a wait on a rank's progress gives up only after this (a hang, not slowness)
# A rank that imports everything, says so, and starts `splitlora_ds.train` only when the test
# says go (a line on stdin). Importing takes ~8 s of CPU per rank; started at once on a loaded
# 2-core machine, ranks finish it seconds apart, and a rank that reaches the rendezvous more
# than TIMEOUT_S before the last one fails there. Past the gate only the light setup is left.
GATED_RANK = """
import sys
import deepspeed, transformers, splitlora_ds.trainer
from splitlora_ds.train import main
print("rank ready", flush=True)
sys.stdin.readline()
sys.exit(main(sys.argv[1:]))
"""


def start_ranks(recipe: Path, world: int, logs: Path) -> list[subprocess.Popen]:
    """`world` ranks of one job, each writing to logs/<rank>.log (a file: no pipe to fill while
    the test waits on another rank), released together once every one has imported."""
    port = free_port()
    logs.mkdir()
    procs = []
    for rank in range(world):
        env = rank_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        with open(logs / f"{rank}.log", "w") as out:
            procs.append(subprocess.Popen([sys.executable, "-c", GATED_RANK, "--recipe", str(recipe)], cwd=ROOT,
                                          env=env, stdin=subprocess.PIPE, stdout=out, stderr=subprocess.STDOUT,
                                          text=True))
    try:
        wait_until(lambda: all("rank ready" in output(logs, r) for r in range(world)), procs, logs,
                   "every rank imported")
        for p in procs:
            p.stdin.write("go\n")
            p.stdin.close()
    except BaseException:
        stop(procs)
        raise
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        if p.poll() is None:
            p.kill()  # SIGKILL: also ends a SIGSTOPped rank
        p.wait()


def output(logs: Path, rank: int) -> str:
    return (logs / f"{rank}.log").read_text(errors="replace")


def wait_until(condition, procs: list[subprocess.Popen], logs: Path, what: str) -> None:
    """Poll `condition` until it holds; fail at once if a rank exits first. HANG_GUARD_S only
    stops a run that hangs: the wait is on the condition, never on elapsed time."""
    guard = time.monotonic() + HANG_GUARD_S
    while not condition():
        for rank, p in enumerate(procs):
            assert p.poll() is None, f"rank {rank} exited ({p.returncode}) before {what}:\n{output(logs, rank)[-3000:]}"
        assert time.monotonic() < guard, f"no {what} after {HANG_GUARD_S} s (a hang?)"
        time.sleep(0.05)


@pytest.mark.parametrize("fault", ["server hangs", "client dies"])
def test_peers_exit_nonzero_within_timeout(tmp_path, fault):
    recipe = write_recipe(tmp_path, federation={"clients": 2}, train={"max_steps": 100000},
                          dist={"timeout_s": TIMEOUT_S})
    logs = tmp_path / "logs"
    procs = start_ranks(recipe, 3, logs)
    try:
        # The main rank (server0) logs "step 3/" after its third step: every rank is then inside
        # the training loop, so the fault hits mid-run and each survivor can name the step.
        wait_until(lambda: "step 3/" in output(logs, 2), procs, logs, "the server's step 3")
        victim = procs[2] if fault == "server hangs" else procs[1]
        os.kill(victim.pid, signal.SIGSTOP if fault == "server hangs" else signal.SIGKILL)
        t0 = time.monotonic()
        others = [p for p in procs if p is not victim]
        for p in others:
            p.wait(timeout=TIMEOUT_S + 60)  # a survivor that hangs fails here
        elapsed = time.monotonic() - t0
        assert all(p.returncode == 3 for p in others), [p.returncode for p in others]
        # dist.timeout_s plus what a loaded 2-core machine adds to noticing it and exiting; far
        # below the default 300 s timeout a rank would wait without dist.timeout_s.
        assert elapsed < TIMEOUT_S + 60
        # Every survivor names the peer it was waiting on when it failed; ranks that wait on
        # another survivor may see that one leave first, so the lost rank is named by at least one.
        lost = "server0 (rank 2)" if fault == "server hangs" else "client1 (rank 1)"
        lines = []
        for rank, p in enumerate(procs):
            if p is victim:
                continue
            out = output(logs, rank)
            errors = [line for line in out.splitlines() if line.startswith("splitlora_ds: error:")]
            assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
            assert " at step " in errors[0] and "--resume latest" in errors[0], errors[0]
            lines.append(errors[0])
        assert any(lost in line for line in lines), lines
    finally:
        stop(procs)
