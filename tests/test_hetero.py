"""Heterogeneous clients under the launcher: per-client split points and ranks, the server's
copies of shared blocks, and aggregation checked against the pure functions on recorded adapters."""

import pytest
import torch
from safetensors.torch import load_file

from _launch import ROOT, check, launch, write_recipe
from splitlora_ds.federation.lowrank import Factors, aggregate
from splitlora_ds.metrics import read_scalars

pytestmark = pytest.mark.launcher

LAYERS, RANKS, ALPHA = [1, 3, 2], [2, 8, 4], 8.0


def _modules(snap, step, tag):
    """{module: (A, B)} recorded after `tag` at `step`."""
    out = {}
    for key, t in snap.items():
        s, g, name = key.split("/", 2)
        if int(s) == step and g == tag and ".lora_A." in name:
            module = name.split(".lora_A.")[0]
            out[module] = (t, snap[f"{s}/{g}/{module}.lora_B.default.weight"])
    return out


@pytest.mark.parametrize("method", ["stacked", "zero_pad"])
def test_heterogeneous_aggregation_matches_the_pure_functions(tmp_path, method):
    recipe = write_recipe(tmp_path, federation={"clients": 3, "aggregate_every": 2, "aggregation": method},
                          split={"client_layers": LAYERS, "server_stages": 1},
                          lora={"rank": RANKS, "alpha": ALPHA, "target_modules": ["c_attn", "c_fc"]},
                          train={"max_steps": 4})
    check(launch(4, ["--recipe", str(recipe), "--out", str(tmp_path)], script=str(ROOT / "tests/scripts/record_adapters.py")))
    snaps = {r: load_file(str(tmp_path / f"{r}.safetensors")) for r in ["client0", "client1", "client2", "server0"]}
    counts = [read_scalars(str(tmp_path / "tb" / f"client{c}"), f"client{c}/samples")[0][1] for c in range(3)]
    w = [n / sum(counts) for n in counts]
    entry = [k + 1 for k in LAYERS]  # the layer each client's activations enter the server at

    for step in (1, 3):  # the averaging steps
        before = {r: _modules(s, step, "opt") for r, s in snaps.items()}
        after = {r: _modules(s, step, "avg") for r, s in snaps.items()}
        # server0 holds layers 2..5 and aggregates layers 2 and 3, the blocks clients 1 and 2 hold
        # too; its own block (layer 4) is left alone
        own = [m for m in after["server0"] if int(m.split(".")[1]) >= max(entry)]
        assert own and all(torch.equal(after["server0"][m][0], before["server0"][m][0]) for m in own)
        for m in own:
            del after["server0"][m]
        assert sorted({int(m.split(".")[1]) for m in after["server0"]}) == [2, 3]
        modules = sorted(set().union(*(after[r] for r in after)))
        assert len(modules) == 2 * 3  # c_attn and c_fc in layers 1, 2, 3
        for m in modules:
            layer = int(m.split(".")[1])
            holders = [r for r in snaps if m in after[r]]
            weights = [w[int(r[-1])] if r.startswith("client") else sum(wc for wc, e in zip(w, entry) if e <= layer)
                       for r in holders]
            assert sum(weights) == pytest.approx(1.0)
            ranks = [before[r][m][0].shape[0] for r in holders]
            parts = [Factors(*before[r][m], ALPHA / rk) for r, rk in zip(holders, ranks)]
            expected = aggregate(parts, weights, method)
            for r, e in zip(holders, expected):
                A, B = after[r][m]
                assert A.shape == before[r][m][0].shape  # every holder keeps its own rank
                torch.testing.assert_close(A, e.A, atol=1e-5, rtol=1e-4)
                torch.testing.assert_close(B, e.B, atol=1e-5, rtol=1e-4)
    # the clients' own ranks and cuts: client1 (k=3, rank 8) holds layers 1..3 at rank 8
    assert {int(m.split(".")[1]) for m in after["client1"]} == {1, 2, 3}
    assert all(a.shape[0] == 8 for a, _ in after["client1"].values())
    assert all(a.shape[0] == 8 for a, _ in after["server0"].values())  # server rank: the largest


