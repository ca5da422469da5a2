"""FedAvg arithmetic against hand-computed numbers."""

import pytest
import torch

from splitlora_ds.federation.fedavg import fedavg, sample_weights


def test_sample_weights():
    assert sample_weights([1, 3]) == [0.25, 0.75]
    with pytest.raises(ValueError):
        sample_weights([0, 0])


def test_fedavg_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "b": torch.tensor([[4.0]])}
    b = {"w": torch.tensor([3.0, 6.0]), "b": torch.tensor([[0.0]])}
    out = fedavg([a, b], [0.25, 0.75])
    # 0.25*1 + 0.75*3 = 2.5 ; 0.25*2 + 0.75*6 = 5.0 ; 0.25*4 = 1.0
    assert torch.equal(out["w"], torch.tensor([2.5, 5.0]))
    assert torch.equal(out["b"], torch.tensor([[1.0]]))


def test_fedavg_rejects_mismatched_keys():
    with pytest.raises(ValueError, match="other keys"):
        fedavg([{"a": torch.zeros(1)}, {"b": torch.zeros(1)}], [0.5, 0.5])
