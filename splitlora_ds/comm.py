"""Point-to-point exchange of tensor bundles (activations, masks, labels, gradients).

Each bundle travels as one fixed-size int64 header (count, then dtype code, rank and shape of
every tensor) followed by the tensors, so sequence lengths and batch sizes may change from step
to step. Floating tensors may travel in a narrower `wire_dtype` and are cast back to the
receiver's compute dtype. Every byte sent and received is counted for the comm/ metrics.

Tensors with no elements (a client whose validation shard ran out sends zero rows) travel as
their header entry alone: the receiver makes them from the shape, and no backend is ever asked to
send or receive an empty buffer (NCCL's behaviour for those is not something to rely on).

Floating tensors (activations, gradients, adapters) arrive on the compute device; integer tensors
(segment ids, targets, owners, counts) arrive on the host, where the receiver's bookkeeping reads
them. Two ways to get there:

- One channel (the default group): everything travels from `staging`. Under gloo that is host
  memory and nothing waits for the device. Under NCCL it is device memory, and the receiver's host
  must wait for the device twice per receive: to read the headers (it allocates from them) and to
  read the integers.
- With a `meta` group (a gloo group over all ranks, made beside an NCCL default group): headers
  and integer tensors travel over it from and to host memory, floating tensors over the default
  group from device memory. No receive waits for the device. Per pair of ranks each channel
  delivers in send order, and both sides walk a bundle's tensors in the same order, so each
  channel's messages match one to one; the receiver posts a bundle's tensor receives only once its
  header has arrived, as with one channel.

The bytes counted are the same either way: the channel changes where bytes travel, not which.
Copies from the host to the device never block the host.
"""

from __future__ import annotations

from typing import Optional, Sequence

import deepspeed.comm as ds_comm
import torch
import torch.distributed as dist

from .failures import wait_each, wait_on

_DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64,
           torch.int64, torch.int32, torch.uint8, torch.bool]
_CODE = {dt: i for i, dt in enumerate(_DTYPES)}
MAX_TENSORS = 6
MAX_DIMS = 4
_SLOT = 2 + MAX_DIMS  # dtype code, ndim, dims...
HEADER_LEN = 1 + MAX_TENSORS * _SLOT
HOST = torch.device("cpu")


