"""Offline data path: synthetic data, tokenizers, tokenization, partitions, loaders."""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch

from splitlora_ds.data import (
    IGNORE_INDEX,
    ClientBatches,
    collate,
    iid_partition,
    load_tokenizer,
    make_data_to_text,
    pooled_batches,
    tokenize_example,
    tokenize_examples,
)
from splitlora_ds.errors import ConfigError

GPT2_DIR = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "gpt2-tokenizer"


@pytest.fixture(scope="module")
def tok():
    return load_tokenizer(None)


def _tokenized(tok, n=10, seed=0):
    data, _ = tokenize_examples(make_data_to_text(n, seed), tok, 512)
    return data


# --- synthetic ---------------------------------------------------------------------------

def test_synthetic_deterministic_by_seed():
    a, b, c = make_data_to_text(50, 1), make_data_to_text(50, 1), make_data_to_text(50, 2)
    assert a == b and a != c
    assert len(a) == 50 and make_data_to_text(0, 1) == []
    for ex in a:
        assert isinstance(ex["prompt"], str) and isinstance(ex["target"], str)
        assert ex["prompt"].startswith(f"name[{ex['name']}], eatType[{ex['eatType']}]")
        assert ex["name"] in ex["target"]
        # Every attribute in the MR is also an extra key with its value.
        for key in ("food", "priceRange", "customer rating", "area", "familyFriendly", "near"):
            assert (f"{key}[" in ex["prompt"]) == (ex[key] is not None)
    assert len({ex["target"] for ex in a}) > 40  # varied, not one template


# --- tokenizer ---------------------------------------------------------------------------

def test_byte_tokenizer_round_trip_and_needs_no_files(monkeypatch, tmp_path):
    def no_files(*args, **kwargs):
        raise AssertionError(f"byte tokenizer touched a file: {args[:1]}")

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr("splitlora_ds.data.tokenizer.AutoTokenizer.from_pretrained", no_files)
    monkeypatch.setattr(builtins, "open", no_files)
    t = load_tokenizer("byte")
    monkeypatch.undo()
    assert 257 <= len(t) <= 260
    assert t.eos_token == t.bos_token == "<|endoftext|>" and t.eos_token_id == 256
    assert t.pad_token_id is not None
    for s in ["", "hello world", "  two  spaces\n\ttab", "Café £20 — 日本語 🍕", "\x00\x7f"]:
        ids = t.encode(s, add_special_tokens=False)
        assert ids == list(s.encode("utf-8"))  # id == byte value
        assert t.decode(ids) == s


def test_load_tokenizer_missing_path():
    for bad in ["./no/such/tokenizer", "/no/such/dir", "a/b/c"]:
        with pytest.raises(ConfigError, match="data.tokenizer") as info:
            load_tokenizer(bad)
        assert bad in str(info.value)


@pytest.mark.skipif(not GPT2_DIR.is_dir(), reason="no GPT-2 tokenizer in ../shared/data")
def test_gpt2_tokenizer_from_shared(tok):
    g = load_tokenizer(str(GPT2_DIR))
    assert len(g) == 50257 and g.eos_token_id == 50256 and g.pad_token_id == 50256
    s = "name[Café Rouge], area[riverside] £20"
    assert g.decode(g.encode(s, add_special_tokens=False)) == s
    out = tokenize_example({"prompt": "name[The Eagle]", "target": "The Eagle is a pub."}, g, 64)
    n_prompt = out["labels"].count(IGNORE_INDEX)
    assert out["input_ids"][n_prompt - 1] == 198  # "\n" separator ends the prompt part
    assert out["labels"][n_prompt:] == out["input_ids"][n_prompt:]
    assert out["input_ids"][-1] == 50256
    assert g.decode(out["input_ids"][n_prompt:-1]) == "The Eagle is a pub."


# --- tokenize_example / collate ----------------------------------------------------------

def test_tokenize_example_hand_checked(tok):
    out = tokenize_example({"prompt": "a[b]", "target": "Hi é"}, tok, 32)
    # "a[b]" + "\n" -> bytes 97 91 98 93 10; "Hi é" -> 72 105 32 195 169; eos 256.
    assert out == {
        "input_ids": [97, 91, 98, 93, 10, 72, 105, 32, 195, 169, 256],
        "labels": [-100, -100, -100, -100, -100, 72, 105, 32, 195, 169, 256],
    }
    sep = tokenize_example({"prompt": "a", "target": "b"}, tok, 32, separator=" = ")
    assert sep == {"input_ids": [97, 32, 61, 32, 98, 256], "labels": [-100] * 4 + [98, 256]}
    # A literal "<|endoftext|>" in the data stays text, never a real eos.
    lit = tokenize_example({"prompt": "p", "target": "<|endoftext|>"}, tok, 64)
    assert lit["input_ids"].count(256) == 1


