"""What a user reads when a run stops: one line on every rank, naming the real cause.

Two kinds of failure, told apart here and nowhere else:
- A lost peer: a rank died or stopped answering, and the ranks talking to it get an error from
  the backend (gloo: "Connection reset/closed by peer", a timeout after dist.timeout_s; nccl: a
  watchdog error). Only such backend, connection and timeout errors of a call with another rank
  are `PeerLost` (`is_peer_failure`). The executor knows which instruction was waiting and so
  which peers it was waiting on.
- A rank's own error (out of memory, a bad tensor, a bug): the rank where it happened prints its
  traceback and one line (`describe_error`), leaves that line on the job's store
  (`FailureBoard`) and exits 1; every other rank then loses a peer, reads the board and says
  which rank failed first and why, instead of blaming the peer it was waiting on.
"""

from __future__ import annotations

import json
import re
import socket
import time
import traceback
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
import torch.distributed as dist

from .topology import Topology

EXIT_ERROR = 1  # this rank failed with an error of its own
EXIT_PEER_LOST = 3  # a peer died or stopped answering: resuming from a checkpoint may continue
EXIT_PEER_FAILED = 4  # another rank failed with an error of its own (see its output)
RESUME_ADVICE = "Restart every rank with --resume latest to continue from the last checkpoint"

# What gloo, nccl and the store say when a peer is gone or silent. Matched only for errors of calls
# with another rank; everything else is the rank's own error.
_BACKEND_MESSAGE = re.compile(
    r"gloo/|closed by peer|reset by peer|connection (?:reset|closed|refused|lost)|broken pipe|timed out|"
    r"timeout|pair closure|nccl|watchdog|socket", re.IGNORECASE)
_OOM_SIZE = re.compile(r"(?i:tried to allocate) ([0-9]+ bytes|[0-9.]+ ?[KMGT]?i?B)")
_DIST_ERRORS = tuple(getattr(dist, name) for name in ("DistBackendError", "DistNetworkError", "DistStoreError")
                     if hasattr(dist, name))


def is_peer_failure(error: BaseException) -> bool:
    """Whether `error`, raised by a call with another rank, says that the peer is gone or silent."""
    if is_out_of_memory(error):
        return False
    if isinstance(error, _DIST_ERRORS):
        return True
    return isinstance(error, RuntimeError) and bool(_BACKEND_MESSAGE.search(str(error)))


def is_out_of_memory(error: BaseException) -> bool:
    """CUDA's OutOfMemoryError, or the CPU allocator's failure (a RuntimeError)."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text.lower())


def note_where(error: BaseException, step: int, during: str) -> None:
    """Remember the step and instruction an error happened in (the first place to note it wins)."""
    if getattr(error, "splitlora_where", None) is None:
        try:
            error.splitlora_where = (step, during)
        except AttributeError:  # an exception type without a __dict__
            pass


def _where(error: BaseException) -> str:
    step, during = getattr(error, "splitlora_where", None) or (None, "")
    at = f" at step {step}" if step is not None and step >= 0 else (" during evaluation" if step == -1 else "")
    return f"{at} ({during})" if during else at


def _first_line(error: BaseException) -> str:
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else "(no message)"


def describe_error(error: BaseException, who: str, device: str) -> str:
    """The one line a rank prints for its own error (after its traceback)."""
    where = _where(error)
    if is_out_of_memory(error):
        size = _OOM_SIZE.search(str(error))
        tried = f"tried to allocate {size.group(1)}" if size else _first_line(error)
        return (f"{who} ran out of memory{where} on {device}: {tried}. Lower train.batch_size or "
                f"train.pack_length, raise split.micro_batches (smaller micro-batches), or move layers off "
                f"this stage with split.client_layers")
    return f"{who} failed{where}: {type(error).__name__}: {_first_line(error)}"


def who(topology: Topology, rank: int) -> str:
    return f"{topology.role_of(rank).name} (rank {rank})"


class PeerLost(RuntimeError):
    """Communication with `peers` (global ranks) failed; `step` is set once the executor knows it."""

    def __init__(self, peers: Sequence[int], cause: BaseException, step: int | None = None, during: str = ""):
        self.peers = tuple(peers)
        self.cause = cause
        self.step = step
        self.during = during
        super().__init__(str(cause))

    def what_was_lost(self, topology: Topology) -> str:
        """Which peer was lost, how and where, as this rank saw it."""
        names = ", ".join(who(topology, p) for p in self.peers) or "a peer"
        text = str(self.cause).lower()
        how = "stopped answering within dist.timeout_s" if "timeout" in text or "timed out" in text else "was lost"
        lost = names if len(self.peers) <= 1 else f"one of {names}"
        return f"{lost} {how}{self._where()}"

    def describe(self, topology: Topology, me: int, first: Optional["Failure"] = None) -> str:
        """The one line a surviving rank prints; `first`: what the board says failed first, when
        another rank posted it (an error of its own, or a loss it saw first)."""
        if first is None:
            return (f"{who(topology, me)}: {self.what_was_lost(topology)}; the run stops here. "
                    f"{RESUME_ADVICE}")
        tail = "see that rank's output" if first.kind == "error" else RESUME_ADVICE
        return f"{who(topology, me)} stopped{self._where()} because {first.line}; {tail}"

    def _where(self) -> str:
        at = f" at step {self.step}" if self.step is not None and self.step >= 0 else ""
        return f"{at} ({self.during})" if self.during else at


def wait_on(works: Sequence, peer: int) -> None:
    """Wait for a peer's transfers; a backend error becomes PeerLost naming that peer."""
    try:
        for w in works:
            w.wait()
    except RuntimeError as e:  # gloo/nccl errors (DistBackendError, timeouts) are RuntimeErrors
        if not is_peer_failure(e):
            raise
        raise PeerLost((peer,), e) from e


