"""Clients on their own machines: one job across hosts that share no filesystem.

The launcher tests start two `deepspeed --hostfile H --no_ssh --node_rank N` launchers (through
launch/host.sh) on this machine, each in its own working directory standing for a separate
disk: the recipe's relative checkpoint.dir, log.dir and train.output_dir resolve under it, and
nothing of one is visible to the other. Host A runs client0 and client1, host B client2 and the
server stage. The unit tests cover the pure parts: the recipe digest, the common resume step, the
shard selection for a stage's layers from a hub index.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest
import yaml
from safetensors.torch import load_file

from _launch import ROOT, check, deepspeed_bin, free_port, launch, rank_env, tiny_model
from splitlora_ds import checkpoint as ckpt
from splitlora_ds import hosts
from splitlora_ds.errors import ConfigError
from splitlora_ds.export import main as export_main
from splitlora_ds.metrics import read_scalars

HOST_SH = str(ROOT / "launch" / "host.sh")
TIMEOUT_S = 60  # generous: under CI load the two hosts start and load checkpoints at different speeds
STEPS = 16
HANG_GUARD_S = 600  # a wait on another process's progress gives up only after this (a hang, not slowness)
ROLES_A, ROLES_B = ("client0", "client1"), ("client2", "server0")  # ranks 0, 1 on host A; 2, 3 on host B


# ----------------------------------------------------------------------------- unit tests

def report(host, rank, steps, digest="d", problem=""):
    return hosts.RankReport(host, rank, f"role{rank}", digest, tuple(steps), problem)


def test_common_step_is_the_newest_step_every_rank_has():
    reports = [report("a", 0, [6, 4, 2]), report("a", 1, [6, 4, 2]), report("b", 2, [4, 2]), report("b", 3, [4, 2])]
    assert hosts.common_step(reports) == 4


def test_no_common_step_names_the_hosts_and_ranks_at_fault():
    reports = [report("a", 0, [4]), report("b", 1, [2])]
    with pytest.raises(ConfigError, match=r"host b \(ranks 1 role1\) lack step 4"):
        hosts.common_step(reports)
    missing = [report("a", 0, [4]), report("b", 1, [], problem="no role1 part in ckpt"), report("b", 2, [])]
    with pytest.raises(ConfigError, match=r"no usable checkpoint part on host b \(ranks 1 role1, 2 role2\): "
                                          r"no role1 part in ckpt; no rank"):
        hosts.common_step(missing)
    both = [report("a", 0, [], problem="no role0 part"), report("b", 1, [], problem="has train.seed=99")]
    with pytest.raises(ConfigError, match=r"on host a \(ranks 0 role0\): no role0 part; "
                                          r"host b \(ranks 1 role1\): has train.seed=99; no rank"):
        hosts.common_step(both)


def test_recipe_digest_ignores_host_local_paths_only():
    cfg = {"deepspeed_config": "/a/ds.json", "lora": {"rank": 4}, "log": {"dir": "tb", "gather": True},
           "checkpoint": {"dir": "ckpt"}, "train": {"output_dir": "out", "seed": 7}}
    moved = json.loads(json.dumps(cfg))
    moved["deepspeed_config"], moved["log"]["dir"], moved["checkpoint"]["dir"] = "/b/ds.json", "/x/tb", "/y"
    moved["train"]["output_dir"] = "elsewhere"
    ds = {"optimizer": {"type": "SGD"}}
    assert hosts.recipe_digest(cfg, ds) == hosts.recipe_digest(moved, ds)
    seeded = json.loads(json.dumps(cfg))
    seeded["train"]["seed"] = 8
    assert hosts.recipe_digest(cfg, ds) != hosts.recipe_digest(seeded, ds)
    assert hosts.recipe_digest(cfg, ds) != hosts.recipe_digest(cfg, {"optimizer": {"type": "AdamW"}})


def test_recipe_mismatch_names_the_odd_host():
    reports = [report("a", 0, [], "x"), report("a", 1, [], "x"), report("b", 2, [], "y")]
    with pytest.raises(ConfigError, match=r"recipe differs between hosts: host b \(ranks 2 role2\)"):
        hosts.check_recipes(reports)
    hosts.check_recipes(reports[:2])


# ----------------------------------------------------------------------------- launcher tests

def host_recipe(folder: Path, **train) -> Path:
    """The same recipe on every host, with paths relative to the host's working directory."""
    folder.mkdir(parents=True, exist_ok=True)
    recipe = {
        "deepspeed_config": str(ROOT / "ds_configs" / "cpu-sgd.json"),
        "model": tiny_model("gpt2"),
        "lora": {"rank": 4, "alpha": 8, "dropout": 0.0},
        "split": {"client_layers": 2, "server_stages": 1},
        "federation": {"clients": 3, "aggregate_every": 2},
        "data": {"num_samples": 96, "max_length": 64},
        "train": {"max_steps": STEPS, "batch_size": 2, "seed": 7, "output_dir": "out", **train},
        "log": {"dir": "tb", "print_every": 1, "gather": True},
        "checkpoint": {"dir": "ckpt", "every": 2, "keep": 3, "gather_adapters": True},
        "dist": {"timeout_s": TIMEOUT_S, "backend": "gloo"},
    }
    (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
    (folder / "hostfile").write_text("hostA slots=2\nhostB slots=2\n")
    return folder / "recipe.yaml"


def host_env() -> dict:
    # The ranks run in the hosts' folders: the project comes from PYTHONPATH, not the cwd.
    env = rank_env()
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH")) if p)
    return env


@dataclass
class Host:
    """One host's launcher (its own process group) and the file its output goes to: a file, not a
    pipe, so a host that prints much never blocks on a pipe nobody reads while the test waits on
    the other host."""
    proc: subprocess.Popen
    log: Path

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def kill(self) -> None:
        """SIGKILL the launcher and every rank it started, then reap the launcher."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait()


def start_host(folder: Path, node: int, port: int, *args: str, direct: bool = False) -> Host:
    """launch/host.sh in `folder`; `direct`: the deepspeed command it runs, without its slot check
    (a few seconds quicker). Its output goes to <folder>.log (overwritten at each start)."""
    env = host_env() | {"MASTER_PORT": str(port)}
    cmd = ([deepspeed_bin(), "--hostfile", "hostfile", "--no_ssh", "--node_rank", str(node), "--master_addr",
            "127.0.0.1", "--master_port", str(port), "--module", "splitlora_ds.train", "--recipe", "recipe.yaml"]
           if direct else [HOST_SH, "hostfile", str(node), "127.0.0.1", "recipe.yaml"])
    log = folder.with_name(folder.name + ".log")
    with open(log, "w") as out:  # the child keeps its own descriptor
        proc = subprocess.Popen([*cmd, *args], cwd=folder, env=env, stdout=out, stderr=subprocess.STDOUT,
                                start_new_session=True)  # its own process group: a host to kill as one
    return Host(proc, log)


def run_hosts(a: Path, b: Path, *args: str, direct: bool = False) -> list[tuple[int, str]]:
    """Run both hosts to their end; (exit code, output) per host. Their ranks give up on a lost
    peer after dist.timeout_s; HANG_GUARD_S only stops a hang (six processes importing DeepSpeed
    take minutes on a loaded 2-core machine)."""
    port = free_port()
    started = [start_host(a, 0, port, *args, direct=direct), start_host(b, 1, port, *args, direct=direct)]
    try:
        for host in started:
            host.proc.wait(timeout=HANG_GUARD_S)
    finally:
        for host in started:
            host.kill()
    return [(host.proc.returncode, host.output()) for host in started]


def wait_until(condition: Callable[[], bool], running: list[Host], what: str) -> None:
    """Poll `condition` until it holds. Fails at once, with the host's output, if a host exits
    first. HANG_GUARD_S only stops a run that hangs: the wait is on the condition, not on time."""
    guard = time.monotonic() + HANG_GUARD_S
    while not condition():
        for host in running:
            assert host.proc.poll() is None, f"{host.log.stem} exited ({host.proc.returncode}) before {what}:\n" \
                                               f"{host.output()[-3000:]}"
        assert time.monotonic() < guard, f"no {what} after {HANG_GUARD_S} s (a hang?)"
        time.sleep(0.05)


def has_step(folder: Path, roles: tuple[str, ...], step: int) -> bool:
    """Whether every one of `roles` has marked its part of checkpoint `step` complete on this host."""
    directory = ckpt.step_dir(folder / "ckpt", step)
    return all((directory / f"{role}{ckpt.MARK}").is_file() for role in roles)


def errors_of(text: str) -> list[str]:
    return [line[line.index("splitlora_ds: error:"):] for line in text.splitlines() if "splitlora_ds: error:" in line]


def exported(out: Path) -> dict:
    return load_file(str(out / "adapter_model.safetensors"))


def max_diff(a: dict, b: dict) -> float:
    assert set(a) == set(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


@pytest.mark.launcher
def test_two_hosts_without_a_shared_disk_resume_and_export(tmp_path):
    # The straight reference: one host, one folder.
    single = tmp_path / "single"
    host_recipe(single)
    check(launch(4, ["--recipe", "recipe.yaml"], cwd=single, env=host_env()))
    straight = read_scalars(str(single / "tb" / "server0"), "train/loss")
    assert [s for s, _ in straight] == list(range(STEPS))

    a, b = tmp_path / "hostA", tmp_path / "hostB"
    host_recipe(a)
    host_recipe(b)
    port = free_port()
    started = [start_host(a, 0, port), start_host(b, 1, port)]
    try:
        # Kill host B (its launcher and ranks) once EVERY rank has marked its step-2 part: then a
        # step is complete on both hosts, whatever the ranks do until the kill lands (a rank
        # writes its marker before the checkpoint's barrier and prunes only older parts, so the
        # ranks' newest parts never lie more than one checkpoint apart). Waiting on fewer markers
        # raced with the slowest rank's write.
        wait_until(lambda: has_step(a, ROLES_A, 2) and has_step(b, ROLES_B, 2), started,
                   "every rank's step-2 checkpoint marker")
        started[1].kill()
        killed = started[1].proc.returncode == -signal.SIGKILL
        assert killed, f"host B ended before the kill:\n{started[1].output()[-3000:]}"
        started[0].proc.wait(timeout=HANG_GUARD_S)  # its ranks lose host B's and give up
        assert started[0].proc.returncode != 0, started[0].output()[-3000:]
    finally:
        for host in started:
            host.kill()
    # Each host holds only its own ranks' parts.
    assert {f.name.split(".")[0] for f in (a / "ckpt").glob("step-*/*.done.json")} == {"client0", "client1"}
    assert {f.name.split(".")[0] for f in (b / "ckpt").glob("step-*/*.done.json")} <= {"client2", "server0"}
    assert not (b / "tb" / "client0").exists() and not (a / "tb" / "server0").exists()

    (rc_a, out_a), (rc_b, out_b) = run_hosts(a, b, "--resume", "latest")
    assert rc_a == 0 and rc_b == 0, (errors_of(out_a), errors_of(out_b), out_a[-3000:], out_b[-3000:])
    start = int(out_b.split("resumed at step ")[1].split()[0])
    assert 2 <= start < STEPS
    resumed = read_scalars(str(b / "tb" / "server0"), "train/loss")
    assert [s for s, _ in resumed] == list(range(STEPS))
    assert max(abs(x - y) for (_, x), (_, y) in zip(straight[start:], resumed[start:])) <= 1e-6

    # log.gather: every role's summary on the main rank's host; per-role curves stay home.
    for role in ("client0", "client1", "client2", "server0"):
        assert json.loads((b / "tb" / role / "summary.json").read_text())["role"] == role
    assert not list((b / "tb" / "client0").glob("events.*"))

    # Export from the two hosts' folders, and from server0's folder alone (gathered adapters),
    # equals the single-host export.
    assert export_main(["--checkpoint", str(single / "ckpt"), "--out", str(tmp_path / "x-single")]) == 0
    assert export_main(["--checkpoint", str(a / "ckpt"), "--checkpoint", str(b / "ckpt"),
                        "--out", str(tmp_path / "x-hosts")]) == 0
    assert export_main(["--checkpoint", str(b / "ckpt"), "--out", str(tmp_path / "x-gathered")]) == 0
    reference = exported(tmp_path / "x-single")
    assert max_diff(reference, exported(tmp_path / "x-hosts")) <= 1e-6
    assert max_diff(reference, exported(tmp_path / "x-gathered")) <= 1e-6
    assert export_main(["--checkpoint", str(a / "ckpt"), "--out", str(tmp_path / "x-a")]) == 2  # no server part

    # Host A's part is missing and host B's is of another run: every rank prints the same one
    # line naming each host, its ranks and what is wrong there, and nobody hangs.
    shutil.move(a / "ckpt", a / "ckpt-kept")
    for marker in (b / "ckpt").glob("step-*/*.done.json"):
        meta = json.loads(marker.read_text())
        meta["config"]["train"]["seed"] = 99
        marker.write_text(json.dumps(meta))
    results = run_hosts(a, b, "--resume", "latest", "--set", f"train.max_steps={STEPS + 2}", direct=True)
    lines = set()
    for rc, text in results:
        assert rc != 0 and "Traceback" not in text, text[-3000:]
        lines |= set(errors_of(text))
    assert len(lines) == 1, "\n".join(lines)
    line = lines.pop()
    assert "(node 0) (ranks 0 client0, 1 client1): no client0 part" in line, line
    assert "(node 1) (ranks 2 client2, 3 server0): " in line and "has train.seed=99 but this run has train.seed=7" in line


@pytest.mark.launcher
def test_hosts_with_different_recipes_stop_with_one_line(tmp_path):
    # One client host and one server host (two ranks: quick to start).
    a, b = tmp_path / "hostA", tmp_path / "hostB"
    for folder, seed in ((a, 7), (b, 8)):
        host_recipe(folder, max_steps=2, seed=seed)
        recipe = yaml.safe_load((folder / "recipe.yaml").read_text())
        recipe["federation"]["clients"] = 1
        (folder / "recipe.yaml").write_text(yaml.safe_dump(recipe))
        (folder / "hostfile").write_text("hostA slots=1\nhostB slots=1\n")
    for rc, text in run_hosts(a, b, direct=True):
        assert rc != 0 and "Traceback" not in text, text[-3000:]
        lines = set(errors_of(text))
        assert len(lines) == 1, "\n".join(lines) or text[-3000:]
        line = lines.pop()
        assert "the recipe differs between hosts" in line and "(node 1) (ranks 1 server0)" in line, line


@pytest.mark.launcher
def test_hostfile_slots_must_match_the_world(tmp_path):
    a = tmp_path / "hostA"
    host_recipe(a)
    (a / "hostfile").write_text("hostA slots=2\nhostB slots=1\n")
    proc = subprocess.run([HOST_SH, "hostfile", "0", "127.0.0.1", "recipe.yaml"], cwd=a, env=host_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "the recipe needs 4 ranks but hostfile offers 3 slots (hostA slots=2, hostB slots=1)" in proc.stderr
    (a / "hostfile").write_text("hostA slots=2\nhostB slots=2\n")
    proc = subprocess.run([HOST_SH, "hostfile", "2", "127.0.0.1", "recipe.yaml"], cwd=a, env=host_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "NODE_RANK 2, but hostfile lists 2 hosts" in proc.stderr
