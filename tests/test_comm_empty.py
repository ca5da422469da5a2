"""Zero-row tensors never reach the backend: an exhausted client's empty activation travels as
its header alone and is rebuilt from the shape (NCCL's handling of empty buffers is not relied on)."""

import torch

import splitlora_ds.comm as comm
from _ranks import run_ranks
from splitlora_ds.comm import P2P


def _exchange(rank):
    sent_sizes = []
    real_isend, real_irecv = comm.ds_comm.isend, comm.ds_comm.irecv

    def isend(t, dst, **kwargs):
        sent_sizes.append(t.numel())
        return real_isend(t, dst, **kwargs)

    def irecv(t, src, **kwargs):
        sent_sizes.append(t.numel())
        return real_irecv(t, src, **kwargs)

    comm.ds_comm.isend, comm.ds_comm.irecv = isend, irecv
    p2p = P2P(torch.device("cpu"))
    if rank == 0:
        empty = torch.zeros(0, 7, 16)
        mask = torch.zeros(0, 7, dtype=torch.long)
        p2p.send([empty, mask, torch.ones(3)], 1)
        return sent_sizes, None
    hidden, mask, ones = p2p.recv(0, torch.float32)
    return sent_sizes, (tuple(hidden.shape), tuple(mask.shape), mask.dtype, ones.tolist())


def test_empty_tensors_travel_as_headers_only():
    (sent0, _), (sent1, got) = run_ranks(2, _exchange)
    assert 0 not in sent0 and 0 not in sent1  # the backend never saw an empty buffer
    assert len(sent0) == len(sent1) == 2  # header + the one non-empty tensor, on both sides
    assert got == ((0, 7, 16), (0, 7), torch.int64, [1.0, 1.0, 1.0])
