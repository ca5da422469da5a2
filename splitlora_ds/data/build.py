"""From a DataConfig to per-client data: `plan_data` (every rank, no tokenizer) decides who gets
which raw example; `tokenize_client` (one client rank) tokenizes only that client's part.

Planning is cheap and a pure function of (config, clients, seed), so every rank computes the
same plan independently and no rank ever has to broadcast data.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from transformers import PreTrainedTokenizerBase

from splitlora_ds.config import DataConfig
from splitlora_ds.data.cache import tokenize_cached
from splitlora_ds.data.examples import DEFAULT_SEPARATOR, TokenizeCounts
from splitlora_ds.data.partition import (
    dirichlet_partition,
    holdout_by_group,
    iid_partition,
    label_histograms,
)
from splitlora_ds.data.sources import RESERVED_KEYS, format_instruction, load_examples, looks_like_path
from splitlora_ds.data.synthetic import make_data_to_text
from splitlora_ds.errors import ConfigError

MISSING_LABEL = "<none>"


@dataclass
class DataPlan:
    """Raw (untokenized) train/validation examples and who gets which."""

    train: list[dict]
    val: list[dict]
    shards: list[list[int]]  # training indices per client (into train)
    val_shards: list[list[int]]  # validation indices per client (into val); lists may be empty
    histograms: list[dict[str, int]]  # per client over partition_key ({} when None)
    partition_key: Optional[str] = None

    def sample_counts(self) -> list[int]:
        return [len(s) for s in self.shards]

    def describe(self) -> str:
        """A table: one row per client with its sample counts and label histogram."""
        label = f"histogram ({self.partition_key})" if self.partition_key else "histogram"
        lines = [f"{'client':>6}  {'samples':>7}  {'val':>5}  {label}"]
        for c, (shard, hist) in enumerate(zip(self.shards, self.histograms)):
            text = ", ".join(f"{k}={v}" for k, v in hist.items()) or "-"
            lines.append(f"{c:>6}  {len(shard):>7}  {len(self.val_shards[c]):>5}  {text}")
        lines.append(f"{'total':>6}  {len(self.train):>7}  {len(self.val):>5}")
        return "\n".join(lines)


def partition_labels(examples: list[dict], key: str) -> list[str]:
    """The value of `key` per example ("<none>" where absent); a key no example has is an error."""
    if not any(ex.get(key) is not None for ex in examples):
        available = sorted({k for ex in examples for k, v in ex.items()
                            if v is not None and k not in RESERVED_KEYS})
        raise ConfigError(f"data.partition_key: no example has {key!r}; available keys: "
                          f"{', '.join(available) or '(none)'}")
    return [MISSING_LABEL if ex.get(key) is None else str(ex[key]) for ex in examples]


def _spread(n: int, num_clients: int, seed: int) -> list[list[int]]:
    """iid_partition, but a validation set smaller than the federation leaves clients empty."""
    if n >= num_clients:
        return iid_partition(n, num_clients, seed)
    return [[c] if c < n else [] for c in range(num_clients)]


def _read(data: DataConfig, spec: str, field: str, split: str) -> list[dict]:
    if data.source == "synthetic":
        raise ConfigError(f"{field}: data.source=synthetic reads no files ({spec!r}); "
                          "use data.source=e2e or instruction")
    return load_examples(data.source, spec, field=field, split=split)


def _with_groups(examples: list[dict]) -> list[dict]:
    # Synthetic examples predate "group": the prompt is their identity.
    for i, ex in enumerate(examples):
        ex.setdefault("group", ex["prompt"])
        ex.setdefault("origin", f"synthetic sample {i}")
    return examples


def _load_validation(data: DataConfig) -> list[dict]:
    spec = data.validation
    assert spec is not None
    if data.source == "synthetic" or data.path is None or looks_like_path(spec):
        if not looks_like_path(spec):
            spec = "./" + spec  # no hub dataset to take a split of: it must be a file
        return _read(data, spec, "data.validation", "validation")
    if looks_like_path(data.path):
        raise ConfigError(f"data.validation: file {spec!r} does not exist")
    # data.path is a hub dataset: data.validation names its split.
    return _read(data, data.path, "data.validation", spec)


def _plan_by_file(data: DataConfig, num_clients: int, seed: int) -> tuple[list[dict], list[dict],
                                                                        list[list[int]], list[list[int]]]:
    files = data.files or []
    if len(files) != num_clients:
        raise ConfigError(f"data.files: {len(files)} files for {num_clients} clients "
                          "(federation.clients); partition=by_file needs one file per client")
    train: list[dict] = []
    val: list[dict] = []
    shards: list[list[int]] = []
    val_shards: list[list[int]] = []
    for c, spec in enumerate(files):
        field = f"data.files[{c}]"
        if not looks_like_path(spec):
            spec = "./" + spec  # by_file means local files: never a hub lookup
        rows = _read(data, spec, field, "train")
        if data.validation_fraction > 0:
            # Each client holds out from its own file: its validation matches its distribution.
            keep, held = holdout_by_group([r["group"] for r in rows], data.validation_fraction, seed + c)
            val_shards.append(list(range(len(val), len(val) + len(held))))
            val.extend(rows[i] for i in held)
            rows = [rows[i] for i in keep]
        if data.limit is not None:
            rows = rows[:data.limit]  # per file: a global cut would starve the last clients
        shards.append(list(range(len(train), len(train) + len(rows))))
        train.extend(rows)
    if data.validation is not None:
        val = _load_validation(data)
        val_shards = _spread(len(val), num_clients, seed)
    elif not val_shards:
        val_shards = [[] for _ in range(num_clients)]
    return train, val, shards, val_shards


def plan_data(data: DataConfig, num_clients: int, seed: int) -> DataPlan:
    """Load the raw examples and decide every client's training and validation indices."""
    if data.partition == "by_file":
        if data.path is not None:
            raise ConfigError(f"data.path: {data.path!r} is unused with partition=by_file "
                              "(the clients' data are data.files); leave it unset")
        train, val, shards, val_shards = _plan_by_file(data, num_clients, seed)
    else:
        if data.files:
            raise ConfigError(f"data.files: only used with partition=by_file, not {data.partition}")
        if data.source == "synthetic":
            rows = _with_groups(make_data_to_text(data.num_samples, seed))
        else:
            rows = _read(data, data.path, "data.path", "train")
        val = []
        if data.validation is not None:
            val = _load_validation(data)
        elif data.validation_fraction > 0:
            keep, held = holdout_by_group([r["group"] for r in rows], data.validation_fraction, seed)
            val = [rows[i] for i in held]
            rows = [rows[i] for i in keep]
        train = rows[:data.limit] if data.limit is not None else rows
        if data.partition == "dirichlet":
            shards = dirichlet_partition(partition_labels(train, data.partition_key),
                                         num_clients, data.dirichlet_alpha, seed)
        else:
            shards = iid_partition(len(train), num_clients, seed)
        val_shards = _spread(len(val), num_clients, seed)
    for c, shard in enumerate(shards):
        if not shard:
            raise ConfigError(f"data: client{c} has no training samples ({data.partition} partition)")
    histograms = ([{} for _ in shards] if data.partition_key is None
                  else label_histograms(partition_labels(train, data.partition_key), shards))
    return DataPlan(train, val, shards, val_shards, histograms, data.partition_key)


