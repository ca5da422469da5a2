"""Sequence packing: the real tokens of several sources' sequences in a few rows, no padding.

The server of a split run receives activations [b_c, T_c, H] from several clients; padding them
all to the longest T wastes the compute of every padded position. Packing puts each sequence
("segment") whole into one packed row, several per row, and marks which segment each position
holds; models.base.causal_context turns those segment ids into a block-diagonal causal mask with
positions restarting at 0 per segment, so every real token sees exactly what it saw padded.

A segment is the set of positions of one nonzero id in one source row (a 0/1 mask row: its
tokens; an already packed row: each of its segments), in the order of its positions; this is the
meaning causal_context gives the ids, so packing never changes a token's context.
"""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field
from typing import Sequence

import torch

from ..config import DEFAULT_PACK_LENGTH  # the longest packed row unless one segment is longer
from ..data.examples import IGNORE_INDEX


@dataclass(frozen=True)
class _Segment:
    row: int  # the source row it came from
    start: int  # its first position in that row: with (source, row), the deterministic tie-break
    length: int


@dataclass(frozen=True)
class _SourceSegments:
    """A source's real tokens, grouped segment by segment (each in position order)."""

    tokens: torch.Tensor  # [n] int64 flat (row * T + t) indices, CPU
    counts: list[int]  # tokens per segment, in the order of `segments`
    segments: list[_Segment]


