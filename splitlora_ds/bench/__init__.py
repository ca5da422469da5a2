"""The benchmark: every mode of one recipe side by side (see __main__.py), a latency model for
devices this machine does not have (latency.py), and the README's performance targets (targets.py)."""