def encode_header(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """The int64 header describing `tensors` (pure; tested without processes)."""
    if len(tensors) > MAX_TENSORS:
        raise ValueError(f"a bundle holds at most {MAX_TENSORS} tensors, got {len(tensors)}")
    header = torch.zeros(HEADER_LEN, dtype=torch.int64)
    header[0] = len(tensors)
    for i, t in enumerate(tensors):
        if t.dim() > MAX_DIMS:
            raise ValueError(f"tensor {i} has {t.dim()} dims; at most {MAX_DIMS} travel")
        slot = 1 + i * _SLOT
        header[slot] = _CODE[t.dtype]
        header[slot + 1] = t.dim()
        header[slot + 2: slot + 2 + t.dim()] = torch.tensor(t.shape, dtype=torch.int64)
    return header


def decode_header(header: torch.Tensor) -> list[tuple[torch.dtype, tuple[int, ...]]]:
    """Inverse of `encode_header`: (dtype, shape) of every tensor in the bundle."""
    h = header.tolist()
    out = []
    for i in range(int(h[0])):
        slot = 1 + i * _SLOT
        ndim = int(h[slot + 1])
        out.append((_DTYPES[int(h[slot])], tuple(int(d) for d in h[slot + 2: slot + 2 + ndim])))
    return out


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


class P2P:
    """Sends and receives bundles between this rank and its peers, counting bytes.

    `device` is where received floating tensors are used (integer ones are used on the host);
    `staging` is where tensors travel from and to: the same device under nccl, host memory under
    gloo (which cannot send CUDA tensors). `meta`: a gloo group over all ranks for headers and
    integer tensors, from and to host memory (None: they travel with the floats, from `staging`).
    Peers are global ranks on either channel (the meta group spans every rank).
    """

    def __init__(self, device: torch.device, wire_dtype: Optional[torch.dtype] = None,
                 staging: Optional[torch.device] = None, meta: Optional[dist.ProcessGroup] = None):
        self.device = device
        self.staging = staging or device
        self.wire_dtype = wire_dtype
        self.meta = meta
        self.bytes_sent = 0
        self.bytes_received = 0
        self.adapter_bytes_sent = 0  # of bytes_sent: adapters (FedAvg uploads, sequential hand-overs)

    def state_dict(self) -> dict[str, int]:
        """The byte counters (a resumed run continues its comm/ curves)."""
        return {"bytes_sent": self.bytes_sent, "bytes_received": self.bytes_received,
                "adapter_bytes_sent": self.adapter_bytes_sent}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.bytes_sent, self.bytes_received = int(state["bytes_sent"]), int(state["bytes_received"])
        self.adapter_bytes_sent = int(state["adapter_bytes_sent"])

    # ------------------------------------------------------------------ channels
    def _on_meta(self, dtype: torch.dtype) -> bool:
        """Whether a tensor of `dtype` travels on the meta channel: headers and integers do, as
        the receiver's host reads them."""
        return self.meta is not None and not dtype.is_floating_point

    def _place(self, dtype: torch.dtype) -> torch.device:
        """Where a tensor of `dtype` travels from and to."""
        return HOST if self._on_meta(dtype) else self.staging

    def _group(self, t: torch.Tensor) -> Optional[dist.ProcessGroup]:
        """The group `t` travels over (None: the default group)."""
        return self.meta if self._on_meta(t.dtype) else None

    def _stage(self, t: torch.Tensor) -> torch.Tensor:
        where = self._place(t.dtype)
        # To the host the copy must be complete before the backend reads it; onto a device it is
        # queued, in order with the send.
        return t.to(where, non_blocking=where != HOST).contiguous()

    def _isend(self, t: torch.Tensor, dst: int):
        return ds_comm.isend(t, dst, group=self._group(t))

    def _irecv(self, t: torch.Tensor, src: int):
        return ds_comm.irecv(t, src, group=self._group(t))

    def _empty(self, shape: Sequence[int], dtype: torch.dtype) -> torch.Tensor:
        return torch.empty(shape, dtype=dtype, device=self._place(dtype))

    # ------------------------------------------------------------------ bundles
    def _to_wire(self, t: torch.Tensor, exact: bool) -> torch.Tensor:
        t = t.detach()
        if self.wire_dtype is not None and t.is_floating_point() and not exact:
            t = t.to(self.wire_dtype)
        return self._stage(t)

    def isend(self, tensors: Sequence[torch.Tensor], dst: int, exact: bool = False) -> list:
        """Start sending a bundle; returns work handles to `wait()` on. `exact`: in the tensors'
        own dtype, whatever the wire dtype (weights, not activations)."""
        wire = [self._to_wire(t, exact) for t in tensors]
        header = self._stage(encode_header(wire))
        works = [self._isend(t, dst) for t in [header, *wire] if t.numel()]
        self.bytes_sent += _nbytes(header) + sum(_nbytes(t) for t in wire)
        # Keep the buffers alive until the sends complete.
        works.append(_Keep([header, *wire]))
        return works

    def send(self, tensors: Sequence[torch.Tensor], dst: int, exact: bool = False) -> None:
        wait_on(self.isend(tensors, dst, exact), dst)

    def recv_many(self, srcs: Sequence[int], float_dtype: torch.dtype) -> list[list[torch.Tensor]]:
        """Receive one bundle from each of `srcs`, all at once (no source waits on another).
        A source that fails raises failures.PeerLost naming it."""
        headers = [self._empty((HEADER_LEN,), torch.int64) for _ in srcs]
        wait_each([[self._irecv(h, src)] for h, src in zip(headers, srcs)], srcs)
        # The shapes are needed on the host to allocate the buffers: one read for all the headers
        # (none when they came over the meta channel, into host memory).
        bundles, works = [], []
        for h, src in zip(_to_host(headers), srcs):
            bufs = [self._empty(shape, dt) for dt, shape in decode_header(h)]
            works.append([self._irecv(b, src) for b in bufs if b.numel()])
            bundles.append(bufs)
            self.bytes_received += _nbytes(h) + sum(_nbytes(b) for b in bufs)
        wait_each(works, srcs)
        integers = iter(_to_host([b for bufs in bundles for b in bufs if not b.is_floating_point()]))
        return [[b.to(self.device, float_dtype, non_blocking=True) if b.is_floating_point() else next(integers)
                 for b in bufs] for bufs in bundles]

    def recv(self, src: int, float_dtype: torch.dtype) -> list[torch.Tensor]:
        return self.recv_many([src], float_dtype)[0]


def _to_host(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """`tensors` on the host, with one device-to-host copy for all of those that are elsewhere
    (each copy makes the host wait for the device; one wait is enough)."""
    away = [i for i, t in enumerate(tensors) if t.device != HOST]
    if not away:
        return list(tensors)
    flat = torch.cat([tensors[i].reshape(-1).to(torch.int64) for i in away]).to(HOST)
    out = list(tensors)
    for i, part in zip(away, flat.split([tensors[i].numel() for i in away])):
        out[i] = part.to(tensors[i].dtype).view(tensors[i].shape)
    return out


class _Keep:
    """A no-op work handle that holds references to buffers of in-flight sends."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors

    def wait(self) -> bool:
        return True
