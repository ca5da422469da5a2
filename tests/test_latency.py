"""The latency model on hand-computed cases (two clients; four with partial participation), and its
device profiles."""

from pathlib import Path

import pytest

from splitlora_ds.bench.latency import (Device, Profile, RoundWork, Sampling, elapsed_seconds, load_profile,
                                        mean_round_seconds, round_seconds, round_times, simulate)
from splitlora_ds.errors import ConfigError

ROOT = Path(__file__).resolve().parent.parent

PROFILE = Profile(
    server=Device("server", tflops=100),
    clients=[Device("slow", tflops=1, memory_gb=1, uplink_mbps=10, downlink_mbps=50, latency_ms=40),
             Device("fast", tflops=4, memory_gb=8, uplink_mbps=50, downlink_mbps=100, latency_ms=20)])


def work(mode: str) -> RoundWork:
    # 2 TFLOP per client, 10 TFLOP on the server, 10 Mbit up and 20 Mbit down, 2 messages.
    return RoundWork(mode, clients=2, client_flops=2e12, server_flops=1e13, bytes_up=1.25e6, bytes_down=2.5e6,
                     messages=2, client_memory_bytes=2e9)


def test_two_clients_by_hand():
    # slow: 2 s compute + 10/10 s up + 20/50 s down + 2 x 40 ms = 3.48 s
    # fast: 0.5 s + 10/50 s + 20/100 s + 2 x 20 ms = 0.94 s;   server: 1e13 / 1e14 = 0.1 s
    assert round_seconds(work("split"), PROFILE) == pytest.approx(3.48 + 0.1)  # waits for the straggler
    assert round_seconds(work("sequential"), PROFILE) == pytest.approx(3.48 + 0.94 + 0.1)  # every client in turn
    assert round_seconds(work("fedlora"), PROFILE) == pytest.approx(3.48)
    assert round_seconds(work("centralized"), PROFILE) == pytest.approx(0.1)


def test_simulated_time_to_target_and_memory_misfits():
    split, central = simulate([work("split"), work("centralized")], [10, None], PROFILE)
    assert split["to_target_s"] == pytest.approx(35.8) and central["to_target_s"] is None
    assert split["memory_misfits"] == ["client0 (slow: 1 GB < 2.00 GB)"]  # 2 GB measured, 1 GB device
    assert central["memory_misfits"] == []


def test_heterogeneous_clients_use_their_own_work():
    # the slow device now runs a 0.5 TFLOP client (fewer blocks), the fast one a 4 TFLOP client:
    # slow: 0.5 + 1 + 0.4 + 0.08 = 1.98 s, fast: 1 + 0.2 + 0.2 + 0.04 = 1.44 s; + 0.1 s server
    from dataclasses import replace
    hetero = replace(work("split"), per_client_flops=(0.5e12, 4e12), per_client_memory_bytes=(0.5e9, 9e9))
    assert round_seconds(hetero, PROFILE) == pytest.approx(1.98 + 0.1)
    (sim,) = simulate([hetero], [10], PROFILE)
    assert sim["memory_misfits"] == ["client1 (fast: 8 GB < 9.00 GB)"]


def test_every_client_by_default_and_named_are_the_same_figures():
    for mode in ("split", "fedlora", "sequential", "centralized"):
        assert round_seconds(work(mode), PROFILE, [0, 1]) == round_seconds(work(mode), PROFILE)
    everyone = Sampling(((0, 1), (0, 1)), (5, 5))
    assert mean_round_seconds(work("split"), PROFILE, everyone) == pytest.approx(3.58)
    assert elapsed_seconds(work("split"), PROFILE, None, 10) == pytest.approx(35.8)


FAST, SLOW = PROFILE.clients[1], PROFILE.clients[0]
FOUR = Profile(server=Device("server", tflops=100), clients=[FAST, FAST, SLOW, SLOW])


def four(mode: str) -> RoundWork:
    # the two-client work per client; the server's 40 TFLOP are for all 4 clients (0.4 s), 0.1 s per client
    return RoundWork(mode, clients=4, client_flops=2e12, server_flops=4e13, bytes_up=1.25e6, bytes_down=2.5e6,
                     messages=2)


