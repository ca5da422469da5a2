"""Differential privacy: the Gaussian mechanism on what a client releases, with accounting.

- Activations (`privacy.activation_clip` C, `privacy.activation_noise` sigma): each sample's
  cut-layer activations (one row, its real tokens) are scaled to L2 norm <= C, then N(0, (sigma C)^2)
  is added to every real position before they leave the client. Clipping is part of the forward
  pass, so the client's adapters train through it; the noise is not (it has no gradient).
- Tail gradients (U-shaped split; `privacy.tail_gradient_clip` C, `privacy.tail_gradient_noise`
  sigma): the gradient of the client's loss w.r.t. the server's output at its real positions,
  [n, H], computed from its labels, is what its tail sends back. Each sample's part (all its
  positions and features together; with packing a sample is one segment of a row) is scaled to L2
  norm <= C, then N(0, (sigma C)^2) is added per entry before it leaves the client. The client's
  own tail trains on the true gradient; the server and, through it, the client's bottom get the
  released one. The loss is the client's mean over its step's tokens, so one sample's presence
  also rescales the others' gradients: the bound of C per sample that the accounting assumes
  holds exactly when every sample's gradient is clipped (C below all their norms).
- Updates (DP-FedAvg, client level; `privacy.update_clip` S, `privacy.update_noise` sigma): at an
  aggregation each client's update since the last global adapters is clipped to L2 norm <= S and
  weighted; the weighted sum gets N(0, (sigma S w_max)^2) per entry, w_max being the largest
  client weight (the most one client can move the sum), added as C independent shares of
  variance (sigma S w_max)^2 / C, one per client, so no single rank needs to be trusted with it.
  Noise comes from torch's global RNG, which checkpoints save and restore (exact resume).
- Accounting: Opacus's RDP accountant. Activations and tail gradients, each on its own: per
  client, sample-level, one Gaussian mechanism of multiplier sigma per local training step at
  sampling rate batch / shard (add/remove neighbours; shuffled batches treated as Poisson
  sampling, as is usual); a step's micro-batches are disjoint parts of its one sampled batch.
  They cover the messages of training batches only: not the attention mask (sequence lengths),
  not evaluation, and epsilon_tail_gradients not the activations (nor the other way round).
  Updates: client-level, one mechanism of multiplier sigma per aggregation with every client
  taking part (rate 1).
"""

from __future__ import annotations

import warnings
from typing import Sequence

import torch


def clip_rows(hidden: torch.Tensor, mask: torch.Tensor, max_norm: float) -> torch.Tensor:
    """hidden [B, T, H] with each row's real positions (mask [B, T]) scaled to L2 norm <= max_norm
    (padding positions are zeroed: they carry nothing and must not count in the norm)."""
    real = hidden * mask.unsqueeze(-1).to(hidden.dtype)
    return real * _clip_factor(real.flatten(1).norm(dim=1), max_norm).view(-1, 1, 1)


def clip_samples(values: torch.Tensor, sample_ids: torch.Tensor, max_norm: float) -> torch.Tensor:
    """values [n, H] with each sample's rows (those of one id in `sample_ids` [n] int64, each in
    [0, n): at most n samples) scaled to L2 norm <= max_norm over all its rows and features together.
    Norms are summed in fp32 whatever the values' dtype; nothing is read back to the host."""
    squares = values.float().pow(2).sum(dim=1)
    # n bins are enough (an id is < n), and a size known without reading the ids keeps the device async
    norms = torch.zeros(values.shape[0], dtype=torch.float32, device=values.device)
    norms = norms.index_add(0, sample_ids, squares).sqrt()
    return values * _clip_factor(norms, max_norm)[sample_ids].unsqueeze(1).to(values.dtype)


def _clip_factor(norms: torch.Tensor, max_norm: float) -> torch.Tensor:
    """What scales a vector of norm `norms` into the ball of radius max_norm (1 when inside it)."""
    return (max_norm / (norms + 1e-12)).clamp(max=1.0)


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
    with warnings.catch_warnings():
        # With little noise the best RDP order is the smallest Opacus tries: the bound is still
        # valid (only looser), and the warning would repeat at every logged step.
        warnings.filterwarnings("ignore", message="Optimal order is the smallest alpha")
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
        self.tail_releases = 0  # training batches whose tail gradients left this client
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
    def release_tail_gradient(self, values: torch.Tensor, sample_ids: torch.Tensor, training: bool) -> torch.Tensor:
        """The gradient a U-shaped client's tail returns ([n, H], its real positions; `sample_ids`
        [n]: each position's sample, see clip_samples) as it may leave the client. `training`:
        whether to count this as the step's release (one per training step, as `release`)."""
        clip = self.cfg.tail_gradient_clip
        if clip is None:
            return values
        out = clip_samples(values, sample_ids, clip)
        if self.cfg.tail_gradient_noise > 0:
            out = out + torch.randn_like(out) * (self.cfg.tail_gradient_noise * clip)
        self.tail_releases += int(training)
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
        if self.cfg.tail_gradient_clip is not None:
            out["privacy/epsilon_tail_gradients"] = epsilon(self.cfg.tail_gradient_noise, self.sample_rate,
                                                            self.tail_releases, self.cfg.delta)
        if self.cfg.update_clip is not None:
            out["privacy/epsilon_updates"] = epsilon(self.cfg.update_noise, 1.0, self.rounds, self.cfg.delta)
        return out

    def state_dict(self) -> dict:
        return {"releases": self.releases, "tail_releases": self.tail_releases, "rounds": self.rounds,
                "last_global": [t.cpu() for t in self.last_global] if self.last_global is not None else None}

    def load_state_dict(self, state: dict) -> None:
        self.releases, self.rounds = state["releases"], state["rounds"]
        # a checkpoint from before tail-gradient DP existed released no tail gradient under it
        self.tail_releases = state.get("tail_releases", 0)
        if state["last_global"] is not None:
            self.last_global = [t for t in state["last_global"]]
