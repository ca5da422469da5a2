"""FedAvg across two clients: identical right after each averaging, weighted by sample counts,
different between averagings."""

import pytest
import torch
from safetensors.torch import load_file

from _launch import ROOT, check, launch, write_recipe

pytestmark = pytest.mark.launcher


def test_fedavg_every_two_steps_weighted_by_samples(tmp_path):
    # 11 samples over 2 clients: shards of 6 and 5, so the weights are 6/11 and 5/11.
    recipe = write_recipe(tmp_path, federation={"clients": 2, "aggregate_every": 2},
                          data={"num_samples": 11}, train={"max_steps": 4, "batch_size": 2})
    check(launch(3, ["--recipe", str(recipe), "--out", str(tmp_path)], script=str(ROOT / "tests/scripts/record_adapters.py")))
    c0, c1 = load_file(str(tmp_path / "client0.safetensors")), load_file(str(tmp_path / "client1.safetensors"))
    names = sorted({k.split("/", 2)[2] for k in c0})
    assert names and all("lora_" in n for n in names)

    assert sorted({int(k.split("/")[0]) for k in c0 if "/avg/" in k}) == [1, 3]
    for step in (1, 3):
        for n in names:
            avg0, avg1 = c0[f"{step}/avg/{n}"], c1[f"{step}/avg/{n}"]
            assert torch.equal(avg0, avg1), f"clients differ right after averaging at step {step}: {n}"
            expected = (6 / 11) * c0[f"{step}/opt/{n}"] + (5 / 11) * c1[f"{step}/opt/{n}"]
            torch.testing.assert_close(avg0, expected, rtol=0, atol=1e-6)
    for step in (0, 1, 2, 3):  # local steps on different data pull the clients apart
        assert any(not torch.equal(c0[f"{step}/opt/{n}"], c1[f"{step}/opt/{n}"]) for n in names if "lora_B" in n)
    # A weighted average is not the plain mean here (the shards differ in size).
    n = next(n for n in names if "lora_B" in n)
    plain = 0.5 * (c0[f"1/opt/{n}"] + c1[f"1/opt/{n}"])
    assert not torch.allclose(plain, c0[f"1/avg/{n}"], rtol=0, atol=1e-9)
