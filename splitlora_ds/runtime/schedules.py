"""One training step as a list of instructions per role: one schedule class per mode.

Pure functions of the topology, the step number and the micro-batch count M: tested without
processes, run by `runtime.executor.Executor`. A split step is a 1F1B pipeline (as DeepSpeed's
`TrainSchedule`): the clients are position 0 of a pipeline of depth 1 + S, server stage s is
position s + 1; position p first runs min(depth - p - 1, M) forwards, then alternates one
forward and one backward, then drains its backwards. So client c forwards micro-batch m + 1
while the server works on m, and server stage s + 1 works on m while stage s works on m + 1.
Gradients accumulate over the micro-batches; every role takes one optimizer step per step.
Server stage 0 packs micro-batch m of every client it serves into one batch.

    client c:      LoadBatch  1F1B[Forward SendActivations | RecvGrads Backward]
                   [ClipGradients] OptimizerStep [AverageAdapters]
    server stage:  1F1B[RecvActivations Forward (ComputeLoss | SendActivations) |
                        (RecvGrads) Backward SendGrads]  [ClipGradients] OptimizerStep
                   [AverageAdapters: stage 0, for the blocks it holds on behalf of clients that
                    cut earlier (heterogeneous split points)]
    centralized:   LoadBatch  (Forward ComputeLoss Backward) x M  OptimizerStep
    fedlora c:     the centralized step on each client, ReduceLossStats [AverageAdapters]
    sequential:    vanilla split learning: clients take turns of I steps; the active client runs
                   the client step (no averaging) and at the end of its turn sends its adapters to
                   the next client (SendAdapters/RecvAdapters); the server serves the active client
                   only; every client ends each step at a TurnBarrier, so an idle client never
                   waits longer than one step on a collective (dist.timeout_s stays meaningful).

U-shaped split (split.client_tail_layers): the client also holds the tail (last blocks, head) and
computes its own loss, so the pipeline runs client bottom -> server stages -> client tail and back:
a pipeline of depth S + 2 whose first and last positions are the same client. The client runs
min(S + 1, M) bottom forwards ahead, then per micro-batch m its tail (forward, loss, backward),
the next bottom forward, and the bottom backward of m - 1:

    client c:      LoadBatch  Forward SendActivations (warm-up) ...
                   [RecvTailActivations TailForward ComputeLoss TailBackward SendTailGrads
                    (Forward SendActivations) (RecvGrads Backward of m - 1)] x M  RecvGrads Backward
                   [ClipGradients] OptimizerStep ReduceLossStats [AverageAdapters]
    last stage:    1F1B[RecvActivations Forward SendTailActivations |
                        RecvTailGrads Backward SendGrads]

ClipGradients (train.clip_scope: global) names the ranks that train together in this step; they
all-reduce one scalar. An evaluation batch is the forward half alone, one buffer, no optimizer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, ClassVar, Optional

from ..federation.participation import Participation
from ..topology import Role, Topology
from .instructions import (AverageAdapters, Backward, BeginParticipation, ClipGradients, ComputeLoss, EndParticipation, Forward, Instruction,
                           LoadBatch, LoadEvalBatch, OptimizerStep, RecvActivations, RecvAdapters, RecvGrads, RecvTailActivations,
                           RecvTailGrads, ReduceLossStats, SendActivations, SendAdapters, SendGrads, SendTailActivations,
                           SendTailGrads, ShareAdapters, TailBackward, TailForward, TurnBarrier)

Part = Callable[[int], list[Instruction]]  # micro-batch id -> its instructions


def is_aggregation_step(step: int, aggregate_every: int, max_steps: int | None = None) -> bool:
    """Step numbers are 0-based; averaging follows every `aggregate_every`-th local step and the
    last step, so a run always ends with one global model (what is evaluated and exported)."""
    return (step + 1) % aggregate_every == 0 or step == (max_steps or 0) - 1


def is_eval_step(step: int, eval_every: int, max_steps: int) -> bool:
    """Evaluate after every `eval_every`-th step (0: never mid-run) and after the last one."""
    return step == max_steps - 1 or (eval_every > 0 and (step + 1) % eval_every == 0)


def one_f_one_b(position: int, depth: int, micro_batches: int, forward: Part, backward: Part) -> list[Instruction]:
    """Position `position` of a `depth`-deep pipeline: warm-up forwards, one forward and one
    backward in turn, then the remaining backwards (DeepSpeed's TrainSchedule order)."""
    warmup = min(depth - position - 1, micro_batches)
    out: list[Instruction] = []
    for m in range(warmup):
        out += forward(m)
    for m in range(micro_batches - warmup):
        out += forward(warmup + m) + backward(m)
    for m in range(micro_batches - warmup, micro_batches):
        out += backward(m)
    return out


def client_pipeline(topology: Topology, micro_batches: int) -> list[Instruction]:
    server = topology.server_rank(0)
    return [LoadBatch(), *one_f_one_b(
        0, 1 + topology.server_stages, micro_batches,
        lambda m: [Forward(m), SendActivations(m, server)],
        lambda m: [RecvGrads(m, server), Backward(m)])]


def u_client_pipeline(topology: Topology, micro_batches: int) -> list[Instruction]:
    """A U-shaped client: the first and the last position of a pipeline of depth S + 2."""
    server, last = topology.server_rank(0), topology.server_rank(topology.server_stages - 1)
    warmup = min(topology.server_stages + 1, micro_batches)

    def bottom_forward(m: int) -> list[Instruction]:
        return [Forward(m), SendActivations(m, server)]

    out: list[Instruction] = [LoadBatch()]
    for m in range(warmup):
        out += bottom_forward(m)
    for m in range(micro_batches):
        out += [RecvTailActivations(m, last), TailForward(m), ComputeLoss(m), TailBackward(m), SendTailGrads(m, last)]
        # The next bottom forward before waiting on a gradient keeps the server fed. Bottom
        # backward m - 1 comes after tail m: the last stage forwards m before it sends gradient
        # m - 1 back, and with S = 1 both come from one rank, whose messages arrive in order.
        if m + warmup < micro_batches:
            out += bottom_forward(m + warmup)
        if m:
            out += [RecvGrads(m - 1, server), Backward(m - 1)]
    return out + [RecvGrads(micro_batches - 1, server), Backward(micro_batches - 1)]


def server_pipeline(topology: Topology, stage: int, clients: tuple[int, ...], micro_batches: int,
                    u_shaped: bool = False) -> list[Instruction]:
    """`clients`: whose activations the first stage serves this step. `u_shaped`: the last stage
    hands its output to the clients' tails instead of computing the loss."""
    srcs = clients if stage == 0 else (topology.server_rank(stage - 1),)
    depth = topology.server_stages + (2 if u_shaped else 1)
    if stage == topology.server_stages - 1 and u_shaped:
        forward: Part = lambda m: [RecvActivations(m, srcs), Forward(m), SendTailActivations(m, clients)]  # noqa: E731
        backward: Part = lambda m: [RecvTailGrads(m, clients), Backward(m), SendGrads(m, srcs)]  # noqa: E731
    elif stage == topology.server_stages - 1:
        forward: Part = lambda m: [RecvActivations(m, srcs), Forward(m), ComputeLoss(m)]  # noqa: E731
        # Gradients go back before anything else so the upstream ranks resume sooner.
        backward: Part = lambda m: [Backward(m), SendGrads(m, srcs)]  # noqa: E731
    else:
        nxt = topology.server_rank(stage + 1)
        forward = lambda m: [RecvActivations(m, srcs), Forward(m), SendActivations(m, nxt)]  # noqa: E731
        backward = lambda m: [RecvGrads(m, nxt), Backward(m), SendGrads(m, srcs)]  # noqa: E731
    return one_f_one_b(stage + 1, depth, micro_batches, forward, backward)


def local_step(micro_batches: int) -> list[Instruction]:
    """A whole model on one rank (centralized, fedlora): micro-batches one after another."""
    out: list[Instruction] = [LoadBatch()]
    for m in range(micro_batches):
        out += [Forward(m), ComputeLoss(m), Backward(m)]
    return out


@dataclass(frozen=True)
class Schedule(ABC):
    """A whole run's instructions for one mode: `train(role, step)` for each of `steps` steps,
    `eval(role)` per evaluation batch after `before_eval(role, step)`.

    Recipe step counts (train.max_steps, eval.every, checkpoint.every, aggregate_every) are per
    client. Every mode but `sequential` advances all clients in one step; a sequential step is
    one client's local step, so that run has `clients x max_steps` steps and evaluates and
    checkpoints every `clients x every` of them: the same data seen at the same points.
    """

    mode: ClassVar[str]
    topology: Topology
    aggregate_every: int
    max_steps: int  # per client
    micro_batches: int = 1
    # Heterogeneous split points: server stage 0 holds blocks on behalf of clients that cut
    # earlier, and joins the clients' aggregation for them.
    server_aggregates: bool = False
    # Gradient clipping by one norm over every rank that trains together (train.clip_scope:
    # global, with a gradient_clipping threshold); False: each rank's engine clips its own.
    clip_global: bool = False
    # U-shaped split: clients hold the tail and compute the loss (see the module docstring).
    u_shaped: bool = False
    # Logical clients (federation.client_ranks / clients_per_round): which client each rank
    # trains in each step; None: rank c is client c, in every step.
    participation: Optional[Participation] = None

    @property
    def steps_per_client_step(self) -> int:
        return 1

    @property
    def steps(self) -> int:
        if self.participation is not None:
            return self.participation.steps
        return self.max_steps * self.steps_per_client_step

    def is_due(self, step: int, every: int) -> bool:
        """Whether a per-client interval (eval.every, checkpoint.every; 0: never) ends at step
        `step`. With logical clients, intervals end only where a round ends, at the first round
        end that completes a multiple of `every` local steps."""
        if not every:
            return False
        if self.participation is None:
            return (step + 1) % (every * self.steps_per_client_step) == 0
        place = self.participation.locate(step)
        return place.ends_round and self.participation.progress(step) // every > place.round_start // every

    def is_eval_step(self, step: int, eval_every: int) -> bool:
        """Evaluate after every `eval.every`-th local step (0: never mid-run) and after the last one."""
        return step == self.steps - 1 or self.is_due(step, eval_every)

    def aggregates(self, step: int) -> bool:
        if self.participation is not None:
            return self.participation.num_clients > 1 and self.participation.locate(step).ends_round
        return self.topology.clients > 1 and is_aggregation_step(step, self.aggregate_every, self.max_steps)

    def active_clients(self, step: int) -> tuple[int, ...]:
        """The client ranks that train in step `step`."""
        if self.participation is not None:
            return self.participation.locate(step).active_ranks
        return tuple(self.topology.client_ranks)

    def clip_ranks(self, step: int) -> Optional[tuple[int, ...]]:
        """The ranks that train together in step `step` and share one gradient norm (None: no
        global clipping this run)."""
        if not self.clip_global:
            return None
        return (*self.active_clients(step), *self.topology.server_ranks)

    def clip_rank_sets(self) -> list[tuple[int, ...]]:
        """Every distinct `clip_ranks` of the run (each becomes a process group)."""
        if not self.clip_global:
            return []
        active = self.participation.active_sets() if self.participation is not None else [tuple(self.topology.client_ranks)]
        return [(*ranks, *self.topology.server_ranks) for ranks in active]

    def _client_part(self, role: Role, step: int, local: list[Instruction],
                     every_step: list[Instruction]) -> list[Instruction]:
        """A client rank's step: `local` (its training), then `every_step` (collectives of all
        client ranks), then the aggregation when one is due. With logical clients, a rank trains
        only in the slots it has a client for, opening and closing each participation; every
        client rank meets the others once per step (the loss reduction or a barrier), so a rank
        sitting a slot out never waits longer than one step on a collective."""
        aggregate = [AverageAdapters()] if self.aggregates(step) else []
        if self.participation is None:
            return local + every_step + aggregate
        place = self.participation.locate(step)
        client = place.client_of(role.index)
        out: list[Instruction] = []
        if client is not None:
            out += [BeginParticipation(client)] if place.starts_slot else []
            out += local + ([EndParticipation(client)] if place.ends_slot else [])
        if self.topology.clients > 1:
            out += every_step or [TurnBarrier()]
        else:
            out += every_step
        return out + aggregate

    def _update(self, step: int) -> list[Instruction]:
        """After the backwards: clip (if global) and step."""
        clip = self.clip_ranks(step)
        return ([ClipGradients(clip)] if clip is not None else []) + [OptimizerStep()]

    @abstractmethod
    def train(self, role: Role, step: int) -> list[Instruction]: ...

    def before_eval(self, role: Role, step: int) -> list[Instruction]:
        """Instructions before the evaluation that follows step `step`."""
        return []

    def eval(self, role: Role) -> list[Instruction]:
        """One evaluation batch of the split model: the forward half, one buffer."""
        topo = self.topology
        last_rank = topo.server_rank(topo.server_stages - 1)
        if role.is_client:
            out = [LoadEvalBatch(), Forward(0), SendActivations(0, topo.server_rank(0))]
            return out + ([RecvTailActivations(0, last_rank), TailForward(0), ComputeLoss(0)] if self.u_shaped else [])
        stage = role.index
        srcs = tuple(topo.client_ranks) if stage == 0 else (topo.server_rank(stage - 1),)
        if stage < topo.server_stages - 1:
            end: Instruction = SendActivations(0, topo.server_rank(stage + 1))
        else:
            end = SendTailActivations(0, tuple(topo.client_ranks)) if self.u_shaped else ComputeLoss(0)
        return [RecvActivations(0, srcs), Forward(0), end]

    def client_step(self) -> list[Instruction]:
        """A client's pipeline part of a step (standard or U-shaped)."""
        if self.u_shaped:
            return u_client_pipeline(self.topology, self.micro_batches)
        return client_pipeline(self.topology, self.micro_batches)

    def server_step(self, role: Role, clients: tuple[int, ...]) -> list[Instruction]:
        return server_pipeline(self.topology, role.index, clients, self.micro_batches, self.u_shaped)

    def aggregation_members(self) -> list[int]:
        return self.topology.client_ranks + ([self.topology.server_rank(0)] if self.server_aggregates else [])

    def peers(self, instruction: Instruction, rank: int) -> tuple[int, ...]:
        """The ranks `instruction` on `rank` waits on: who to name when it fails."""
        if isinstance(instruction, (SendActivations, SendAdapters, SendTailGrads)):
            return (instruction.dst,)
        if isinstance(instruction, (RecvGrads, RecvAdapters, RecvTailActivations)):
            return (instruction.src,)
        if isinstance(instruction, (RecvActivations, RecvTailGrads)):
            return instruction.srcs
        if isinstance(instruction, (SendGrads, SendTailActivations)):
            return instruction.dsts
        if isinstance(instruction, ClipGradients):
            members: list[int] = list(instruction.ranks)
        elif isinstance(instruction, AverageAdapters):
            members = self.aggregation_members()
        elif isinstance(instruction, (ReduceLossStats, ShareAdapters, TurnBarrier)):
            members = self.topology.client_ranks
        else:
            return ()
        return tuple(r for r in members if r != rank)


@dataclass(frozen=True)
class CentralizedSchedule(Schedule):
    """The unsplit model in one process (the exactness reference): no clipping instruction, the
    engine clips its own gradients."""

    mode: ClassVar[str] = "centralized"

    def clip_ranks(self, step: int) -> Optional[tuple[int, ...]]:
        return None

    def clip_rank_sets(self) -> list[tuple[int, ...]]:
        return []

    def train(self, role: Role, step: int) -> list[Instruction]:
        return local_step(self.micro_batches) + [OptimizerStep()]

    def eval(self, role: Role) -> list[Instruction]:
        return [LoadEvalBatch(), Forward(0), ComputeLoss(0)]


@dataclass(frozen=True)
class FedLoRASchedule(Schedule):
    """Every client holds the whole model (the FedLoRA baseline); FedAvg every I steps. Each
    client evaluates its own validation shard."""

    mode: ClassVar[str] = "fedlora"

    def train(self, role: Role, step: int) -> list[Instruction]:
        return self._client_part(role, step, local_step(self.micro_batches) + self._update(step), [ReduceLossStats()])

    def eval(self, role: Role) -> list[Instruction]:
        return [LoadEvalBatch(), Forward(0), ComputeLoss(0)]


@dataclass(frozen=True)
class SplitSchedule(Schedule):
    """SplitLoRA: every client in parallel, the server serving all of them."""

    mode: ClassVar[str] = "split"

    def train(self, role: Role, step: int) -> list[Instruction]:
        if role.is_client:
            local = self.client_step() + self._update(step)
            # U-shaped: each client has its own loss; the job-wide figure is their sum
            return self._client_part(role, step, local, [ReduceLossStats()] if self.u_shaped else [])
        out = self.server_step(role, self.active_clients(step)) + self._update(step)
        if self.server_aggregates and role.index == 0 and self.aggregates(step):
            out.append(AverageAdapters())
        return out


@dataclass(frozen=True)
class SequentialSchedule(Schedule):
    """Vanilla split learning: clients take turns; the server serves the active client only."""

    mode: ClassVar[str] = "sequential"

    @property
    def steps_per_client_step(self) -> int:
        return self.topology.clients

    def active_client(self, step: int) -> int:
        """Whose turn step `step` is. Turns last `aggregate_every` local steps; when max_steps is
        not a multiple of it, the last round's turns are shorter so that every client trains
        exactly max_steps steps."""
        c, turn = self.topology.clients, self.aggregate_every
        full_rounds = self.max_steps // turn
        if step < full_rounds * turn * c:
            return (step % (turn * c)) // turn
        return (step - full_rounds * turn * c) // (self.max_steps - full_rounds * turn)

    def turn_ends(self, step: int) -> bool:
        return step == self.steps - 1 or self.active_client(step + 1) != self.active_client(step)

    def clip_ranks(self, step: int) -> Optional[tuple[int, ...]]:
        """A sequential step's active client and the server."""
        return (self.active_client(step), *self.topology.server_ranks) if self.clip_global else None

    def clip_rank_sets(self) -> list[tuple[int, ...]]:
        if not self.clip_global:
            return []
        return [(c, *self.topology.server_ranks) for c in self.topology.client_ranks]

    def train(self, role: Role, step: int) -> list[Instruction]:
        topo, active = self.topology, self.active_client(step)
        if role.is_server:
            return self.server_step(role, (active,)) + self._update(step)
        out: list[Instruction] = []
        last = step == self.steps - 1
        nxt = self.active_client(step + 1) if not last else active
        if role.index == active:
            # no averaging in vanilla split learning: the turn ends with a hand-over instead
            out += self.client_step() + self._update(step)
            if self.turn_ends(step) and nxt != active:
                out.append(SendAdapters(nxt))
        elif role.index == nxt and self.turn_ends(step):
            out.append(RecvAdapters(active))
        if topo.clients > 1:
            if last:
                out.append(ShareAdapters(active))  # the run ends with one model on every client
            # U-shaped: the active client's loss reaches the main rank (client 0); the all-reduce
            # is also the turn's barrier
            out.append(ReduceLossStats() if self.u_shaped else TurnBarrier())
        elif self.u_shaped:
            out.append(ReduceLossStats())
        return out

    def before_eval(self, role: Role, step: int) -> list[Instruction]:
        if role.is_client and self.topology.clients > 1 and step != self.steps - 1:  # the last step already shared
            return [ShareAdapters(self.active_client(step))]
        return []


SCHEDULES: dict[str, type[Schedule]] = {s.mode: s for s in (CentralizedSchedule, FedLoRASchedule, SplitSchedule,
                                                             SequentialSchedule)}
