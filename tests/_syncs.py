"""Counting host synchronisations on a CPU stand-in for a CUDA device (tests/test_host_sync.py).

On a GPU, the host queues kernels and runs ahead; it stops and waits for the device whenever it
needs a value the device computes: `.item()` / `bool()` / `int()` / `float()` of a device tensor,
`.tolist()`, a copy to the host, an op whose output size depends on the data (`nonzero`,
`masked_select`, boolean indexing, `unique`, `bincount`, `repeat_interleave` by a tensor), a
blocking copy from the host (PyTorch follows cudaMemcpyAsync with a stream synchronisation unless
`non_blocking=True`), `torch.cuda.synchronize()` and waiting on a CUDA event. Each such read is a
synchronisation: the device drains its queue and sits idle until the host catches up.

On the CPU the device and the host are the same memory, so the counter needs to know which
tensors the code put on the device. It tags them by their storage:

- The rank's device is `cpu:<n>` (a real CPU device, but not the plain `cpu` every host tensor
  has): a move `.to(cpu:0)`, a factory `torch.zeros(..., device=cpu:0)` and `torch.tensor(...,
  device=cpu:0)` make device tensors, and so does every op with a device tensor among its inputs
  (views share the storage, so they are device tensors too).
- Tensors that already live on the device when counting starts (the stage's parameters, buffers,
  gradients, optimizer state) are tagged by the caller (`SyncCounter.tag`).
- `t.device` of a device tensor reads `cpu:<n>`, so code that places tensors "next to" another one
  (`torch.arange(n, device=x.device)`, `idx.to(x.device)`) does what it does on CUDA.
- `.to("cpu")` / `.cpu()` of a device tensor is a download (counted) and returns an untagged
  copy: host data from then on, as on CUDA.

An op that mixes device tensors with host tensors of one or more dimensions is counted too
(`mixed`): on CUDA it is either an error or a hidden blocking copy (indexing a CUDA tensor with a
CPU index tensor). Host tensors of zero dimensions are CPU scalars, which CUDA ops read on the host.

Every synchronisation is recorded with its kind, the site it happened in (`wire` while inside
the point-to-point layer, `compute` elsewhere) and the innermost project frame (for reports).
"""

from __future__ import annotations

import contextlib
import time
import traceback
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional

import torch
from torch.multiprocessing.reductions import StorageWeakRef
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

HOST = torch.device("cpu")
aten = torch.ops.aten

# Ops whose output size depends on the values of their (device) input: the host must read them.
_DATA_DEPENDENT = {aten.nonzero, aten.argwhere, aten.masked_select, aten.unique_consecutive, aten._unique,
                   aten._unique2, aten.unique_dim, aten.unique_dim_consecutive, aten.bincount, aten.equal,
                   aten.is_nonzero, aten.nonzero_numpy}
_BOOL_INDEXED = {aten.index, aten.index_put, aten.index_put_, aten._index_put_impl_}
# Python-level reads of a whole tensor's values (item/bool/int/float are aten._local_scalar_dense).
_READS = {torch.Tensor.tolist, torch.Tensor.numpy, torch.Tensor.__array__}
# Python-level constructors that copy host data to the device.
_UPLOADS = {torch.tensor, torch.as_tensor, torch.asarray, torch.Tensor.new_tensor}
_DEVICE_PROPERTY = torch.Tensor.device  # its __get__ is what `t.device` calls


def is_fake_device(device: Any) -> bool:
    """`cpu:<n>`: the stand-in for a CUDA device."""
    if device is None:
        return False
    device = torch.device(device) if not isinstance(device, torch.device) else device
    return device.type == "cpu" and device.index is not None


@dataclass
class Sync:
    kind: str  # item, read, shape, download, upload, mixed, synchronize, event
    site: str  # wire or compute
    what: str  # the op
    where: str  # innermost frame of the project (or of DeepSpeed) that made it

    def __str__(self) -> str:
        return f"{self.site}/{self.kind} {self.what} at {self.where}"


def _where() -> str:
    """Where a sync comes from: the innermost project frame on the stack, and the innermost
    DeepSpeed or torch.optim frame below it when there is one."""
    frames = [f for f in traceback.extract_stack()[:-3] if "/tests/" not in f.filename]
    out = []
    for package in ("splitlora_ds/", "deepspeed/", "torch/optim/"):
        mine = [f for f in frames if package in f.filename]
        if mine:
            f = mine[-1]
            out.append(f"{package}{f.filename.rsplit(package, 1)[1]}:{f.lineno} {f.name}")
    return " > ".join(out[:2]) or "?"


