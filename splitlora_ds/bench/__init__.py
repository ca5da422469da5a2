"""The benchmark: every mode of one recipe side by side (see __main__.py), a latency model for
devices this machine does not have (latency.py), the performance targets of docs/benchmarks.md (targets.py),
and a server stage's achieved TFLOP/s and MFU (mfu.py, run on its own)."""
