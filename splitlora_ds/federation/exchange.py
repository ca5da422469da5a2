"""The collective side of heterogeneous aggregation: every participant (the clients, and server
stage 0 for the blocks it holds on behalf of clients that cut earlier) gathers every other
participant's factors and computes its own new ones with `lowrank.aggregate_state_dicts`.
`LowRankExchange` is the strategy the engine calls.

Participants may hold different modules and ranks, so the factors travel as an all_gather of
Python objects (CPU tensors), not as one flat all-reduce. Every participant runs the same
deterministic arithmetic on the same gathered inputs, so shared results agree across ranks.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Collection, Mapping, Optional

import torch
import torch.distributed as dist
from torch import nn

from .lowrank import METHODS, aggregate_state_dicts, factor_names


def lora_modules(stage: nn.Module) -> dict[str, tuple[nn.Parameter, nn.Parameter, float]]:
    """{module name: (A, B, scaling)} of every trainable LoRA adapter in `stage`."""
    params = dict(stage.named_parameters())
    modules = dict(stage.named_modules())
    return {m: (params[a], params[b], float(modules[m].scaling["default"]))
            for m, (a, b) in factor_names(params).items() if params[a].requires_grad}


def layer_of(module: str) -> int:
    """The global layer index in a stage's module name ("layers.3.block.attn.c_attn" -> 3)."""
    parts = module.split(".")
    if len(parts) < 2 or parts[0] != "layers" or not parts[1].isdigit():
        raise ValueError(f"not a stage module name: {module!r}")
    return int(parts[1])


def participant_weights(modules: Mapping[str, object], client: Optional[int], client_weights: list[float],
                        entry_layers: list[int]) -> dict[str, float]:
    """Each module's aggregation weight for one participant: a client's is its FedAvg weight;
    server stage 0's copy of layer i speaks for every client whose rows run it (entry <= i).
    Weights over the holders of one module add up to 1."""
    if client is not None:
        return {m: client_weights[client] for m in modules}
    return {m: sum(w for w, e in zip(client_weights, entry_layers) if e <= layer_of(m)) for m in modules}


@torch.no_grad()
def exchange_(stage: nn.Module, weights: Mapping[str, float], modules: set[str], method: str,
              group: Optional[dist.ProcessGroup], masters: Optional[Mapping[str, torch.Tensor]] = None) -> int:
    """Aggregate the adapters of `modules` with every participant of `group`, in place
    (`lowrank.aggregate_state_dicts` over the gathered state dicts). `masters`: the optimizer's
    full-precision copies by parameter name (bf16 runs), read and written instead of the parameters.
    Returns the bytes of this participant's own adapters (what it uploads, and downloads back)."""
    own = {name: v for name, v in lora_modules(stage).items() if name in modules}
    params = dict(stage.named_parameters())
    tensors = masters if masters is not None else params
    keys = factor_names(params)
    state = {key: tensors[key].detach().cpu() for name in own for key in keys[name]}
    mine = (state, {m: weights[m] for m in own}, {m: scale for m, (_A, _B, scale) in own.items()})
    return exchange_entries_([mine], method, group, tensors)


@torch.no_grad()
def exchange_entries_(entries: list[tuple[dict, dict, dict]], method: str, group: Optional[dist.ProcessGroup],
                      tensors: Mapping[str, torch.Tensor]) -> int:
    """Aggregate with every participant of `group`, each bringing one or more entries (state dict,
    weight per module, scale per module; with logical clients a rank brings one per client it
    trained this round), and write the result for this rank's first entry into `tensors`. All
    of a rank's entries hold the same modules. Returns the bytes of one entry's adapters."""
    gathered: list[list] = [None] * dist.get_world_size(group)  # type: ignore[list-item]
    dist.all_gather_object(gathered, entries, group=group)
    first = sum(len(g) for g in gathered[:dist.get_rank(group)])
    # Only the modules this participant holds: the others are the other holders' business.
    modules = set(entries[0][1])
    states, weights_of, scales_of = zip(*[_restrict(e, modules) for g in gathered for e in g])
    # Inputs were validated before the run (hetero.setup): a ValueError here is a bug, not a
    # user error, and propagates as such.
    new = aggregate_state_dicts(states, weights_of, scales_of, method=method)[first]
    for key, value in new.items():
        tensors[key].copy_(value.to(tensors[key].dtype))
    return sum(tensors[k].numel() * tensors[k].element_size() for k in new)


