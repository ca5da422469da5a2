"""HSplitLoRA: heterogeneous clients (per-client split points and LoRA ranks, budgets, importance,
and aggregation of adapters of different ranks)."""
