#!/usr/bin/env bash
# Run a recipe across machines with a DeepSpeed hostfile, started from this machine through pdsh
# (DeepSpeed's default multi-node launcher: passwordless ssh from here to every host, pdsh
# installed, and the project and recipe at the same path on each, as the command runs there
# as given here). Disks need not be shared: every host keeps its own ranks' checkpoints and
# logs under the recipe's paths, resolved on that host (see README "Launching"). Hosts that
# cannot be reached by ssh start their own ranks with launch/host.sh instead.
#   launch/multi-node.sh launch/hostfile.example recipes/gpt2-e2e.yaml [--set ...]
# Ranks are numbered host by host in hostfile order, so list the client machines first and the
# server machine(s) last: ranks 0..C-1 become clients, the last S ranks the server stages.
# Clients without GPUs and a GPU server can share one job with `--set dist.backend=gloo`
# (tensors then travel through host memory).
set -euo pipefail
hostfile=${1:?usage: launch/multi-node.sh HOSTFILE RECIPE [--set section.key=value ...]}
recipe=${2:?usage: launch/multi-node.sh HOSTFILE RECIPE [--set section.key=value ...]}
shift 2
. "$(dirname "${BASH_SOURCE[0]}")/slots.sh"
check_slots launch/multi-node.sh "$hostfile" "$recipe" "$@"
exec deepspeed --hostfile "$hostfile" --master_port "${MASTER_PORT:-29500}" \
  --module splitlora_ds.train --recipe "$recipe" "$@"
