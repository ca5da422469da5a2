#!/usr/bin/env bash
# Run a recipe on one GPU node: one GPU per rank (clients first, then the server stages), nccl.
#   launch/gpu-node.sh recipes/llama2-7b-alpaca.yaml [--set section.key=value ...]
# The recipe's world size (federation.clients + split.server_stages) must not exceed the GPUs.
set -euo pipefail
recipe=${1:?usage: launch/gpu-node.sh RECIPE [--set section.key=value ...]}
shift
world=$(python -m splitlora_ds.train --recipe "$recipe" "$@" --world-size | tail -n 1)
gpus=$(python -c "import torch; print(torch.cuda.device_count())")
if (( world > gpus )); then
  echo "launch/gpu-node.sh: the recipe needs $world ranks but this node has $gpus GPUs" >&2
  exit 2
fi
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}
exec deepspeed --num_gpus "$world" --master_port "${MASTER_PORT:-29500}" \
  --module splitlora_ds.train --recipe "$recipe" "$@"
