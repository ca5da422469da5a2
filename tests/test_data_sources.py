"""Real data sources: E2E CSV, Alpaca-style instruction files, hub fallbacks, chat templates."""

from __future__ import annotations

import json
from pathlib import Path

import datasets
import pytest

from splitlora_ds.data import (
    IGNORE_INDEX,
    byte_tokenizer,
    format_instruction,
    load_examples,
    load_tokenizer,
    parse_mr,
    read_e2e_csv,
    read_instruction_file,
    tokenize_example,
)
from splitlora_ds.errors import ConfigError

SHARED = Path(__file__).resolve().parents[1].parent / "shared" / "data"
DEVSET = SHARED / "e2e" / "devset.csv"
GPT2_DIR = SHARED / "gpt2-tokenizer"

CSV = ('mr,ref\n'
       '"name[The Eagle], eatType[pub], customer rating[5 out of 5]",The Eagle is a pub.\n'
       '"name[The Eagle], eatType[pub], customer rating[5 out of 5]","A pub, The Eagle."\n'
       '"name[Zizzi], area[riverside]",Zizzi is by the river.\n')
CHAT_TEMPLATE = ("{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n"
                 "{% endfor %}{% if add_generation_prompt %}bot: {% endif %}")


def _write(tmp_path: Path, name: str, text: str | bytes) -> str:
    p = tmp_path / name
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8"))
    return str(p)


def _error(fn, *args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert "\n" not in msg  # one line
    return msg


@pytest.fixture(scope="module")
def tok():
    return byte_tokenizer()


# --- E2E ---------------------------------------------------------------------------------

def test_parse_mr():
    assert parse_mr("name[The Eagle], eatType[pub], customer rating[5 out of 5]") == {
        "name": "The Eagle", "eatType": "pub", "customer rating": "5 out of 5"}
    assert parse_mr("name[Café Rouge], priceRange[less than £20]") == {
        "name": "Café Rouge", "priceRange": "less than £20"}
    assert parse_mr("") == {}


def test_e2e_csv_hand_checked(tmp_path, tok):
    path = _write(tmp_path, "e2e.csv", CSV)
    rows = read_e2e_csv(path)
    assert len(rows) == 3
    a, b, c = rows
    mr = "name[The Eagle], eatType[pub], customer rating[5 out of 5]"
    assert (a["prompt"], a["target"], a["group"]) == (mr, "The Eagle is a pub.", mr)
    assert (a["name"], a["eatType"], a["customer rating"]) == ("The Eagle", "pub", "5 out of 5")
    assert b["target"] == "A pub, The Eagle." and b["group"] == a["group"]  # same MR, same group
    assert c["area"] == "riverside" and "eatType" not in c  # absent attribute stays absent
    out = tokenize_example({"prompt": "name[Zizzi]", "target": "Hi"}, tok, 64)
    prompt = list(b"name[Zizzi]\n")
    assert out["input_ids"] == prompt + [72, 105, 256]
    assert out["labels"] == [IGNORE_INDEX] * len(prompt) + [72, 105, 256]
    full = tokenize_example(c, tok, 128)
    n = len(c["prompt"]) + 1  # MR bytes + "\n" separator
    assert full["labels"][:n] == [IGNORE_INDEX] * n
    assert full["input_ids"][n - 1] == 10
    assert full["labels"][n:] == list(c["target"].encode()) + [256]


@pytest.mark.skipif(not (DEVSET.is_file() and GPT2_DIR.is_dir()), reason="no shared E2E/GPT-2 data")
def test_real_devset_with_gpt2():
    rows = read_e2e_csv(DEVSET)
    assert len(rows) == 4672 and len({r["group"] for r in rows}) == 547
    g = load_tokenizer(str(GPT2_DIR))
    out = tokenize_example(rows[0], g, 128)
    n = out["labels"].count(IGNORE_INDEX)
    assert out["input_ids"][n - 1] == 198
    assert g.decode(out["input_ids"][:n - 1]) == rows[0]["prompt"]
    assert g.decode(out["labels"][n:-1]) == rows[0]["target"] and out["labels"][-1] == 50256


def test_e2e_csv_errors(tmp_path):
    missing = str(tmp_path / "nope.csv")
    assert _error(read_e2e_csv, missing) == f"data.path: file {missing!r} does not exist"
    empty = _write(tmp_path, "empty.csv", " \n")
    assert _error(read_e2e_csv, empty) == f"data.path: {empty!r} is empty"
    header = _write(tmp_path, "header.csv", "meaning,text\na,b\n")
    msg = _error(read_e2e_csv, header)
    assert header in msg and "line 1" in msg and "['meaning', 'text']" in msg
    no_rows = _write(tmp_path, "norows.csv", "mr,ref\n")
    assert "no rows" in _error(read_e2e_csv, no_rows)
    bad_ref = _write(tmp_path, "ref.csv", "mr,ref\nname[A],A.\nname[B],\n")
    assert _error(read_e2e_csv, bad_ref) == f"data.path: {bad_ref!r} row 2 (line 3): empty 'ref'"
    bad_mr = _write(tmp_path, "mr.csv", 'mr,ref\nname[A],A.\n\n"",B.\n')
    assert _error(read_e2e_csv, bad_mr) == f"data.path: {bad_mr!r} row 2 (line 4): empty 'mr'"
    commas = _write(tmp_path, "commas.csv", "mr,ref\nname[A],A, a pub.\n")
    assert "row 1 (line 2)" in _error(read_e2e_csv, commas)
    latin1 = _write(tmp_path, "latin1.csv", "mr,ref\nname[A],A.\nname[Caf\xe9],B.\n".encode("latin-1"))
    msg = _error(read_e2e_csv, latin1, field="data.files[1]")
    assert msg == f"data.files[1]: {latin1!r} line 3: byte 0xe9 is not valid UTF-8 (save the file as UTF-8)"
    bom = _write(tmp_path, "bom.csv", b"\xef\xbb\xbf" + CSV.encode())
    assert len(read_e2e_csv(bom)) == 3  # a BOM is not part of the header


# --- instructions ------------------------------------------------------------------------

RECORDS = [{"instruction": "Add.", "input": "2 and 3", "output": "5"},
           {"instruction": "Say hi.", "output": "Hi!"}]
ALPACA_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                "further context. Write a response that appropriately completes the request.\n\n"
                "### Instruction:\nAdd.\n\n### Input:\n2 and 3\n\n### Response:\n")
