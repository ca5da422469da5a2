"""Privacy options: differential privacy on activations and on adapter updates (dp.py)."""