def test_collate_pads_to_batch_max_and_masks(tok):
    a = tokenize_example({"prompt": "ab", "target": "c"}, tok, 32)        # 5 tokens
    b = tokenize_example({"prompt": "x", "target": "yz"}, tok, 32)       # 5 tokens
    c = tokenize_example({"prompt": "long prompt", "target": "t"}, tok, 32)  # 14 tokens
    batch = collate([a, b], pad_token_id=tok.pad_token_id)
    assert batch["input_ids"].shape == (2, 5)  # batch max, not max_length
    batch = collate([a, c], pad_token_id=7)
    assert {k: v.dtype for k, v in batch.items()} == dict.fromkeys(batch, torch.long)
    assert batch["input_ids"].shape == batch["labels"].shape == (2, 14)
    assert batch["input_ids"][0].tolist() == [97, 98, 10, 99, 256] + [7] * 9
    assert batch["attention_mask"][0].tolist() == [1] * 5 + [0] * 9
    assert batch["labels"][0].tolist() == [-100, -100, -100, 99, 256] + [-100] * 9
    assert batch["attention_mask"][1].tolist() == [1] * 14
    assert batch["labels"][1].tolist() == [-100] * 12 + [116, 256]


def test_overlong_policies(tok):
    ex = {"prompt": "abcd", "target": "efghij"}  # 5 prompt + 7 target/eos = 12 tokens
    cut = tokenize_example(ex, tok, 8, overlong="truncate")
    assert cut["input_ids"] == [97, 98, 99, 100, 10, 101, 102, 103]  # eos cut first
    assert cut["labels"] == [-100] * 5 + [101, 102, 103]
    assert tokenize_example(ex, tok, 12, overlong="error")["input_ids"][-1] == 256  # fits
    assert tokenize_example(ex, tok, 8, overlong="drop") is None
    # Prompt leaves no room for a target token: cannot be truncated, so it is dropped.
    assert tokenize_example(ex, tok, 5, overlong="truncate") is None
    with pytest.raises(ConfigError, match="data.overlong"):
        tokenize_example(ex, tok, 8, overlong="cut")

    short = {"prompt": "a", "target": "b"}
    data = [short, ex, short, {"prompt": "abcdefgh", "target": "x"}]
    kept, counts = tokenize_examples(data, tok, 8, overlong="truncate")
    assert len(kept) == 3 and (counts.truncated, counts.dropped) == (1, 1)
    kept, counts = tokenize_examples(data, tok, 8, overlong="drop")
    assert len(kept) == 2 and (counts.truncated, counts.dropped) == (0, 2)
    with pytest.raises(ConfigError, match=r"train sample 1 has 12 tokens .* max_length 8"):
        tokenize_examples(data, tok, 8, overlong="error", source="train")
    with pytest.raises(ConfigError, match="sample 0 needs a string 'target'"):
        tokenize_examples([{"prompt": "a"}], tok, 8)


# --- partition ---------------------------------------------------------------------------

def test_iid_partition():
    shards = iid_partition(103, 4, seed=3)
    assert sorted(len(s) for s in shards) == [25, 26, 26, 26]
    flat = [i for s in shards for i in s]
    assert sorted(flat) == list(range(103))  # disjoint and covering
    assert shards == iid_partition(103, 4, seed=3)
    assert shards != iid_partition(103, 4, seed=4)
    assert shards[0] != list(range(26))  # shuffled, not contiguous
    assert sorted(iid_partition(3, 3, seed=0)) == [[0], [1], [2]]  # one each
    assert iid_partition(5, 1, seed=0) == [[0, 1, 2, 3, 4]]
    with pytest.raises(ConfigError) as info:
        iid_partition(2, 3, seed=0)
    assert str(info.value) == ("federation.clients: 3 clients but only 2 training samples; "
                               "every client needs at least one")


# --- loader ------------------------------------------------------------------------------

def _ids(batch):
    """Rows as unpadded token lists (identifies samples independently of padding)."""
    return [row[m.bool()].tolist() for row, m in zip(batch["input_ids"], batch["attention_mask"])]


