"""Input reconstruction from cut-layer activations, from the server's position.

- `LearnedInversion` (the EIA / BiSR learning-based family): the attacker passes public text of the
  same kind through the frozen base bottom, applies the same DP mechanism the client's recipe
  applies (its clip and noise are in the job's config, which every party reads), and trains a
  classifier from one position's activations to its token. The classes are the tokens of the
  public text: what the attacker has never seen it cannot name.
- `optimisation_inversion` (the UnSplit / BiSR-forward family): no public data; search for input
  embeddings whose forward through the base bottom matches the received activations, then take
  the nearest row of the token embedding table.

Both adapt to the client's adapters, which the attacker does not know: once training has moved
them, the client's activations are no longer the base bottom's, and an attacker fitted to the
base alone falls to near the unigram guess within a few dozen steps on a random-weight model. The
server holds thousands of the client's activation vectors, so it matches their per-feature mean
and spread to those of the base activations before inverting (moment matching, as AdaBN adapts
a classifier to a shifted domain). This needs no label and recovers most of the loss.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import nn

from .base_model import BaseModel


def padded(rows: Sequence[torch.Tensor], fill: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of [n_i, *rest] as one right-padded batch [S, max n, *rest] and its 0/1 mask [S, max n]."""
    width = max(r.shape[0] for r in rows)
    out = torch.full((len(rows), width, *rows[0].shape[1:]), fill, dtype=rows[0].dtype)
    mask = torch.zeros(len(rows), width, dtype=torch.long)
    for i, r in enumerate(rows):
        out[i, :r.shape[0]] = r
        mask[i, :r.shape[0]] = 1
    return out, mask


Mechanism = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (hidden [B, T, H], mask) -> released


@torch.no_grad()
def public_activations(base: BaseModel, rows: Sequence[torch.Tensor], k: int, release: Optional[Mechanism],
                       batch: int = 32, max_positions: int = 60_000) -> tuple[torch.Tensor, torch.Tensor]:
    """(activations [N, H], tokens [N]) of public token rows through the base bottom at split point
    k, each sample released through `release` (the client's DP mechanism) when given."""
    feats, tokens, total = [], [], 0
    for i in range(0, len(rows), batch):
        ids, mask = padded(rows[i:i + batch])
        hidden = base.bottom(ids, mask, k)
        if release is not None:
            hidden = release(hidden, mask)
        real = mask.bool()
        feats.append(hidden[real])
        tokens.append(ids[real])
        total += int(real.sum())
        if total >= max_positions:
            break
    return torch.cat(feats)[:max_positions], torch.cat(tokens)[:max_positions]


@dataclass
class LearnedInversion:
    """A classifier from one position's activations to its token (an MLP over standardised inputs)."""

    hidden_size: int = 512
    epochs: int = 6
    batch: int = 512
    lr: float = 2e-3
    seed: int = 0

    def fit(self, feats: torch.Tensor, tokens: torch.Tensor) -> "LearnedInversion":
        gen = torch.Generator().manual_seed(self.seed)
        torch.manual_seed(self.seed)
        self.classes = tokens.unique()  # sorted
        labels = torch.searchsorted(self.classes, tokens)
        self.mean, self.std = feats.mean(0), feats.std(0).clamp(min=1e-6)
        x = (feats - self.mean) / self.std
        self.net = nn.Sequential(nn.Linear(x.shape[1], self.hidden_size), nn.GELU(),
                                 nn.Linear(self.hidden_size, len(self.classes)))
        opt = torch.optim.AdamW(self.net.parameters(), lr=self.lr, weight_decay=1e-4)
        steps = self.epochs * math.ceil(len(x) / self.batch)
        sched = torch.optim.lr_scheduler.OneCycleLR(opt, self.lr, total_steps=steps)
        for _ in range(self.epochs):
            for idx in torch.randperm(len(x), generator=gen).split(self.batch):
                loss = nn.functional.cross_entropy(self.net(x[idx]), labels[idx])
                opt.zero_grad()
                loss.backward()
                opt.step()
                sched.step()
        return self

    @torch.no_grad()
    def predict(self, feats: torch.Tensor, adapt: bool = True) -> torch.Tensor:
        """The most likely token of each row of feats [N, H]. `adapt`: standardise them by their own
        statistics, as the public ones were by theirs (see the module docstring)."""
        mean, std = (feats.mean(0), feats.std(0).clamp(min=1e-6)) if adapt else (self.mean, self.std)
        logits = self.net((feats - mean) / std)
        return self.classes[logits.argmax(-1)]


def match_moments(rows: Sequence[torch.Tensor], mean: torch.Tensor, std: torch.Tensor) -> list[torch.Tensor]:
    """rows [n_i, H] moved so that, over all of them, each feature has the given mean and spread."""
    flat = torch.cat(rows)
    scale = std / flat.std(0).clamp(min=1e-6)
    shift = mean - flat.mean(0) * scale
    return [r * scale + shift for r in rows]


def optimisation_inversion(base: BaseModel, hidden: Sequence[torch.Tensor], k: int, steps: int = 100,
                           lr: float = 0.05, chunk: int = 4096) -> list[torch.Tensor]:
    """The tokens whose base-bottom activations best match each received sample hidden[i] [n_i, H]
    (moment-matched to base activations beforehand by the caller, where the adapters have moved)."""
    target, mask = padded(hidden)
    table = base.token_embedding.weight.detach()
    real = mask.bool()
    embeds = table.mean(0).expand(*mask.shape, -1).clone().requires_grad_(True)
    opt = torch.optim.Adam([embeds], lr=lr)
    scale = target[real].pow(2).mean()
    for _ in range(steps):
        out = base.bottom_from_embeddings(embeds, mask, k)
        # a relative squared error, so the step size means the same at any activation scale
        loss = (out - target)[real].pow(2).mean() / scale
        opt.zero_grad()
        loss.backward()
        opt.step()
    found = nearest_tokens(embeds.detach()[real], table, chunk)
    return list(found.split(mask.sum(1).tolist()))


def nearest_tokens(vectors: torch.Tensor, table: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """For each vector, the row of the embedding table nearest in L2 distance."""
    norms = table.pow(2).sum(1)
    out = []
    for part in vectors.split(chunk):
        out.append((norms - 2 * part @ table.T).argmin(1))  # |t|^2 - 2 v.t: |v|^2 is the same for every t
    return torch.cat(out)
