"""Per-step runtime helpers shared by the roles of a run (sequence packing)."""
