#!/usr/bin/env bash
# Run a recipe on this machine's CPU cores: one rank per client and server stage, gloo backend.
#   launch/local-cpu.sh recipes/tiny-cpu.yaml [--set section.key=value ...]
# The world size comes from the recipe (federation.clients + split.server_stages). Every rank may
# use every core: the trainer makes waiting ranks' threads sleep (OMP_WAIT_POLICY=PASSIVE), so
# whichever rank computes gets the cores; set OMP_NUM_THREADS to cap each rank instead.
set -euo pipefail
recipe=${1:?usage: launch/local-cpu.sh RECIPE [--set section.key=value ...]}
shift
world=$(python -m splitlora_ds.train --recipe "$recipe" "$@" --world-size | tail -n 1)
exec deepspeed --num_gpus "$world" --master_port "${MASTER_PORT:-29500}" \
  --module splitlora_ds.train --recipe "$recipe" "$@"