ALPACA_NO_INPUT = ("Below is an instruction that describes a task. Write a response that "
                   "appropriately completes the request.\n\n### Instruction:\nSay hi.\n\n"
                   "### Response:\n")


def test_instruction_json_and_jsonl(tmp_path, tok):
    as_json = read_instruction_file(_write(tmp_path, "a.json", json.dumps(RECORDS, indent=1)))
    jsonl = "\n".join(json.dumps(r) for r in RECORDS) + "\n\n"
    as_jsonl = read_instruction_file(_write(tmp_path, "a.jsonl", jsonl))
    strip = [{k: v for k, v in r.items() if k != "origin"} for r in as_json]
    assert strip == [{k: v for k, v in r.items() if k != "origin"} for r in as_jsonl]
    a, b = as_json
    assert (a["prompt"], a["target"], a["group"]) == (ALPACA_INPUT, "5", "Add.\n\n2 and 3")
    assert (b["prompt"], b["input"], b["group"]) == (ALPACA_NO_INPUT, "", "Say hi.")
    plain = format_instruction(a, tok, use_chat_template=True)  # byte tokenizer: no template
    assert plain["prompt"] == ALPACA_INPUT and "prompt_ids" not in plain
    out = tokenize_example(plain, tok, 512, separator="")
    n = len(ALPACA_INPUT.encode())
    assert out["labels"] == [IGNORE_INDEX] * n + [53, 256]  # "5" + eos


