#!/usr/bin/env bash
# Start this machine's ranks of a multi-host run, without ssh: run it on every host, each with
# its own NODE_RANK (its line in the hostfile, from 0), all with the same hostfile, master
# address and recipe. Nothing needs to be shared but the network: each host resolves the
# recipe's relative paths (checkpoint.dir, log.dir, train.output_dir) under the directory it is
# started in and keeps its own ranks' checkpoints, summaries and logs there.
#   MASTER_PORT=29500 launch/host.sh HOSTFILE NODE_RANK MASTER_ADDR RECIPE [--set section.key=value ...]
# MASTER_ADDR is the address of node 0 (the first hostfile line), reachable from every host.
# CPU-only client hosts with a GPU server: add `--set dist.backend=gloo` on every host.
set -euo pipefail
usage="usage: launch/host.sh HOSTFILE NODE_RANK MASTER_ADDR RECIPE [--set section.key=value ...]"
hostfile=${1:?$usage}
node_rank=${2:?$usage}
master_addr=${3:?$usage}
recipe=${4:?$usage}
shift 4
. "$(dirname "${BASH_SOURCE[0]}")/slots.sh"
check_slots launch/host.sh "$hostfile" "$recipe" "$@"
nodes=$(awk '!/^[[:space:]]*#/ && NF { n++ } END { print n + 0 }' "$hostfile")
if (( node_rank < 0 || node_rank >= nodes )); then
  echo "launch/host.sh: NODE_RANK $node_rank, but $hostfile lists $nodes hosts (0..$(( nodes - 1 )))" >&2
  exit 2
fi
exec deepspeed --hostfile "$hostfile" --no_ssh --node_rank "$node_rank" \
  --master_addr "$master_addr" --master_port "${MASTER_PORT:-29500}" \
  --module splitlora_ds.train --recipe "$recipe" "$@"
