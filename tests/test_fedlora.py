"""The FedLoRA baseline: every client holds the whole model, adapters averaged every I steps."""

import pytest
from safetensors.torch import load_file

from _launch import check, launch, run_single, write_recipe
from splitlora_ds.metrics import read_scalars
from splitlora_ds.train import main

pytestmark = pytest.mark.launcher


def test_one_client_fedlora_equals_centralized(tmp_path):
    runs = {}
    for mode in ("centralized", "fedlora"):
        d = tmp_path / mode
        recipe = write_recipe(d, mode=mode, train={"output_dir": str(d / "out")},
                              data={"num_samples": 64, "validation_fraction": 0.25}, eval={"every": 2})
        check(run_single(["--recipe", str(recipe)]) if mode == "centralized" else launch(1, ["--recipe", str(recipe)]))
        runs[mode] = d
    ref = [v for _, v in read_scalars(str(runs["centralized"] / "tb" / "centralized"), "train/loss")]
    fed = [v for _, v in read_scalars(str(runs["fedlora"] / "tb" / "client0"), "train/loss")]
    assert len(fed) == len(ref) == 4 and max(abs(a - b) for a, b in zip(fed, ref)) <= 1e-5
    ref_eval = read_scalars(str(runs["centralized"] / "tb" / "centralized"), "eval/loss")
    fed_eval = read_scalars(str(runs["fedlora"] / "tb" / "client0"), "eval/loss")
    assert max(abs(a[1] - b[1]) for a, b in zip(ref_eval, fed_eval)) <= 1e-5
    wa = load_file(str(runs["centralized"] / "out" / "centralized.safetensors"))
    wb = load_file(str(runs["fedlora"] / "out" / "client0.safetensors"))
    assert sorted(wa) == sorted(wb) and max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-5


def test_two_clients_average_and_log_the_job_wide_loss(tmp_path):
    recipe = write_recipe(tmp_path, mode="fedlora", federation={"clients": 2, "aggregate_every": 2},
                          data={"num_samples": 40, "validation_fraction": 0.2},
                          train={"max_steps": 4, "batch_size": 2, "output_dir": str(tmp_path / "out")})
    proc = launch(2, ["--recipe", str(recipe)])
    check(proc)
    assert "mode=fedlora: 2 clients, each with the whole model" in proc.stdout
    tb = tmp_path / "tb" / "client0"
    loss, c0, c1 = (read_scalars(str(tb), t) for t in ("train/loss", "client0/loss", "client1/loss"))
    t0, t1 = (read_scalars(str(tb), t) for t in ("client0/tokens", "client1/tokens"))
    for i in range(4):  # the job-wide loss is the token-weighted mean of the clients' losses
        expected = (c0[i][1] * t0[i][1] + c1[i][1] * t1[i][1]) / (t0[i][1] + t1[i][1])
        assert loss[i][1] == pytest.approx(expected, rel=1e-5)
    assert len(read_scalars(str(tb), "eval/loss")) == 1
    a, b = load_file(str(tmp_path / "out" / "client0.safetensors")), load_file(str(tmp_path / "out" / "client1.safetensors"))
    assert all((a[k] == b[k]).all() for k in a)  # the run ends on an averaging


def test_fedlora_world_size_is_the_client_count(tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "3")
    recipe = write_recipe(tmp_path, mode="fedlora", federation={"clients": 2})
    assert main(["--recipe", str(recipe)]) == 2
    assert "world size 3 != federation.clients (2) for mode=fedlora" in capsys.readouterr().err
    assert main(["--recipe", str(recipe), "--world-size"]) == 0
    assert capsys.readouterr().out.strip() == "2"
