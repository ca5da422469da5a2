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
them. The host waits for the device only where it must know what arrived: under NCCL (tensors
travel from device memory) it reads the headers of one receive, then its integer tensors, one
transfer each; under gloo (through host memory) neither read waits for the device. Copies from
the host to the device never block the host.
"""

from __future__ import annotations

from typing import Optional, Sequence

import deepspeed.comm as ds_comm
import torch

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
    gloo (which cannot send CUDA tensors).
    """

    def __init__(self, device: torch.device, wire_dtype: Optional[torch.dtype] = None,
                 staging: Optional[torch.device] = None):
        self.device = device
        self.staging = staging or device
        self.wire_dtype = wire_dtype
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

    def _to_wire(self, t: torch.Tensor, exact: bool) -> torch.Tensor:
        t = t.detach()
        if self.wire_dtype is not None and t.is_floating_point() and not exact:
            t = t.to(self.wire_dtype)
        # To the host (gloo) the copy must be complete before the backend reads it; onto a device
        # it is queued, in order with the send.
        return t.to(self.staging, non_blocking=self.staging != HOST).contiguous()

    def isend(self, tensors: Sequence[torch.Tensor], dst: int, exact: bool = False) -> list:
        """Start sending a bundle; returns work handles to `wait()` on. `exact`: in the tensors'
        own dtype, whatever the wire dtype (weights, not activations)."""
        wire = [self._to_wire(t, exact) for t in tensors]
        header = encode_header(wire).to(self.staging, non_blocking=self.staging != HOST)
        works = [ds_comm.isend(header, dst)] + [ds_comm.isend(t, dst) for t in wire if t.numel()]
        self.bytes_sent += _nbytes(header) + sum(_nbytes(t) for t in wire)
        # Keep the buffers alive until the sends complete.
        works.append(_Keep([header, *wire]))
        return works

    def send(self, tensors: Sequence[torch.Tensor], dst: int, exact: bool = False) -> None:
        wait_on(self.isend(tensors, dst, exact), dst)

    def recv_many(self, srcs: Sequence[int], float_dtype: torch.dtype) -> list[list[torch.Tensor]]:
        """Receive one bundle from each of `srcs`, all at once (no source waits on another).
        A source that fails raises failures.PeerLost naming it."""
        headers = [torch.empty(HEADER_LEN, dtype=torch.int64, device=self.staging) for _ in srcs]
        wait_each([[ds_comm.irecv(h, src)] for h, src in zip(headers, srcs)], srcs)
        # The shapes are needed on the host to allocate the buffers: one read for all the headers.
        bundles, works = [], []
        for h, src in zip(_to_host(headers), srcs):
            bufs = [torch.empty(shape, dtype=dt, device=self.staging) for dt, shape in decode_header(h)]
            works.append([ds_comm.irecv(b, src) for b in bufs if b.numel()])
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
