"""One training step as a list of instructions per role (after DeepSpeed's pipe/schedule.py).

Pure functions of the topology and the step number: tested without processes, executed by
`engine.StageRunner`. The server's first stage takes every client's activations in one step and
runs them as one batch, so no client waits for another to be served.

    client c:     LoadBatch Forward SendActivations RecvGrads Backward [ClipGradients] OptimizerStep
                  [AverageAdapters]
    server stage: RecvActivations Forward (ComputeLoss | SendActivations RecvGrads) Backward
                  SendGrads [ClipGradients] OptimizerStep [AverageAdapters: stage 0, for the
                  blocks it holds on behalf of clients that cut earlier (heterogeneous split points)]
    centralized:  LoadBatch Forward ComputeLoss Backward OptimizerStep
    fedlora c:    LoadBatch Forward ComputeLoss Backward OptimizerStep ReduceLossStats [AverageAdapters]
                  (every client holds the whole model: the FedLoRA baseline)
    sequential:   vanilla split learning: clients take turns of I steps; the active client runs the
                  client step (no averaging) and at the end of its turn sends its adapters to the
                  next client (SendAdapters/RecvAdapters); the server serves the active client only;
                  every client ends each step at a TurnBarrier, so an idle client never waits
                  longer than one step on a collective (dist.timeout_s stays meaningful).

ClipGradients (gradient clipping by the global norm, `train.clip_scope: global`) names the ranks
that train together in this step; they all-reduce one scalar, so every one of them holds it.

An evaluation batch is the forward half alone (no gradients, no optimizer):

    client c:     LoadEvalBatch Forward SendActivations
    server stage: RecvActivations Forward (ComputeLoss | SendActivations)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .topology import Role, Topology


@dataclass(frozen=True)
class Instruction:
    pass


@dataclass(frozen=True)
class LoadBatch(Instruction):
    pass


@dataclass(frozen=True)
class LoadEvalBatch(Instruction):
    pass


@dataclass(frozen=True)
class Forward(Instruction):
    pass


@dataclass(frozen=True)
class SendActivations(Instruction):
    dst: int


@dataclass(frozen=True)
class RecvActivations(Instruction):
    srcs: tuple[int, ...]  # several sources are batched together in source order


@dataclass(frozen=True)
class ComputeLoss(Instruction):
    pass


@dataclass(frozen=True)
class Backward(Instruction):
    pass


@dataclass(frozen=True)
class SendGrads(Instruction):
    dsts: tuple[int, ...]  # the gradient of each source's slice goes back to that source


@dataclass(frozen=True)
class RecvGrads(Instruction):
    src: int


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
class ReduceLossStats(Instruction):
    """fedlora: sum every client's loss and token counts so the job-wide loss can be logged."""


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


def is_aggregation_step(step: int, aggregate_every: int, max_steps: int | None = None) -> bool:
    """Step numbers are 0-based; averaging follows every `aggregate_every`-th local step and the
    last step, so a run always ends with one global model (what is evaluated and exported)."""
    return (step + 1) % aggregate_every == 0 or step == (max_steps or 0) - 1


def is_eval_step(step: int, eval_every: int, max_steps: int) -> bool:
    """Evaluate after every `eval_every`-th step (0: never mid-run) and after the last one."""
    return step == max_steps - 1 or (eval_every > 0 and (step + 1) % eval_every == 0)


def _clip(clip_ranks: Optional[tuple[int, ...]]) -> list[Instruction]:
    return [ClipGradients(clip_ranks)] if clip_ranks is not None else []


def client_step(topology: Topology, step: int, aggregate_every: int, max_steps: int | None = None,
                clip_ranks: Optional[tuple[int, ...]] = None) -> list[Instruction]:
    """`clip_ranks`: the ranks whose global gradient norm clips this step (None: no global clipping)."""
    server = topology.server_rank(0)
    out: list[Instruction] = [LoadBatch(), Forward(), SendActivations(server), RecvGrads(server),
                              Backward(), *_clip(clip_ranks), OptimizerStep()]
    if topology.clients > 1 and is_aggregation_step(step, aggregate_every, max_steps):
        out.append(AverageAdapters())
    return out


