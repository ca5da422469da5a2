"""Runs splitlora_ds.train and records every tensor bundle this rank sends or receives point to
point (tests/test_wire_audit.py): peer, direction, and each tensor's dtype, shape and values."""

import sys

import torch

from splitlora_ds import comm
from splitlora_ds.config import load_config
from splitlora_ds.prepare import prepare
from splitlora_ds.train import parse_args
from splitlora_ds.trainer import train

out_dir = sys.argv.pop(sys.argv.index("--out") + 1)
sys.argv.remove("--out")
args = parse_args(sys.argv[1:])
prep = prepare(load_config(args.recipe, args.overrides))
log = []
send, recv_many = comm.P2P.isend, comm.P2P.recv_many


def isend(self, tensors, dst, exact=False):
    log.append({"dir": "sent", "peer": dst, "tensors": [t.detach().cpu().clone() for t in tensors]})
    return send(self, tensors, dst, exact)


def recv(self, srcs, float_dtype):
    bundles = recv_many(self, srcs, float_dtype)
    for src, bundle in zip(srcs, bundles):
        log.append({"dir": "received", "peer": src, "tensors": [t.detach().cpu().clone() for t in bundle]})
    return bundles


comm.P2P.isend, comm.P2P.recv_many = isend, recv
train(prep)
torch.save({"log": log, "role": prep.role.name}, f"{out_dir}/{prep.role.name}.wire.pt")