def tokenize_client(plan: DataPlan, client: int, tokenizer: PreTrainedTokenizerBase,
                    data: DataConfig, train: bool = True,
                    validation: bool = True) -> tuple[list[dict], list[dict], TokenizeCounts]:
    """(train, val) tokenized for one client, cached; counts are train + validation together.
    `train` / `validation` False: that part is left alone (an empty list), e.g. a rank that only
    evaluates a logical client it is not training now.

    The overlong policy applies to both; a client left without training samples is an error.
    """
    if not 0 <= client < len(plan.shards):
        raise ConfigError(f"data: client {client} out of range for {len(plan.shards)} clients")
    separator = DEFAULT_SEPARATOR
    if data.source == "instruction":
        separator = ""  # the Alpaca prompt already ends with "### Response:\n"

    def prepare(rows: list[dict]) -> list[dict]:
        if data.source != "instruction":
            return rows
        return [format_instruction(r, tokenizer, data.chat_template) for r in rows]

    out, total = [], TokenizeCounts(0, 0)
    for part, examples, shard, wanted in (("train", plan.train, plan.shards[client], train),
                                          ("validation", plan.val, plan.val_shards[client], validation)):
        if not wanted:
            out.append([])
            continue
        rows, counts = tokenize_cached(prepare([examples[i] for i in shard]), tokenizer,
                                       data.max_length, overlong=data.overlong, separator=separator,
                                       cache_dir=data.cache_dir, source=f"client{client} {part}")
        out.append(rows)
        total = TokenizeCounts(total.truncated + counts.truncated, total.dropped + counts.dropped)
    if train and not out[0]:
        raise ConfigError(f"data: client{client} has no training samples left after "
                          f"data.overlong={data.overlong} (data.max_length={data.max_length})")
    return out[0], out[1], total
