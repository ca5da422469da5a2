"""Data path: synthetic and real (E2E CSV, Alpaca-style instructions, hub fallbacks) sources,
tokenizers, cached tokenization, IID / Dirichlet / by-file partitions, and loaders.

An example is a dict with "prompt" and "target" strings (or pre-tokenized "prompt_ids"), a
"group" string (the prompt's identity) and metadata keys.
"""

from splitlora_ds.data.build import DataPlan, plan_data, tokenize_client
from splitlora_ds.data.cache import tokenize_cached, tokenizer_fingerprint
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
from splitlora_ds.data.partition import (
    dirichlet_partition,
    holdout_by_group,
    iid_partition,
    label_histograms,
    skew,
)
from splitlora_ds.data.sources import (
    alpaca_prompt,
    format_instruction,
    load_examples,
    load_hub_e2e,
    load_hub_instruction,
    parse_mr,
    read_e2e_csv,
    read_instruction_file,
)
from splitlora_ds.data.synthetic import make_data_to_text
from splitlora_ds.data.tokenizer import byte_tokenizer, load_tokenizer

__all__ = [
    "DEFAULT_SEPARATOR", "IGNORE_INDEX", "TokenizeCounts", "collate", "concat_batches",
    "tokenize_example", "tokenize_examples", "ClientBatches", "pooled_batches",
    "iid_partition", "dirichlet_partition", "holdout_by_group", "label_histograms", "skew",
    "make_data_to_text", "byte_tokenizer", "load_tokenizer",
    "parse_mr", "read_e2e_csv", "read_instruction_file", "alpaca_prompt", "format_instruction",
    "load_hub_e2e", "load_hub_instruction", "load_examples",
    "tokenize_cached", "tokenizer_fingerprint", "DataPlan", "plan_data", "tokenize_client",
]
