"""The README's demo: tiny-cpu.yaml under the deepspeed launcher, 2 clients + 1 server stage."""

import pytest

from _launch import ROOT, check, launch
from splitlora_ds.metrics import read_scalars

pytestmark = pytest.mark.launcher


def test_tiny_cpu_demo_trains_and_logs(tmp_path):
    # the README's command, under the real deepspeed launcher
    proc = launch(3, ["--recipe", str(ROOT / "recipes/tiny-cpu.yaml"), "--set", "train.max_steps=40",
                      "--set", f"log.dir={tmp_path}"], real=True)
    check(proc)
    assert "mode=split: 2 clients + 1 server stage(s)" in proc.stdout

    loss = [v for _, v in read_scalars(str(tmp_path / "server0"), "train/loss")]
    assert len(loss) == 40
    assert sum(loss[-5:]) / 5 < loss[0] - 0.3, f"loss did not fall: {loss[0]:.3f} -> {loss[-5:]}"

    # Every role logs its traffic and step time; the server logs the job-wide and per-client loss.
    for role in ("client0", "client1", "server0"):
        sent = read_scalars(str(tmp_path / role), "comm/bytes_sent")
        received = read_scalars(str(tmp_path / role), "comm/bytes_received")
        assert sent[-1][1] > sent[0][1] > 0 and received[-1][1] > 0
        assert len(read_scalars(str(tmp_path / role), "time/step_s")) == 40
        assert len(read_scalars(str(tmp_path / role), "train/lr")) == 40
    for c in (0, 1):
        client_loss = read_scalars(str(tmp_path / "server0"), f"client{c}/loss")
        assert len(client_loss) == 40
        assert read_scalars(str(tmp_path / f"client{c}"), f"client{c}/samples")[0][1] == 950  # 5% held out
    # What the server receives is what the clients sent (activations, masks, labels, sizes), apart
    # from the FedAvg uploads, which a client's traffic counts too.
    to_server = sum(read_scalars(str(tmp_path / f"client{c}"), "comm/bytes_sent")[-1][1]
                    - read_scalars(str(tmp_path / f"client{c}"), "comm/adapter_bytes_sent")[-1][1] for c in (0, 1))
    assert read_scalars(str(tmp_path / "client0"), "comm/adapter_bytes_sent")[-1][1] > 0
    assert read_scalars(str(tmp_path / "server0"), "comm/bytes_received")[-1][1] == to_server


def test_local_cpu_wrapper_runs_the_recipe(tmp_path):
    import subprocess

    from _launch import free_port, rank_env

    env = rank_env() | {"MASTER_PORT": str(free_port())}
    env.pop("OMP_NUM_THREADS")  # the wrapper picks it
    proc = subprocess.run(["bash", "launch/local-cpu.sh", "recipes/tiny-cpu.yaml", "--set", "train.max_steps=2",
                           "--set", f"log.dir={tmp_path}"], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300)
    check(proc)
    assert len(read_scalars(str(tmp_path / "server0"), "train/loss")) == 2


SHARED = ROOT.parent / "shared" / "data"


@pytest.mark.skipif(not (SHARED / "e2e" / "devset.csv").exists() or not (SHARED / "gpt2-tokenizer").exists(),
                    reason="needs ../shared/data (E2E devset and GPT-2 tokenizer)")
@pytest.mark.parametrize("recipe,main", [("gpt2-e2e-cpu", "server0"), ("gpt2-e2e-cpu-private", "client0")])
def test_gpt2_e2e_cpu_recipe_learns(tmp_path, recipe, main):
    """The private variant: U-shaped split and secure aggregation; client 0 logs the loss."""
    proc = launch(4, ["--recipe", str(ROOT / f"recipes/{recipe}.yaml"), "--set", "train.max_steps=30",
                      "--set", "eval.every=30", "--set", "eval.max_batches=2", "--set", f"log.dir={tmp_path}"])
    check(proc)
    assert "histogram (customer rating)" in proc.stdout  # the Dirichlet split is reported at start
    loss = [v for _, v in read_scalars(str(tmp_path / main), "train/loss")]
    assert len(loss) == 30 and loss[0] > 10.5  # ln(50257) = 10.8 at random init
    assert sum(loss[-5:]) / 5 < loss[0] - 2.0, f"loss did not fall: {loss[0]:.2f} -> {loss[-5:]}"
    assert read_scalars(str(tmp_path / main), "eval/loss")[-1][1] < loss[0] - 2.0
