"""The latency model on a hand-computed two-client case, and its device profiles."""

from pathlib import Path

import pytest

from splitlora_ds.bench.latency import Device, Profile, RoundWork, load_profile, round_seconds, simulate
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