def test_heterogeneous_run_with_two_server_stages_learns(tmp_path):
    # cuts after 1, 2, 1 blocks: block 1 is shared (client1 holds it, server0 runs it for clients
    # 0 and 2); blocks 2 and 3, which no client holds, go one to each server stage
    recipe = write_recipe(tmp_path, federation={"clients": 3, "aggregate_every": 5},
                          split={"client_layers": [1, 2, 1], "server_stages": 2},
                          lora={"rank": RANKS, "target_modules": ["c_attn", "c_fc"]},
                          train={"max_steps": 30}, data={"num_samples": 256, "validation_fraction": 0.1},
                          eval={"every": 15})
    check(launch(5, ["--recipe", str(recipe), "--set", "deepspeed_config=" + str(ROOT / "ds_configs/cpu-fp32.json")]))
    last = str(tmp_path / "tb" / "server1")
    loss = [v for _, v in read_scalars(last, "train/loss")]
    ev = [v for _, v in read_scalars(last, "eval/loss")]
    assert len(loss) == 30 and sum(loss[-5:]) / 5 < sum(loss[:5]) / 5 - 0.1
    assert len(ev) == 2 and ev[-1] < ev[0]
    for c in range(3):  # rows come back in client order: every client's own loss is logged
        assert len(read_scalars(last, f"client{c}/loss")) == 30


def test_replanning_moves_ranks_and_resumes_exactly(tmp_path):
    # Heterogeneous clients with importance re-planning after every aggregation (threshold 0):
    # ranks move between modules, and a run resumed after a re-plan continues the same trajectory.
    import shutil

    def recipe_in(folder, **checkpoint):
        return write_recipe(folder, deepspeed_config=str(ROOT / "ds_configs/cpu-fp32.json"),
                            federation={"clients": 2, "aggregate_every": 2},
                            split={"client_layers": [1, 2]}, lora={"rank": [2, 4], "target_modules": ["c_attn", "c_fc"]},
                            importance={"enabled": True, "replan_threshold": 0.0},
                            train={"max_steps": 6, "batch_size": 2, "output_dir": str(folder / "out")},
                            checkpoint={"dir": str(folder / "ckpt"), **checkpoint})

    straight = tmp_path / "straight"
    check(launch(3, ["--recipe", str(recipe_in(straight, every=3))]))
    resized = sum(v for _, v in read_scalars(str(straight / "tb" / "server0"), "importance/resized_modules"))
    assert resized > 0
    assert read_scalars(str(straight / "tb" / "server0"), "importance/layers.3.block.mlp.c_fc")
    out = load_file(str(straight / "out" / "server0.safetensors"))
    ranks = {k.split(".lora_A")[0]: v.shape[0] for k, v in out.items() if ".lora_A." in k}
    assert len(set(ranks.values())) > 1  # no longer one rank everywhere
    assert sum(r * (32 + (96 if "c_attn" in m else 128)) for m, r in ranks.items()) <= 4 * sum(
        32 + (96 if "c_attn" in m else 128) for m in ranks)  # within the server's rank-4 budget

    resumed = tmp_path / "resumed"
    shutil.copytree(straight / "tb", resumed / "tb")
    proc = launch(3, ["--recipe", str(recipe_in(resumed)), "--resume", str(straight / "ckpt" / "step-000003")])
    check(proc)
    a = read_scalars(str(straight / "tb" / "server0"), "train/loss")
    b = read_scalars(str(resumed / "tb" / "server0"), "train/loss")
    assert max(abs(x - y) for (_, x), (_, y) in zip(a[3:], b[3:])) <= 1e-6
    for role in ("client0", "client1", "server0"):
        wa = load_file(str(straight / "out" / f"{role}.safetensors"))
        wb = load_file(str(resumed / "out" / f"{role}.safetensors"))
        assert {k: v.shape for k, v in wa.items()} == {k: v.shape for k, v in wb.items()}
        assert max((wa[k] - wb[k]).abs().max().item() for k in wa) <= 1e-6