def _source_segments(mask: torch.Tensor, source: int) -> _SourceSegments:
    if mask.dim() != 2:
        raise ValueError(f"masks[{source}]: must be [B, T], got shape {tuple(mask.shape)}")
    seg = mask.detach().to("cpu", torch.long)
    if bool((seg < 0).any()):
        raise ValueError(f"masks[{source}]: segment ids must be >= 0, got {int(seg.min())}")
    width = seg.shape[1]
    flat = seg.flatten()
    real = flat.nonzero().squeeze(1)
    if real.numel() == 0:
        return _SourceSegments(real, [], [])
    rows = real // width
    # one key per (row, id); a stable sort keeps each segment's positions in order
    key = rows * (int(flat.max()) + 1) + flat[real]
    order = torch.sort(key, stable=True).indices
    tokens = real[order]
    _, counts = torch.unique_consecutive(key[order], return_counts=True)
    counts_list = counts.tolist()
    firsts = (counts.cumsum(0) - counts).tolist()
    first_tokens = tokens[firsts].tolist() if counts_list else []
    segments = [_Segment(f // width, f % width, n) for f, n in zip(first_tokens, counts_list)]
    return _SourceSegments(tokens, counts_list, segments)


def _lpt(lengths: Sequence[int], order: Sequence[int], k: int) -> tuple[list[list[int]], int]:
    """Longest processing time: each item (longest first) to the least-loaded of k bins.
    Returns the bins and the largest load."""
    bins: list[list[int]] = [[] for _ in range(k)]
    heap = [(0, b) for b in range(k)]  # (load, bin): ties go to the lowest bin
    for i in order:
        load, b = heapq.heappop(heap)
        bins[b].append(i)
        heapq.heappush(heap, (load + lengths[i], b))
    return bins, max(load for load, _ in heap)


def _assign_bins(lengths: Sequence[int], capacity: int | None) -> list[list[int]]:
    """Item indices per bin, each bin in placement order. Items arrive in tie-break order.

    First-fit decreasing finds how many bins k the capacity needs; longest-processing-time over
    k (and k + 1) bins then evens the loads, which is what bounds the padding: every row is as
    long as the longest. Of those and FFD's own assignment, the one with the fewest positions
    whose rows all stay within capacity (or the longest segment) wins, the earlier on a tie."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    if not order:
        return []
    if capacity is None:
        return [order]
    ffd: list[list[int]] = []
    ffd_load: list[int] = []
    for i in order:
        for b, load in enumerate(ffd_load):
            if load + lengths[i] <= capacity:
                ffd[b].append(i)
                ffd_load[b] += lengths[i]
                break
        else:  # also the fate of a segment longer than capacity: a bin of its own
            ffd.append([i])
            ffd_load.append(lengths[i])
    k = len(ffd)
    bound = max(capacity, lengths[order[0]])
    candidates = [_lpt(lengths, order, k), _lpt(lengths, order, k + 1), (ffd, max(ffd_load))]
    # FFD always fits, so the choice is never empty
    fitting = [(len(bins) * longest, n, bins) for n, (bins, longest) in enumerate(candidates) if longest <= bound]
    return min(fitting, key=lambda c: (c[0], c[1]))[2]


def _check_groups(groups: Sequence[int] | None, n: int) -> list[int]:
    if groups is None:
        return [0] * n
    groups = [int(g) for g in groups]
    if len(groups) != n:
        raise ValueError(f"groups: one per source ({n}), got {len(groups)}")
    return groups


@dataclass(frozen=True)
class PackPlan:
    """Where every real token of several sources lands in the packed rows.

    `segments` is the packed rows' attention mask for models.base.causal_context; `row_group`
    says which group (e.g. entry layer) each packed row's segments belong to."""

    rows: int
    length: int
    segments: torch.Tensor  # [rows, length] int64: segment id (1..n within each row), 0 = padding
    row_group: torch.Tensor  # [rows] int64: the group of the segments in each packed row
    # per source: its mask's shape, the flat (row * T + t) indices of its real tokens, and the
    # matching flat indices in the packed [rows * length] layout (on the masks' device)
    _shapes: tuple[tuple[int, int], ...] = field(repr=False)
    _src: tuple[torch.Tensor, ...] = field(repr=False)
    _dst: tuple[torch.Tensor, ...] = field(repr=False)

    @classmethod
    def build(cls, masks: Sequence[torch.Tensor], capacity: int | None = DEFAULT_PACK_LENGTH,
              groups: Sequence[int] | None = None) -> "PackPlan":
        """Pack the segments of `masks` ([b_i, T_i] segment ids, 0 = padding) into rows of at most
        `capacity` positions (a longer segment gets a row of its own; None: one row per group).
        Segments of different `groups` (one int per source) never share a row; rows come group by
        group, in increasing group order."""
        if not masks:
            raise ValueError("masks: need at least one source")
        if capacity is not None and (isinstance(capacity, bool) or int(capacity) != capacity or capacity < 1):
            raise ValueError(f"capacity: must be a positive int or None, got {capacity!r}")
        group_of = _check_groups(groups, len(masks))
        sources = [_source_segments(m, i) for i, m in enumerate(masks)]
        device = masks[0].device

        # bins per group; every segment gets (packed row, offset in row, id in row)
        placed: dict[tuple[int, int], tuple[int, int, int]] = {}  # (source, k-th segment) -> place
        row_groups: list[int] = []
        row_loads: list[int] = []
        for group in sorted(set(group_of)):
            # (source, k-th segment of it) in (source, row, start) order: the tie-break order
            items = [(s, j) for s, src in enumerate(sources) if group_of[s] == group
                     for j in sorted(range(len(src.segments)),
                                     key=lambda j, src=src: (src.segments[j].row, src.segments[j].start))]
            lengths = [sources[s].segments[j].length for s, j in items]
            for bin_items in _assign_bins(lengths, capacity):
                offset = 0
                for seg_id, i in enumerate(bin_items, start=1):
                    placed[items[i]] = (len(row_loads), offset, seg_id)
                    offset += lengths[i]
                row_groups.append(group)
                row_loads.append(offset)
        rows = len(row_loads)
        length = max(row_loads, default=1)

        segments = torch.zeros(rows * length, dtype=torch.long)
        src_all, dst_all = [], []
        for s, src in enumerate(sources):
            counts = torch.tensor(src.counts, dtype=torch.long)
            places = [placed[(s, j)] for j in range(len(src.segments))]
            starts = torch.tensor([r * length + off for r, off, _ in places], dtype=torch.long)
            ids = torch.tensor([seg_id for _, _, seg_id in places], dtype=torch.long)
            # token k of a segment starting at packed index p goes to p + k
            before = counts.cumsum(0) - counts
            within = torch.arange(int(counts.sum())) - before.repeat_interleave(counts)
            dst = starts.repeat_interleave(counts) + within
            segments[dst] = ids.repeat_interleave(counts)
            src_all.append(src.tokens.to(device, non_blocking=True))
            dst_all.append(dst.to(device, non_blocking=True))
        return cls(rows, length, segments.view(rows, length).to(device, non_blocking=True),
                   torch.tensor(row_groups, dtype=torch.long).to(device, non_blocking=True),
                   tuple((int(m.shape[0]), int(m.shape[1])) for m in masks), tuple(src_all), tuple(dst_all))

    @classmethod
    def padded(cls, masks: Sequence[torch.Tensor], groups: Sequence[int] | None = None) -> "PackPlan":
        """No packing (today's behaviour): every source row stays a row, in source order, right-padded
        to the longest T; its segment ids are kept as they are (left padding included)."""
        if not masks:
            raise ValueError("masks: need at least one source")
        group_of = _check_groups(groups, len(masks))
        for i, m in enumerate(masks):
            if m.dim() != 2:
                raise ValueError(f"masks[{i}]: must be [B, T], got shape {tuple(m.shape)}")
        device = masks[0].device
        length = max(int(m.shape[1]) for m in masks)
        rows = sum(int(m.shape[0]) for m in masks)
        segments, src_all, dst_all, row_groups = [], [], [], []
        offset = 0
        for m, group in zip(masks, group_of):
            b, t = m.shape
            seg = m.to(device, torch.long)
            segments.append(torch.nn.functional.pad(seg, (0, length - t)))
            src = seg.flatten().nonzero().squeeze(1)
            src_all.append(src)
            dst_all.append((offset + src // max(t, 1)) * length + src % max(t, 1))
            row_groups += [group] * b
            offset += b
        return cls(rows, length, torch.cat(segments), torch.tensor(row_groups, dtype=torch.long, device=device),
                   tuple((int(m.shape[0]), int(m.shape[1])) for m in masks), tuple(src_all), tuple(dst_all))

    @property
    def real_tokens(self) -> int:
        return sum(int(s.numel()) for s in self._src)

    @property
    def positions(self) -> int:
        """Positions the packed rows hold, padding included."""
        return self.rows * self.length

    def _check_part(self, name: str, i: int, shape: torch.Size) -> None:
        if tuple(shape[:2]) != self._shapes[i]:
            raise ValueError(f"{name}[{i}]: shape {tuple(shape)} does not start with its mask's "
                             f"{self._shapes[i]}")

    def pack(self, parts: Sequence[torch.Tensor], fill: float | int = 0) -> torch.Tensor:
        """parts[i]: [b_i, T_i, *rest] aligned with masks[i]; returns [rows, length, *rest] with
        `fill` at padding. Differentiable w.r.t. every part: each part's gradient is the packed
        gradient at its tokens' places, 0 at its padding."""
        if len(parts) != len(self._shapes):
            raise ValueError(f"parts: one per source ({len(self._shapes)}), got {len(parts)}")
        rest = tuple(parts[0].shape[2:])
        for i, p in enumerate(parts):
            self._check_part("parts", i, p.shape)
            if tuple(p.shape[2:]) != rest or p.dtype != parts[0].dtype:
                raise ValueError(f"parts[{i}]: trailing shape {tuple(p.shape[2:])} / dtype {p.dtype} differ "
                                 f"from parts[0]'s {rest} / {parts[0].dtype}")
        device = parts[0].device
        # The plan lives where its masks were (the host, normally): its indices follow the parts.
        values = torch.cat([p.reshape(-1, *rest).index_select(0, src.to(p.device, non_blocking=True)).to(device)
                            for p, src in zip(parts, self._src)])
        dst = torch.cat(self._dst).to(device, non_blocking=True)
        out = torch.full((self.positions, *rest), fill, dtype=parts[0].dtype, device=device)
        return out.index_copy(0, dst, values).view(self.rows, self.length, *rest)  # out of place: autograd

    def unpack(self, packed: torch.Tensor, source: int, fill: float | int = 0) -> torch.Tensor:
        """Inverse of `pack` for one source: [b_i, T_i, *rest] with `fill` at its padding;
        differentiable w.r.t. `packed`."""
        if not 0 <= source < len(self._shapes):
            raise ValueError(f"source: {source} is not one of the plan's {len(self._shapes)} sources")
        if tuple(packed.shape[:2]) != (self.rows, self.length):
            raise ValueError(f"packed: shape {tuple(packed.shape)} does not start with the plan's "
                             f"({self.rows}, {self.length})")
        b, t = self._shapes[source]
        rest = tuple(packed.shape[2:])
        values = packed.reshape(-1, *rest).index_select(0, self._dst[source].to(packed.device, non_blocking=True))
        out = torch.full((b * t, *rest), fill, dtype=packed.dtype, device=packed.device)
        return out.index_copy(0, self._src[source].to(packed.device, non_blocking=True), values).view(b, t, *rest)


def next_token_targets(labels: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-position targets [B, T] that survive packing: targets[b, t] = labels[b, t + 1] when
    position t + 1 is in t's segment (same nonzero id) and that label is not IGNORE_INDEX, else
    IGNORE_INDEX. Packed, a segment's last position so never predicts the next segment's first
    token; for a right-padded 0/1 mask this is today's labels[:, 1:] shift."""
    if labels.shape != mask.shape or labels.dim() != 2:
        raise ValueError(f"labels: shape {tuple(labels.shape)} must equal the mask's {tuple(mask.shape)} "
                         "and be [B, T]")
    seg = mask.to(torch.long)
    nxt = labels[:, 1:]
    keep = (seg[:, 1:] == seg[:, :-1]) & (seg[:, :-1] > 0) & (nxt != IGNORE_INDEX)
    targets = torch.full_like(labels, IGNORE_INDEX)
    targets[:, :-1] = torch.where(keep, nxt, torch.full_like(nxt, IGNORE_INDEX))
    return targets


def sample_ids(segments: torch.Tensor) -> torch.Tensor:
    """The sample of every real position of `segments` ([B, T] segment ids, 0 = padding), in flat
    order: a sample is one nonzero id within one row (packed rows hold several), numbered 0..S-1.
    On the segments' device: call it on the host copy, where the bookkeeping lives."""
    seg = segments.to(torch.long)
    flat = seg.flatten()
    real = flat.nonzero().squeeze(1)
    if real.numel() == 0:
        return real
    # one key per (row, id), as _source_segments: ids repeat across rows, never within one
    key = (real // seg.shape[1]) * (int(flat.max()) + 1) + flat[real]
    return torch.unique(key, return_inverse=True)[1]
