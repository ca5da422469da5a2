#!/usr/bin/env bash
# Run a recipe across machines with a DeepSpeed hostfile (passwordless ssh from this machine to
# every host, the project installed at the same path on each).
#   launch/multi-node.sh launch/hostfile.example recipes/gpt2-e2e.yaml [--set ...]
# Ranks are numbered host by host in hostfile order, so list the client machines first and the
# server machine(s) last: ranks 0..C-1 become clients, the last S ranks the server stages.
# Clients without GPUs and a GPU server can share one job with `--set dist.backend=gloo`
# (tensors then travel through host memory).
set -euo pipefail
hostfile=${1:?usage: launch/multi-node.sh HOSTFILE RECIPE [--set section.key=value ...]}
recipe=${2:?usage: launch/multi-node.sh HOSTFILE RECIPE [--set section.key=value ...]}
shift 2
world=$(python -m splitlora_ds.train --recipe "$recipe" "$@" --world-size | tail -n 1)
slots=$(awk '!/^[[:space:]]*#/ { for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); s += a[2] } }
             END { print s + 0 }' "$hostfile")
if (( world != slots )); then
  echo "launch/multi-node.sh: the recipe needs $world ranks but $hostfile offers $slots slots" >&2
  exit 2
fi
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" \
  --module splitlora_ds.train --recipe "$recipe" "$@"
