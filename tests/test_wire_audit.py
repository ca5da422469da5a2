"""What crosses the wire, recorded tensor by tensor in a real run: in the standard split topology
a client's labels (its target text as token ids) travel to the server with its activations, as
the README says; nothing else of the client's text does (no input ids)."""

import pytest
import torch

from _launch import ROOT, check, launch, write_recipe
from splitlora_ds.config import load_config
from splitlora_ds.prepare import prepare

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
        log = torch.load(tmp_path / f"client{c}.wire.pt")["log"]
        sent = [entry["tensors"] for entry in log if entry["dir"] == "sent"]
        received = [entry["tensors"] for entry in log if entry["dir"] == "received"]
        assert len(sent) == len(received) == 2 and all(entry["peer"] == 2 for entry in log)
        for bundle, batch in zip(sent, batches):
            hidden, mask, labels, sizes = bundle
            assert hidden.is_floating_point() and hidden.shape[:2] == batch["input_ids"].shape
            assert torch.equal(mask, batch["attention_mask"])  # reveals the lengths
            assert torch.equal(labels, batch["labels"])  # the target text, in the clear
            assert torch.equal(sizes, torch.tensor([batch["input_ids"].shape[0]]))
            assert not any(t.shape == batch["input_ids"].shape and torch.equal(t, batch["input_ids"])
                           for t in bundle)  # the input ids themselves stay home
        for (grad,), bundle in zip(received, sent):  # only the gradient of the activations comes back
            assert grad.is_floating_point() and grad.shape == bundle[0].shape
