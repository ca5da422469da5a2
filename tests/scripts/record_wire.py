"""Runs splitlora_ds.train and records every tensor bundle this rank sends or receives point to
point (tests/test_wire_audit.py): peer, direction, and each tensor's dtype, shape and values (the
bundle's int64 header, made inside P2P.isend, is not recorded: it holds dtypes and shapes only).
Collectives this rank joins (all_reduce, broadcast) are recorded too, with their group's ranks.

`--relabel`: the same input ids and masks, other labels (every real position scored, with a
target that is a function of the input ids unrelated to the text): for runs that differ only in
the labels."""

import sys

import torch
import torch.distributed as dist

from splitlora_ds import comm
from splitlora_ds.config import load_config
from splitlora_ds.prepare import prepare
from splitlora_ds.train import parse_args
from splitlora_ds.trainer import train

out_dir = sys.argv.pop(sys.argv.index("--out") + 1)
sys.argv.remove("--out")
relabel = "--relabel" in sys.argv
if relabel:
    sys.argv.remove("--relabel")
args = parse_args(sys.argv[1:])
prep = prepare(load_config(args.recipe, args.overrides))
log = []
collectives = []
send, recv_many = comm.P2P.isend, comm.P2P.recv_many
all_reduce, broadcast = dist.all_reduce, dist.broadcast


def isend(self, tensors, dst, exact=False):
    log.append({"dir": "sent", "peer": dst, "tensors": [t.detach().cpu().clone() for t in tensors]})
    return send(self, tensors, dst, exact)


def recv(self, srcs, float_dtype):
    bundles = recv_many(self, srcs, float_dtype)
    for src, bundle in zip(srcs, bundles):
        log.append({"dir": "received", "peer": src, "tensors": [t.detach().cpu().clone() for t in bundle]})
    return bundles


def _ranks(group):
    return tuple(dist.get_process_group_ranks(group if group is not None else dist.group.WORLD))


def recorded_all_reduce(tensor, op=dist.ReduceOp.SUM, group=None, async_op=False):
    before = tensor.detach().cpu().clone()
    out = all_reduce(tensor, op=op, group=group, async_op=async_op)
    collectives.append({"op": "all_reduce", "ranks": _ranks(group), "sent": before,
                        "received": tensor.detach().cpu().clone()})
    return out


def recorded_broadcast(tensor, src, group=None, async_op=False):
    before = tensor.detach().cpu().clone()
    out = broadcast(tensor, src, group=group, async_op=async_op)
    collectives.append({"op": "broadcast", "ranks": _ranks(group), "src": src, "sent": before,
                        "received": tensor.detach().cpu().clone()})
    return out


def relabelled(batches):
    for batch in batches:
        ids, mask = batch["input_ids"], batch["attention_mask"]
        yield {**batch, "labels": torch.where(mask > 0, (ids * 7 + 3) % 256, -100)}


if relabel and prep.batches is not None:
    prep.batches = relabelled(prep.batches)
comm.P2P.isend, comm.P2P.recv_many = isend, recv
dist.all_reduce, dist.broadcast = recorded_all_reduce, recorded_broadcast
train(prep)
torch.save({"log": log, "collectives": collectives, "role": prep.role.name}, f"{out_dir}/{prep.role.name}.wire.pt")
