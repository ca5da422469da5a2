"""Runs splitlora_ds.train and records each rank's adapters after every optimizer step and
every averaging or hand-over (tests/test_federation.py, test_sequential.py, test_hetero.py).
With --masters, also the optimizer's fp32 masters, as "<step>/<tag>/master/<name>" (bf16 runs)."""

import sys

from safetensors.torch import save_file

from splitlora_ds.runtime import instructions as S
from splitlora_ds.config import load_config
from splitlora_ds.train import parse_args
from splitlora_ds.prepare import prepare
from splitlora_ds.trainer import train

out_dir = sys.argv.pop(sys.argv.index("--out") + 1)
sys.argv.remove("--out")
masters = "--masters" in sys.argv
if masters:
    sys.argv.remove("--masters")
args = parse_args(sys.argv[1:])
prep = prepare(load_config(args.recipe, args.overrides))
snapshots = {}


def record(step, instruction, runner):
    tag = {S.OptimizerStep: "opt", S.AverageAdapters: "avg", S.SendAdapters: "sent",
           S.RecvAdapters: "recv"}.get(type(instruction))
    if tag:
        for name, p in runner.stage.adapter_parameters().items():
            snapshots[f"{step}/{tag}/{name}"] = p.detach().cpu().clone()
            if masters:
                snapshots[f"{step}/{tag}/master/{name}"] = runner.masters[name].detach().cpu().clone()


train(prep, observers=[record])
save_file(snapshots, f"{out_dir}/{prep.role.name}.safetensors")
