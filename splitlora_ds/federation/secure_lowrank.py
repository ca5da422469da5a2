"""Secure aggregation for heterogeneous clients (HSplitLoRA: per-client LoRA ranks and split
points): every participant learns, per module it holds, the weighted sum the plain low-rank
exchange would compute from everyone's factors, and nothing about one participant's factors
beyond what that sum reveals. Same cryptography as `secure` (X25519 pair seeds, HKDF-SHA256,
ChaCha20 masks, fixed point modulo 2^MODULUS_BITS), reused from there.

What is summed, per module m (participant p holds A_p [r_p, d_in], B_p [d_out, r_p], scale s_p,
weight w_p):
- stacked: the dense update w_p s_p B_p A_p [d_out, d_in]. The stacked factors the plain exchange
  gathers multiply out to exactly sum_p w_p s_p B_p A_p, and all `lowrank.refactor` keeps of them is
  that product's truncated SVD; so summing the dense updates and taking the same truncated SVD of
  the revealed sum (float64, `lowrank.truncate`, canonical signs) hands each participant the same
  rank-r_p factors. Summing the factors themselves cannot work: sum_p B_p A_p is not a function of
  sum_p B_p and sum_p A_p (the cross terms), and their concatenation would reveal each one.
- zero_pad (and fedavg, its equal-rank case): the weighted factors zero-padded to the largest rank
  among m's holders, A and B; each participant truncates the sum back to its rank, exactly as
  `lowrank.zero_pad` does.
Fixed point as in `secure` (modulo 2^48), at 2^-24 for factors and 2^-36 for dense updates (see
DENSE_FRACTION_BITS).

Cost (stacked): d_out * d_in int64 words per module instead of r * (d_in + d_out) fp32 values, a
ratio of 2 d_out d_in / (r (d_in + d_out)). GPT-2 tiny test model (n_embd 32, c_attn 32 -> 96):
96*32*8 = 24,576 bytes against 4*(32+96)*4 = 2,048 at r = 4 (12x; 24x at r = 2). LLaMA-2-7B q_proj
(4096 x 4096, r = 16): 4096*4096*8 = 134,217,728 bytes (128 MiB) against 16*(4096+4096)*4 =
524,288 (512 KiB), 256x, per module and round; and each participant runs a dense float64 SVD of
every module it holds. zero_pad costs 2x its factors at the largest rank (int64 words).

Heterogeneous split points: a shared block's modules are held by server stage 0 (for the clients
that cut earlier) and by the clients that cut later. Every participant of the aggregation group
makes the same calls in the same order: one all_gather of public metadata (module names, shapes,
ranks: the buffer layout, and which participants hold which module, follow from the split points
anyway), then one all-reduce of one flat int64 buffer covering every module any participant holds.
A participant writes zeros where it holds no module, and a pair adds its pairwise mask only on the
modules both hold: so each module's slice carries masks only between its holders, and they cancel
there. The key agreement runs once per run over the whole group (server stage 0 included).

What it reveals: each module's weighted sum to the participants (and, like any SecAgg, to whoever
relays the all-reduce: the sum only), the public metadata above, and the sample counts behind the
weights. A module with exactly two holders reveals each one's term to the other (the sum minus its
own), as plain FedAvg of two clients does: inherent in revealing the sum. Server stage 0's term
for a shared block is the copy it trained itself on the earlier-cutting clients' behalf. When a
participant's rank exceeds the rank of the sum, its surplus A rows (with zero B columns) are
arbitrary orthonormal directions, which may differ from the plain exchange's (its come from the
span of the stacked A's, which secure aggregation does not reveal); the product is the same.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from .exchange import LowRankSetup, check_exchange, lora_modules, participant_modules
from .lowrank import METHODS, Factors, factor_names, truncate
from .secure import FRACTION_BITS, SecureAggregator, decode, encode, masked

# Per module, what a participant states about itself before a round: (d_out, d_in, rank).
Holding = Mapping[str, tuple[int, int, int]]

# Dense updates are encoded finer than factors: the singular vectors each participant takes from
# the revealed sum move by (rounding error) / (gap between singular values), and LoRA updates are
# small (entries ~1e-3), so 2^-24 moved the tiny test run's new A's by 4e-3. 2^-36 (1.5e-11)
# keeps them within 1e-6 of the plain exchange's there; the range, +-2^(MODULUS_BITS - 1 - 36) =
# +-2048 per update entry, is far beyond any LoRA update (encode refuses, naming the range).
DENSE_FRACTION_BITS = 36


def fraction_bits(method: str) -> int:
    """The fixed-point resolution of a method's buffer: dense updates (stacked) or factors."""
    return DENSE_FRACTION_BITS if method == "stacked" else FRACTION_BITS


