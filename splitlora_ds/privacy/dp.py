"""Differential privacy: the Gaussian mechanism on what a client releases, with accounting.

- Activations (`privacy.activation_clip` C, `privacy.activation_noise` sigma): each sample's
  cut-layer activations (one row, its real tokens) are scaled to L2 norm <= C, then N(0, (sigma C)^2)
  is added to every real position before they leave the client. Clipping is part of the forward
  pass, so the client's adapters train through it; the noise is not (it has no gradient).
- Updates (DP-FedAvg, client level; `privacy.update_clip` S, `privacy.update_noise` sigma): at an
  aggregation each client's update since the last global adapters is clipped to L2 norm <= S and
  weighted; the weighted sum gets N(0, (sigma S w_max)^2) per entry, w_max being the largest
  client weight (the most one client can move the sum), added as C independent shares of
  variance (sigma S w_max)^2 / C, one per client, so no single rank needs to be trusted with it.
  Noise comes from torch's global RNG, which checkpoints save and restore (exact resume).
- Accounting: Opacus's RDP accountant. Activations: per client, sample-level, one Gaussian
  mechanism of multiplier sigma per local step at sampling rate batch / shard (add/remove
  neighbours; shuffled batches treated as Poisson sampling, as is usual). Updates: client-level,
  one mechanism of multiplier sigma per aggregation with every client taking part (rate 1).
"""

from __future__ import annotations

from typing import Sequence

import torch


def clip_rows(hidden: torch.Tensor, mask: torch.Tensor, max_norm: float) -> torch.Tensor:
    """hidden [B, T, H] with each row's real positions (mask [B, T]) scaled to L2 norm <= max_norm
    (padding positions are zeroed: they carry nothing and must not count in the norm)."""
    real = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    norms = real.flatten(1).norm(dim=1)
    factor = (max_norm / (norms + 1e-12)).clamp(max=1.0)
    return real * factor.view(-1, 1, 1)


@torch.no_grad()
def clip_update_(current: Sequence[torch.Tensor], start: Sequence[torch.Tensor], max_norm: float) -> float:
    """current <- start + (current - start) scaled to L2 norm <= max_norm, over all tensors at once;
    returns the update's norm before clipping."""
    deltas = [c.float() - s.float() for c, s in zip(current, start)]
    norm = float(torch.sqrt(sum((d.pow(2).sum() for d in deltas), torch.zeros(()))))
    factor = min(1.0, max_norm / (norm + 1e-12))
    for c, s, d in zip(current, start, deltas):
        c.copy_((s.float() + d * factor).to(c.dtype))
    return norm


def epsilon(noise_multiplier: float, sample_rate: float, steps: int, delta: float) -> float:
    """epsilon(delta) of `steps` Gaussian mechanisms at `sample_rate` (Opacus's RDP accountant);
    inf without noise."""
    if steps == 0:
        return 0.0
    if noise_multiplier <= 0:
        return float("inf")
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    accountant.history = [(noise_multiplier, sample_rate, steps)]
    return float(accountant.get_epsilon(delta))


class ClientPrivacy:
    """One client's DP mechanisms and what they have released so far (its state is checkpointed)."""

    def __init__(self, cfg, sample_rate: float, clients: int, max_weight: float):
        """`cfg`: the recipe's PrivacyConfig; `sample_rate`: batch size / this client's shard size."""
        self.cfg = cfg
        self.sample_rate = min(1.0, sample_rate)
        self.clients = clients
        self.max_weight = max_weight
        self.releases = 0  # training batches whose activations left this client
        self.rounds = 0  # aggregations this client's update took part in
        self.last_global: list[torch.Tensor] | None = None  # the adapters of the last aggregation

    def release(self, hidden: torch.Tensor, mask: torch.Tensor, training: bool) -> torch.Tensor:
        """The activations as they may leave the client."""
        if self.cfg.activation_clip is None:
            return hidden
        out = clip_rows(hidden, mask, self.cfg.activation_clip)
        if self.cfg.activation_noise > 0:
            std = self.cfg.activation_noise * self.cfg.activation_clip
            out = out + torch.randn_like(out) * std * mask.unsqueeze(-1).to(out.dtype)
        self.releases += int(training)
        return out

    @torch.no_grad()
    def before_aggregation_(self, masters: Sequence[torch.Tensor], weight: float) -> None:
        """Clip this client's update and add its noise share (before the weighted sum)."""
        if self.cfg.update_clip is None:
            return
        if self.last_global is None:
            self.last_global = [m.detach().clone() for m in masters]  # never aggregated: the start
        start = [g.to(m.device) for g, m in zip(self.last_global, masters)]  # a resumed run's are on the CPU
        clip_update_(masters, start, self.cfg.update_clip)
        if self.cfg.update_noise > 0:
            std = self.cfg.update_noise * self.cfg.update_clip * self.max_weight
            # the all-reduce multiplies by the weight: divide the share by it beforehand
            for m in masters:
                m.add_(torch.randn_like(m, dtype=torch.float32).to(m.dtype) * (std / self.clients ** 0.5 / weight))
        self.rounds += 1

    def after_aggregation(self, masters: Sequence[torch.Tensor]) -> None:
        if self.cfg.update_clip is not None:
            self.last_global = [m.detach().clone() for m in masters]

    def remember_start(self, masters: Sequence[torch.Tensor]) -> None:
        """The global adapters the run starts from (call after any resume)."""
        if self.cfg.update_clip is not None and self.last_global is None:
            self.last_global = [m.detach().clone() for m in masters]

    def epsilons(self) -> dict[str, float]:
        out = {}
        if self.cfg.activation_clip is not None:
            out["privacy/epsilon_activations"] = epsilon(self.cfg.activation_noise, self.sample_rate, self.releases,
                                                         self.cfg.delta)
        if self.cfg.update_clip is not None:
            out["privacy/epsilon_updates"] = epsilon(self.cfg.update_noise, 1.0, self.rounds, self.cfg.delta)
        return out

    def state_dict(self) -> dict:
        return {"releases": self.releases, "rounds": self.rounds,
                "last_global": [t.cpu() for t in self.last_global] if self.last_global is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.releases, self.rounds = state["releases"], state["rounds"]
        if state["last_global"] is not None:
            self.last_global = [t for t in state["last_global"]]