def test_a_round_waits_for_its_sampled_clients_only():
    # fast: 0.94 s, slow: 3.48 s (as above); server: 2 of 4 clients, 0.2 s
    assert round_seconds(four("split"), FOUR, [0, 1]) == pytest.approx(0.94 + 0.2)  # the slow devices sit out
    assert round_seconds(four("split"), FOUR, [1, 2]) == pytest.approx(3.48 + 0.2)  # client 2 is slow
    assert round_seconds(four("split"), FOUR) == pytest.approx(3.48 + 0.4)  # default: all 4, the whole server work
    assert round_seconds(four("split"), FOUR, [3]) == pytest.approx(3.48 + 0.1)
    assert round_seconds(four("fedlora"), FOUR, [0, 1]) == pytest.approx(0.94)
    assert round_seconds(four("fedlora"), FOUR, [1, 2]) == pytest.approx(3.48)


def test_a_slow_device_slows_only_the_rounds_it_is_sampled_in():
    rounds = Sampling(((0, 1), (1, 2)), (2, 2))
    assert round_times(four("split"), FOUR, rounds) == pytest.approx([1.14, 3.68])
    assert mean_round_seconds(four("split"), FOUR, rounds) == pytest.approx((1.14 + 3.68) / 2)
    assert mean_round_seconds(four("fedlora"), FOUR, rounds) == pytest.approx((0.94 + 3.48) / 2)
    # a shorter last round (what is left of max_steps) counts for its local steps
    assert mean_round_seconds(four("split"), FOUR, Sampling(rounds.sampled, (2, 1))) == pytest.approx(
        (2 * 1.14 + 3.68) / 3)
    # time to n local steps: the rounds before it, each at its own time, not the run's mean
    assert elapsed_seconds(four("split"), FOUR, rounds, 1) == pytest.approx(1.14)
    assert elapsed_seconds(four("split"), FOUR, rounds, 3) == pytest.approx(2 * 1.14 + 3.68)
    assert elapsed_seconds(four("split"), FOUR, rounds, 4) == pytest.approx(2 * 1.14 + 2 * 3.68)
    split, fed = simulate([four("split"), four("fedlora")], [3, None], FOUR, [rounds, rounds])
    assert split["round_s"] == pytest.approx(2.41) and split["to_target_s"] == pytest.approx(5.96)
    assert fed["round_s"] == pytest.approx(2.21) and fed["to_target_s"] is None
    (everyone,) = simulate([four("split")], [3], FOUR)  # without sampling: every client every round
    assert everyone["round_s"] == pytest.approx(3.88) and everyone["to_target_s"] == pytest.approx(3 * 3.88)


@pytest.mark.parametrize("call, message", [
    (lambda: round_seconds(four("split"), FOUR, []), "at least one"),
    (lambda: round_seconds(four("split"), FOUR, [1, 1]), "distinct"),
    (lambda: round_seconds(four("split"), FOUR, [4]), r"0\.\.3"),
    (lambda: round_seconds(four("sequential"), FOUR, [0, 1]), "mode=sequential has no partial participation"),
    (lambda: round_seconds(four("centralized"), FOUR, [0]), "mode=centralized has no partial participation"),
    (lambda: Sampling(((0,), (1,)), (2,)), "2 sampled sets for 1 rounds"),
    (lambda: Sampling(((0,),), (0,)), "must all be >= 1"),
    (lambda: elapsed_seconds(four("split"), FOUR, Sampling(((0,),), (2,)), 3), "outside the run's 2 local steps"),
    (lambda: simulate([four("split")], [1], FOUR, []), "0 samplings for 1 modes"),
])
def test_bad_participation_input_is_refused(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_shorter_client_lists_repeat():
    assert [PROFILE.client(c).name for c in range(4)] == ["slow", "fast", "slow", "fast"]


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "devices").glob("*.yaml")))
def test_shipped_profiles_load(name):
    profile = load_profile(ROOT / "devices" / name)
    assert profile.server.tflops > 0 and profile.clients


@pytest.mark.parametrize("text, message", [
    ("clients: [{tflops: 1}]", "needs 'server'"),
    ("server: {tflops: 1}\nclients: [{tflops: 1, upload_mbps: 5}]", "clients[0]: unknown keys ['upload_mbps']"),
    ("server: {tflops: 0}\nclients: [{tflops: 1}]", "server.tflops: 0.0 must be > 0"),
    ("server: {tflops: 1}\nclients: [{tflops: fast}]", "clients[0]"),
])
def test_bad_profiles_name_the_field(tmp_path, text, message):
    path = tmp_path / "d.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_profile(path)
