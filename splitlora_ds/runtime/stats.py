"""What one training step or one evaluation pass reports."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from .instructions import COMPUTE


@dataclass
class StepStats:
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

    @property
    def compute_seconds(self) -> float:
        return sum(v for k, v in self.seconds_by.items() if k in COMPUTE)

    @property
    def client_loss(self) -> list[float]:
        return [s / max(t, 1) for s, t in zip(self.client_sum, self.client_tokens)]

    def add_loss(self, client_sum: list[float], client_tokens: list[int]) -> None:
        """Add one micro-batch's scored tokens; `loss` is the mean over every token so far."""
        if not self.client_tokens:
            self.client_sum, self.client_tokens = [0.0] * len(client_tokens), [0] * len(client_tokens)
        self.client_sum = [a + b for a, b in zip(self.client_sum, client_sum)]
        self.client_tokens = [a + b for a, b in zip(self.client_tokens, client_tokens)]
        self.loss_sum = sum(self.client_sum)
        self.tokens = sum(self.client_tokens)
        self.loss = self.loss_sum / max(self.tokens, 1)


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
