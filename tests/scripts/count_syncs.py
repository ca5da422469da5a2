"""Runs splitlora_ds.train with every rank's compute device faked as `cpu:0` and counts the host
synchronisations each training step makes (tests/_syncs.py says how; tests/test_host_sync.py
reads the result). Writes `<out>/<role>.syncs.json`: per step, the number of instructions the
rank ran and every synchronisation (kind, site, op, where).

`--staging device` (default): tensors travel from and to the device, as under NCCL;
`--staging host`: through host memory, as under gloo with a GPU.
`--meta-channel`: the job makes its host-side metadata group as under NCCL (topology.make_groups
with host_channel, a gloo group here too): headers and integer tensors travel over it from host
memory, floating tensors from the device.
`--read-per-micro-batch`: every Forward also reads a value of its output on the host (the kind of
read the executor must not make), to show that the count sees it.

The clock is the CUDA one (events), with torch.cuda.Event and torch.cuda.synchronize replaced by
stand-ins that count (tests/_syncs.py FakeCuda)."""

import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from _syncs import FakeCuda, SyncCounter  # noqa: E402
from splitlora_ds import comm, timing, trainer  # noqa: E402
from splitlora_ds.config import load_config  # noqa: E402
from splitlora_ds.prepare import prepare  # noqa: E402
from splitlora_ds.runtime import executor as executor_module  # noqa: E402
from splitlora_ds.topology import make_groups  # noqa: E402
from splitlora_ds.train import parse_args  # noqa: E402

FAKE = torch.device("cpu", 0)

out_dir = sys.argv.pop(sys.argv.index("--out") + 1)
sys.argv.remove("--out")
staging_mode = "device"
if "--staging" in sys.argv:
    staging_mode = sys.argv.pop(sys.argv.index("--staging") + 1)
    sys.argv.remove("--staging")
read_per_micro_batch = "--read-per-micro-batch" in sys.argv
if read_per_micro_batch:
    sys.argv.remove("--read-per-micro-batch")
meta_channel = "--meta-channel" in sys.argv
if meta_channel:
    sys.argv.remove("--meta-channel")
args = parse_args(sys.argv[1:])
prep = prepare(load_config(args.recipe, args.overrides))
counter = SyncCounter(FAKE)
cuda = FakeCuda(counter)
steps: list[dict] = []


class FakeDeviceP2P(comm.P2P):
    """The rank's device is the fake one; staging is the device (NCCL) or the host (gloo); `meta`
    is the trainer's metadata group (made only with --meta-channel)."""

    def __init__(self, device, wire_dtype=None, staging=None, meta=None):
        super().__init__(FAKE, wire_dtype, FAKE if staging_mode == "device" else torch.device("cpu"), meta)

    def isend(self, *a, **k):
        with counter.site("wire"):
            return super().isend(*a, **k)

    def recv_many(self, *a, **k):
        with counter.site("wire"):
            return super().recv_many(*a, **k)


def device_state(runner) -> list[torch.Tensor]:
    """What lives on the device between steps: the stage's parameters, buffers and gradients, the
    optimizer's state and the adapters' master copies."""
    out = [*runner.stage.parameters(), *runner.stage.buffers()]
    out += [p.grad for p in runner.stage.parameters() if p.grad is not None]
    optimizer = getattr(runner.engine, "optimizer", None)
    for state in getattr(optimizer, "state", {}).values():
        out += [v for v in state.values() if isinstance(v, torch.Tensor) and v.dim() > 0]
    out += list(runner.masters.values()) + list(runner.global_masters)
    return out


train_step = executor_module.Executor.train_step


def counted_train_step(self, step):
    if not isinstance(self.clock, timing.EventClock):  # the CUDA clock, on the fake events
        self.clock = timing.EventClock(make_event=cuda.event)
    instructions = [type(i).__name__ for i in self.schedule.train(self.role, step)]
    counter.syncs = []
    counter.tag(*device_state(self))
    with counter.counting():
        stats = train_step(self, step)
    steps.append({"step": step, "instructions": instructions,
                  "syncs": [vars(s) for s in counter.syncs]})
    return stats


def groups_with_host_channel(*args, **kwargs):
    """make_groups as under NCCL: with the metadata group, whatever the backend."""
    return make_groups(*args, **{**kwargs, "host_channel": True})


def reading_forward(self, ins):
    forward(self, ins)
    output = self.buffers[ins.buffer].output
    if output is not None and output.numel():
        float(output.float().mean())


forward = executor_module.Executor._forward
if read_per_micro_batch:
    executor_module.Executor._forward = reading_forward
trainer.P2P = FakeDeviceP2P
if meta_channel:
    trainer.make_groups = groups_with_host_channel
executor_module.Executor.train_step = counted_train_step
torch.cuda.synchronize = cuda.synchronize
trainer.train(prep)
Path(out_dir, f"{prep.role.name}.syncs.json").write_text(json.dumps(
    {"role": prep.role.name, "micro_batches": prep.cfg.micro_batches, "steps": steps}, indent=1))
