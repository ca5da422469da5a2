"""The attack tool against real runs: the recorder keeps exactly what the server received, in the
victim's order, and `python -m splitlora_ds.attack` goes from a recipe to results.json, table.md
and the plot, with the DP settings spending the epsilon they aim at."""

import json
import subprocess
import sys

import pytest
import torch

from _launch import ROOT, check, launch, rank_env, write_recipe
from splitlora_ds.attack.base_model import BaseModel
from splitlora_ds.attack.views import load_view
from splitlora_ds.config import load_config
from splitlora_ds.data.examples import IGNORE_INDEX

pytestmark = pytest.mark.launcher

U_SHAPED = {"client_layers": 1, "client_tail_layers": 1, "micro_batches": 2, "server_stages": 1}


def test_the_recorded_view_is_what_the_server_received(tmp_path):
    """At step 0 every adapter is at its init (LoRA B = 0), so the base model recomputes the
    victim's messages exactly: the activations from its ids, the tail's input from the server's
    blocks, and the tail's gradient (up to the loss's scale) from its targets."""
    recipe = write_recipe(tmp_path, split=U_SHAPED, federation={"clients": 2, "aggregate_every": 1},
                          train={"max_steps": 2, "label_smoothing": 0.1}, data={"num_samples": 40})
    view = tmp_path / "view"
    check(launch(3, ["--view-dir", str(view), "--view-steps", "0", "--recipe", str(recipe)],
                 script=str(ROOT / "tests/scripts/record_view.py")))
    assert sorted(p.name for p in view.glob("*.pt")) == ["view-client0.pt", "view-server0.pt"]
    samples = load_view(view)
    cfg = load_config(str(recipe))
    assert len(samples) == cfg.train.batch_size and all(s.step == 0 for s in samples)
    base = BaseModel(cfg)
    for s in samples:
        ids, mask = s.ids[None], torch.ones(1, len(s.ids), dtype=torch.long)
        assert torch.allclose(base.bottom(ids, mask, 1)[0], s.hidden, atol=1e-5)
        y = base.run(ids, mask, range(0, base.num_blocks)).detach()  # the server's blocks: 1..L-1
        assert torch.allclose(y[0], s.tail_input, atol=1e-5)
        scored = s.scored.nonzero().squeeze(1)
        y.requires_grad_(True)
        loss = torch.nn.functional.cross_entropy(base.tail(y, mask, 1, scored), s.targets[scored], reduction="sum",
                                                 label_smoothing=0.1)
        (grad,) = torch.autograd.grad(loss, y)
        cosine = torch.nn.functional.cosine_similarity(grad[0].flatten(), s.tail_grad.flatten(), dim=0)
        assert cosine > 0.9999, float(cosine)
    assert all((s.targets[s.scored] != IGNORE_INDEX).all() for s in samples)


def test_attack_cli_writes_results_with_the_epsilon_it_aims_at(tmp_path):
    recipe = write_recipe(tmp_path, federation={"clients": 2, "aggregate_every": 1},
                          data={"num_samples": 200, "validation_fraction": 0.1}, eval={"max_batches": 2},
                          deepspeed_config=str(ROOT / "ds_configs/cpu-fp32.json"))
    out = tmp_path / "attack"
    cmd = [sys.executable, "-m", "splitlora_ds.attack", "--recipe", str(recipe), "--out", str(out),
           "--settings", "u-k1-m0-tgdp-eps1", "--steps", "4", "--record-steps", "2"]
    proc = subprocess.run(cmd, cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=600)
    check(proc)
    rows = json.loads((out / "results.json").read_text())
    keys = {"attack", "split_layers", "tail_layers", "dp_sigma", "epsilon", "token_recovery", "rouge_l", "val_loss"}
    assert all(keys <= set(r) for r in rows)
    attacks = sorted((r["attack"], r["phase"]) for r in rows if r["setting"] is not None)
    assert attacks == sorted((a, p) for a in ("inversion-learned", "inversion-optimised", "label-backprojection")
                             for p in ("start", "end"))
    assert {r["attack"] for r in rows if r["setting"] is None} == {"unigram", "unigram-targets"}
    assert all(0.0 <= r["token_recovery"] <= 1.0 and 0.0 <= r["rouge_l"] <= 1.0 for r in rows)
    label = [r for r in rows if r["attack"] == "label-backprojection"]
    # the run's own accountant (the victim's TensorBoard) agrees with the calibration
    assert all(r["dp_sigma"] > 0 and r["epsilon"] == pytest.approx(1.0, rel=0.05) for r in label)
    assert all(r["tail_layers"] == 0 and r["split_layers"] == 1 and r["val_loss"] > 0 for r in rows if r["setting"])
    assert (out / "table.md").read_text().count("| u-k1-m0-tgdp-eps1 |") == 2
    assert (out / "leakage.png").stat().st_size > 0
    # --reuse attacks the recorded run without training it again
    log = out / "runs" / "u-k1-m0-tgdp-eps1" / "log.txt"
    before = log.stat().st_mtime
    check(subprocess.run([*cmd, "--reuse"], cwd=ROOT, env=rank_env(), capture_output=True, text=True, timeout=600))
    assert log.stat().st_mtime == before
    again = json.loads((out / "results.json").read_text())
    assert [r["val_loss"] for r in again] == [r["val_loss"] for r in rows]
