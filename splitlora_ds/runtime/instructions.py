"""The instructions a schedule emits and the executor runs (after DeepSpeed's pipe/schedule.py).

Instructions that touch one micro-batch address its buffer by id (`buffer`, 0..M-1 within a
step); the rest act on the whole step (loading the step's batch, clipping, the optimizer step,
aggregation). Instructions are frozen dataclasses: schedules are plain data, compared in tests.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Instruction:
    pass


@dataclass(frozen=True)
class BufferInstruction(Instruction):
    buffer: int  # the micro-batch this instruction works on


@dataclass(frozen=True)
class LoadBatch(Instruction):
    """Take the step's batch from this rank's stream and split its rows into the step's
    micro-batch buffers; count the step's target tokens (the loss is a mean over all of them)."""


@dataclass(frozen=True)
class LoadEvalBatch(Instruction):
    """The next evaluation batch, whole, into buffer 0."""


@dataclass(frozen=True)
class Forward(BufferInstruction):
    pass


@dataclass(frozen=True)
class SendActivations(BufferInstruction):
    dst: int


@dataclass(frozen=True)
class RecvActivations(BufferInstruction):
    srcs: tuple[int, ...]  # several sources are packed together, in source order


@dataclass(frozen=True)
class ComputeLoss(BufferInstruction):
    pass


@dataclass(frozen=True)
class Backward(BufferInstruction):
    pass


@dataclass(frozen=True)
class SendGrads(BufferInstruction):
    dsts: tuple[int, ...]  # the gradient of each source's slice goes back to that source


@dataclass(frozen=True)
class RecvGrads(BufferInstruction):
    src: int


# The U-shaped split (split.client_tail_layers): the last server stage hands each client the
# output for its own rows; the client runs its tail (last blocks, head, loss) and returns the
# gradient of that output. Only floating-point values of the client's real positions travel.


@dataclass(frozen=True)
class SendTailActivations(BufferInstruction):
    """Last server stage: each client's rows of the stage's output, to that client."""
    dsts: tuple[int, ...]


@dataclass(frozen=True)
class RecvTailActivations(BufferInstruction):
    """Client: the server's output for this micro-batch's rows, the input of the client's tail."""
    src: int


@dataclass(frozen=True)
class TailForward(BufferInstruction):
    pass


@dataclass(frozen=True)
class TailBackward(BufferInstruction):
    pass


@dataclass(frozen=True)
class SendTailGrads(BufferInstruction):
    """Client: the gradient of its loss with respect to the server's output, back to the server."""
    dst: int


@dataclass(frozen=True)
class RecvTailGrads(BufferInstruction):
    """Last server stage: every client's gradient of its rows of the output."""
    srcs: tuple[int, ...]


@dataclass(frozen=True)
class ClipGradients(Instruction):
    """Scale this rank's gradients by min(1, max_norm / global norm), the norm taken over every
    rank in `ranks` (one scalar all-reduce): the ranks that train together in this step."""
    ranks: tuple[int, ...]


@dataclass(frozen=True)
class OptimizerStep(Instruction):
    pass


@dataclass(frozen=True)
class AverageAdapters(Instruction):
    pass


@dataclass(frozen=True)
class BeginParticipation(Instruction):
    """Logical clients: this rank now trains client `client` (federation.clients_per_round):
    the global adapters, a fresh optimizer state when ranks serve several clients, and that
    client's data stream at its position."""
    client: int


@dataclass(frozen=True)
class EndParticipation(Instruction):
    """Logical clients: client `client`'s participation this round is over; its adapters go into
    this rank's share of the round's weighted sum."""
    client: int


@dataclass(frozen=True)
class ReduceLossStats(Instruction):
    """Clients that compute their own loss (fedlora, U-shaped split): sum every client's loss and
    token counts over the clients so the job-wide loss can be logged."""


@dataclass(frozen=True)
class SendAdapters(Instruction):
    """sequential: hand this client's adapters to the client whose turn comes next."""
    dst: int


@dataclass(frozen=True)
class RecvAdapters(Instruction):
    src: int


@dataclass(frozen=True)
class ShareAdapters(Instruction):
    """sequential: every client takes the adapters of client `src` (a broadcast), so evaluation
    and the end of the run see the model as the last client left it."""
    src: int


@dataclass(frozen=True)
class TurnBarrier(Instruction):
    """sequential: all clients meet once per step."""


# Instructions whose time is computation (the rest is sending, receiving and waiting).
COMPUTE = ("Forward", "TailForward", "ComputeLoss", "Backward", "TailBackward", "OptimizerStep")
