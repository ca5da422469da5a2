"""Prompt/target examples -> token ids with target-only labels, and batch collation.

Sequence layout (one example):

    input_ids = tokens(prompt + separator) + tokens(target) + [eos]
                (or prompt_ids + tokens(target) + [eos] for pre-tokenized chat-template prompts)
    labels    = [-100] * len(prompt part) + tokens(target) + [eos]

Prompt and target are tokenized separately so the prompt/target boundary is exact even for
BPE tokenizers. The default separator is a newline: one token for both the byte tokenizer
(id 10) and GPT-2 (id 198), and the target then starts at a word boundary.

Labels are aligned with input_ids, NOT shifted: the model's loss compares
logits[:, :-1] with labels[:, 1:] (the Hugging Face convention).
"""

from __future__ import annotations

from typing import Literal, NamedTuple

import torch
from transformers import PreTrainedTokenizerBase

from splitlora_ds.errors import ConfigError

IGNORE_INDEX = -100
DEFAULT_SEPARATOR = "\n"
OVERLONG_POLICIES = ("truncate", "drop", "error")
Overlong = Literal["truncate", "drop", "error"]


class TokenizeCounts(NamedTuple):
    """How many examples `tokenize_examples` truncated or dropped (for the caller to log)."""

    truncated: int
    dropped: int


def _encode(tokenizer: PreTrainedTokenizerBase, text: str) -> list[int]:
    # No BOS/EOS from the tokenizer (we add eos ourselves), and a literal "<|endoftext|>"
    # inside the data stays text rather than becoming a real eos.
    return tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True)


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str, separator: str = DEFAULT_SEPARATOR) -> list[int]:
    """The token ids a model trained by this package sees before its answer (for generation)."""
    return _encode(tokenizer, prompt + separator)


def tokenize_example(ex: dict, tokenizer: PreTrainedTokenizerBase, max_length: int, *,
                     separator: str = DEFAULT_SEPARATOR, overlong: Overlong = "truncate",
                     name: str = "sample") -> dict | None:
    """One example -> {"input_ids", "labels"}; None when it is dropped as overlong.

    The prompt part is `ex["prompt_ids"]` as given when present (no separator), else the
    tokens of `ex["prompt"] + separator`; it is always -100 in labels.

    Overlong (> max_length tokens): "truncate" keeps the whole prompt and cuts target+eos
    from the right (eos goes first: a cut sentence must not teach the model to stop there);
    "drop" returns None; "error" raises ConfigError naming `name`. A prompt that leaves no
    room for a single target token cannot be truncated, so "truncate" drops it too.
    """
    return _tokenize(ex, tokenizer, max_length, separator, overlong, name)[0]


def _tokenize(ex: dict, tokenizer: PreTrainedTokenizerBase, max_length: int,
              separator: str, overlong: str, name: str) -> tuple[dict | None, bool]:
    """tokenize_example plus whether the example was truncated."""
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"data.overlong: {overlong!r} is not one of {OVERLONG_POLICIES}")
    if max_length < 2:
        raise ConfigError(f"data.max_length: must be >= 2, got {max_length}")
    eos = tokenizer.eos_token_id
    if eos is None:
        raise ConfigError("data.tokenizer: tokenizer has no eos token")
    ids = ex.get("prompt_ids")
    for key in ("target",) if ids is not None else ("prompt", "target"):
        if not isinstance(ex.get(key), str):
            raise ConfigError(f"data: {name} needs a string {key!r}, got {ex.get(key)!r}")
    if ids is not None:
        # Already tokenized (a chat template's output): its special tokens must stay special,
        # and the template ends where the answer starts, so no separator.
        if not all(isinstance(t, int) and not isinstance(t, bool) for t in ids):
            raise ConfigError(f"data: {name} needs integer 'prompt_ids', got {ids!r:.80}")
        prompt_ids = list(ids)
    else:
        prompt_ids = _encode(tokenizer, ex["prompt"] + separator)
    answer_ids = _encode(tokenizer, ex["target"]) + [eos]
    total = len(prompt_ids) + len(answer_ids)
    if total > max_length:
        if overlong == "error":
            raise ConfigError(
                f"data.max_length: {name} has {total} tokens (prompt {len(prompt_ids)}, "
                f"target+eos {len(answer_ids)}) > max_length {max_length} (data.overlong=error)")
        room = max_length - len(prompt_ids)
        if overlong == "drop" or room < 1:
            return None, False
        answer_ids = answer_ids[:room]
    return {"input_ids": prompt_ids + answer_ids,
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids}, total > max_length


def tokenize_examples(examples: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, *,
                      separator: str = DEFAULT_SEPARATOR, overlong: Overlong = "truncate",
                      source: str = "data") -> tuple[list[dict], TokenizeCounts]:
    """Tokenize a list; returns (kept examples in input order, TokenizeCounts).

    Errors name the sample as "<source> sample <index>" so the user can find it.
    """
    out: list[dict] = []
    truncated = dropped = 0
    for i, ex in enumerate(examples):
        tok, was_truncated = _tokenize(ex, tokenizer, max_length, separator, overlong,
                                       f"{source} sample {i}")
        if tok is None:
            dropped += 1
            continue
        truncated += was_truncated
        out.append(tok)
    return out, TokenizeCounts(truncated, dropped)


def collate(batch: list[dict], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest sample in THIS batch (lengths vary between batches).

    Returns LongTensors input_ids / attention_mask (1 token, 0 pad) / labels (-100 on pad),
    all [B, T]. Labels are not shifted (see the module docstring).
    """
    if not batch:
        raise ValueError("collate: empty batch")
    width = max(len(ex["input_ids"]) for ex in batch)
    ids = torch.full((len(batch), width), pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(batch), width), dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE_INDEX, dtype=torch.long)
    for row, ex in enumerate(batch):
        n = len(ex["input_ids"])
        ids[row, :n] = torch.tensor(ex["input_ids"], dtype=torch.long)
        mask[row, :n] = 1
        labels[row, :n] = torch.tensor(ex["labels"], dtype=torch.long)
    return {"input_ids": ids, "attention_mask": mask, "labels": labels}


def concat_batches(batches: list[dict[str, torch.Tensor]],
                   pad_token_id: int) -> dict[str, torch.Tensor]:
    """Concatenate collated batches along dim 0, re-padding to the widest one.

    Equal to `collate` over the union of their samples (in order), since every batch is
    right-padded with the same pad values.
    """
    if not batches:
        raise ValueError("concat_batches: no batches")
    width = max(b["input_ids"].shape[1] for b in batches)
    fill = {"input_ids": pad_token_id, "attention_mask": 0, "labels": IGNORE_INDEX}
    out = {}
    for key, value in fill.items():
        parts = [torch.nn.functional.pad(b[key], (0, width - b[key].shape[1]), value=value)
                 for b in batches]
        out[key] = torch.cat(parts, dim=0)
    return out
