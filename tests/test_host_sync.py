"""The GPU hot path waits for the device a fixed few times per training step, whatever the number
of micro-batches M, clients or server stages (issue 21).

How it is counted (tests/_syncs.py): every rank of a real run computes on `cpu:0`, a CPU device
the counter tells apart from the host's plain `cpu`; tensors put there, and everything computed
from them, are device tensors. Each host read of a device value (item/bool/int/float, tolist, a
download, an op whose output size depends on device data, a blocking upload, a mixed-placement
op, a wait on a CUDA event, torch.cuda.synchronize) counts as one synchronisation, recorded with
where it happened (tests/scripts/count_syncs.py). Tensors travel from the device, as under NCCL.

What a step may do, per rank:
- compute: one wait for the clock's last event (timing.EventClock) and one read of the step's
  figures (StepStats.finish), nothing else of this project; on a step that averages adapters the
  aggregation's own transfers too (the same for any M: once per step). DeepSpeed's engine clipping
  (centralized mode) makes its own, also once per step.
- wire (comm.P2P.recv_many), as an NCCL job runs it: headers and integer tensors travel over a
  gloo group of their own from host memory (topology.make_groups with host_channel; here forced
  with count_syncs.py --meta-channel, the backend being gloo), floating tensors from the device.
  The receiver reads shapes and integers without waiting: no synchronisation at all, so a step's
  total is the same constant for M = 1 and M = 4.
- wire over one channel (everything from the device; no metadata group): per receive, one read of
  the headers (the receiver must know the shapes to allocate) and, when the bundles hold integers
  (segment ids, targets, owners: what the receiver's host needs), one read of those. This grows
  with M; it is the path the metadata group replaces. A gloo job has no metadata group and needs
  none: its tensors travel through host memory, and neither read waits for the device.
"""

from __future__ import annotations

import json
from collections import Counter
from functools import cache
from pathlib import Path

import pytest
import torch

from _launch import ROOT, check, launch, run_single, write_recipe
from _syncs import SyncCounter

DS_CONFIG = str(ROOT / "ds_configs" / "cpu-fp32.json")  # AdamW, LR schedule, gradient clipping 1.0
SCRIPT = str(ROOT / "tests" / "scripts" / "count_syncs.py")
RECEIVES = {"RecvActivations", "RecvGrads", "RecvTailActivations", "RecvTailGrads", "RecvAdapters"}
STEPS = 2  # with aggregation every 2 steps: one plain step and one that averages
META = "--meta-channel"  # count_syncs.py: headers and integers over a host-side group, as under NCCL

CASES = {
    # name: (clients, server stages, client layers, client tail layers)
    "split": (2, 1, 1, None),
    "split-3-clients-2-stages": (3, 2, 1, None),
    "u-shaped": (2, 1, 1, 1),
    "centralized": (1, 0, None, None),
}


@cache
def _counts(tmp_root: Path, case: str, micro_batches: int, extra: tuple[str, ...] = ()) -> dict:
    """{role: [per step {"instructions": [...], "syncs": [...]}]} of one counted run."""
    clients, stages, client_layers, tail = CASES[case]
    folder = tmp_root / f"{case}-m{micro_batches}{''.join(extra)}"
    if case == "centralized":
        recipe = write_recipe(folder, mode="centralized", deepspeed_config=DS_CONFIG,
                              split={"micro_batches": micro_batches},
                              federation={"clients": 2, "aggregate_every": 2},
                              train={"max_steps": STEPS, "batch_size": 4})
        check(run_single(["--recipe", str(recipe), "--out", str(folder), *extra], script=SCRIPT))
    else:
        recipe = write_recipe(folder, deepspeed_config=DS_CONFIG,
                              split={"client_layers": client_layers, "server_stages": stages,
                                     "micro_batches": micro_batches, "client_tail_layers": tail},
                              federation={"clients": clients, "aggregate_every": 2},
                              train={"max_steps": STEPS, "batch_size": 4})
        check(launch(clients + stages, ["--recipe", str(recipe), "--out", str(folder), *extra], script=SCRIPT))
    runs = {}
    for path in folder.glob("*.syncs.json"):
        run = json.loads(path.read_text())
        assert run["micro_batches"] == micro_batches and len(run["steps"]) == STEPS
        runs[run["role"]] = run["steps"]
    assert len(runs) == max(clients + stages, 1)
    return runs


