"""N steps + resume + N steps continues the exact trajectory of 2N steps straight."""

import shutil

import pytest
from safetensors.torch import load_file

from _launch import ROOT, check, launch, write_recipe
from splitlora_ds.metrics import read_scalars

pytestmark = pytest.mark.launcher


def test_resume_continues_the_exact_trajectory(tmp_path):
    # Two clients averaging every 2 steps, AdamW with warm-up + decay, clipping, LoRA dropout:
    # optimizer, scheduler, RNG and data position must all come back.
    def recipe_in(folder, **checkpoint):
        return write_recipe(folder, deepspeed_config=str(ROOT / "ds_configs/cpu-fp32.json"),
                            lora={"dropout": 0.1}, federation={"clients": 2, "aggregate_every": 2},
                            train={"max_steps": 6, "batch_size": 2, "output_dir": str(folder / "out")},
                            checkpoint={"dir": str(folder / "ckpt"), **checkpoint})

    straight = tmp_path / "straight"
    recipe = recipe_in(straight, every=3)
    check(launch(3, ["--recipe", str(recipe)]))

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "tb", resumed / "tb")  # the first run's curves, to be continued
    recipe = recipe_in(resumed)
    proc = launch(3, ["--recipe", str(recipe), "--resume", str(straight / "ckpt" / "step-000003")])
    check(proc)
    assert "resumed at step 3" in proc.stdout

    a = read_scalars(str(straight / "tb" / "server0"), "train/loss")
    b = read_scalars(str(resumed / "tb" / "server0"), "train/loss")
    assert [s for s, _ in b] == list(range(6))  # continued: each step once, no restart at 0
    assert max(abs(x - y) for (_, x), (_, y) in zip(a[3:], b[3:])) <= 1e-6
    for role in ("client0", "client1", "server0"):
        wa, wb = load_file(str(straight / "out" / f"{role}.safetensors")), load_file(str(resumed / "out" / f"{role}.safetensors"))
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    sent_a = read_scalars(str(straight / "tb" / "client0"), "comm/bytes_sent")[-1][1]
    sent_b = read_scalars(str(resumed / "tb" / "client0"), "comm/bytes_sent")[-1][1]
    assert sent_a == sent_b  # byte counters continue too


@pytest.mark.parametrize("server_stages", [1, 2])
def test_u_shaped_resume_continues_the_exact_trajectory(tmp_path, server_stages):
    # U-shaped split (the clients hold block 0 and block 3 + the head, and log the loss), M = 2
    # micro-batches, the rest as above: the clients' tails (adapters, AdamW moments, dropout RNG)
    # come back too. The resumed run finds the checkpoint as `--resume latest` in its own folder.
    def recipe_in(folder, **checkpoint):
        return write_recipe(folder, deepspeed_config=str(ROOT / "ds_configs/cpu-fp32.json"),
                            lora={"dropout": 0.1}, federation={"clients": 2, "aggregate_every": 2},
                            split={"client_layers": 1, "client_tail_layers": 1, "server_stages": server_stages,
                                   "micro_batches": 2},
                            train={"max_steps": 6, "batch_size": 2, "output_dir": str(folder / "out")},
                            checkpoint={"dir": str(folder / "ckpt"), **checkpoint})

    world = 2 + server_stages
    roles = ["client0", "client1"] + [f"server{s}" for s in range(server_stages)]
    straight = tmp_path / "straight"
    check(launch(world, ["--recipe", str(recipe_in(straight, every=3))]))

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "tb", resumed / "tb")
    shutil.copytree(straight / "ckpt" / "step-000003", resumed / "ckpt" / "step-000003")  # the run stopped there
    proc = launch(world, ["--recipe", str(recipe_in(resumed)), "--resume", "latest"])
    check(proc)
    assert "resumed at step 3" in proc.stdout

    a = read_scalars(str(straight / "tb" / "client0"), "train/loss")
    b = read_scalars(str(resumed / "tb" / "client0"), "train/loss")
    assert [s for s, _ in a] == [s for s, _ in b] == list(range(6))
    assert max(abs(x - y) for (_, x), (_, y) in zip(a[3:], b[3:])) <= 1e-6
    assert len({round(v, 6) for _, v in a[3:]}) == 3  # the steps after the checkpoint moved the loss
    for role in roles:
        wa, wb = load_file(str(straight / "out" / f"{role}.safetensors")), load_file(str(resumed / "out" / f"{role}.safetensors"))
        assert sorted(wa) == sorted(wb)
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
    tail = load_file(str(straight / "out" / "client0.safetensors"))
    assert any(k.startswith("layers.4.") for k in tail)  # the client's tail block was compared too


def test_resume_refuses_another_config(tmp_path):
    recipe = write_recipe(tmp_path, checkpoint={"dir": str(tmp_path / "ckpt")}, train={"max_steps": 2})
    check(launch(2, ["--recipe", str(recipe)]))
    proc = launch(2, ["--recipe", str(recipe), "--resume", "latest", "--set", "lora.rank=2",
                      "--set", "train.max_steps=4"])
    assert proc.returncode != 0
    assert "splitlora_ds: error: --resume: " in proc.stdout + proc.stderr
    assert "has lora.rank=4 but this run has lora.rank=2" in proc.stdout + proc.stderr
