"""Cached tokenization and the trainer-facing plan: plan_data / tokenize_client."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from splitlora_ds.config import DataConfig
from splitlora_ds.data import (
    IGNORE_INDEX,
    byte_tokenizer,
    make_data_to_text,
    plan_data,
    tokenize_cached,
    tokenize_client,
    tokenize_examples,
)
from splitlora_ds.errors import ConfigError

DEVSET = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "e2e" / "devset.csv"


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


def _broken_tokenizer():
    t = byte_tokenizer()

    def refuse(*args, **kwargs):
        raise AssertionError("tokenized again instead of loading the cache")

    t.encode = refuse
    return t


def _write_csv(path: Path, examples: list[dict]) -> str:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["mr", "ref"])
        w.writerows([ex["prompt"], ex["target"]] for ex in examples)
    return str(path)


# --- tokenize_cached ---------------------------------------------------------------------

def test_tokenize_cached_reloads_and_invalidates(tmp_path, tok):
    data = make_data_to_text(30, seed=0) + [{"prompt": "x" * 60, "target": "y"}]
    kw = dict(overlong="drop", separator="\n", cache_dir=str(tmp_path), source="client0 train")
    first, counts = tokenize_cached(data, tok, 64, **kw)
    ref, ref_counts = tokenize_examples(data, tok, 64, overlong="drop")
    assert first == ref and counts == ref_counts and counts.dropped >= 1
    files = sorted(tmp_path.glob("tokenized-*.arrow"))
    assert len(files) == 1
    again, again_counts = tokenize_cached(data, _broken_tokenizer(), 64, **kw)  # from the cache
    assert again == first and again_counts == counts  # counts survive the reload too
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_cached(data, _broken_tokenizer(), 65, **kw)  # max_length changed: re-tokenize
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_cached(data[:-1], _broken_tokenizer(), 64, **kw)  # content changed
    with pytest.raises(AssertionError, match="tokenized again"):
        tokenize_cached(data, _broken_tokenizer(), 64, **{**kw, "separator": " = "})
    truncated, t_counts = tokenize_cached(data, tok, 64, **{**kw, "overlong": "truncate"})
    assert (truncated, t_counts) == tokenize_examples(data, tok, 64, overlong="truncate")
    assert tokenize_cached([], tok, 64, **kw) == ([], (0, 0))


def test_tokenize_cached_error_names_source_and_row(tmp_path, tok):
    data = [{"prompt": "a", "target": "b", "origin": "dev.csv row 1"},
            {"prompt": "abcdefghij", "target": "k", "origin": "dev.csv row 2"}]
    with pytest.raises(ConfigError) as info:
        tokenize_cached(data, tok, 8, overlong="error", separator="\n", cache_dir=str(tmp_path),
                        source="client1 train")
    assert str(info.value).startswith("data.max_length: client1 train sample 1 (dev.csv row 2) has 13 tokens")
    assert not list(tmp_path.glob("*.arrow"))  # nothing half-written to reload later
    with pytest.raises(ConfigError, match="client0 validation sample 0 .*needs a string 'target'"):
        tokenize_cached([{"prompt": "a", "target": 3}], tok, 8, overlong="drop", separator="\n",
                        cache_dir=str(tmp_path), source="client0 validation")


# --- plan_data / tokenize_client ---------------------------------------------------------

@pytest.mark.skipif(not DEVSET.is_file(), reason="no ../shared/data/e2e/devset.csv")
def test_plan_real_devset_dirichlet(tmp_path, tok):
    cfg = DataConfig(source="e2e", path=str(DEVSET), partition="dirichlet", partition_key="eatType",
                     dirichlet_alpha=0.3, validation_fraction=0.1, max_length=600,
                     cache_dir=str(tmp_path))
    plan = plan_data(cfg, num_clients=3, seed=0)
    assert plan == plan_data(cfg, num_clients=3, seed=0)  # every rank computes the same plan
    assert len(plan.train) + len(plan.val) == 4672
    assert {r["group"] for r in plan.train}.isdisjoint(r["group"] for r in plan.val)
    assert sorted(i for s in plan.shards for i in s) == list(range(len(plan.train)))
    assert sorted(i for s in plan.val_shards for i in s) == list(range(len(plan.val)))
    assert all(n > 0 for n in plan.sample_counts())
    for shard, hist in zip(plan.shards, plan.histograms):
        assert sum(hist.values()) == len(shard) and set(hist) <= {"coffee shop", "<none>"}
    table = plan.describe().splitlines()
    assert "histogram (eatType)" in table[0] and len(table) == 5
    assert table[-1].split()[:3] == ["total", str(len(plan.train)), str(len(plan.val))]
    train, val, counts = tokenize_client(plan, 2, tok, cfg)
    assert len(train) == plan.sample_counts()[2] and len(val) == len(plan.val_shards[2])
    assert counts == (0, 0)
    with pytest.raises(ConfigError, match=r"data.partition_key: no example has 'eat_type'; "
                                          r"available keys: area, customer rating, eatType"):
        plan_data(DataConfig(**{**cfg.__dict__, "partition_key": "eat_type"}), 3, 0)


def test_plan_by_file_from_synthetic_csvs(tmp_path, tok):
    data = make_data_to_text(30, seed=1)
    files = [_write_csv(tmp_path / f"client{c}.csv", data[c * 10:c * 10 + 4 + 3 * c]) for c in range(3)]
    cfg = DataConfig(source="e2e", partition="by_file", files=files, partition_key="eatType",
                     cache_dir=str(tmp_path / "cache"))
    plan = plan_data(cfg, num_clients=3, seed=0)
    assert plan.shards == [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10], list(range(11, 21))]
    assert [r["target"] for r in plan.train[4:11]] == [d["target"] for d in data[10:17]]
    assert plan.val == [] and plan.val_shards == [[], [], []]
    assert [sum(h.values()) for h in plan.histograms] == [4, 7, 10]
    train, val, _ = tokenize_client(plan, 1, tok, cfg)
    assert len(train) == 7 and val == []
    assert train[0]["labels"][-1] == 256 and train[0]["labels"][0] == IGNORE_INDEX
    limited = plan_data(DataConfig(**{**cfg.__dict__, "limit": 5}), 3, 0)
    assert limited.sample_counts() == [4, 5, 5]  # data.limit applies per client file
    held = plan_data(DataConfig(**{**cfg.__dict__, "validation_fraction": 0.3}), 3, 0)
    assert all(held.val_shards) and len(held.train) + len(held.val) == 21
    with pytest.raises(ConfigError, match=r"data.files: 3 files for 4 clients"):
        plan_data(cfg, num_clients=4, seed=0)
    bad = DataConfig(**{**cfg.__dict__, "files": files[:2] + [str(tmp_path / "gone.csv")]})
    with pytest.raises(ConfigError, match=r"data.files\[2\]: file .*gone.csv' does not exist"):
        plan_data(bad, 3, 0)


def test_plan_synthetic_iid_validation_and_limit(tmp_path, tok):
    cfg = DataConfig(num_samples=40, validation_fraction=0.25, limit=20, max_length=180,
                     overlong="drop", cache_dir=str(tmp_path))
    plan = plan_data(cfg, 3, seed=5)
    assert len(plan.train) == 20 and plan.val and plan.histograms == [{}, {}, {}]
    assert {r["group"] for r in plan.train}.isdisjoint(r["group"] for r in plan.val)
    train, val, counts = tokenize_client(plan, 0, tok, cfg)
    # Overlong rows are dropped from validation as well as from training.
    assert len(train) + len(val) + counts.dropped == len(plan.shards[0]) + len(plan.val_shards[0])
    assert counts.dropped > 0 and all(len(v["input_ids"]) <= 180 for v in train + val)
    with pytest.raises(ConfigError, match="client0 has no training samples left"):
        tokenize_client(plan, 0, tok, DataConfig(**{**cfg.__dict__, "max_length": 8}))
    with pytest.raises(ConfigError, match="federation.clients: 30 clients but only 20"):
        plan_data(cfg, 30, seed=5)


def test_plan_instruction_with_chat_template(tmp_path):
    records = [{"instruction": f"Count to {i}.", "output": " ".join(map(str, range(1, i + 2)))}
               for i in range(8)]
    train_file = tmp_path / "train.jsonl"
    train_file.write_text("\n".join(json.dumps(r) for r in records))
    val_file = tmp_path / "val.json"
    val_file.write_text(json.dumps(records[:2]))
    cfg = DataConfig(source="instruction", path=str(train_file), validation=str(val_file),
                     max_length=512, cache_dir=str(tmp_path / "cache"))
    plan = plan_data(cfg, 2, seed=0)  # no tokenizer needed to plan
    assert len(plan.train) == 8 and len(plan.val) == 2 and [len(v) for v in plan.val_shards] == [1, 1]
    chat = byte_tokenizer()
    chat.chat_template = "{% for m in messages %}<|endoftext|>{{ m['content'] }}{% endfor %}>>"
    train, val, _ = tokenize_client(plan, 1, chat, cfg)
    i = plan.shards[1][0]
    prompt = [256] + list(records[i]["instruction"].encode()) + list(b">>")
    assert train[0]["input_ids"][:len(prompt)] == prompt
    assert train[0]["labels"] == [IGNORE_INDEX] * len(prompt) + list(records[i]["output"].encode()) + [256]
    plain, _, _ = tokenize_client(plan, 1, chat, DataConfig(**{**cfg.__dict__, "chat_template": False}))
    text = bytes(t for t in plain[0]["input_ids"][:-1] if t < 256).decode()
    assert text.endswith("### Response:\n" + records[i]["output"])  # Alpaca text, no extra separator
    with pytest.raises(ConfigError, match="data.validation: file 'nope.json' does not exist"):
        plan_data(DataConfig(**{**cfg.__dict__, "validation": "nope.json"}), 2, 0)


@pytest.mark.parametrize("partition", ["iid", "dirichlet"])
def test_plan_synthetic_for_a_hundred_logical_clients(partition):
    # Many data owners on few ranks (federation.client_ranks < clients): the plan is still one
    # shard per logical client, disjoint, covering the data, and the same on every rank.
    extra = {"partition_key": "eatType"} if partition == "dirichlet" else {}
    cfg = DataConfig(num_samples=2000, partition=partition, **extra)
    plan = plan_data(cfg, 100, seed=3)
    assert len(plan.shards) == 100 and len(plan.val_shards) == 100
    flat = sorted(i for s in plan.shards for i in s)
    assert flat == list(range(2000)) and min(plan.sample_counts()) >= 1
    if partition == "iid":
        assert set(plan.sample_counts()) == {20}
    else:
        assert len(plan.histograms) == 100 and max(plan.sample_counts()) > 20  # skewed sizes
    assert plan_data(cfg, 100, seed=3).shards == plan.shards
    with pytest.raises(ConfigError, match="federation.clients: 2001 clients but only 2000 training samples"):
        plan_data(cfg, 2001, seed=3)
