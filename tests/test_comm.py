"""Bundle headers carry dtype and shape of every tensor."""

import pytest
import torch

from splitlora_ds.comm import MAX_TENSORS, decode_header, encode_header


def test_header_round_trip():
    ts = [torch.zeros(2, 7, 16), torch.ones(2, 7, dtype=torch.int64), torch.zeros(3, dtype=torch.bfloat16),
          torch.zeros((), dtype=torch.bool)]
    assert decode_header(encode_header(ts)) == [(t.dtype, tuple(t.shape)) for t in ts]


def test_header_limits():
    with pytest.raises(ValueError):
        encode_header([torch.zeros(1)] * (MAX_TENSORS + 1))
    with pytest.raises(ValueError):
        encode_header([torch.zeros(1, 1, 1, 1, 1)])
