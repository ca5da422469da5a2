"""Tokenize once, reload after a restart: `tokenize_examples` cached as an Arrow file.

The file is named by a hash of everything the token ids depend on (the examples' prompt /
prompt_ids / target, the tokenizer, max_length, overlong, separator), so a restart with the
same inputs memory-maps it instead of re-tokenizing, and any change makes a new file.
Each client rank calls this on its own shard only, so ranks never write the same file.
"""

from __future__ import annotations

import os
from pathlib import Path

import datasets
from datasets.fingerprint import Hasher
from transformers import PreTrainedTokenizerBase

from splitlora_ds.data.examples import OVERLONG_POLICIES, TokenizeCounts, _tokenize
from splitlora_ds.errors import ConfigError

# Bump when the tokenization code changes what it writes, so old cache files are not reused.
CACHE_VERSION = "splitlora_ds-tokenize-v1"
_FEATURES = datasets.Features({
    "input_ids": datasets.List(datasets.Value("int32")),
    "labels": datasets.List(datasets.Value("int32")),
    "truncated": datasets.Value("bool"),
    "dropped": datasets.Value("bool"),
})


def default_cache_dir() -> Path:
    return Path(datasets.config.HF_DATASETS_CACHE) / "splitlora_ds"


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A hash of what decides the token ids, computed without encoding anything."""
    h = Hasher()
    h.update(type(tokenizer).__name__)
    h.update(getattr(tokenizer, "name_or_path", ""))
    h.update(len(tokenizer))
    h.update(tokenizer.eos_token_id)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        # The full serialized pipeline: vocab, merges, normalizer, pre-tokenizer, added tokens.
        h.update(backend.to_str())
    else:
        h.update(sorted(tokenizer.get_vocab().items()))
    return h.hexdigest()


def _cache_key(rows: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int,
               overlong: str, separator: str) -> str:
    h = Hasher()
    for part in (CACHE_VERSION, rows, tokenizer_fingerprint(tokenizer), max_length, overlong,
                 separator):
        h.update(part)
    return h.hexdigest()


def tokenize_cached(examples: list[dict], tokenizer: PreTrainedTokenizerBase, max_length: int, *,
                    overlong: str, separator: str, cache_dir: str | None,
                    source: str) -> tuple[list[dict], TokenizeCounts]:
    """Same result as `tokenize_examples` (kept rows in order, counts), cached on disk.

    Errors (overlong="error", a non-string target) name "<source> sample <i>" and the row's
    origin (file and row) when the example has one. No cache file is left behind on error.
    """
    if overlong not in OVERLONG_POLICIES:
        raise ConfigError(f"data.overlong: {overlong!r} is not one of {OVERLONG_POLICIES}")
    if not examples:
        return [], TokenizeCounts(0, 0)
    origins = [ex.get("origin") for ex in examples]

    def name(i: int) -> str:
        return f"{source} sample {i}" + (f" ({origins[i]})" if origins[i] else "")

    rows = []
    for i, ex in enumerate(examples):
        # Checked here, not in the map: Arrow would reject mixed types with an unreadable error.
        ids = ex.get("prompt_ids")
        if not isinstance(ex.get("target"), str) or (ids is None and not isinstance(ex.get("prompt"), str)):
            _tokenize(ex, tokenizer, max_length, separator, overlong, name(i))  # raises, named
        rows.append({"prompt": ex.get("prompt") if ids is None else None,
                     "prompt_ids": None if ids is None else list(ids), "target": ex["target"]})
    key = _cache_key(rows, tokenizer, max_length, overlong, separator)
    directory = Path(cache_dir) if cache_dir else default_cache_dir()
    directory.mkdir(parents=True, exist_ok=True)

    def encode(batch: dict, indices: list[int]) -> dict:
        out: dict[str, list] = {"input_ids": [], "labels": [], "truncated": [], "dropped": []}
        for prompt, ids, target, i in zip(batch["prompt"], batch["prompt_ids"], batch["target"], indices):
            ex = {"prompt": prompt, "target": target}
            if ids is not None:
                ex["prompt_ids"] = ids
            tok, truncated = _tokenize(ex, tokenizer, max_length, separator, overlong, name(i))
            # Dropped rows stay as empty rows so the counts survive a reload from cache.
            out["input_ids"].append(tok["input_ids"] if tok else [])
            out["labels"].append(tok["labels"] if tok else [])
            out["truncated"].append(truncated)
            out["dropped"].append(tok is None)
        return out

    bars_were_off = datasets.utils.are_progress_bars_disabled()
    datasets.utils.disable_progress_bars()  # one bar per rank would interleave on the console
    try:
        ds = datasets.Dataset.from_list(rows).map(
            encode, batched=True, with_indices=True, remove_columns=["prompt", "prompt_ids", "target"],
            features=_FEATURES, cache_file_name=os.fspath(directory / f"tokenized-{key}.arrow"),
            load_from_cache_file=True, new_fingerprint=key)  # given: never hash the closure
    finally:
        if not bars_were_off:
            datasets.utils.enable_progress_bars()
    table = ds.to_dict()
    kept = [{"input_ids": ids, "labels": labels}
            for ids, labels, dropped in zip(table["input_ids"], table["labels"], table["dropped"])
            if not dropped]
    return kept, TokenizeCounts(sum(table["truncated"]), sum(table["dropped"]))
