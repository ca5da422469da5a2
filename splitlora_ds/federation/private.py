"""DP-FedAvg as composition: a client's update is clipped (and its noise share added) before the
inner strategy sums it, and the result is remembered as the next round's starting point after
(privacy/dp.py has the mechanism and the accounting)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .strategy import Aggregator

if TYPE_CHECKING:
    from ..privacy.dp import ClientPrivacy


class Private:
    """`inner` (FedAvg or SecureFedAvg) under `privacy`'s update mechanism. `weight`: this client's
    FedAvg weight, the one `inner` multiplies by (the noise share is divided by it beforehand)."""

    def __init__(self, inner: Aggregator, privacy: "ClientPrivacy", weight: float):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"Private weight must be in [0, 1], got {weight}")
        self.inner = inner
        self.privacy = privacy
        self.weight = weight

    @property
    def setup_bytes(self) -> tuple[int, int]:
        return self.inner.setup_bytes

    def aggregate_(self, masters: dict[str, torch.Tensor]) -> int:
        tensors = list(masters.values())
        self.privacy.before_aggregation_(tensors, self.weight)
        nbytes = self.inner.aggregate_(masters)
        self.privacy.after_aggregation(tensors)
        return nbytes
