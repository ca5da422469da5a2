"""splitlora_ds: split federated LoRA fine-tuning of causal LLMs on DeepSpeed."""

__version__ = "0.1.0"
