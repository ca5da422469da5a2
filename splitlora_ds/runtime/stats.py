"""What one training step or one evaluation pass reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional, Sequence

import torch

from .instructions import COMPUTE


@dataclass
class StepStats:
    """A step's figures. While the step runs, what the device computes (loss sums, the gradient
    norm, sums over clients) stays there: reading a device value makes the host wait for the
    device, so `finish()` reads them all at once at the step's end."""

    step: int
    seconds: float = 0.0
    loss: Optional[float] = None  # mean token loss over every client's tokens (the loss's role only)
    tokens: int = 0
    client_sum: list[float] = field(default_factory=list)  # each client's summed token loss
    client_tokens: list[int] = field(default_factory=list)
    lr: float = 0.0
    averaged: bool = False
    loss_sum: float = 0.0
    # Seconds per instruction kind: what the rank computed and what it spent sending or waiting.
    seconds_by: dict[str, float] = field(default_factory=dict)
    positions: int = 0  # rows x (packed or padded) length this rank ran forward
    real_tokens: int = 0  # of `positions`: the real (non-padding) ones
    grad_norm: Optional[float] = None  # the global gradient norm before clipping (ClipGradients)
    # Device values that finish() reads: each client's summed token loss so far [clients] float64;
    # every client's (loss sum, tokens) summed over the clients [2 x clients] float64
    # (ReduceLossStats: it replaces the rank's own figures); the gradient norm.
    _client_sum: Optional[torch.Tensor] = field(default=None, repr=False)
    _reduced: Optional[torch.Tensor] = field(default=None, repr=False)
    _grad_norm: Optional[torch.Tensor] = field(default=None, repr=False)

    @property
    def compute_seconds(self) -> float:
        return sum(v for k, v in self.seconds_by.items() if k in COMPUTE)

    @property
    def client_loss(self) -> list[float]:
        return [s / max(t, 1) for s, t in zip(self.client_sum, self.client_tokens)]

    def add_loss(self, client_sum: torch.Tensor, client_tokens: Sequence[int]) -> None:
        """Add one micro-batch's scored tokens: each client's summed token loss (a tensor, left
        where it is until finish()) and each client's token count (known on the host)."""
        if not self.client_tokens:
            self.client_tokens = [0] * len(client_tokens)
        self.client_tokens = [a + int(b) for a, b in zip(self.client_tokens, client_tokens)]
        self._client_sum = client_sum if self._client_sum is None else self._client_sum + client_sum

    def own_loss(self, clients: int, device: torch.device) -> tuple[torch.Tensor, list[int]]:
        """This rank's (summed token loss [clients] float64 on `device`, token counts) so far."""
        if self._client_sum is None:
            return torch.zeros(clients, dtype=torch.float64, device=device), [0] * clients
        return self._client_sum, list(self.client_tokens)

    def set_reduced(self, sums_and_tokens: torch.Tensor) -> None:
        """Every client's loss sums and token counts, [2 x clients], summed over the clients."""
        self._reduced = sums_and_tokens

    def set_grad_norm(self, norm: torch.Tensor) -> None:
        self._grad_norm = norm

    def finish(self) -> "StepStats":
        """Read what the step left on the device into plain numbers: one transfer per device
        (the step's last synchronisation but the clock's), then the loss as before."""
        pending = {name: t for name, t in (("reduced", self._reduced), ("grad_norm", self._grad_norm),
                                           ("client_sum", self._client_sum if self._reduced is None else None))
                   if t is not None}
        values = _read_together(pending)
        self._client_sum = self._reduced = self._grad_norm = None
        if "grad_norm" in values:
            self.grad_norm = values["grad_norm"][0]
        if "reduced" in values:
            both = values["reduced"]
            half = len(both) // 2
            self.client_sum, self.client_tokens = both[:half], [int(t) for t in both[half:]]
        elif "client_sum" in values:
            self.client_sum = values["client_sum"]
        else:
            return self
        self.loss_sum = float(sum(self.client_sum))
        self.tokens = int(sum(self.client_tokens))
        self.loss = self.loss_sum / max(self.tokens, 1)
        return self


def _read_together(tensors: dict[str, torch.Tensor]) -> dict[str, list[float]]:
    """Each tensor's values as Python floats, with one read per device the tensors live on."""
    by_device: dict[torch.device, list[str]] = {}
    for name, t in tensors.items():
        by_device.setdefault(t.device, []).append(name)
    out: dict[str, list[float]] = {}
    for names in by_device.values():
        flat = torch.cat([tensors[n].detach().reshape(-1).double() for n in names]).tolist()
        for n in names:
            size = tensors[n].numel()
            out[n], flat = flat[:size], flat[size:]
    return out


@dataclass
class EvalStats:
    """Token-weighted validation loss over every client's validation data."""

    loss_sum: float = 0.0
    tokens: int = 0
    client_loss_sum: list[float] = field(default_factory=list)
    client_tokens: list[int] = field(default_factory=list)
    seconds: float = 0.0

    def add(self, step: StepStats) -> None:
        self.loss_sum += step.loss_sum
        self.tokens += step.tokens
        if not self.client_tokens:
            self.client_loss_sum = [0.0] * len(step.client_tokens)
            self.client_tokens = [0] * len(step.client_tokens)
        for c, (loss_sum, tokens) in enumerate(zip(step.client_sum, step.client_tokens)):
            self.client_loss_sum[c] += loss_sum
            self.client_tokens[c] += tokens

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)

    @property
    def client_loss(self) -> list[float]:
        return [s / max(t, 1) for s, t in zip(self.client_loss_sum, self.client_tokens)]