def _restrict(part: tuple[dict, dict, dict], modules: set[str]) -> tuple[dict, dict, dict]:
    """A gathered (state dict, weights, scales) cut down to `modules`."""
    state, weights, scales = part
    keys = {k for m, ab in factor_names(state).items() if m in modules for k in ab}
    return ({k: v for k, v in state.items() if k in keys}, {m: w for m, w in weights.items() if m in modules},
            {m: s for m, s in scales.items() if m in modules})


@dataclass(frozen=True)
class LowRankSetup:
    """What a heterogeneous run fixed before training (hetero.setup, partition.SplitPlan): the
    method, the layer each client's activations enter server stage 0 at, and the blocks server
    stage 0 holds on behalf of the clients that cut earlier."""

    method: str
    entry_layers: tuple[int, ...]
    shared_layers: Collection[int]


def participant_modules(stage: nn.Module, client: Optional[int], setup: LowRankSetup,
                        client_weights: list[float]) -> tuple[set[str], dict[str, float]]:
    """The modules a participant aggregates (a client: all its adapters; server stage 0, client
    None: those of the shared blocks it holds for others) and its weight for each."""
    modules = set(lora_modules(stage))
    if client is None:
        modules = {m for m in modules if layer_of(m) in setup.shared_layers}
    return modules, participant_weights(modules, client, client_weights, list(setup.entry_layers))


def check_exchange(name: str, method: str, modules: set[str], weights: Mapping[str, float]) -> None:
    """An exchange's arguments: a known method and a weight for every module it aggregates."""
    if method not in METHODS:
        raise ValueError(f"{name} method must be one of {METHODS}, got {method!r}")
    missing = sorted(modules - set(weights))
    if missing:
        raise ValueError(f"{name} weights: no weight for modules {missing}")


class LowRankExchange:
    """Heterogeneous aggregation (different ranks or split points): every participant of `group`
    gathers the others' factors of the modules it holds and keeps its own result (see exchange_).
    `stage` is read at every aggregation: an importance re-plan may have changed ranks and scales.
    `uploads`: whether this participant's adapters travel (a client's do; server stage 0 plays
    the aggregator, its copies stay put and count as no traffic)."""

    setup_bytes = (0, 0)

    def __init__(self, stage: nn.Module, modules: set[str], weights: Mapping[str, float], method: str,
                 group: Optional[dist.ProcessGroup], uploads: bool):
        check_exchange(type(self).__name__, method, modules, weights)
        self.stage = stage
        self.modules = set(modules)
        self.weights = dict(weights)
        self.method = method
        self.group = group
        self.uploads = uploads

    @classmethod
    def for_participant(cls, stage: nn.Module, client: Optional[int], setup: LowRankSetup,
                        client_weights: list[float], group: Optional[dist.ProcessGroup]) -> "LowRankExchange":
        """Client `client`'s exchange over all its adapters, or (client None) server stage 0's over
        the shared blocks it holds for others."""
        modules, weights = participant_modules(stage, client, setup, client_weights)
        return cls(stage, modules, weights, setup.method, group, uploads=client is not None)

    def aggregate_(self, masters: dict[str, torch.Tensor]) -> int:
        nbytes = exchange_(self.stage, self.weights, self.modules, self.method, self.group, masters)
        return nbytes if self.uploads else 0
