# Sourced by the multi-host launch scripts: the slot count of a DeepSpeed hostfile must equal
# the ranks the recipe needs, checked before any rank starts (a mismatch would otherwise show up
# as ranks of the wrong role, or a rendezvous that never completes).
#   check_slots SCRIPT HOSTFILE RECIPE [--set ...]
check_slots() {
  local script=$1 hostfile=$2 recipe=$3
  shift 3
  if [[ ! -f $hostfile ]]; then
    echo "$script: no hostfile $hostfile" >&2
    exit 2
  fi
  local world slots
  world=$(python -m splitlora_ds.train --recipe "$recipe" "$@" --world-size | tail -n 1)
  slots=$(awk '!/^[[:space:]]*#/ { for (i = 1; i <= NF; i++) if ($i ~ /^slots=/) { split($i, a, "="); s += a[2] } }
               END { print s + 0 }' "$hostfile")
  if (( world != slots )); then
    echo "$script: the recipe needs $world ranks but $hostfile offers $slots slots ($(awk '!/^[[:space:]]*#/ && NF { printf "%s%s", sep, $0; sep = ", " }' "$hostfile"))" >&2
    exit 2
  fi
}