def test_chat_template_prompt_ids(tmp_path, tok):
    chat = byte_tokenizer()
    chat.chat_template = CHAT_TEMPLATE
    a, b = read_instruction_file(_write(tmp_path, "a.json", json.dumps(RECORDS)))
    ex = format_instruction(a, chat, use_chat_template=True)
    expected = [256] + list(b"user: Add.\n\n2 and 3\nbot: ")  # the template's eos stays special
    assert ex["prompt_ids"] == expected and "prompt" not in ex and ex["target"] == "5"
    out = tokenize_example(ex, chat, 64)  # no separator after prompt_ids
    assert out["input_ids"] == expected + [53, 256]
    assert out["labels"] == [IGNORE_INDEX] * len(expected) + [53, 256]
    off = format_instruction(b, chat, use_chat_template=False)
    assert off["prompt"] == ALPACA_NO_INPUT and "prompt_ids" not in off


def test_instruction_errors(tmp_path):
    def err(name, text, field="data.path"):
        return _error(read_instruction_file, _write(tmp_path, name, text), field=field)

    assert "record 2: missing 'output'" in err("m.json", json.dumps([RECORDS[0], {"instruction": "x"}]))
    assert "m.json" in err("m.json", json.dumps([RECORDS[0], {"instruction": "x"}]))
    assert "line 2: expected an object, got list" in err("o.jsonl", json.dumps(RECORDS[0]) + "\n[1]\n")
    assert "line 3: invalid JSON" in err("i.json", '[\n{"instruction": "a", "output": "b"},\n{oops}\n]')
    assert "line 2: invalid JSON" in err("i.jsonl", json.dumps(RECORDS[0]) + "\n{oops\n")
    assert "is empty" in err("e.jsonl", "\n\n")
    assert "empty list" in err("e.json", "[]")
    msg = err("u.jsonl", b'{"instruction": "a", "output": "b"}\n{"instruction": "\xff"}\n', "data.validation")
    assert msg.startswith("data.validation:") and "u.jsonl" in msg and "line 2" in msg
    assert "'output' must be a non-empty string" in err("t.jsonl", '{"instruction": "a", "output": 3}')
    missing = str(tmp_path / "none.jsonl")
    assert _error(read_instruction_file, missing) == f"data.path: file {missing!r} does not exist"


# --- local path vs hub -------------------------------------------------------------------

def test_missing_local_path_never_tries_hub(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("tried the hub")

    monkeypatch.setattr(datasets, "load_dataset", no_hub)
    for spec in ["./data/train.csv", "/no/such.csv", "~/x.csv", "train.csv", "data.jsonl", "a/b/c"]:
        msg = _error(load_examples, "e2e", spec, field="data.path")
        assert msg.startswith("data.path:") and "does not exist" in msg and spec in msg


def test_hub_fallback_offline(monkeypatch):
    calls = []

    def fake(name, split):
        calls.append((name, split))
        if name == "e2e_nlg":
            return datasets.Dataset.from_dict({
                "meaning_representation": ["name[A], eatType[pub]"], "human_reference": ["A pub."]})
        if name == "someone/alpaca":
            return datasets.Dataset.from_dict({"instruction": ["Hi"], "input": [""], "output": ["Yo"]})
        raise ConnectionError("offline\nsecond line")

    monkeypatch.setattr(datasets, "load_dataset", fake)
    (ex,) = load_examples("e2e", "e2e_nlg", field="data.path", split="validation")
    assert (ex["prompt"], ex["target"], ex["eatType"]) == ("name[A], eatType[pub]", "A pub.", "pub")
    (ins,) = load_examples("instruction", "someone/alpaca", field="data.path")
    assert ins["target"] == "Yo" and ins["group"] == "Hi"
    assert calls == [("e2e_nlg", "validation"), ("someone/alpaca", "train")]
    msg = _error(load_examples, "e2e", "org/missing", field="data.path")
    assert msg == "data.path: cannot load hub dataset 'org/missing' split 'train': offline"
    msg = _error(load_examples, "instruction", "e2e_nlg", field="data.path")
    assert "lacks columns ['instruction', 'output']" in msg
