"""The split-federated runtime: instructions, schedules (one class per mode), packing, the loss
and the executor that runs a role's instructions against explicit micro-batch buffers."""
