"""Aggregating LoRA adapters of different ranks, as pure functions.

A participant p holds, for one adapted module, A_p [r_p, d_in] and B_p [d_out, r_p] with scaling
s_p (peft's alpha / r), so its update is dW_p = s_p B_p A_p; its aggregation weight is w_p.

- `stack`: the exact ("noise-free") combination. Concatenating the weighted B's and the A's
  along the rank dimension gives factors whose product is sum_p w_p dW_p, with no cross terms.
- `refactor`: hands that sum back to a participant of rank r: its best rank-r approximation
  (truncated SVD, computed from the stacked factors through two QRs, never forming d_out x d_in),
  exact whenever r >= rank(sum). A's rows come out orthonormal and B carries the singular
  values, so no rank slot is ever left with A and B both zero (a dead direction that gradient
  descent could not revive; e.g. the first round, when every B is still zero).
- `fedavg`: SplitLoRA's average of A and of B (equal ranks only); zero_pad with equal ranks.
- `zero_pad`: the HetLoRA-style baseline: pad every A and B with zeros to the largest rank,
  average the factors, truncate back to each rank. B_avg A_avg differs from sum_p w_p dW_p by the
  cross terms w_p w_q B_p A_q: the aggregation noise HSplitLoRA avoids. With equal ranks it is
  exactly FedAvg of the factors.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

METHODS = ("fedavg", "stacked", "zero_pad")


@dataclass(frozen=True)
class Factors:
    """One participant's LoRA factors for one module."""

    A: torch.Tensor  # [r, d_in]
    B: torch.Tensor  # [d_out, r]
    scale: float  # s = alpha / r (peft's `scaling`)

    @property
    def rank(self) -> int:
        return self.A.shape[0]

    def delta(self) -> torch.Tensor:
        return self.scale * (self.B.double() @ self.A.double())


def _check(parts: Sequence[Factors], weights: Sequence[float]) -> None:
    if not parts or len(parts) != len(weights):
        raise ValueError(f"need one weight per participant, got {len(parts)} participants and {len(weights)} weights")
    d_out, d_in = parts[0].B.shape[0], parts[0].A.shape[1]
    for i, p in enumerate(parts):
        if p.A.dim() != 2 or p.B.dim() != 2 or p.B.shape[1] != p.A.shape[0]:
            raise ValueError(f"participant {i}: A {tuple(p.A.shape)} and B {tuple(p.B.shape)} are not LoRA factors")
        if (p.B.shape[0], p.A.shape[1]) != (d_out, d_in):
            raise ValueError(f"participant {i}: adapts a {p.B.shape[0]}x{p.A.shape[1]} weight, "
                             f"participant 0 a {d_out}x{d_in} one")


def stack(parts: Sequence[Factors], weights: Sequence[float]) -> tuple[torch.Tensor, torch.Tensor]:
    """(A_s [sum r_p, d_in], B_s [d_out, sum r_p]) with B_s @ A_s == sum_p w_p s_p B_p A_p (float64)."""
    _check(parts, weights)
    A = torch.cat([p.A.double() for p in parts], dim=0)
    B = torch.cat([(w * p.scale) * p.B.double() for p, w in zip(parts, weights)], dim=1)
    return A, B


