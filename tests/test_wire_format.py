"""The activation bundle per topology (runtime/wire.py): what each hop carries, in order."""

import dataclasses

import pytest
import torch

from splitlora_ds.runtime.wire import Activations


def _acts():
    return Activations(hidden=torch.randn(2, 3, 4), mask=torch.tensor([[1, 1, 0], [1, 2, 2]]),
                       targets=torch.tensor([[5, -100, -100], [-100, 7, -100]]), counts=torch.tensor([2, 0]),
                       owner=torch.tensor([[0, 0, -1], [1, 1, 1]]), origin=torch.tensor([[0, 1, -1], [0, 1, 2]]))


@pytest.mark.parametrize("u_shaped", [False, True])
@pytest.mark.parametrize("from_client", [False, True])
def test_round_trip_keeps_exactly_the_format_fields(u_shaped, from_client):
    sent = _acts()
    wire = sent.to_wire(u_shaped, from_client)
    got = Activations.from_wire(wire, u_shaped, from_client)
    names = Activations.format(u_shaped, from_client)
    assert len(wire) == len(names)
    for field in dataclasses.fields(Activations):
        value = getattr(got, field.name)
        if field.name in names:
            assert torch.equal(value, getattr(sent, field.name))
        else:
            assert value is None


def test_a_u_shaped_client_sends_floats_and_its_mask_only():
    assert Activations.format(True, True) == ("hidden", "mask")
    assert "targets" in Activations.format(False, True)  # the standard split's client sends its labels
    assert not {"owner", "origin"} & set(Activations.format(False, True))  # a client's rows are its own


def test_missing_fields_and_wrong_lengths_are_refused():
    with pytest.raises(ValueError, match="lack \\['targets', 'counts'\\]"):
        Activations(torch.zeros(1, 1, 2), torch.ones(1, 1)).to_wire(False, True)
    with pytest.raises(ValueError, match="bundle of 3 tensors"):
        Activations.from_wire(_acts().to_wire(False, True)[:3], False, True)
