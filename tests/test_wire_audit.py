"""What crosses the wire, recorded tensor by tensor in a real run: in the standard split topology
a client's labels (its target text as token ids, shifted to the position that predicts them)
travel to the server with its activations, as the README says; nothing else of the client's text
does (no input ids). Each micro-batch travels packed, with its segment ids as the mask."""

import pytest
import torch

from _launch import ROOT, check, launch, write_recipe
from splitlora_ds.config import load_config
from splitlora_ds.prepare import prepare
from splitlora_ds.runtime.packing import PackPlan, next_token_targets

pytestmark = pytest.mark.launcher


def test_standard_split_sends_activations_mask_and_labels(tmp_path):
    recipe = write_recipe(tmp_path, federation={"clients": 2, "aggregate_every": 2}, train={"max_steps": 2},
                          data={"num_samples": 40})
    check(launch(3, ["--recipe", str(recipe), "--out", str(tmp_path)], script=str(ROOT / "tests/scripts/record_wire.py")))
    cfg = load_config(str(recipe))
    for c in range(2):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RANK", str(c)), mp.setenv("WORLD_SIZE", "3"), mp.setenv("LOCAL_RANK", str(c))
            prep = prepare(cfg)
        batches = [next(prep.batches) for _ in range(2)]
        m = cfg.micro_batches
        log = torch.load(tmp_path / f"client{c}.wire.pt")["log"]
        sent = [entry["tensors"] for entry in log if entry["dir"] == "sent"]
        received = [entry["tensors"] for entry in log if entry["dir"] == "received"]
        assert m > 1 and len(sent) == len(received) == 2 * m and all(entry["peer"] == 2 for entry in log)
        for step, batch in enumerate(batches):
            targets = next_token_targets(batch["labels"], batch["attention_mask"])
            rows = torch.arange(batch["input_ids"].shape[0]).tensor_split(m)
            for micro, bundle in zip(rows, sent[step * m:(step + 1) * m]):
                hidden, mask, sent_targets, counts = bundle
                plan = PackPlan.build([batch["attention_mask"][micro]], cfg.train.pack_length)
                assert hidden.is_floating_point() and hidden.shape[:2] == (plan.rows, plan.length)
                assert torch.equal(mask, plan.segments)  # reveals the lengths
                assert torch.equal(sent_targets, plan.pack([targets[micro]], -100))  # the target text, in the clear
                expected = torch.zeros(2, dtype=torch.long)
                expected[c] = int((targets != -100).sum())  # the step's token count, for the loss's mean
                assert torch.equal(counts, expected)
                ids = plan.pack([batch["input_ids"][micro]], 0)
                assert not any(t.shape == ids.shape and torch.equal(t, ids) for t in bundle)  # input ids stay home
        for (grad,), bundle in zip(received, sent):  # only the gradient of the activations comes back
            assert grad.is_floating_point() and grad.shape == bundle[0].shape
