"""Which device each rank uses and which backend the job talks over, on hosts with 0, 1 or many
GPUs: never nccl with two ranks on one device, decided before the first collective. GPUs are
faked on this CPU machine (torch.cuda.device_count)."""

import pytest
import torch

from _launch import ROOT, _zygote, launch, rank_env, write_recipe
from splitlora_ds.errors import ConfigError
from splitlora_ds.placement import agree_backend, local_launch, plan_device


@pytest.mark.parametrize("backend", ["auto", "gloo"])
def test_a_host_without_gpus_runs_on_the_cpu(backend):
    placement = plan_device(backend, local_rank=1, local_size=3, gpus=0)
    assert placement.device == torch.device("cpu") and not placement.note


def test_nccl_without_gpus_is_refused_naming_the_field():
    with pytest.raises(ConfigError, match=r"dist.backend: nccl needs a GPU per rank, but this host sees no GPU"):
        plan_device("nccl", 0, 3, 0)


@pytest.mark.parametrize("backend", ["auto", "gloo", "nccl"])
def test_a_gpu_per_rank_puts_rank_i_on_gpu_i(backend):
    assert plan_device(backend, 2, 3, 4).device == torch.device("cuda", 2)


def test_auto_with_more_ranks_than_gpus_uses_the_cpu_and_says_so():
    placement = plan_device("auto", 2, 3, 1)
    assert placement.device == torch.device("cpu")
    assert "3 ranks but sees 1 GPU(s)" in placement.note and "--num_gpus 1" in placement.note
    assert "dist.backend: gloo" in placement.note and "\n" not in placement.note


def test_nccl_with_more_ranks_than_gpus_is_refused_naming_the_launch_and_the_gpus():
    with pytest.raises(ConfigError) as e:
        plan_device("nccl", 0, 3, 1)
    assert str(e.value).startswith("dist.backend: nccl needs one GPU per rank")
    assert "--num_gpus 3" in str(e.value) and "sees 1 GPU(s)" in str(e.value)


def test_gloo_with_more_ranks_than_gpus_shares_them():
    devices = [plan_device("gloo", r, 3, 2).device for r in range(3)]
    assert devices == [torch.device("cuda", 0), torch.device("cuda", 1), torch.device("cuda", 0)]


@pytest.mark.parametrize("backend,types,agreed", [
    ("auto", ["cuda", "cuda", "cuda"], "nccl"),
    ("auto", ["cpu", "cpu", "cuda"], "gloo"),  # CPU-only client hosts and a GPU server
    ("auto", ["cpu"], "gloo"),
    ("gloo", ["cuda", "cuda"], "gloo"),
    ("nccl", ["cuda", "cuda"], "nccl"),
])
def test_the_job_agrees_on_one_backend(backend, types, agreed):
    assert agree_backend(backend, types) == agreed


@pytest.mark.parametrize("env,expected", [
    ({"LOCAL_RANK": "1", "LOCAL_SIZE": "4", "WORLD_SIZE": "8"}, (1, 4)),  # deepspeed launcher
    ({"LOCAL_RANK": "1", "LOCAL_WORLD_SIZE": "2", "WORLD_SIZE": "8"}, (1, 2)),  # torchrun
    ({"LOCAL_RANK": "2", "WORLD_SIZE": "3"}, (2, 3)),  # ranks started by hand: all on this host
    ({}, (0, 1)),  # one process, no launcher
])
def test_the_local_launch_is_read_from_the_launchers_variables(monkeypatch, env, expected):
    for name in ("LOCAL_RANK", "LOCAL_SIZE", "LOCAL_WORLD_SIZE", "WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert local_launch() == expected


FAKE = str(ROOT / "tests" / "scripts" / "fake_gpus.py")


@pytest.mark.launcher
def test_the_demo_on_a_one_gpu_host_runs_on_the_cpu_and_says_so_once(tmp_path):
    recipe = write_recipe(tmp_path, federation={"clients": 2}, train={"max_steps": 2})
    proc = launch(3, ["--recipe", str(recipe)], script=FAKE, env=rank_env() | {"FAKE_GPUS": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    notes = [line for line in proc.stdout.splitlines() if "sees 1 GPU(s)" in line]
    assert len(notes) == 1 and notes[0].startswith("[splitlora_ds] this host runs 3 ranks"), proc.stdout[-2000:]
    assert "mode=split: 2 clients + 1 server stage(s)" in proc.stdout


@pytest.mark.launcher
def test_nccl_on_a_one_gpu_host_is_refused_by_every_rank_before_any_collective(tmp_path):
    recipe = write_recipe(tmp_path, federation={"clients": 2}, dist={"backend": "nccl"})
    # One rank of three: had it tried to meet the others it would wait for them until dist.timeout_s.
    env = rank_env() | {"FAKE_GPUS": "1", "RANK": "1", "LOCAL_RANK": "1", "WORLD_SIZE": "3", "LOCAL_SIZE": "3",
                        "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "9"}
    proc = _zygote().run(1, ["--recipe", str(recipe)], FAKE, timeout=60, cwd=ROOT, env=env, ranks_env=False)
    assert proc.returncode == 2, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("splitlora_ds: error:")]
    assert len(errors) == 1 and "dist.backend: nccl needs one GPU per rank" in errors[0], proc.stderr[-3000:]
    assert "--num_gpus 3" in errors[0] and "Traceback" not in proc.stderr


def test_where_cuda_is_visible_test_ranks_are_fresh_processes_of_the_real_launcher(monkeypatch):
    """A rank forked after DeepSpeed's import cannot initialise CUDA; the GPU suite's ranks must
    be exec'd by the launcher (or python -m), each initialising CUDA itself."""
    import subprocess

    import _launch

    commands = []
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(_launch, "_zygote", lambda: pytest.fail("forked ranks cannot initialise CUDA"))
    monkeypatch.setattr(_launch.subprocess, "run",
                        lambda cmd, **kw: commands.append(cmd) or subprocess.CompletedProcess(cmd, 0, "", ""))
    _launch.launch(3, ["--recipe", "r.yaml"])
    _launch.run_single(["--recipe", "r.yaml"])
    assert commands[0][0].endswith("deepspeed") and commands[0][1:3] == ["--num_gpus", "3"]
    assert commands[1][1:3] == ["-m", "splitlora_ds.train"]
