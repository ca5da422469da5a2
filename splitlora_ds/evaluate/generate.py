"""Batched generation from an exported model (PEFT adapter folder or merged model folder)."""

from __future__ import annotations

from pathlib import Path
from typing import Sequence

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from ..data.examples import DEFAULT_SEPARATOR, encode_prompt
from ..errors import ConfigError


def load_model(path: str | Path, device: str = "cpu") -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """`python -m splitlora_ds.export` output: an adapter folder (loads its base too) or a merged model."""
    path = Path(path)
    if not path.is_dir():
        raise ConfigError(f"--model: no such folder {path}")
    if (path / "adapter_config.json").is_file():
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path)
    elif (path / "config.json").is_file():
        model = AutoModelForCausalLM.from_pretrained(path)
    else:
        raise ConfigError(f"--model: {path} holds neither adapter_config.json nor config.json")
    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model.to(device).eval(), tokenizer


@torch.no_grad()
def generate(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, prompts: Sequence[str], *,
             num_beams: int = 1, length_penalty: float = 1.0, no_repeat_ngram_size: int = 0,
             max_new_tokens: int = 64, batch_size: int = 16, separator: str = DEFAULT_SEPARATOR) -> list[str]:
    """Greedy (num_beams=1) or beam search; one line of text per prompt, in order.

    Prompts are encoded exactly as in training (prompt + separator, no special tokens) and
    left-padded so every row's answer starts right after its own prompt.
    """
    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id
    out: list[str] = []
    for start in range(0, len(prompts), batch_size):
        ids = [encode_prompt(tokenizer, p, separator) for p in prompts[start:start + batch_size]]
        width = max(len(x) for x in ids)
        input_ids = torch.tensor([[pad] * (width - len(x)) + x for x in ids], device=device)
        mask = torch.tensor([[0] * (width - len(x)) + [1] * len(x) for x in ids], device=device)
        generated = model.generate(input_ids=input_ids, attention_mask=mask, do_sample=False, num_beams=num_beams,
                                   length_penalty=length_penalty, no_repeat_ngram_size=no_repeat_ngram_size,
                                   max_new_tokens=max_new_tokens, eos_token_id=tokenizer.eos_token_id,
                                   pad_token_id=pad)
        for row in generated[:, width:]:
            text = tokenizer.decode(row, skip_special_tokens=True)
            out.append(" ".join(text.split()))  # one line per hypothesis, whitespace normalised
    return out