def test_client_batches_cycle_and_reshuffle(tok):
    data = _tokenized(tok, 10)
    it = ClientBatches(data, batch_size=4, seed=5, pad_token_id=tok.pad_token_id)
    assert it.num_samples == 10 and it.epoch == 0
    sizes, epochs = [], []
    for _ in range(9):  # 3 epochs of 4 + 4 + 2
        epochs.append(it.epoch)
        sizes.append(next(it)["input_ids"].shape[0])
    assert sizes == [4, 4, 2] * 3 and epochs == [0, 0, 0, 1, 1, 1, 2, 2, 2] and it.epoch == 3

    def epoch_order(seed):
        it = ClientBatches(data, 4, seed, tok.pad_token_id)
        return [[r for _ in range(3) for r in _ids(next(it))] for _ in range(2)]

    e0, e1 = epoch_order(5)
    every = sorted(d["input_ids"] for d in data)
    assert sorted(e0) == sorted(e1) == every  # each epoch is one full pass
    assert e0 != e1  # reshuffled per epoch
    assert epoch_order(5) == [e0, e1]  # deterministic by seed...
    torch.manual_seed(123)
    assert epoch_order(5) == [e0, e1]  # ...and independent of global RNG state
    assert epoch_order(6) != [e0, e1]


def test_client_batches_resume_mid_epoch(tok):
    data = _tokenized(tok, 11)
    ref = ClientBatches(data, 3, seed=9, pad_token_id=tok.pad_token_id)
    for _ in range(6):  # into the second epoch (4 batches per epoch)
        next(ref)
    state = ref.state_dict()
    assert (state["epoch"], state["position"]) == (1, 6)
    expected = [next(ref) for _ in range(7)]
    fresh = ClientBatches(data, 3, seed=9, pad_token_id=tok.pad_token_id)
    fresh.load_state_dict(state)
    for want in expected:
        got = next(fresh)
        assert all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(ConfigError, match="seed"):
        ClientBatches(data, 3, seed=10, pad_token_id=0).load_state_dict(state)



@pytest.mark.parametrize("n,batch_size", [(11, 3), (12, 3), (5, 8)])
def test_client_batches_skip_to_matches_serving_that_many(tok, n, batch_size):
    data = _tokenized(tok, n)
    ref = ClientBatches(data, batch_size, seed=4, pad_token_id=tok.pad_token_id)
    total = 3 * ref.batches_per_epoch + 2  # across several epoch boundaries
    served, states = [], []
    for _ in range(total):
        states.append(ref.state_dict())
        served.append(next(ref))
    stream = ClientBatches(data, batch_size, seed=4, pad_token_id=tok.pad_token_id)
    for _ in range(5):  # skip_to is absolute: where the stream was does not matter
        next(stream)
    for b in [0, 1, ref.batches_per_epoch - 1, ref.batches_per_epoch, total - 1, 2, 0]:
        stream.skip_to(b)
        assert stream.state_dict() == states[b]
        got = next(stream)
        assert all(torch.equal(got[k], served[b][k]) for k in served[b])
        if b + 1 < total:  # and it carries on from there
            after = next(stream)
            assert all(torch.equal(after[k], served[b + 1][k]) for k in after)


def test_client_batches_skip_to_refuses_bad_counts(tok):
    stream = ClientBatches(_tokenized(tok, 4), 2, seed=0, pad_token_id=tok.pad_token_id)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError, match="batches_consumed must be an int >= 0"):
            stream.skip_to(bad)

def test_pooled_batches_is_concatenation(tok):
    data = _tokenized(tok, 17)
    shards = iid_partition(len(data), 3, seed=0)

    def clients():
        return [ClientBatches([data[i] for i in s], 2, seed=c, pad_token_id=tok.pad_token_id)
                for c, s in enumerate(shards)]

    solo, pooled = clients(), pooled_batches(clients(), tok.pad_token_id)
    for _ in range(5):
        parts = [next(c) for c in solo]
        big = next(pooled)
        rows = [r for p in parts for r in _ids(p)]
        assert _ids(big) == rows  # the union, in client order
        width = max(p["input_ids"].shape[1] for p in parts)
        assert big["input_ids"].shape == (sum(p["input_ids"].shape[0] for p in parts), width)
        # Same as collating the union directly (re-padded to the longest).
        samples = [{"input_ids": r, "labels": lab[m.bool()].tolist()}
                   for p in parts for r, lab, m in
                   zip(_ids(p), p["labels"], p["attention_mask"])]
        direct = collate(samples, tok.pad_token_id)
        assert all(torch.equal(big[k], direct[k]) for k in direct)