def server_step(topology: Topology, stage: int, clients: Optional[tuple[int, ...]] = None,
                clip_ranks: Optional[tuple[int, ...]] = None) -> list[Instruction]:
    """`clients`: whose activations the first stage serves this step (default: all of them)."""
    first_srcs = tuple(topology.client_ranks) if clients is None else clients
    srcs = first_srcs if stage == 0 else (topology.server_rank(stage - 1),)
    out: list[Instruction] = [RecvActivations(srcs), Forward()]
    if stage == topology.server_stages - 1:
        out += [ComputeLoss(), Backward()]
    else:
        nxt = topology.server_rank(stage + 1)
        out += [SendActivations(nxt), RecvGrads(nxt), Backward()]
    # Gradients go back before our own optimizer step so the upstream ranks resume sooner.
    out += [SendGrads(srcs), *_clip(clip_ranks), OptimizerStep()]
    return out


def fedlora_step(topology: Topology, step: int, aggregate_every: int, max_steps: int | None = None,
                 clip_ranks: Optional[tuple[int, ...]] = None) -> list[Instruction]:
    out: list[Instruction] = [LoadBatch(), Forward(), ComputeLoss(), Backward(), *_clip(clip_ranks),
                              OptimizerStep(), ReduceLossStats()]
    if topology.clients > 1 and is_aggregation_step(step, aggregate_every, max_steps):
        out.append(AverageAdapters())
    return out


def centralized_step() -> list[Instruction]:
    return [LoadBatch(), Forward(), ComputeLoss(), Backward(), OptimizerStep()]


def split_eval(role: Role, topology: Topology) -> list[Instruction]:
    """One evaluation batch of the split model (used by split and sequential runs)."""
    if role.kind == "client":
        return [LoadEvalBatch(), Forward(), SendActivations(topology.server_rank(0))]
    stage = role.index
    srcs = tuple(topology.client_ranks) if stage == 0 else (topology.server_rank(stage - 1),)
    last = stage == topology.server_stages - 1
    return [RecvActivations(srcs), Forward(),
            ComputeLoss() if last else SendActivations(topology.server_rank(stage + 1))]


