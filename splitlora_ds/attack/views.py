"""The recorded server view of one run, cut into the victim's samples (record.py wrote it).

A victim micro-batch is packed: several samples may share a row, each a run of one nonzero segment
id. The server knows the segment ids (they travel with the activations), so it can cut what it
received into samples exactly as here; the token ids and targets come from the victim's own
record and are used only to score the attacks.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from ..data.examples import IGNORE_INDEX


@dataclass
class VictimSample:
    """One of the victim's training samples, at one recorded step."""

    step: int
    ids: torch.Tensor  # [n] its input tokens (the answer key)
    targets: torch.Tensor  # [n] next-token targets, IGNORE_INDEX where none (the answer key)
    hidden: torch.Tensor  # [n, H] the cut-layer activations the server received
    tail_input: Optional[torch.Tensor] = None  # [n, H] U-shaped: what the server sent the tail
    tail_grad: Optional[torch.Tensor] = None  # [n, H] U-shaped: the gradient the tail sent back

    @property
    def scored(self) -> torch.Tensor:
        """Positions with a target (where the label attack is scored)."""
        return self.targets != IGNORE_INDEX


def _cut(step: int, slot: dict[str, torch.Tensor]) -> list[VictimSample]:
    segments = slot["segments"]
    width = segments.shape[1]
    flat_seg = segments.flatten()
    real = (flat_seg > 0).nonzero().squeeze(1)  # the order of the tail's [n, H] tensors
    rank_of = torch.full_like(flat_seg, -1)
    rank_of[real] = torch.arange(real.numel())
    hidden = slot["hidden"].flatten(0, 1)
    samples = []
    rows = real // width
    for row in rows.unique().tolist():
        for seg in flat_seg[real[rows == row]].unique().tolist():
            where = real[(rows == row) & (flat_seg[real] == seg)]  # in position order
            tail = rank_of[where]
            samples.append(VictimSample(
                step, slot["ids"].flatten()[where], slot["targets"].flatten()[where], hidden[where].float(),
                slot["tail_input"][tail].float() if "tail_input" in slot else None,
                slot["tail_grad"][tail].float() if "tail_grad" in slot else None))
    return samples


def load_view(view_dir: str | Path) -> list[VictimSample]:
    """Every recorded sample of the victim, in step and micro-batch order."""
    slots: dict[tuple[int, int], dict[str, torch.Tensor]] = {}
    files = sorted(Path(view_dir).glob("view-*.pt"))
    if not files:
        raise FileNotFoundError(f"no view-*.pt in {view_dir}: was the run recorded (splitlora_ds.attack.record)?")
    for path in files:
        for key, part in torch.load(path)["kept"].items():
            slots.setdefault(key, {}).update(part)
    samples = []
    for (step, _), slot in sorted(slots.items()):
        missing = {"ids", "targets", "segments", "hidden"} - set(slot)
        if missing:
            raise ValueError(f"{view_dir}: step {step} lacks {sorted(missing)} (a rank's view file is missing)")
        samples.extend(_cut(step, slot))
    return samples
