"""Recording what the server sees of one client during a real training run.

    deepspeed --num_gpus 3 --module splitlora_ds.attack.record --view-dir DIR --view-steps 0,1,38,39 \\
        --recipe recipes/tiny-cpu.yaml

runs `splitlora_ds.train` unchanged, with one observer on every rank (the executor calls it after
each training instruction). At the chosen steps it keeps, for the victim (client rank 0):

- on server stage 0, after RecvActivations: the cut-layer activations exactly as they arrived
  (after the client's DP clipping and noise, when privacy.activation_* is set);
- on the last server stage of a U-shaped split, after SendTailActivations: the output it sent to
  the victim's tail, and after RecvTailGrads: the gradient the tail sent back (times the victim's
  FedAvg weight, which the server knows: a scale the attacks do not depend on);
- on the victim, after SendActivations: its packed token ids, next-token targets and segment ids.
  The ids and targets are the answer key the attacks are scored against; they never reach the
  attacks. The segment ids travel to the server unchanged with the activations
  (tests/test_wire_audit.py), so they are part of the server's view.

Each rank writes what it kept to DIR/view-<role>.pt when its training ends (views.py reads them).
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Optional

# As splitlora_ds.train does, before torch loads: waiting CPU ranks must not spin.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

from ..runtime import instructions as I  # noqa: E402

VICTIM = 0  # the client rank whose messages are recorded


class ViewRecorder:
    """An executor observer that keeps the victim's messages at `steps` (see the module docstring)."""

    def __init__(self, steps: set[int], victim: int = VICTIM):
        self.steps = steps
        self.victim = victim
        self.role: Optional[str] = None
        # (step, micro-batch) -> {name: tensor}
        self.kept: dict[tuple[int, int], dict[str, torch.Tensor]] = {}

    def __call__(self, step: int, ins: I.Instruction, executor: Any) -> None:
        if step not in self.steps or not executor.training:
            return
        role = executor.role
        self.role = role.name
        buffer = getattr(ins, "buffer", None)
        if buffer is None:
            return
        b = executor.buffers.get(buffer)
        if b is None:
            return
        slot = self.kept.setdefault((step, buffer), {})
        if role.is_client and role.index == self.victim and isinstance(ins, I.SendActivations):
            slot.update(ids=b.x.detach().cpu(), targets=b.targets.clone(), segments=b.mask.clone())
        elif role.is_server and isinstance(ins, I.RecvActivations) and self.victim in b.source_clients:
            slot["hidden"] = b.leaves[b.source_clients.index(self.victim)].detach().cpu().clone()
        elif role.is_server and isinstance(ins, I.SendTailActivations) and self.victim in b.tail_positions:
            positions = b.tail_positions[self.victim]
            slot["tail_input"] = b.output.detach().flatten(0, 1).index_select(0, positions).cpu()
        elif role.is_server and isinstance(ins, I.RecvTailGrads) and self.victim in b.tail_positions:
            positions = b.tail_positions[self.victim]
            slot["tail_grad"] = b.grad_output.detach().flatten(0, 1).index_select(0, positions).cpu()
        if not slot:
            del self.kept[(step, buffer)]

    def save(self, out_dir: str) -> Optional[str]:
        """Write what this rank kept (nothing to write: None)."""
        if not self.kept or self.role is None:
            return None
        os.makedirs(out_dir, exist_ok=True)
        path = os.path.join(out_dir, f"view-{self.role}.pt")
        torch.save({"role": self.role, "victim": self.victim, "kept": self.kept}, path)
        return path


def parse_view_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    """(--view-dir / --view-steps, the rest for splitlora_ds.train)."""
    p = argparse.ArgumentParser(prog="splitlora_ds.attack.record", add_help=False)
    p.add_argument("--view-dir", required=True)
    p.add_argument("--view-steps", required=True, help="comma-separated training steps (0-based) to record")
    args, rest = p.parse_known_args(argv)
    return args, rest


def main(argv: Optional[list[str]] = None) -> int:
    from ..train import main as train_main

    args, rest = parse_view_args(sys.argv[1:] if argv is None else argv)
    recorder = ViewRecorder({int(s) for s in args.view_steps.split(",") if s.strip()})
    code = train_main(rest, observers=[recorder])
    if code == 0:
        recorder.save(args.view_dir)
    return code


if __name__ == "__main__":
    sys.exit(main())