def wait_each(works: Sequence[Sequence], peers: Sequence[int]) -> None:
    """Wait for several peers' transfers (works[i] from peers[i]); every peer whose transfers
    fail is named in one PeerLost."""
    lost, first = [], None
    for peer_works, peer in zip(works, peers):
        try:
            wait_on(peer_works, peer)
        except PeerLost as e:
            lost.append(peer)
            first = first or e.cause
    if lost:
        raise PeerLost(lost, first)


@dataclass(frozen=True)
class Failure:
    """What failed first: a rank's own error (`error`), or a peer a rank saw lost (`lost`)."""

    kind: str
    line: str
    gone: tuple[int, ...] = ()  # ranks that will never read the board (the lost ones)


class FailureBoard:
    """The job's record of what failed first, on the rendezvous store, so that every rank can name
    the real cause instead of the peer it happened to be waiting on.

    The first rank to post wins: the rank whose own error stopped the run (it posts before its
    connections close, so before anyone else notices), or the first to see a peer lost (the
    lost rank's neighbour sees it before the others see the neighbour leave). The store lives in
    rank 0's process: when rank 0 itself is gone there is no board (`first` returns None), and
    while a failure is on the board rank 0 leaves last, waiting (at most `linger_s`) until every
    rank but the lost ones has read it.
    """

    _KEY, _DONE = "failure/first", "failure/done"

    def __init__(self, store: dist.Store, rank: int, world: int, linger_s: float, address: tuple[str, int]):
        self.store, self.rank, self.world, self.linger_s = store, rank, world, linger_s
        self.address = address  # where the store listens: probed before use (see _reachable)
        self._up: Optional[bool] = None

    def post(self, failure: Failure) -> None:
        """Record `failure` unless another rank's is there already."""
        if self._reachable():
            record = {"kind": failure.kind, "line": failure.line, "gone": list(failure.gone)}
            self.store.compare_set(self._KEY, "", json.dumps(record))

    def first(self) -> Optional[Failure]:
        """What failed first, None when nobody posted (or the store is gone with rank 0)."""
        if not self._reachable() or not self.store.check([self._KEY]):
            return None
        record = json.loads(self.store.get(self._KEY).decode())
        return Failure(record["kind"], record["line"], tuple(record["gone"]))

    def leave(self) -> None:
        """This rank has said what it had to say. Rank 0, which holds the store, first closes its
        connections (so peers waiting on it notice at once) and then waits for the others."""
        if not self._reachable():
            return
        done = self.store.add(self._DONE, 1)
        if self.rank != 0:
            return
        first = self.first()
        if first is None:
            return
        if dist.is_initialized():
            dist.destroy_process_group()
        readers = self.world - len(first.gone)
        deadline = time.monotonic() + self.linger_s
        while done < readers and time.monotonic() < deadline:
            time.sleep(0.05)
            done = self.store.add(self._DONE, 0)

    def _reachable(self) -> bool:
        """Whether the store still answers. Asked with a plain connection first: a store client
        whose server died prints a C++ stack trace on every call, which must not bury the one
        line a user reads."""
        if self._up is None:
            if self.rank == 0:
                self._up = True
            else:
                try:
                    socket.create_connection(self.address, timeout=2.0).close()
                    self._up = True
                except OSError:
                    self._up = False
        return self._up


def format_traceback(error: BaseException) -> str:
    return "".join(traceback.format_exception(type(error), error, error.__traceback__))


def linger_seconds(timeout_s: float) -> float:
    """How long rank 0 keeps the store up for the others after a failure: long enough for every
    rank to notice a closed connection, bounded so that a hung rank cannot hold the job."""
    return float(min(timeout_s, 30.0))