@dataclass(frozen=True)
class Slot:
    """One module's slice of the flat buffer."""

    offset: int
    d_out: int
    d_in: int
    top: int  # the largest rank among its holders (zero_pad's padded rank)
    holders: tuple[int, ...]  # group ranks of the participants holding it
    dense: bool  # stacked: the d_out x d_in update; else the padded A then the padded B

    @property
    def size(self) -> int:
        return self.d_out * self.d_in if self.dense else self.top * (self.d_in + self.d_out)


def buffer_layout(holdings: Sequence[Holding], method: str) -> dict[str, Slot]:
    """Every module any participant holds, in sorted order, laid end to end. The same on every
    participant: it is computed from the same gathered metadata."""
    if method not in METHODS:
        raise ValueError(f"secure low-rank aggregation method must be one of {METHODS}, got {method!r}")
    layout, offset = {}, 0
    for module in sorted(set().union(*holdings)):
        holders = tuple(p for p, h in enumerate(holdings) if module in h)
        shapes = {holdings[p][module][:2] for p in holders}
        if len(shapes) > 1:
            raise ValueError(f"{module}: its holders adapt weights of different shapes {sorted(shapes)}")
        ranks = [holdings[p][module][2] for p in holders]
        if method == "fedavg" and len(set(ranks)) > 1:
            raise ValueError(f"{module}: fedavg averages factors of one rank, got ranks {ranks}")
        (d_out, d_in), = shapes
        slot = Slot(offset, d_out, d_in, max(ranks), holders, dense=method == "stacked")
        layout[module] = slot
        offset += slot.size
    return layout


def buffer_size(layout: Mapping[str, Slot]) -> int:
    return sum(s.size for s in layout.values())


def contribution(own: Mapping[str, tuple[Factors, float]], layout: Mapping[str, Slot]) -> torch.Tensor:
    """This participant's weighted terms (float64), zero on every module it does not hold."""
    flat = torch.zeros(buffer_size(layout), dtype=torch.float64)
    for module, (f, w) in own.items():
        slot = layout[module]
        if slot.dense:
            term = w * f.delta()  # w s B A, float64
        else:
            pad = slot.top - f.rank
            A = torch.nn.functional.pad(f.A.double(), (0, 0, 0, pad))
            B = torch.nn.functional.pad(f.B.double(), (0, pad))
            term = torch.cat([(w * A).flatten(), (w * B).flatten()])
        flat[slot.offset:slot.offset + slot.size] = term.flatten()
    return flat


def shared_positions(layout: Mapping[str, Slot], me: int, peer: int) -> np.ndarray:
    """The buffer positions of the modules both `me` and `peer` hold: where their pair mask goes."""
    spans = [np.arange(s.offset, s.offset + s.size) for s in layout.values() if me in s.holders and peer in s.holders]
    return np.concatenate(spans) if spans else np.zeros(0, dtype=np.int64)


def masked_upload(encoded: np.ndarray, me: int, seeds: Mapping[int, bytes], layout: Mapping[str, Slot],
                  round_index: int) -> np.ndarray:
    """`encoded` plus, for every peer, the pair's mask on the modules both hold (+ for peers above
    `me`, - below). One ChaCha20 stream per pair and round, over those positions in buffer order,
    so no keystream is reused; over each module the masks of its holders add up to zero."""
    out = encoded.copy()
    for peer, seed in seeds.items():
        idx = shared_positions(layout, me, peer)
        if idx.size:
            out[idx] = masked(out[idx], me, {peer: seed}, round_index)
    return out


