"""A rank that dies or hangs mid-run makes the others exit non-zero within dist.timeout_s, each
with one line naming the lost role, its rank and the step, and no traceback."""

import os
import signal
import subprocess
import sys
import time

import pytest

from _launch import ROOT, free_port, rank_env, write_recipe

pytestmark = pytest.mark.launcher
TIMEOUT_S = 5


def start_ranks(recipe, world):
    port = free_port()
    procs = []
    for rank in range(world):
        env = rank_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world),
                            "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "splitlora_ds.train", "--recipe", str(recipe)],
                                      cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    return procs


def wait_for_step(proc, step, limit=180):
    deadline = time.time() + limit
    for line in proc.stdout:
        if f"step {step}/" in line:
            return
        assert time.time() < deadline, "the run never reached the step"
    pytest.fail(f"rank exited before step {step}: {proc.wait()}")


@pytest.mark.parametrize("fault", ["server hangs", "client dies"])
def test_peers_exit_nonzero_within_timeout(tmp_path, fault):
    recipe = write_recipe(tmp_path, federation={"clients": 2}, train={"max_steps": 100000},
                          dist={"timeout_s": TIMEOUT_S})
    procs = start_ranks(recipe, 3)
    try:
        wait_for_step(procs[2], 3)
        victim = procs[2] if fault == "server hangs" else procs[1]
        os.kill(victim.pid, signal.SIGSTOP if fault == "server hangs" else signal.SIGKILL)
        t0 = time.time()
        others = [p for p in procs if p is not victim]
        for p in others:
            p.wait(timeout=TIMEOUT_S + 60)
        elapsed = time.time() - t0
        assert all(p.returncode == 3 for p in others), [p.returncode for p in others]
        assert elapsed < TIMEOUT_S + 60
        # Every survivor names the peer it was waiting on when it failed; ranks that wait on
        # another survivor may see that one leave first, so the lost rank is named by at least one.
        lost = "server0 (rank 2)" if fault == "server hangs" else "client1 (rank 1)"
        lines = []
        for p in others:
            out = p.stdout.read()
            errors = [line for line in out.splitlines() if line.startswith("splitlora_ds: error:")]
            assert len(errors) == 1 and "Traceback" not in out, out[-3000:]
            assert " at step " in errors[0] and "--resume latest" in errors[0], errors[0]
            lines.append(errors[0])
        assert any(lost in line for line in lines), lines
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
