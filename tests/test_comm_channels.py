"""Bundles over two channels (comm.P2P with a `meta` group): headers and integer tensors over a
second gloo group from host memory, floating tensors over the default group. Under NCCL that
group is what spares the receiver's host its waits for the device (tests/test_host_sync.py);
here both groups are gloo, and the bundles, their order and the byte counters must be exactly
those of one channel."""

from __future__ import annotations

from datetime import timedelta

import pytest
import torch

import splitlora_ds.comm as comm
from _ranks import TIMEOUT_S, run_ranks
from splitlora_ds.comm import P2P
from splitlora_ds.failures import wait_on

WORLD = 3
Described = tuple[str, tuple[int, ...], list]  # dtype, shape, values


def _bundles(src: int, dst: int) -> list[list[torch.Tensor]]:
    """What `src` sends `dst`, in order: every dtype the wire carries, empty tensors, bundles with
    nothing for one of the channels, and shapes that change from bundle to bundle."""
    g = torch.Generator().manual_seed(100 * src + dst)
    rows = 2 + src + dst  # each pair's shapes differ, so a mismatched receive cannot pass unseen
    return [
        [torch.randn(rows, 3, 4, generator=g), torch.randint(0, 9, (rows, 3), generator=g),
         torch.randint(0, 99, (WORLD,), generator=g)],  # activations, segment ids, counts
        [torch.zeros(0, 5, 4), torch.zeros(0, 5, dtype=torch.long), torch.randn(rows, generator=g).double()],
        [torch.randn(7, generator=g).bfloat16(), torch.rand(2, rows, generator=g) > 0.5,
         torch.randint(-5, 5, (4, 1, rows), generator=g, dtype=torch.int32)],
        [torch.randint(0, 9, (rows + 3,), generator=g)],  # integers only: nothing on the default group
        [torch.randn(rows, rows, generator=g).half()],  # floats only: the header alone on the meta group
        [torch.randint(0, 255, (3,), generator=g, dtype=torch.uint8), torch.randn(1, 1, 1, rows, generator=g),
         torch.zeros(rows, 0, dtype=torch.int32)],
    ]


def _describe(t: torch.Tensor) -> Described:
    return str(t.dtype), tuple(t.shape), t.tolist()


def _expected(src: int, dst: int) -> list[list[Described]]:
    """What `dst` receives from `src`: floats in the receive dtype (float64 holds every one
    exactly), integers as sent."""
    return [[_describe(t.double() if t.is_floating_point() else t) for t in bundle] for bundle in _bundles(src, dst)]


def _record_channels(meta) -> list[tuple[str, bool, bool]]:
    """Wrap the backend's isend/irecv to note, per call: op, floating or not, over the meta group."""
    calls = []
    real_isend, real_irecv = comm.ds_comm.isend, comm.ds_comm.irecv

    def isend(t, dst, group=None):
        calls.append(("send", t.is_floating_point(), meta is not None and group is meta))
        return real_isend(t, dst, group=group)

    def irecv(t, src, group=None):
        calls.append(("recv", t.is_floating_point(), meta is not None and group is meta))
        return real_irecv(t, src, group=group)

    comm.ds_comm.isend, comm.ds_comm.irecv = isend, irecv
    return calls


def _exchange(p2p: P2P, rank: int) -> list[list[list[Described]]]:
    """Every rank sends all its bundles to every other rank without waiting, then receives them
    from all the others at once, bundle by bundle; its sends are waited for at the end (as the
    executor does at a step's end)."""
    peers = [r for r in range(WORLD) if r != rank]
    pending = [(p2p.isend(bundle, dst), dst) for dst in peers for bundle in _bundles(rank, dst)]
    received = [p2p.recv_many(peers, torch.float64) for _ in _bundles(rank, peers[0])]
    for works, dst in pending:
        wait_on(works, dst)
    # per source: its bundles in arrival order
    return [[[_describe(t) for t in step[i]] for step in received] for i in range(len(peers))]


def _both_channels(rank: int) -> dict:
    single = P2P(torch.device("cpu"))
    meta_group = torch.distributed.new_group(backend="gloo", timeout=timedelta(seconds=TIMEOUT_S))
    split = P2P(torch.device("cpu"), meta=meta_group)
    calls = _record_channels(meta_group)
    out = {"single": _exchange(single, rank), "single_calls": list(calls)}
    calls.clear()
    out.update(meta=_exchange(split, rank), meta_calls=list(calls))
    out.update(single_counters=single.state_dict(), meta_counters=split.state_dict())
    return out


@pytest.fixture(scope="module")
def results() -> list[dict]:
    return run_ranks(WORLD, _both_channels)


def test_two_channels_deliver_the_same_bundles_in_order_and_count_the_same_bytes(results):
    for rank, out in enumerate(results):
        peers = [r for r in range(WORLD) if r != rank]
        expected = [_expected(src, rank) for src in peers]
        assert out["single"] == expected, rank
        assert out["meta"] == expected, rank
        assert out["meta_counters"] == out["single_counters"], rank
        assert out["single_counters"]["bytes_sent"] > 0
    sent = sum(out["meta_counters"]["bytes_sent"] for out in results)
    assert sent == sum(out["meta_counters"]["bytes_received"] for out in results)


def test_headers_and_integers_travel_on_the_meta_group_and_floats_on_the_default_one(results):
    for out in results:
        assert not any(on_meta for _, _, on_meta in out["single_calls"])
        assert {(floating, on_meta) for _, floating, on_meta in out["meta_calls"]} == {(True, False), (False, True)}
        # one channel or two, the backend moves the same tensors (none of them empty)
        assert sorted(c[:2] for c in out["meta_calls"]) == sorted(c[:2] for c in out["single_calls"])
