"""A peer lost mid-run, told as one line instead of a backend traceback.

When a rank dies or stops answering, the ranks talking to it get an error from the backend
(gloo: "Connection closed by peer", a timeout after dist.timeout_s; nccl: a watchdog error). The
executor knows which instruction was waiting and so which peers it was waiting on; it raises
`PeerLost` naming them and the step, and the entry point prints it and exits non-zero.
"""

from __future__ import annotations

from typing import Sequence

from .topology import Topology

EXIT_PEER_LOST = 3


class PeerLost(RuntimeError):
    """Communication with `peers` (global ranks) failed; `step` is set once the executor knows it."""

    def __init__(self, peers: Sequence[int], cause: BaseException, step: int | None = None, during: str = ""):
        self.peers = tuple(peers)
        self.cause = cause
        self.step = step
        self.during = during
        super().__init__(str(cause))

    def describe(self, topology: Topology, me: int) -> str:
        """The one-line message every surviving rank prints."""
        names = ", ".join(f"{topology.role_of(p).name} (rank {p})" for p in self.peers) or "a peer"
        text = str(self.cause).lower()
        how = "stopped answering within dist.timeout_s" if "timeout" in text or "timed out" in text else "was lost"
        lost = names if len(self.peers) <= 1 else f"one of {names}"
        at = f" at step {self.step}" if self.step is not None and self.step >= 0 else ""
        during = f" ({self.during})" if self.during else ""
        return (f"{topology.role_of(me).name} (rank {me}): {lost} {how}{at}{during}; the run stops here. "
                f"Restart every rank with --resume latest to continue from the last checkpoint")


def wait_on(works: Sequence, peer: int) -> None:
    """Wait for a peer's transfers; a backend error becomes PeerLost naming that peer."""
    try:
        for w in works:
            w.wait()
    except RuntimeError as e:  # gloo/nccl errors (DistBackendError, timeouts) are RuntimeErrors
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
