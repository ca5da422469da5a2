"""A latency model for devices and links the benchmark machine does not have.

Each mode's measured work per round (FLOPs on a client and on the server, bytes each client sends
and receives, messages each way) becomes the simulated time the SplitLoRA paper reports: compute
time plus transmission time, with stragglers. A round is one local step of every client (the
same data in every mode):

    split:       max_c (F_client / R_c + up_c / B_up_c + down_c / B_down_c + n_c * L_c) + F_server / R_s
    fedlora:     max_c (F_client / R_c + up_c / B_up_c + down_c / B_down_c + n_c * L_c)
    sequential:  sum_c (F_client / R_c + up_c / B_up_c + down_c / B_down_c + n_c * L_c + F_server / R_s)
    centralized: F_server / R_s              (all data already at the server)

R: FLOP/s, B: bits/s, L: one-way latency, n_c: one-way messages per round. In split and
sequential, F_server is the server's work for the clients it serves (all of them at once in
split, one in each turn of sequential). Pure functions; tested on a hand-computed case.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import yaml

from ..errors import ConfigError


@dataclass(frozen=True)
class Device:
    name: str
    tflops: float  # sustained FLOP/s, in units of 1e12
    memory_gb: float = float("inf")
    uplink_mbps: float = float("inf")  # client -> server, Mbit/s
    downlink_mbps: float = float("inf")
    latency_ms: float = 0.0  # one way

    def __post_init__(self) -> None:
        for name in ("tflops", "memory_gb", "uplink_mbps", "downlink_mbps"):
            if not getattr(self, name) > 0:
                raise ConfigError(f"devices: {self.name}.{name}: {getattr(self, name)} must be > 0")
        if self.latency_ms < 0:
            raise ConfigError(f"devices: {self.name}.latency_ms: {self.latency_ms} must be >= 0")


@dataclass(frozen=True)
class Profile:
    server: Device
    clients: list[Device] = field(default_factory=list)

    def client(self, c: int) -> Device:
        """Client c's device; a shorter list repeats (3 device kinds for 6 clients)."""
        return self.clients[c % len(self.clients)]


def load_profile(path: str | Path) -> Profile:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"--devices: file not found: {path}")
    raw = yaml.safe_load(path.read_text()) or {}
    unknown = set(raw) - {"server", "clients"}
    if unknown or "server" not in raw or not raw.get("clients"):
        raise ConfigError(f"--devices: {path} needs 'server' and a non-empty 'clients' list"
                          + (f"; unknown keys {sorted(unknown)}" if unknown else ""))
    return Profile(_device(raw["server"], "server", path), [_device(d, f"clients[{i}]", path)
                                                              for i, d in enumerate(raw["clients"])])


def _device(raw: dict, where: str, path: Path) -> Device:
    known = {f.name for f in fields(Device)}
    if not isinstance(raw, dict) or set(raw) - known:
        raise ConfigError(f"--devices: {path}: {where}: unknown keys {sorted(set(raw) - known) if isinstance(raw, dict) else raw}; "
                          f"use {sorted(known)}")
    raw = {"name": where, **raw}
    try:
        return Device(**{k: (v if k == "name" else float(v)) for k, v in raw.items()})
    except (TypeError, ValueError) as e:
        raise ConfigError(f"--devices: {path}: {where}: {e}") from None


@dataclass(frozen=True)
class RoundWork:
    """What one round of a mode costs, per client and on the server (measured by the bench)."""

    mode: str
    clients: int
    client_flops: float = 0.0  # per client per round
    server_flops: float = 0.0  # per round (all clients' activations)
    bytes_up: float = 0.0  # per client per round
    bytes_down: float = 0.0
    messages: float = 0.0  # one-way messages per client per round
    client_memory_bytes: float = 0.0
    # Heterogeneous clients (per-client split points and ranks): each one's own figures; when
    # set they replace client_flops / client_memory_bytes client by client.
    per_client_flops: tuple[float, ...] = ()
    per_client_memory_bytes: tuple[float, ...] = ()

    def flops_of(self, client: int) -> float:
        return self.per_client_flops[client] if self.per_client_flops else self.client_flops

    def memory_of(self, client: int) -> float:
        return self.per_client_memory_bytes[client] if self.per_client_memory_bytes else self.client_memory_bytes


def client_seconds(work: RoundWork, device: Device, client: int = 0) -> float:
    """One client's compute plus transmission time in one round."""
    compute = work.flops_of(client) / (device.tflops * 1e12)
    transmit = work.bytes_up * 8 / (device.uplink_mbps * 1e6) + work.bytes_down * 8 / (device.downlink_mbps * 1e6)
    return compute + transmit + work.messages * device.latency_ms / 1e3


def round_seconds(work: RoundWork, profile: Profile) -> float:
    server = work.server_flops / (profile.server.tflops * 1e12)
    per_client = [client_seconds(work, profile.client(c), c) for c in range(work.clients)]
    if work.mode == "centralized":
        return server
    if work.mode == "fedlora":
        return max(per_client)
    if work.mode == "split":
        return max(per_client) + server
    if work.mode == "sequential":
        # The server serves one client per turn, its share of the round's server work each.
        return sum(per_client) + server
    raise ValueError(f"unknown mode {work.mode!r}")


def memory_misfits(work: RoundWork, profile: Profile) -> list[str]:
    """Client devices whose memory is below what a client of this mode measured."""
    if work.mode == "centralized" or not (work.client_memory_bytes or work.per_client_memory_bytes):
        return []
    return [f"client{c} ({profile.client(c).name}: {profile.client(c).memory_gb:g} GB < "
            f"{work.memory_of(c) / 1e9:.2f} GB)" for c in range(work.clients)
            if profile.client(c).memory_gb * 1e9 < work.memory_of(c)]


def simulate(works: Sequence[RoundWork], rounds: Sequence[float], profile: Profile) -> list[dict]:
    """Per mode: simulated seconds per round and to reach `rounds` rounds (None: never)."""
    out = []
    for work, n in zip(works, rounds):
        per_round = round_seconds(work, profile)
        out.append({"mode": work.mode, "round_s": per_round,
                    "to_target_s": None if n is None else per_round * n,
                    "memory_misfits": memory_misfits(work, profile)})
    return out
