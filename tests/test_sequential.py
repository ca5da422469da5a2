"""The sequential split-learning baseline: clients take turns, each starting from the adapters the
previous client left; the server serves the active client only."""

import json

import pytest
import torch
from safetensors.torch import load_file

from _launch import ROOT, check, launch, write_recipe
from splitlora_ds.metrics import read_scalars

pytestmark = pytest.mark.launcher


def test_clients_take_turns_and_start_from_the_previous_clients_adapters(tmp_path):
    # 2 clients, turns of 2 local steps, 3 steps per client: client order 0 0 1 1 0 1.
    recipe = write_recipe(tmp_path, mode="sequential", federation={"clients": 2, "aggregate_every": 2},
                          data={"num_samples": 40, "validation_fraction": 0.2}, eval={"every": 1},
                          train={"max_steps": 3, "batch_size": 2, "output_dir": str(tmp_path / "out")})
    proc = launch(3, ["--recipe", str(recipe), "--out", str(tmp_path)], script=str(ROOT / "tests/scripts/record_adapters.py"))
    check(proc)
    assert "mode=sequential (vanilla split learning): 2 clients take turns of 2 step(s)" in proc.stdout

    server = tmp_path / "tb" / "server0"
    assert [s for s, _ in read_scalars(str(server), "client0/tokens")] == [0, 1, 4]
    assert [s for s, _ in read_scalars(str(server), "client1/tokens")] == [2, 3, 5]
    assert [s for s, _ in read_scalars(str(server), "train/loss")] == list(range(6))
    assert [s for s, _ in read_scalars(str(server), "eval/loss")] == [1, 3, 5]  # every 1 step per client

    c0, c1 = load_file(str(tmp_path / "client0.safetensors")), load_file(str(tmp_path / "client1.safetensors"))
    assert sorted({int(k.split("/")[0]) for k in c0 if "/opt/" in k}) == [0, 1, 4]
    assert sorted({int(k.split("/")[0]) for k in c1 if "/opt/" in k}) == [2, 3, 5]
    names = sorted({k.split("/", 2)[2] for k in c0})
    for sender, receiver, step in ((c0, c1, 1), (c1, c0, 3), (c0, c1, 4)):
        for n in names:  # what the receiver holds is exactly what the sender trained
            assert torch.equal(sender[f"{step}/sent/{n}"], sender[f"{step}/opt/{n}"])
            assert torch.equal(receiver[f"{step}/recv/{n}"], sender[f"{step}/opt/{n}"])
    # ...and its next step starts from there: client1's step 2 moves away from client0's step 1.
    assert any(not torch.equal(c1[f"2/opt/{n}"], c0[f"1/opt/{n}"]) for n in names if "lora_B" in n)
    # The run ends with the last client's model on every client (what is exported).
    a, b = load_file(str(tmp_path / "out" / "client0.safetensors")), load_file(str(tmp_path / "out" / "client1.safetensors"))
    assert all(torch.equal(a[n], b[n]) for n in a)
    assert all(torch.equal(b[n], c1[f"5/opt/{n}"]) for n in names)

    # Each client trained 3 of the 6 steps; the hand-overs are counted in its traffic.
    s0 = json.loads((tmp_path / "tb" / "client0" / "summary.json").read_text())
    assert s0["steps"] == 6 and s0["active_steps"] == 3 and s0["flops_per_step"] > 0
    sent = read_scalars(str(tmp_path / "tb" / "client0"), "comm/bytes_sent")
    assert sent[2][1] == sent[1][1] and sent[4][1] > sent[3][1]  # idle at step 2, trains at step 4