@dataclass
class SyncCounter:
    device: torch.device  # the fake device, cpu:<n>
    syncs: list[Sync] = field(default_factory=list)
    _tagged: dict[int, StorageWeakRef] = field(default_factory=dict)
    _site: list[str] = field(default_factory=lambda: ["compute"])
    _quiet: int = 0  # > 0: inside a counted Python-level call, its aten ops are not counted again

    # ------------------------------------------------------------------ tags
    def tag(self, *tensors: Optional[torch.Tensor]) -> None:
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.layout == torch.strided:
                s = t.untyped_storage()
                self._tagged[s._cdata] = StorageWeakRef(s)
        if len(self._tagged) > 50_000:
            self._tagged = {k: v for k, v in self._tagged.items() if not v.expired()}

    def untag(self, t: torch.Tensor) -> None:
        self._tagged.pop(t.untyped_storage()._cdata, None)

    def on_device(self, t: Any) -> bool:
        if not isinstance(t, torch.Tensor) or t.layout != torch.strided:
            return False
        ref = self._tagged.get(t.untyped_storage()._cdata)
        return ref is not None and not ref.expired()

    # ------------------------------------------------------------------ counting
    def count(self, kind: str, what: str) -> None:
        if not self._quiet:
            self.syncs.append(Sync(kind, self._site[-1], what, _where()))

    @contextlib.contextmanager
    def site(self, name: str) -> Iterator[None]:
        self._site.append(name)
        try:
            yield
        finally:
            self._site.pop()

    @contextlib.contextmanager
    def counting(self) -> Iterator["SyncCounter"]:
        with _Functions(self), _Dispatch(self):
            yield self

    @contextlib.contextmanager
    def quiet(self) -> Iterator[None]:
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    def summary(self, site: Optional[str] = None) -> dict[str, int]:
        out: dict[str, int] = {}
        for s in self.syncs:
            if site is None or s.site == site:
                out[s.kind] = out.get(s.kind, 0) + 1
        return out


def _target_device(args: tuple, kwargs: dict, counter: SyncCounter) -> tuple[Optional[torch.device], bool]:
    """Where `Tensor.to(*args, **kwargs)` moves a tensor (None: nowhere), and whether non_blocking."""
    rest = args[1:]
    if rest and isinstance(rest[0], torch.Tensor):  # .to(other): other's place
        other = rest[0]
        return (counter.device if counter.on_device(other) else HOST), bool(kwargs.get("non_blocking", False))
    device, _, non_blocking, _ = torch._C._nn._parse_to(*rest, **kwargs)
    return device, non_blocking


