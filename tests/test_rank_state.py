"""A rank's checkpoint state, part by part: it round-trips, and a checkpoint written before the
parts had names (byte counters as a list) still loads."""

from types import SimpleNamespace

import torch

from splitlora_ds.comm import P2P
from splitlora_ds.data.loader import ClientBatches
from splitlora_ds.rank_state import load_state, rank_parts, save_state


def _rank(lr=0.1):
    w = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([w], lr=lr, momentum=0.9)
    w.grad = torch.full((3,), 0.5)
    optimizer.step()
    engine = SimpleNamespace(optimizer=optimizer, lr_scheduler=None)
    stream = ClientBatches([{"input_ids": [1, 2], "labels": [1, 2]} for _ in range(10)], 3, seed=1, pad_token_id=0)
    return engine, P2P(torch.device("cpu")), [stream]


def test_state_round_trips_through_every_part():
    engine, p2p, streams = _rank()
    p2p.bytes_sent, p2p.bytes_received, p2p.adapter_bytes_sent = 100, 200, 30
    next(streams[0])
    state = save_state(rank_parts(engine, p2p, streams))
    assert set(state) == {"optimizer", "rng", "data", "traffic"}

    fresh_engine, fresh_p2p, fresh_streams = _rank(lr=0.5)
    load_state(rank_parts(fresh_engine, fresh_p2p, fresh_streams), state)
    assert (fresh_p2p.bytes_sent, fresh_p2p.bytes_received, fresh_p2p.adapter_bytes_sent) == (100, 200, 30)
    assert fresh_streams[0].position == 3
    assert fresh_engine.optimizer.param_groups[0]["lr"] == 0.1
    assert torch.equal(fresh_engine.optimizer.state_dict()["state"][0]["momentum_buffer"],
                       engine.optimizer.state_dict()["state"][0]["momentum_buffer"])


def test_a_checkpoint_from_before_named_parts_still_loads():
    engine, p2p, streams = _rank()
    legacy = {"optimizer": engine.optimizer.state_dict(), "scheduler": {}, "rng": save_state({"r": _Rng()})["r"],
              "data": [{"epoch": 1, "position": 6, "seed": 1, "num_samples": 10, "batch_size": 3}],
              "bytes": [7, 8, 9], "importance": None, "privacy": None}
    fresh_engine, fresh_p2p, fresh_streams = _rank(lr=0.5)
    load_state(rank_parts(fresh_engine, fresh_p2p, fresh_streams), legacy)
    assert (fresh_p2p.bytes_sent, fresh_p2p.bytes_received, fresh_p2p.adapter_bytes_sent) == (7, 8, 9)
    assert (fresh_streams[0].epoch, fresh_streams[0].position) == (1, 6)


class _Rng:
    def state_dict(self):
        from splitlora_ds import checkpoint

        return checkpoint.rng_state()
