"""Architectures of the hub models our recipes name, for planning without a download.

`--dry-run` builds the split plan and parameter counts from these when the hub cannot be
reached; training always reads the real config next to the real weights.
"""

from __future__ import annotations

from typing import Optional

_GPT2 = {"vocab_size": 50257, "n_positions": 1024, "bos_token_id": 50256, "eos_token_id": 50256}
_LLAMA2_7B = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 32, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False}
_LLAMA3_8B = {"vocab_size": 128256, "hidden_size": 4096, "intermediate_size": 14336, "num_hidden_layers": 32,
              "num_attention_heads": 32, "num_key_value_heads": 8, "max_position_embeddings": 8192,
              "rms_norm_eps": 1e-5, "rope_theta": 500000.0, "bos_token_id": 128000, "eos_token_id": 128001,
              "tie_word_embeddings": False}

KNOWN_CONFIGS: dict[str, dict] = {
    "gpt2": {**_GPT2, "n_layer": 12, "n_embd": 768, "n_head": 12},
    "gpt2-medium": {**_GPT2, "n_layer": 24, "n_embd": 1024, "n_head": 16},
    "gpt2-large": {**_GPT2, "n_layer": 36, "n_embd": 1280, "n_head": 20},
    "gpt2-xl": {**_GPT2, "n_layer": 48, "n_embd": 1600, "n_head": 25},
    "meta-llama/Llama-2-7b-hf": _LLAMA2_7B,
    "meta-llama/Meta-Llama-3-8B": _LLAMA3_8B,
}
for _name in ("gpt2", "gpt2-medium", "gpt2-large", "gpt2-xl"):
    KNOWN_CONFIGS[f"openai-community/{_name}"] = KNOWN_CONFIGS[_name]


def known_config(pretrained: Optional[str]) -> Optional[dict]:
    return None if pretrained is None else KNOWN_CONFIGS.get(pretrained)
