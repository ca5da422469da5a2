"""A latency model for devices and links the benchmark machine does not have.

Each mode's measured work per round (FLOPs on a client and on the server, bytes each client sends
and receives, messages each way) becomes the simulated time the SplitLoRA paper reports: compute
time plus transmission time, with stragglers. A round is one local step of every client taking
part (the same data in every mode; aggregation traffic is spread over the I steps it covers):

    split:       max_{c in S} T_c + (|S| / N) F_server / R_s
    fedlora:     max_{c in S} T_c
    sequential:  sum_c (T_c + F_server / R_s)
    centralized: F_server / R_s              (all data already at the server)
    with T_c = F_client / R_c + up_c / B_up_c + down_c / B_down_c + n_c * L_c  (client c on its device)

R: FLOP/s, B: bits/s, L: one-way latency, n_c: one-way messages per round, N: the clients,
S: the clients taking part (all N by default). In split and sequential, F_server is the
server's work for all N clients (all of them at once in split, one in each turn of
sequential); the server's work is linear in the clients it serves (their activations are rows
of its batch), so a round of |S| clients costs it |S| / N of that.

Partial participation (`federation.clients_per_round`, logical clients: split and fedlora only):
round r of I local steps samples its own S_r, and each of its local steps takes the time above
with S = S_r, so a slow device slows only the rounds it is sampled in. Over a run

    mean round:  sum_r I_r * T(S_r) / sum_r I_r      (T(S): the round time above; I_r: round r's local steps)
    time to n local steps:  sum_r min(I_r, what is left of n) * T(S_r), rounds in order

(`Sampling`, `mean_round_seconds`, `elapsed_seconds`). Pure functions; tested on hand-computed
cases.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Optional, Sequence

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


def _participants(work: RoundWork, clients: Optional[Sequence[int]]) -> list[int]:
    """The round's clients: `clients` checked (distinct, in range, at least one), or all of them."""
    if clients is None:
        return list(range(work.clients))
    chosen = list(clients)
    if not chosen or len(set(chosen)) != len(chosen) or not all(0 <= c < work.clients for c in chosen):
        raise ValueError(f"round_seconds: clients {chosen} must be distinct ids in 0..{work.clients - 1}, "
                         "at least one")
    if work.mode in ("sequential", "centralized") and len(chosen) != work.clients:
        raise ValueError(f"round_seconds: mode={work.mode} has no partial participation (logical clients "
                         f"run in split and fedlora); got clients {chosen} of {work.clients}")
    return chosen


def round_seconds(work: RoundWork, profile: Profile, clients: Optional[Sequence[int]] = None) -> float:
    """Simulated seconds of one round: one local step of each client in `clients` (the round's
    sampled clients; default all `work.clients`). The round waits for its slowest participant,
    not for devices that sit it out, and the server serves only the participants."""
    chosen = _participants(work, clients)
    server = work.server_flops / (profile.server.tflops * 1e12)
    per_client = [client_seconds(work, profile.client(c), c) for c in chosen]
    if work.mode == "centralized":
        return server
    if work.mode == "fedlora":
        return max(per_client)
    if work.mode == "split":
        # |S| / N of the server's work for all N clients (exactly 1.0 when every client takes part).
        return max(per_client) + server * (len(chosen) / work.clients)
    if work.mode == "sequential":
        # The server serves one client per turn, its share of the round's server work each.
        return sum(per_client) + server
    raise ValueError(f"unknown mode {work.mode!r}")


@dataclass(frozen=True)
class Sampling:
    """A run's rounds under partial participation: round r's sampled clients and its local steps
    (federation.aggregate_every; the last round what is left of train.max_steps). The benchmark
    builds it from federation/participation.py's plan, which every rank also follows."""

    sampled: tuple[tuple[int, ...], ...]
    steps: tuple[int, ...]

    def __post_init__(self) -> None:
        if not self.sampled or len(self.sampled) != len(self.steps):
            raise ValueError(f"Sampling: {len(self.sampled)} sampled sets for {len(self.steps)} rounds; "
                             "give one per round, at least one round")
        if any(n < 1 for n in self.steps):
            raise ValueError(f"Sampling: local steps per round {list(self.steps)} must all be >= 1")

    @property
    def local_steps(self) -> int:
        return sum(self.steps)


def round_times(work: RoundWork, profile: Profile, sampling: Sampling) -> list[float]:
    """Per round of the run: the simulated seconds of one of its local steps (round_seconds over
    that round's sampled clients)."""
    return [round_seconds(work, profile, clients) for clients in sampling.sampled]


def mean_round_seconds(work: RoundWork, profile: Profile, sampling: Sampling) -> float:
    """The simulated round time averaged over the run's local steps (rounds weighted by their
    local steps, so a shorter last round counts less): the figure to compare with a run where
    every client takes part in every round."""
    times = round_times(work, profile, sampling)
    return sum(t * n for t, n in zip(times, sampling.steps)) / sampling.local_steps


def elapsed_seconds(work: RoundWork, profile: Profile, sampling: Optional[Sampling], local_steps: float) -> float:
    """Simulated seconds to the end of the run's first `local_steps` local steps, each at its own
    round's time (without sampling: every client every round, local_steps x round_seconds). Time
    to target is this at the target's step: the rounds before it, not the run's average."""
    if sampling is None:
        return round_seconds(work, profile) * local_steps
    if not 0 <= local_steps <= sampling.local_steps:
        raise ValueError(f"elapsed_seconds: local_steps {local_steps} outside the run's "
                         f"{sampling.local_steps} local steps")
    total, left = 0.0, local_steps
    for t, n in zip(round_times(work, profile, sampling), sampling.steps):
        total += t * min(n, left)
        left -= min(n, left)
        if left <= 0:
            break
    return total


def memory_misfits(work: RoundWork, profile: Profile) -> list[str]:
    """Client devices whose memory is below what a client of this mode measured."""
    if work.mode == "centralized" or not (work.client_memory_bytes or work.per_client_memory_bytes):
        return []
    return [f"client{c} ({profile.client(c).name}: {profile.client(c).memory_gb:g} GB < "
            f"{work.memory_of(c) / 1e9:.2f} GB)" for c in range(work.clients)
            if profile.client(c).memory_gb * 1e9 < work.memory_of(c)]


def simulate(works: Sequence[RoundWork], rounds: Sequence[Optional[float]], profile: Profile,
             samplings: Optional[Sequence[Optional[Sampling]]] = None) -> list[dict]:
    """Per mode: simulated seconds per round and to reach `rounds` rounds (None: never).
    `samplings`: per mode, its run's sampled clients round by round (None: every client every
    round); round_s is then the mean over the run (mean_round_seconds) and to_target_s the time
    of the rounds up to the target (elapsed_seconds)."""
    samplings = list(samplings) if samplings is not None else [None] * len(works)
    if len(samplings) != len(works):
        raise ValueError(f"simulate: {len(samplings)} samplings for {len(works)} modes")
    out = []
    for work, n, sampling in zip(works, rounds, samplings):
        per_round = round_seconds(work, profile) if sampling is None else mean_round_seconds(work, profile, sampling)
        out.append({"mode": work.mode, "round_s": per_round,
                    "to_target_s": None if n is None else elapsed_seconds(work, profile, sampling, n),
                    "memory_misfits": memory_misfits(work, profile)})
    return out
