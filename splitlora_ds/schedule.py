"""One training step as a list of instructions per role (after DeepSpeed's pipe/schedule.py).

Pure functions of the topology and the step number: tested without processes, executed by
`engine.StageRunner`. The server's first stage takes every client's activations in one step and
runs them as one batch, so no client waits for another to be served.

    client c:     LoadBatch Forward SendActivations RecvGrads Backward OptimizerStep [AverageAdapters]
    server stage: RecvActivations Forward (ComputeLoss | SendActivations RecvGrads) Backward
                  SendGrads OptimizerStep
    centralized:  LoadBatch Forward ComputeLoss Backward OptimizerStep
    fedlora c:    LoadBatch Forward ComputeLoss Backward OptimizerStep ReduceLossStats [AverageAdapters]
                  (every client holds the whole model: the FedLoRA baseline)

An evaluation batch is the forward half alone (no gradients, no optimizer):

    client c:     LoadEvalBatch Forward SendActivations
    server stage: RecvActivations Forward (ComputeLoss | SendActivations)
"""

from __future__ import annotations

from dataclasses import dataclass

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
class OptimizerStep(Instruction):
    pass


@dataclass(frozen=True)
class AverageAdapters(Instruction):
    pass


@dataclass(frozen=True)
class ReduceLossStats(Instruction):
    """fedlora: sum every client's loss and token counts so the job-wide loss can be logged."""


def is_aggregation_step(step: int, aggregate_every: int, max_steps: int | None = None) -> bool:
    """Step numbers are 0-based; averaging follows every `aggregate_every`-th local step and the
    last step, so a run always ends with one global model (what is evaluated and exported)."""
    return (step + 1) % aggregate_every == 0 or step == (max_steps or 0) - 1


def client_step(topology: Topology, step: int, aggregate_every: int, max_steps: int | None = None) -> list[Instruction]:
    server = topology.server_rank(0)
    out: list[Instruction] = [LoadBatch(), Forward(), SendActivations(server), RecvGrads(server),
                              Backward(), OptimizerStep()]
    if topology.clients > 1 and is_aggregation_step(step, aggregate_every, max_steps):
        out.append(AverageAdapters())
    return out


def server_step(topology: Topology, stage: int) -> list[Instruction]:
    srcs = tuple(topology.client_ranks) if stage == 0 else (topology.server_rank(stage - 1),)
    out: list[Instruction] = [RecvActivations(srcs), Forward()]
    if stage == topology.server_stages - 1:
        out += [ComputeLoss(), Backward()]
    else:
        nxt = topology.server_rank(stage + 1)
        out += [SendActivations(nxt), RecvGrads(nxt), Backward()]
    # Gradients go back before our own optimizer step so the upstream ranks resume sooner.
    out += [SendGrads(srcs), OptimizerStep()]
    return out


def fedlora_step(topology: Topology, step: int, aggregate_every: int, max_steps: int | None = None) -> list[Instruction]:
    out: list[Instruction] = [LoadBatch(), Forward(), ComputeLoss(), Backward(), OptimizerStep(), ReduceLossStats()]
    if topology.clients > 1 and is_aggregation_step(step, aggregate_every, max_steps):
        out.append(AverageAdapters())
    return out


def centralized_step() -> list[Instruction]:
    return [LoadBatch(), Forward(), ComputeLoss(), Backward(), OptimizerStep()]


def step_instructions(role: Role, topology: Topology, step: int, aggregate_every: int,
                      max_steps: int | None = None) -> list[Instruction]:
    if role.kind == "client" and topology.server_stages == 0:
        return fedlora_step(topology, step, aggregate_every, max_steps)
    if role.kind == "client":
        return client_step(topology, step, aggregate_every, max_steps)
    if role.kind == "server":
        return server_step(topology, role.index)
    return centralized_step()


def eval_instructions(role: Role, topology: Topology) -> list[Instruction]:
    if role.kind == "client" and topology.server_stages == 0:  # fedlora: each client scores its own shard
        return [LoadEvalBatch(), Forward(), ComputeLoss()]
    if role.kind == "client":
        return [LoadEvalBatch(), Forward(), SendActivations(topology.server_rank(0))]
    if role.kind == "server":
        stage = role.index
        srcs = tuple(topology.client_ranks) if stage == 0 else (topology.server_rank(stage - 1),)
        last = stage == topology.server_stages - 1
        return [RecvActivations(srcs), Forward(),
                ComputeLoss() if last else SendActivations(topology.server_rank(stage + 1))]
    return [LoadEvalBatch(), Forward(), ComputeLoss()]


def is_eval_step(step: int, eval_every: int, max_steps: int) -> bool:
    """Evaluate after every `eval_every`-th step (0: never mid-run) and after the last one."""
    return step == max_steps - 1 or (eval_every > 0 and (step + 1) % eval_every == 0)
