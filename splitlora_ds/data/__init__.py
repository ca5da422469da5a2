"""Offline data path: synthetic E2E-like data, tokenizers, tokenization, partitions, loaders.

An example is a dict with "prompt" and "target" strings (plus any metadata keys).
"""

from splitlora_ds.data.examples import (
    DEFAULT_SEPARATOR,
    IGNORE_INDEX,
    TokenizeCounts,
    collate,
    concat_batches,
    tokenize_example,
    tokenize_examples,
)
from splitlora_ds.data.loader import ClientBatches, pooled_batches
from splitlora_ds.data.partition import iid_partition
from splitlora_ds.data.synthetic import make_data_to_text
from splitlora_ds.data.tokenizer import byte_tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_SEPARATOR", "IGNORE_INDEX", "TokenizeCounts", "collate", "concat_batches",
    "tokenize_example", "tokenize_examples", "ClientBatches", "pooled_batches",
    "iid_partition", "make_data_to_text", "byte_tokenizer", "load_tokenizer",
]
