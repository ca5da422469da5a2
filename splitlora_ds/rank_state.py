"""A rank's checkpointed state, walked part by part: every part owns its state through
`state_dict()` / `load_state_dict()`, and the checkpoint is {part name: its state}."""

from __future__ import annotations

from typing import Any, Optional, Protocol, Sequence

from . import checkpoint as ckpt


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, state: Any) -> None: ...


class SchedulerState:
    """The DeepSpeed engine's LR scheduler. DeepSpeed's schedulers restore only their iteration;
    the rate for it is set at load, so a run resumed with a longer train.max_steps follows its new
    schedule from the first step."""

    def __init__(self, engine):
        self.engine = engine

    def state_dict(self) -> dict:
        return self.engine.lr_scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        if not state:
            return
        scheduler = self.engine.lr_scheduler
        scheduler.load_state_dict(state)
        for group, lr in zip(self.engine.optimizer.param_groups, scheduler.get_lr()):
            group["lr"] = lr


class StreamsState:
    """This rank's data streams: where each will draw its next batch."""

    def __init__(self, streams: Sequence[Stateful]):
        self.streams = list(streams)

    def state_dict(self) -> list:
        return [s.state_dict() for s in self.streams]

    def load_state_dict(self, state: list) -> None:
        for stream, s in zip(self.streams, state):
            stream.load_state_dict(s)


class RngState:
    """torch's, Python's and numpy's generators (dropout, noise)."""

    def state_dict(self) -> dict:
        return ckpt.rng_state()

    def load_state_dict(self, state: dict) -> None:
        ckpt.set_rng_state(state)


def rank_parts(engine, p2p: Stateful, streams: Sequence[Stateful], importance: Optional[Stateful] = None,
               privacy: Optional[Stateful] = None) -> dict[str, Stateful]:
    """Every part of a rank that has state, by its name in the checkpoint."""
    parts: dict[str, Stateful] = {"optimizer": engine.optimizer, "rng": RngState(), "data": StreamsState(streams),
                                  "traffic": p2p}
    if engine.lr_scheduler is not None:
        parts["scheduler"] = SchedulerState(engine)
    if importance is not None:
        parts["importance"] = importance
    if privacy is not None:
        parts["privacy"] = privacy
    return parts


def save_state(parts: dict[str, Stateful]) -> dict:
    return {name: part.state_dict() for name, part in parts.items()}


def load_state(parts: dict[str, Stateful], state: dict) -> None:
    """Load every part the checkpoint holds (a part absent there keeps its fresh state)."""
    state = _upgrade(state)
    for name, part in parts.items():
        if state.get(name) is not None:
            part.load_state_dict(state[name])


def _upgrade(state: dict) -> dict:
    """Checkpoints written before the parts had names kept the byte counters as a list."""
    if "traffic" not in state and "bytes" in state:
        sent, received, adapters = state["bytes"]
        state = {**state, "traffic": {"bytes_sent": sent, "bytes_received": received, "adapter_bytes_sent": adapters}}
    return state