class _Functions(TorchFunctionMode):
    """Python-level calls: moves between host and device, whole-tensor reads, `t.device`."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if getattr(func, "__self__", None) is _DEVICE_PROPERTY:
            return self.c.device if self.c.on_device(args[0]) else func(*args, **kwargs)
        if func in (torch.Tensor.to, torch.Tensor.cpu) and isinstance(args[0], torch.Tensor):
            return self._move(func, args, kwargs)
        if func in _READS and self.c.on_device(args[0]):
            self.c.count("read", f"Tensor.{func.__name__}")
            with self.c.quiet():
                return func(*args, **kwargs)
        device = kwargs.get("device")
        next_to_device = func is torch.Tensor.new_tensor and self.c.on_device(args[0])
        if func in _UPLOADS and (is_fake_device(device) or next_to_device):
            return self._upload(func, args, kwargs)
        out = func(*args, **kwargs)
        if is_fake_device(device):  # a factory on the device (zeros, full, arange, empty, ...)
            self.c.tag(*[t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)])
        return out

    def _move(self, func, args: tuple, kwargs: dict) -> Any:
        """`.to(...)` / `.cpu()`: a download returns an untagged copy (host data from then on); an
        upload counts unless non_blocking."""
        c, src = self.c, args[0]
        target, non_blocking = (HOST, False) if func is torch.Tensor.cpu else _target_device(args, kwargs, c)
        if target is not None and target == HOST and c.on_device(src):
            c.count("download", f"Tensor.{func.__name__}")
            with c.quiet():
                out = func(*args, **kwargs)
                if out.untyped_storage()._cdata == src.untyped_storage()._cdata:
                    out = out.clone()  # the CPU returned the tensor itself: the host gets its own
            c.untag(out)
            return out
        if is_fake_device(target) and not c.on_device(src):
            if not non_blocking:
                c.count("upload", f"Tensor.{func.__name__}")
            with c.quiet():
                out = func(*args, **kwargs)
            c.tag(out)
            return out
        return func(*args, **kwargs)

    def _upload(self, func, args: tuple, kwargs: dict) -> torch.Tensor:
        """`torch.tensor(data, device=...)` and its kin: host data copied to the device, blocking."""
        data = args[1] if func is torch.Tensor.new_tensor else (args[0] if args else kwargs.get("data"))
        if not self.c.on_device(data):
            self.c.count("upload", getattr(func, "__name__", str(func)))
        with self.c.quiet():
            out = func(*args, **kwargs)
        self.c.tag(out)
        return out


class _Dispatch(TorchDispatchMode):
    """aten ops: scalar reads, data-dependent shapes, copies, mixed placement; propagates tags."""

    def __init__(self, counter: SyncCounter):
        super().__init__()
        self.c = counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        c = self.c
        tensors = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
        on_dev = [c.on_device(t) for t in tensors]
        packet = func.overloadpacket
        device = kwargs.get("device")
        if any(on_dev):
            self._check(packet, args, kwargs, tensors, on_dev)
        elif packet is aten._to_copy and is_fake_device(device) and not kwargs.get("non_blocking", False):
            c.count("upload", str(packet))
        out = func(*args, **kwargs)
        outs = [t for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor)]
        if packet is aten._to_copy and device is not None:  # a copy lands where it is sent
            for t in outs:
                if is_fake_device(device):
                    c.tag(t)
                else:
                    c.untag(t)
        elif any(on_dev) or is_fake_device(device):
            c.tag(*outs)
        return out

    def _check(self, packet, args: tuple, kwargs: dict, tensors: list, on_dev: list) -> None:
        """Count what an op with device inputs makes the host wait for."""
        c = self.c
        if packet is aten._local_scalar_dense:
            c.count("item", str(packet))
        elif packet in _DATA_DEPENDENT:
            c.count("shape", str(packet))
        elif packet is aten.repeat_interleave and kwargs.get("output_size") is None:
            c.count("shape", str(packet))
        elif packet in _BOOL_INDEXED and any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8)
                                             for i in tree_flatten(args[1])[0]):
            c.count("shape", f"{packet} (boolean index)")
        elif packet is aten.copy_:
            dst, src = args[0], args[1]
            non_blocking = bool(args[2]) if len(args) > 2 else kwargs.get("non_blocking", False)
            if c.on_device(src) and not c.on_device(dst):
                c.count("download", str(packet))
            elif c.on_device(dst) and not c.on_device(src) and not non_blocking:
                c.count("upload", str(packet))
            return
        elif packet is aten._to_copy:
            if kwargs.get("device") is not None and not is_fake_device(kwargs["device"]):
                c.count("download", str(packet))
            return
        if any(not d and t.dim() > 0 for t, d in zip(tensors, on_dev)):
            c.count("mixed", str(packet))


class FakeCudaEvent:
    """torch.cuda.Event on the fake device: `record()` stamps perf_counter; waiting on it is a
    synchronisation; `elapsed_time` needs both events complete (a synchronisation after both
    were recorded), as on CUDA, where it raises otherwise."""

    def __init__(self, counter: SyncCounter, clock: "FakeCuda", enable_timing: bool = False, **_: Any):
        self.counter, self.clock = counter, clock
        self.stamp: Optional[float] = None
        self.generation = -1

    def record(self, stream: Any = None) -> None:
        self.stamp, self.generation = time.perf_counter(), self.clock.generation

    def synchronize(self) -> None:
        self.counter.count("event", "Event.synchronize")
        self.clock.generation += 1

    def query(self) -> bool:
        return self.generation < self.clock.generation

    def elapsed_time(self, end: "FakeCudaEvent") -> float:
        if not (self.query() and end.query()):
            raise RuntimeError("elapsed_time on an event not completed (no synchronisation since its record)")
        return (end.stamp - self.stamp) * 1000.0


@dataclass
class FakeCuda:
    """torch.cuda.Event / torch.cuda.synchronize stand-ins that count into `counter`."""

    counter: SyncCounter
    generation: int = 0

    def event(self, enable_timing: bool = False, **kwargs: Any) -> FakeCudaEvent:
        return FakeCudaEvent(self.counter, self, enable_timing, **kwargs)

    def synchronize(self, device: Any = None) -> None:
        self.counter.count("synchronize", "torch.cuda.synchronize")
        self.generation += 1