def unpack(total: torch.Tensor, own: Mapping[str, Factors], layout: Mapping[str, Slot]) -> dict[str, Factors]:
    """Each held module's new factors at this participant's rank and scale, from the revealed sums."""
    out = {}
    for module, f in own.items():
        slot = layout[module]
        seg = total[slot.offset:slot.offset + slot.size].double()
        if slot.dense:
            svd = torch.linalg.svd(seg.view(slot.d_out, slot.d_in), full_matrices=False)
            A, B = truncate(svd, f.rank, f.scale)
        else:
            A = seg[:slot.top * slot.d_in].view(slot.top, slot.d_in)[:f.rank]
            B = seg[slot.top * slot.d_in:].view(slot.d_out, slot.top)[:, :f.rank]
        out[module] = Factors(A.to(f.A.dtype), B.to(f.B.dtype), f.scale)
    return out


class SecureLowRankExchange:
    """Heterogeneous aggregation with pairwise masks: the `LowRankExchange` result (to fixed-point
    resolution) without any participant's factors leaving it in the clear. Building it runs the
    key agreement, a collective of every participant of `group`. `staging`: where the int64
    buffer travels from (host memory under gloo). `stage` is read at every aggregation (an
    importance re-plan may change ranks; the layout is gathered afresh each round)."""

    def __init__(self, stage: nn.Module, modules: set[str], weights: Mapping[str, float], method: str,
                 group: Optional[dist.ProcessGroup], staging: Optional[torch.device] = None):
        check_exchange(type(self).__name__, method, modules, weights)
        self.stage = stage
        self.modules = set(modules)
        self.weights = dict(weights)
        self.method = method
        self.group = group
        self.staging = staging
        n = dist.get_world_size(group)
        self.secure = SecureAggregator(dist.get_rank(group), group, n)
        self.setup_bytes = (self.secure.key_bytes // n, self.secure.key_bytes)

    @classmethod
    def for_participant(cls, stage: nn.Module, client: Optional[int], setup: LowRankSetup,
                        client_weights: list[float], group: Optional[dist.ProcessGroup],
                        staging: Optional[torch.device] = None) -> "SecureLowRankExchange":
        """Client `client`'s exchange over all its adapters, or (client None) server stage 0's over
        the shared blocks it holds for others (the same modules and weights as `LowRankExchange`)."""
        modules, weights = participant_modules(stage, client, setup, client_weights)
        return cls(stage, modules, weights, setup.method, group, staging)

    def _own(self, tensors: Mapping[str, torch.Tensor]) -> tuple[dict[str, Factors], dict[str, tuple[str, str]]]:
        """This participant's factors of its aggregated modules (from `tensors`: masters or
        parameters), and their parameter names."""
        keys = factor_names(dict(self.stage.named_parameters()))
        own = {m: Factors(tensors[keys[m][0]].detach().cpu(), tensors[keys[m][1]].detach().cpu(), scale)
               for m, (_A, _B, scale) in lora_modules(self.stage).items() if m in self.modules}
        return own, keys

    @torch.no_grad()
    def aggregate_(self, masters: Optional[dict[str, torch.Tensor]]) -> int:
        """In place: this participant's factors <- its share of the securely summed aggregate.
        Returns the bytes of its masked upload (int64 words; the whole buffer)."""
        tensors = masters if masters is not None else dict(self.stage.named_parameters())
        own, keys = self._own(tensors)
        holdings: list = [None] * dist.get_world_size(self.group)
        dist.all_gather_object(holdings, {m: (f.B.shape[0], f.A.shape[1], f.rank) for m, f in own.items()},
                               group=self.group)
        layout = buffer_layout(holdings, self.method)
        values = contribution({m: (f, self.weights[m]) for m, f in own.items()}, layout)
        bits = fraction_bits(self.method)
        upload = masked_upload(encode(values, bits), self.secure.index, self.secure.seeds, layout, self.secure.rounds)
        self.secure.rounds += 1
        device = self.staging or next(iter(tensors.values())).device
        buf = torch.from_numpy(upload).to(device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        for module, new in unpack(decode(buf.cpu().numpy(), bits), own, layout).items():
            a_key, b_key = keys[module]
            tensors[a_key].copy_(new.A.to(tensors[a_key].dtype))
            tensors[b_key].copy_(new.B.to(tensors[b_key].dtype))
        return buf.numel() * buf.element_size()