def svd_of_product(A_s: torch.Tensor, B_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(U, S, V^T) of B_s @ A_s through two QRs and the SVD of a small core: never d_out x d_in."""
    Qb, Rb = torch.linalg.qr(B_s.double())  # B_s = Qb Rb
    Qa, Ra = torch.linalg.qr(A_s.double().T)  # A_s = Ra^T Qa^T
    U, S, Vh = torch.linalg.svd(Rb @ Ra.T)  # the product is (Qb U) S (Qa Vh^T)^T
    return Qb @ U, S, (Qa @ Vh.T).T


def refactor(A_s: torch.Tensor, B_s: torch.Tensor, rank: int, scale: float,
             svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (A [rank, d_in], B [d_out, rank]) with scale * B @ A the best rank-`rank`
    approximation of B_s @ A_s (exact when that product has rank <= `rank`). `svd`: that
    product's `svd_of_product`, when several ranks are cut from one stack."""
    return truncate(svd if svd is not None else svd_of_product(A_s, B_s), rank, scale)


def truncate(svd: tuple[torch.Tensor, torch.Tensor, torch.Tensor], rank: int,
             scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Rank-`rank` factors (A, B) with scale * B @ A the best rank-`rank` approximation of the
    matrix whose SVD (U, S, V^T) is `svd` (of a stack, `svd_of_product`, or of a dense sum, as
    secure aggregation reveals it). Signs are canonical (each A row's largest entry positive):
    an SVD fixes every singular pair only up to sign, and two routes to the same sum (the stack,
    the dense matrix) must hand every participant the same factors, not merely the same product."""
    if rank < 1:
        raise ValueError(f"rank must be >= 1, got {rank}")
    U, S, Vh = svd
    k = min(rank, S.numel())
    A = Vh[:k]  # orthonormal rows
    B = U[:, :k] * S[:k] / scale
    sign = torch.sign(A.gather(1, A.abs().argmax(dim=1, keepdim=True))).squeeze(1)
    sign[sign == 0] = 1.0
    A, B = A * sign[:, None], B * sign
    if k < rank:
        # More rank than the stack has (e.g. d_in < rank): the extra A rows are further
        # orthonormal directions (zero in the product because their B columns are zero).
        extra = _orthonormal_complement(A, rank - k)
        A = torch.cat([A, extra])
        B = torch.cat([B, B.new_zeros(B.shape[0], rank - k)], dim=1)
    return A, B


def _orthonormal_complement(rows: torch.Tensor, n: int) -> torch.Tensor:
    d = rows.shape[1]
    if rows.shape[0] + n > d:
        raise ValueError(f"cannot hold rank {rows.shape[0] + n} adapters on a {d}-wide input")
    basis = torch.linalg.qr(torch.cat([rows, torch.eye(d, dtype=rows.dtype, device=rows.device)]).T)[0].T
    return basis[rows.shape[0]:rows.shape[0] + n]


def zero_pad(parts: Sequence[Factors], weights: Sequence[float]) -> list[Factors]:
    """HetLoRA-style: factors zero-padded to the largest rank, averaged, truncated back per participant."""
    _check(parts, weights)
    top = max(p.rank for p in parts)
    A = sum(w * torch.nn.functional.pad(p.A.double(), (0, 0, 0, top - p.rank)) for p, w in zip(parts, weights))
    B = sum(w * torch.nn.functional.pad(p.B.double(), (0, top - p.rank)) for p, w in zip(parts, weights))
    return [Factors(A[:p.rank].to(p.A.dtype), B[:, :p.rank].to(p.B.dtype), p.scale) for p in parts]


def aggregate(parts: Sequence[Factors], weights: Sequence[float], method: str = "stacked") -> list[Factors]:
    """Every participant's new factors for one module, at its own rank and scale."""
    if method == "fedavg":
        if len({p.rank for p in parts}) > 1:
            raise ValueError(f"fedavg averages factors of one rank, got ranks {[p.rank for p in parts]}; "
                             "use stacked or zero_pad")
        return zero_pad(parts, weights)
    if method == "zero_pad":
        return zero_pad(parts, weights)
    if method != "stacked":
        raise ValueError(f"unknown aggregation method {method!r}; use one of {METHODS}")
    A_s, B_s = stack(parts, weights)
    svd = svd_of_product(A_s, B_s)  # once; each participant takes its own rank from it
    out = []
    for p in parts:
        A, B = refactor(A_s, B_s, p.rank, p.scale, svd)
        out.append(Factors(A.to(p.A.dtype), B.to(p.B.dtype), p.scale))
    return out


# peft's parameter names: "<module>.lora_A.default.weight" (Linear, Conv1D) or
# "<module>.lora_embedding_A.default" (Embedding, whose update is (B A)^T: the same arithmetic).
_A_NAME = re.compile(r"^(?P<module>.+)\.lora_(?P<emb>embedding_)?A\.default(?P<w>\.weight)?$")


def factor_names(state: Mapping[str, torch.Tensor]) -> dict[str, tuple[str, str]]:
    """{module: (A key, B key)} of the LoRA factors in a state dict."""
    out = {}
    for key in state:
        m = _A_NAME.match(key)
        if m is not None:
            out[m["module"]] = (key, f"{m['module']}.lora_{m['emb'] or ''}B.default{m['w'] or ''}")
    return out


def aggregate_state_dicts(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[Mapping[str, float]],
                          scales: Sequence[Mapping[str, float]], method: str = "stacked") -> list[dict[str, torch.Tensor]]:
    """Every participant's new LoRA state dict. Participant p holds the modules in states[p]
    (its own subset, at its own ranks), weighs module m by weights[p][m] and scales it by
    scales[p][m]; each module is combined over the participants holding it (their weights must
    add up to 1), and each gets the result at its own rank."""
    if not len(states) == len(weights) == len(scales):
        raise ValueError(f"need one weight map and one scale map per state dict, got {len(states)}, "
                         f"{len(weights)} and {len(scales)}")
    names = [factor_names(s) for s in states]
    out: list[dict[str, torch.Tensor]] = [{} for _ in states]
    for module in sorted(set().union(*names)):
        holders = [p for p in range(len(states)) if module in names[p]]
        w = [weights[p][module] for p in holders]
        if abs(sum(w) - 1.0) > 1e-6:
            raise ValueError(f"{module}: its holders' weights add up to {sum(w):.6f}, not 1")
        parts = [Factors(states[p][names[p][module][0]], states[p][names[p][module][1]], scales[p][module])
                 for p in holders]
        for p, new in zip(holders, aggregate(parts, w, method)):
            a_key, b_key = names[p][module]
            out[p][a_key], out[p][b_key] = new.A, new.B
    return out
