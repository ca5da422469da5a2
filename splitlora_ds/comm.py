"""Point-to-point exchange of tensor bundles (activations, masks, labels, gradients).

Each bundle travels as one fixed-size int64 header (count, then dtype code, rank and shape of
every tensor) followed by the tensors, so sequence lengths and batch sizes may change from step
to step. Floating tensors may travel in a narrower `wire_dtype` and are cast back to the
receiver's compute dtype. Every byte sent and received is counted for the comm/ metrics.

Tensors with no elements (a client whose validation shard ran out sends zero rows) travel as
their header entry alone: the receiver makes them from the shape, and no backend is ever asked to
send or receive an empty buffer (NCCL's behaviour for those is not something to rely on).
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

    `device` is where received tensors are used; `staging` is where they travel from and to: the
    same device under nccl, host memory under gloo (which cannot send CUDA tensors).
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
        return t.to(self.staging).contiguous()

    def isend(self, tensors: Sequence[torch.Tensor], dst: int, exact: bool = False) -> list:
        """Start sending a bundle; returns work handles to `wait()` on. `exact`: in the tensors'
        own dtype, whatever the wire dtype (weights, not activations)."""
        wire = [self._to_wire(t, exact) for t in tensors]
        header = encode_header(wire).to(self.staging)
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
        bundles, works = [], []
        for h, src in zip(headers, srcs):
            bufs = [torch.empty(shape, dtype=dt, device=self.staging) for dt, shape in decode_header(h)]
            works.append([ds_comm.irecv(b, src) for b in bufs if b.numel()])
            bundles.append(bufs)
            self.bytes_received += _nbytes(h) + sum(_nbytes(b) for b in bufs)
        wait_each(works, srcs)
        return [[b.to(self.device, float_dtype if b.is_floating_point() else b.dtype) for b in bufs]
                for bufs in bundles]

    def recv(self, src: int, float_dtype: torch.dtype) -> list[torch.Tensor]:
        return self.recv_many([src], float_dtype)[0]


class _Keep:
    """A no-op work handle that holds references to buffers of in-flight sends."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.tensors = tensors

    def wait(self) -> bool:
        return True