@dataclass(frozen=True)
class Schedule:
    """A whole run's instructions for one mode: `train(role, step)` for each of `steps` steps,
    `eval(role)` per evaluation batch after `before_eval(role, step)`.

    Recipe step counts (train.max_steps, eval.every, checkpoint.every, aggregate_every) are per
    client. Every mode but `sequential` advances all clients in one step; a sequential step is
    one client's local step, so that run has `clients x max_steps` steps and evaluates and
    checkpoints every `clients x every` of them: the same data seen at the same points.
    """

    mode: str  # split | fedlora | centralized | sequential
    topology: Topology
    aggregate_every: int
    max_steps: int  # per client
    # Heterogeneous split points: server stage 0 holds blocks on behalf of clients that cut
    # earlier, and joins the clients' aggregation for them.
    server_aggregates: bool = False
    # Gradient clipping by one norm over every rank that trains together (train.clip_scope:
    # global, with a gradient_clipping threshold); False: each rank's engine clips its own.
    clip_global: bool = False

    @property
    def steps_per_client_step(self) -> int:
        return self.topology.clients if self.mode == "sequential" else 1

    @property
    def steps(self) -> int:
        return self.max_steps * self.steps_per_client_step

    def every(self, every: int) -> int:
        """A per-client interval (eval.every, checkpoint.every) in this schedule's steps."""
        return every * self.steps_per_client_step

    def is_eval_step(self, step: int, eval_every: int) -> bool:
        return is_eval_step(step, self.every(eval_every), self.steps)

    # ---------------------------------------------------------------- sequential turns
    def active_client(self, step: int) -> int:
        """sequential: whose turn step `step` is. Turns last `aggregate_every` local steps; when
        max_steps is not a multiple of it, the last round's turns are shorter so that every
        client trains exactly max_steps steps."""
        c, turn = self.topology.clients, self.aggregate_every
        full_rounds = self.max_steps // turn
        if step < full_rounds * turn * c:
            return (step % (turn * c)) // turn
        return (step - full_rounds * turn * c) // (self.max_steps - full_rounds * turn)

    def turn_ends(self, step: int) -> bool:
        return step == self.steps - 1 or self.active_client(step + 1) != self.active_client(step)

    # ---------------------------------------------------------------- instructions
    def clip_ranks(self, step: int) -> Optional[tuple[int, ...]]:
        """The ranks that train together in step `step` and share one gradient norm (None: no
        global clipping this run): every rank; a sequential step's active client and the server."""
        if not self.clip_global or self.mode == "centralized":
            return None
        if self.mode == "sequential":
            return (self.active_client(step), *self.topology.server_ranks)
        return tuple(range(self.topology.world_size))

    def clip_rank_sets(self) -> list[tuple[int, ...]]:
        """Every distinct `clip_ranks` of the run (each becomes a process group)."""
        if not self.clip_global or self.mode == "centralized":
            return []
        if self.mode == "sequential":
            return [(c, *self.topology.server_ranks) for c in self.topology.client_ranks]
        return [tuple(range(self.topology.world_size))]

    def train(self, role: Role, step: int) -> list[Instruction]:
        topo, clip = self.topology, self.clip_ranks(step)
        if self.mode == "centralized" or role.kind == "centralized":
            return centralized_step()
        if self.mode == "fedlora":
            return fedlora_step(topo, step, self.aggregate_every, self.max_steps, clip)
        if self.mode == "split":
            if role.is_client:
                return client_step(topo, step, self.aggregate_every, self.max_steps, clip)
            out = server_step(topo, role.index, clip_ranks=clip)
            if (self.server_aggregates and role.index == 0 and topo.clients > 1
                    and is_aggregation_step(step, self.aggregate_every, self.max_steps)):
                out.append(AverageAdapters())
            return out
        return self._sequential(role, step)

    def _sequential(self, role: Role, step: int) -> list[Instruction]:
        topo, active, clip = self.topology, self.active_client(step), self.clip_ranks(step)
        if role.is_server:
            return server_step(topo, role.index, clients=(active,), clip_ranks=clip)
        out: list[Instruction] = []
        last = step == self.steps - 1
        nxt = self.active_client(step + 1) if not last else active
        if role.index == active:
            # no averaging in vanilla split learning: the turn ends with a hand-over instead
            out += [i for i in client_step(topo, step, self.aggregate_every, clip_ranks=clip)
                    if not isinstance(i, AverageAdapters)]
            if self.turn_ends(step) and nxt != active:
                out.append(SendAdapters(nxt))
        elif role.index == nxt and self.turn_ends(step):
            out.append(RecvAdapters(active))
        if topo.clients > 1:
            if last:
                out.append(ShareAdapters(active))  # the run ends with one model on every client
            out.append(TurnBarrier())
        return out

    def peers(self, instruction: Instruction, rank: int) -> tuple[int, ...]:
        """The ranks `instruction` on `rank` waits on: who to name when it fails."""
        topo = self.topology
        if isinstance(instruction, (SendActivations, SendAdapters)):
            return (instruction.dst,)
        if isinstance(instruction, (RecvGrads, RecvAdapters)):
            return (instruction.src,)
        if isinstance(instruction, RecvActivations):
            return instruction.srcs
        if isinstance(instruction, SendGrads):
            return instruction.dsts
        if isinstance(instruction, ClipGradients):
            members: list[int] = list(instruction.ranks)
        elif isinstance(instruction, AverageAdapters):
            members = topo.client_ranks + ([topo.server_rank(0)] if self.server_aggregates else [])
        elif isinstance(instruction, (ReduceLossStats, ShareAdapters, TurnBarrier)):
            members = topo.client_ranks
        else:
            return ()
        return tuple(r for r in members if r != rank)

    def before_eval(self, role: Role, step: int) -> list[Instruction]:
        """Instructions before the evaluation that follows step `step`."""
        if (self.mode == "sequential" and role.is_client and self.topology.clients > 1
                and step != self.steps - 1):  # the last step already shared
            return [ShareAdapters(self.active_client(step))]
        return []

    def eval(self, role: Role) -> list[Instruction]:
        if role.kind == "centralized" or self.mode in ("centralized", "fedlora"):
            return [LoadEvalBatch(), Forward(), ComputeLoss()]  # fedlora: each client scores its own shard
        return split_eval(role, self.topology)