@pytest.fixture(scope="module")
def counts(tmp_path_factory):
    root = tmp_path_factory.mktemp("syncs")
    return lambda case, m, *extra: _counts(root, case, m, tuple(extra))


def _compute(step: dict) -> Counter:
    return Counter(f"{s['kind']} {s['what']} @ {s['where']}" for s in step["syncs"] if s["site"] == "compute")


def _own(step: dict) -> Counter:
    """The project's own compute syncs, aggregation left out (see the module's docstring)."""
    return Counter(f"{s['kind']} @ {s['where'].split(':')[0]}" for s in step["syncs"]
                   if s["site"] == "compute" and "deepspeed/" not in s["where"]
                   and not s["where"].startswith("splitlora_ds/federation/"))


def _wire(step: dict) -> int:
    return sum(s["site"] == "wire" for s in step["syncs"])


def _all(step: dict) -> Counter:
    return Counter(f"{s['site']} {s['kind']} {s['what']} @ {s['where']}" for s in step["syncs"])


@pytest.mark.launcher
@pytest.mark.parametrize("case", list(CASES))
def test_a_step_waits_for_the_device_a_fixed_few_times_whatever_the_micro_batches(counts, case):
    one, four = counts(case, 1), counts(case, 4)
    assert sorted(one) == sorted(four)
    for role in one:
        for step in range(STEPS):
            a, b = one[role][step], four[role][step]
            assert len(b["instructions"]) > len(a["instructions"])  # M = 4 runs more instructions...
            assert _compute(a) == _compute(b), (role, step)  # ...and waits exactly as often
            assert _own(b) == Counter({"event @ splitlora_ds/timing.py": 1,
                                       "read @ splitlora_ds/runtime/stats.py": 1}), (role, step, b["syncs"])
            if "AverageAdapters" not in b["instructions"]:
                assert not any(s["where"].startswith("splitlora_ds/federation/") for s in b["syncs"])


@pytest.mark.launcher
@pytest.mark.parametrize("case", list(CASES))
def test_the_wire_reads_headers_and_integers_once_per_receive(counts, case):
    for m in (1, 4):
        for role, steps in counts(case, m).items():
            for step in steps:
                receives = [i for i in step["instructions"] if i in RECEIVES]
                # activations (not a U-shaped server's tail gradients) carry integers
                with_integers = [i for i in receives if i == "RecvActivations"]
                assert _wire(step) == len(receives) + len(with_integers), (role, m, step["syncs"])
                assert all(s["kind"] == "download" for s in step["syncs"] if s["site"] == "wire")


@pytest.mark.launcher
@pytest.mark.parametrize("case", [c for c in CASES if c != "centralized"])
def test_with_a_metadata_channel_the_wire_never_waits_and_a_step_waits_the_same_whatever_the_micro_batches(
        counts, case):
    one, four, single = counts(case, 1, META), counts(case, 4, META), counts(case, 4)
    assert sorted(one) == sorted(four) == sorted(single)
    receives = 0
    for role in four:
        for step in range(STEPS):
            a, b = one[role][step], four[role][step]
            receives += sum(i in RECEIVES for i in b["instructions"])
            assert _wire(a) == _wire(b) == 0, (role, step, b["syncs"])
            assert _all(a) == _all(b), (role, step)  # the whole step: one constant for any M
            assert _compute(b) == _compute(single[role][step]), (role, step)  # the channel is the wire's affair
    assert receives > 0


@pytest.mark.launcher
def test_more_clients_and_server_stages_add_no_compute_sync(counts):
    small, large = counts("split", 4), counts("split-3-clients-2-stages", 4)
    for step in range(STEPS):
        assert {_own(steps[step]) == _own(small["server0"][step]) for steps in large.values()} == {True}


@pytest.mark.launcher
def test_a_read_per_micro_batch_is_counted(counts):
    """The count can fail: a Forward that reads one value of its output on the host (as the
    executor read real-token counts and emptiness before issue 21) shows as M more waits."""
    plain, reading = counts("split", 4), counts("split", 4, "--read-per-micro-batch")
    for role in plain:
        for a, b in zip(plain[role], reading[role]):
            extra = _compute(b) - _compute(a)
            forwards = b["instructions"].count("Forward")
            assert sum(extra.values()) == forwards == 4, (role, extra)
            assert all(key.startswith("item ") for key in extra)


