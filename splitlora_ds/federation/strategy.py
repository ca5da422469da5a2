"""What the engine asks of an aggregation strategy (FedAvg, secure FedAvg, the low-rank exchange,
any of them under differential privacy): one call per AverageAdapters instruction."""

from __future__ import annotations

from typing import Protocol

import torch


class Aggregator(Protocol):
    # (sent, received) bytes that building the strategy moved, once per run (secure aggregation's
    # key agreement; (0, 0) for the others): the caller adds them to its traffic counters.
    setup_bytes: tuple[int, int]

    def aggregate_(self, masters: dict[str, torch.Tensor]) -> int:
        """Replace this participant's adapter masters (fp32 copies, in place) by the aggregate; return the
        bytes this participant would upload (counted as traffic)."""
        ...
