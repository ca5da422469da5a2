"""Secure aggregation of client adapters (after Bonawitz et al., SecAgg, without dropout recovery):
every client learns the weighted sum of the clients' adapters and nothing else; no participant,
and no rank that relays the reduction, sees one client's adapters in the clear.

- Key agreement: each client makes an X25519 key pair per run and the clients exchange public
  keys (public by nature). Clients i < j derive a shared seed s_ij with HKDF-SHA256.
- Masks: for aggregation round r, each pair expands s_ij with ChaCha20 (nonce = r) into a mask
  m_ij; client i adds m_ij for every j > i and subtracts m_ji for every j < i, so the masks of
  all clients add up to zero.
- Fixed point: each client's weighted adapters w_i x_i are encoded as integers
  round(w_i x_i 2^FRACTION_BITS) modulo 2^MODULUS_BITS. Masked values are uniform in
  [0, 2^MODULUS_BITS) whatever the adapters; their plain integer sum over at most 2^(63 -
  MODULUS_BITS) clients fits an int64, so the all-reduce never overflows on any backend, and the
  sum taken modulo 2^MODULUS_BITS is exactly the sum of the encodings.
- What it protects: the individual (weighted) adapters of each client, from the server, the other
  clients and whoever relays the all-reduce, in every round. What it reveals: the weighted sum
  (the aggregate every client receives anyway), the sample counts behind the weights, and that a
  client took part. A client that drops out mid-round ends the run (no recovery).

Cryptography comes from the `cryptography` package; nothing here is hand-written crypto.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
import torch
import torch.distributed as dist
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from torch._utils import _flatten_dense_tensors, _unflatten_dense_tensors

FRACTION_BITS = 24  # resolution 2^-24 = 6e-8 per client contribution
MODULUS_BITS = 48  # encoded range +-2^23 = 8.4e6 for a weighted adapter entry
MAX_CLIENTS = 2 ** (63 - MODULUS_BITS)  # an int64 holds the plain sum of this many masked values
_MODULUS = 1 << MODULUS_BITS
_SEED_INFO = b"splitlora_ds secure aggregation pair seed"


def encode(values: torch.Tensor, fraction_bits: int = FRACTION_BITS) -> np.ndarray:
    """Fixed-point integers modulo 2^MODULUS_BITS (int64 in [0, 2^MODULUS_BITS)), resolution
    2^-fraction_bits, range +-2^(MODULUS_BITS - 1 - fraction_bits)."""
    scaled = np.rint(values.detach().double().cpu().numpy() * (1 << fraction_bits))
    limit = 1 << (MODULUS_BITS - 1)
    # Checked before the cast: a float beyond int64 would wrap silently (or be inf/nan).
    if scaled.size and not (np.all(scaled < limit) and np.all(scaled >= -limit)):
        raise ValueError(f"secure aggregation: a weighted adapter value exceeds the fixed-point range "
                         f"+-{limit / (1 << fraction_bits):g}")
    return np.mod(scaled.astype(np.int64), _MODULUS)


def decode(total: np.ndarray, fraction_bits: int = FRACTION_BITS) -> torch.Tensor:
    """The signed fixed-point sum (float64) of a sum of encodings taken modulo 2^MODULUS_BITS."""
    residue = np.mod(total, _MODULUS)
    signed = np.where(residue >= _MODULUS // 2, residue - _MODULUS, residue)
    return torch.from_numpy(signed.astype(np.float64) / (1 << fraction_bits))


def pair_seed(private: X25519PrivateKey, peer_public: bytes) -> bytes:
    """The 32-byte seed two clients share (X25519 agreement, HKDF-SHA256)."""
    shared = private.exchange(X25519PublicKey.from_public_bytes(peer_public))
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_SEED_INFO).derive(shared)


def pair_mask(seed: bytes, round_index: int, n: int) -> np.ndarray:
    """n uniform values in [0, 2^MODULUS_BITS), fresh for every round (ChaCha20 keystream)."""
    nonce = round_index.to_bytes(16, "little")
    stream = Cipher(algorithms.ChaCha20(seed, nonce), mode=None).encryptor().update(bytes(8 * n))
    return (np.frombuffer(stream, dtype=np.uint64) & np.uint64(_MODULUS - 1)).astype(np.int64)


def masked(encoded: np.ndarray, me: int, seeds: Mapping[int, bytes], round_index: int) -> np.ndarray:
    """Client `me`'s upload: its encoding plus the pairwise masks (+ for peers above it, - below)."""
    out = encoded.copy()
    for peer, seed in seeds.items():
        mask = pair_mask(seed, round_index, encoded.size)
        out = out + mask if peer > me else out - mask
        out = np.mod(out, _MODULUS)
    return out


class SecureAggregator:
    """One client's side of secure aggregation over a process group of the clients."""

    def __init__(self, index: int, group: Optional[dist.ProcessGroup], clients: int):
        if clients > MAX_CLIENTS:
            raise ValueError(f"secure aggregation supports at most {MAX_CLIENTS} clients, got {clients}")
        self.index = index
        self.group = group
        self.rounds = 0
        private = X25519PrivateKey.generate()  # fresh per run: seeds never repeat across runs
        public = private.public_key().public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
        keys: list = [None] * clients
        dist.all_gather_object(keys, public, group=group)
        self.key_bytes = len(public) * clients  # what the key exchange moved to this client
        self.seeds = {peer: pair_seed(private, key) for peer, key in enumerate(keys) if peer != index}

    @torch.no_grad()
    def weighted_sum_(self, tensors: Sequence[torch.Tensor], weight: float,
                      staging: Optional[torch.device] = None) -> int:
        """In place on every client: t <- sum_c weight_c * t_c, each client's term hidden by masks.
        Returns the bytes this client uploads (int64 words)."""
        if not tensors:
            return 0
        flat = _flatten_dense_tensors([t.float() for t in tensors]) * weight
        upload = masked(encode(flat), self.index, self.seeds, self.rounds)
        self.rounds += 1
        buf = torch.from_numpy(upload).to(staging or tensors[0].device)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM, group=self.group)
        total = decode(buf.cpu().numpy()).to(torch.float32).to(tensors[0].device)
        for t, value in zip(tensors, _unflatten_dense_tensors(total, list(tensors))):
            t.copy_(value.to(t.dtype))
        return buf.numel() * buf.element_size()


class SecureFedAvg:
    """FedAvg whose sum goes through `SecureAggregator` (the same result to fixed-point
    resolution). Building it runs the key agreement, a collective of every client in `group`."""

    def __init__(self, index: int, group: Optional[dist.ProcessGroup], clients: int, weight: float,
                 staging: Optional[torch.device] = None):
        if not 0.0 <= weight <= 1.0:
            raise ValueError(f"SecureFedAvg weight must be in [0, 1], got {weight}")
        self.secure = SecureAggregator(index, group, clients)
        self.weight = weight
        self.staging = staging
        # The key agreement: this client's public key goes out once, every client's comes back.
        self.setup_bytes = (self.secure.key_bytes // clients, self.secure.key_bytes)

    def aggregate_(self, masters: dict[str, torch.Tensor]) -> int:
        return self.secure.weighted_sum_(list(masters.values()), self.weight, self.staging)