# ---------------------------------------------------------------------------- the counter itself
FAKE = torch.device("cpu", 0)


def _count(fn, *device_tensors) -> dict[str, int]:
    counter = SyncCounter(FAKE)
    counter.tag(*device_tensors)
    with counter.counting():
        fn()
    return counter.summary()


def test_host_reads_of_device_values_count_and_host_work_does_not():
    host = torch.tensor([[1, 2, 0], [3, 0, 0]])
    dev = host.clone()
    assert _count(lambda: (int(host.sum()), host.tolist(), host.nonzero(), host[host > 0]), dev) == {}
    assert _count(lambda: int(dev.sum()), dev) == {"item": 1}
    assert _count(lambda: bool((dev > 0).any()), dev) == {"item": 1}
    assert _count(lambda: dev.tolist(), dev) == {"read": 1}
    assert _count(lambda: dev.nonzero(), dev) == {"shape": 1}
    assert _count(lambda: dev[dev > 0], dev) == {"shape": 1}
    assert _count(lambda: torch.bincount(dev.flatten()), dev) == {"shape": 1}
    assert _count(lambda: dev.cpu().tolist(), dev) == {"download": 1}  # the copy waits, not the read


def test_moves_to_the_device_count_only_when_they_block():
    host = torch.arange(6)
    assert _count(lambda: host.to(FAKE)) == {"upload": 1}
    assert _count(lambda: torch.tensor([1, 2], device=FAKE)) == {"upload": 1}
    assert _count(lambda: host.to(FAKE, non_blocking=True)) == {}
    assert _count(lambda: torch.zeros(3, device=FAKE)) == {}  # made on the device


def test_device_tensors_are_followed_through_ops_views_autograd_and_t_device():
    weight = torch.ones(3, requires_grad=True)

    def step():
        x = torch.randn(4, 3, device=FAKE)
        (x * weight).sum().backward()
        index = torch.arange(2, device=x.device)  # placed "next to" x: on the device
        assert x.device == FAKE and torch.ones(1).device == torch.device("cpu")
        x[:, 0].index_select(0, index).sum().item()
        weight.grad.sum().item()

    assert _count(step, weight) == {"item": 2}


def test_mixing_device_and_host_tensors_counts_unless_the_host_one_is_a_scalar():
    dev = torch.ones(3)
    assert _count(lambda: dev + torch.ones(3), dev) == {"mixed": 1}
    assert _count(lambda: dev * torch.tensor(2.0), dev) == {}


def test_a_steps_figures_stay_on_the_device_until_one_read_at_its_end():
    from splitlora_ds.runtime.stats import StepStats

    stats = StepStats(0)
    sums = [torch.tensor([1.5, 0.0], dtype=torch.float64), torch.tensor([0.5, 2.0], dtype=torch.float64)]
    norm = torch.tensor([3.0], dtype=torch.float64)
    counter = SyncCounter(FAKE)
    counter.tag(*sums, norm)
    with counter.counting():
        stats.add_loss(sums[0], [3, 0])  # token counts come from the host
        stats.add_loss(sums[1], [1, 4])
        stats.set_grad_norm(norm)
        assert counter.summary() == {} and stats.loss is None
        stats.finish()
    assert counter.summary() == {"read": 1}
    assert (stats.client_sum, stats.client_tokens, stats.tokens) == ([2.0, 2.0], [4, 4], 8)
    assert (stats.loss_sum, stats.loss, stats.grad_norm) == (4.0, 0.5, 3.0)


def test_sums_over_the_clients_replace_the_ranks_own_figures():
    from splitlora_ds.runtime.stats import StepStats

    stats = StepStats(0)
    stats.add_loss(torch.tensor([1.0, 0.0], dtype=torch.float64), [2, 0])
    stats.set_reduced(torch.tensor([1.0, 3.0, 2.0, 6.0], dtype=torch.float64))  # sums, then tokens
    stats.finish()
    assert (stats.client_sum, stats.client_tokens, stats.loss) == ([1.0, 3.0], [2, 6], 0.5)
    assert StepStats(1).finish().loss is None  # a rank that scored nothing reports no loss
