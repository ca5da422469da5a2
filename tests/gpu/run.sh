#!/usr/bin/env bash
# The whole GPU suite in one go, for a machine with CUDA: prints the versions it ran with, the MFU
# lines of the LLaMA-7B-shaped server stage and the pass/fail summary, and keeps the full log and
# a JUnit report in OUT (default: runs/gpu-suite).
#   bash tests/gpu/run.sh [OUT]
set -uo pipefail
cd "$(dirname "$0")/../.."
out="${1:-runs/gpu-suite}"
mkdir -p "$out"
python - <<'PY' | tee "$out/versions.txt"
import importlib.metadata as md, torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "devices", torch.cuda.device_count(),
      torch.cuda.get_device_name(0) if torch.cuda.is_available() else "(no CUDA)")
for name in ("deepspeed", "transformers", "peft", "accelerate"):
    print(name, md.version(name))
PY
python -m pytest -m gpu tests/gpu -s -q -p no:cacheprovider --junitxml "$out/junit.xml" 2>&1 | tee "$out/log.txt"
code=${PIPESTATUS[0]}
grep -E "MFU|flops/step" "$out/log.txt" || true
exit "$code"
