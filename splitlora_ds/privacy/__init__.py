"""Privacy options: differential privacy on activations, on a U-shaped tail's gradients and on
adapter updates (dp.py)."""
