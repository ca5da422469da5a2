"""Reading real data: E2E CSVs, Alpaca-style instruction files, and their hub fallbacks.

Every reader returns examples: dicts with "prompt" (str), "target" (str), "group" (the
prompt's identity: held-out validation and E2E reference grouping work per group), "origin"
(where the row came from, for error messages) plus metadata keys (E2E: the MR's attributes).
Errors are ConfigErrors of ONE line naming the config field, the file and the row.
"""

from __future__ import annotations

import csv
import io
import json
import os
import re
from pathlib import Path
from typing import Any, Callable

from transformers import PreTrainedTokenizerBase

from splitlora_ds.errors import ConfigError

# Keys every example carries that are not metadata (not offered as a partition key).
RESERVED_KEYS = frozenset({"prompt", "prompt_ids", "target", "group", "origin",
                           "instruction", "input", "output"})
FILE_SUFFIXES = (".csv", ".tsv", ".json", ".jsonl", ".txt", ".parquet")

ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further "
    "context. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n")
ALPACA_NO_INPUT = (
    "Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n")

_ATTRIBUTE = re.compile(r"([^\[\],]+)\[([^\]]*)\]")


# --------------------------------------------------------------------------- E2E


def parse_mr(mr: str) -> dict[str, str]:
    """'name[The Eagle], eatType[pub]' -> {'name': 'The Eagle', 'eatType': 'pub'}.

    Attributes absent from the MR are absent from the dict (callers map missing to a
    category of their own, e.g. "<none>").
    """
    return {m.group(1).strip(): m.group(2).strip() for m in _ATTRIBUTE.finditer(mr)}


def e2e_example(mr: str, ref: str, origin: str) -> dict:
    # Attributes first so an (unlikely) attribute named like a reserved key cannot clobber it.
    return {**parse_mr(mr), "prompt": mr, "target": ref, "group": mr, "origin": origin}


def _read_text(path: str | os.PathLike, field: str) -> str:
    """The file's text; missing/directory/empty/non-UTF-8 -> one-line ConfigError."""
    p = Path(os.path.expanduser(str(path)))
    if not p.exists():
        raise ConfigError(f"{field}: file {str(path)!r} does not exist")
    if p.is_dir():
        raise ConfigError(f"{field}: {str(path)!r} is a directory, expected a file")
    raw = p.read_bytes()
    try:
        # utf-8-sig: files saved by spreadsheet programs start with a BOM that is not data.
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        # The decoder offset is in the BOM-less bytes only when a BOM was stripped.
        offset = exc.start + (3 if raw.startswith(b"\xef\xbb\xbf") else 0)
        line = raw[:offset].count(b"\n") + 1
        raise ConfigError(f"{field}: {str(path)!r} line {line}: byte 0x{raw[offset]:02x} is not "
                          "valid UTF-8 (save the file as UTF-8)") from None
    if not text.strip():
        raise ConfigError(f"{field}: {str(path)!r} is empty")
    return text


def read_e2e_csv(path: str | os.PathLike, *, field: str = "data.path") -> list[dict]:
    """The canonical E2E CSV (header `mr,ref`, extra columns ignored) -> examples.

    Rows are numbered from 1 after the header; the line is the file line the row starts on.
    """
    text = _read_text(path, field)
    name = str(path)
    stream = io.StringIO(text, newline="")
    reader = csv.reader(stream, strict=True)
    try:
        header = next(reader)
    except csv.Error as exc:
        raise ConfigError(f"{field}: {name!r} line 1: bad CSV header ({exc})") from None
    header = [h.strip() for h in header]
    if "mr" not in header or "ref" not in header:
        raise ConfigError(f"{field}: {name!r} line 1: header has columns {header}; "
                          "an E2E CSV needs 'mr' and 'ref'")
    i_mr, i_ref = header.index("mr"), header.index("ref")
    out: list[dict] = []
    row = 0
    while True:
        line = reader.line_num + 1
        try:
            fields = next(reader)
        except StopIteration:
            break
        except csv.Error as exc:
            raise ConfigError(f"{field}: {name!r} row {row + 1} (line {line}): bad CSV ({exc})") from None
        if not fields:  # a blank line is not a row
            continue
        row += 1
        where = f"{name!r} row {row} (line {line})"
        if len(fields) > len(header):
            # An unquoted comma would silently cut the reference: refuse it.
            raise ConfigError(f"{field}: {where}: {len(fields)} fields but the header has "
                              f"{len(header)}; quote values that contain commas")
        mr = fields[i_mr].strip() if i_mr < len(fields) else ""
        ref = fields[i_ref].strip() if i_ref < len(fields) else ""
        for col, value in (("mr", mr), ("ref", ref)):
            if not value:
                raise ConfigError(f"{field}: {where}: empty {col!r}")
        out.append(e2e_example(mr, ref, f"{name} row {row}"))
    if not out:
        raise ConfigError(f"{field}: {name!r} has a header but no rows")
    return out


# --------------------------------------------------------------------------- instructions


def alpaca_prompt(instruction: str, input_text: str = "") -> str:
    """The Stanford Alpaca prompt (with or without input), ending in '### Response:\\n'."""
    if input_text:
        return ALPACA_WITH_INPUT.format(instruction=instruction, input=input_text)
    return ALPACA_NO_INPUT.format(instruction=instruction)


def instruction_example(record: Any, where: str, field: str, origin: str) -> dict:
    if not isinstance(record, dict):
        raise ConfigError(f"{field}: {where}: expected an object, got {type(record).__name__}")
    for key in ("instruction", "output"):
        if key not in record:
            raise ConfigError(f"{field}: {where}: missing {key!r} (has {sorted(record)})")
        if not isinstance(record[key], str) or not record[key].strip():
            raise ConfigError(f"{field}: {where}: {key!r} must be a non-empty string, "
                              f"got {record[key]!r:.60}")
    input_text = record.get("input") or ""
    if not isinstance(input_text, str):
        raise ConfigError(f"{field}: {where}: 'input' must be a string, got {input_text!r:.60}")
    instruction, output = record["instruction"], record["output"]
    return {"instruction": instruction, "input": input_text, "output": output,
            "prompt": alpaca_prompt(instruction, input_text), "target": output,
            # The user turn as the chat template sees it: its identity is the prompt's.
            "group": instruction + ("\n\n" + input_text if input_text else ""), "origin": origin}


def read_instruction_file(path: str | os.PathLike, *, field: str = "data.path") -> list[dict]:
    """Alpaca-style JSON (a list of objects) or JSONL (one object per line) -> examples.

    Fields: instruction (required), input (optional), output (required). A file whose first
    non-space character is '[' is JSON, anything else JSONL (whatever the suffix says).
    """
    text = _read_text(path, field)
    name = str(path)
    out: list[dict] = []
    if text.lstrip().startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{field}: {name!r} line {exc.lineno}: invalid JSON ({exc.msg})") from None
        if not records:
            raise ConfigError(f"{field}: {name!r} is an empty list")
        for i, rec in enumerate(records, 1):
            out.append(instruction_example(rec, f"{name!r} record {i}", field, f"{name} record {i}"))
        return out
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"{field}: {name!r} line {lineno}: invalid JSON ({exc.msg}); "
                              "expected a JSON list or one object per line") from None
        out.append(instruction_example(rec, f"{name!r} line {lineno}", field, f"{name} line {lineno}"))
    return out


def format_instruction(ex: dict, tokenizer: PreTrainedTokenizerBase, use_chat_template: bool) -> dict:
    """An instruction example ready for tokenization: target = output, and either
    `prompt_ids` (the chat template's tokens, so its special tokens stay special) or the
    Alpaca `prompt` text when chat templates are off or the tokenizer has none."""
    out = {k: v for k, v in ex.items() if k not in ("prompt", "prompt_ids")}
    out["target"] = ex["output"]
    if use_chat_template and getattr(tokenizer, "chat_template", None):
        content = ex["instruction"] + ("\n\n" + ex["input"] if ex.get("input") else "")
        ids = tokenizer.apply_chat_template([{"role": "user", "content": content}],
                                            add_generation_prompt=True, tokenize=True,
                                            return_dict=False)
        if isinstance(ids, dict) or hasattr(ids, "input_ids"):  # BatchEncoding on some versions
            ids = ids["input_ids"]
        out["prompt_ids"] = [int(t) for t in ids]
    else:
        out["prompt"] = alpaca_prompt(ex["instruction"], ex.get("input") or "")
    return out


# --------------------------------------------------------------------------- hub


def _hub_rows(name: str, split: str, field: str, columns: tuple[str, ...]) -> list[dict]:
    import datasets  # deferred: only hub sources need it here

    try:
        ds = datasets.load_dataset(name, split=split)
    except Exception as exc:  # noqa: BLE001 - load_dataset raises many unrelated types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{field}: cannot load hub dataset {name!r} split {split!r}: {first}") from exc
    missing = [c for c in columns if c not in ds.column_names]
    if missing:
        raise ConfigError(f"{field}: hub dataset {name!r} split {split!r} lacks columns {missing} "
                          f"(has {ds.column_names})")
    return ds.to_list()


def load_hub_e2e(name: str, split: str, *, field: str = "data.path") -> list[dict]:
    """E2E from the hub (`e2e_nlg`: columns meaning_representation, human_reference)."""
    rows = _hub_rows(name, split, field, ("meaning_representation", "human_reference"))
    out = []
    for i, r in enumerate(rows, 1):
        mr, ref = (r["meaning_representation"] or "").strip(), (r["human_reference"] or "").strip()
        if not mr or not ref:
            raise ConfigError(f"{field}: hub dataset {name!r} split {split!r} row {i}: empty "
                              f"{'meaning_representation' if not mr else 'human_reference'}")
        out.append(e2e_example(mr, ref, f"{name}[{split}] row {i}"))
    return out


def load_hub_instruction(name: str, split: str, *, field: str = "data.path") -> list[dict]:
    """Alpaca-style instructions from the hub (columns instruction, input, output)."""
    rows = _hub_rows(name, split, field, ("instruction", "output"))
    return [instruction_example(r, f"hub dataset {name!r} split {split!r} row {i}", field,
                                f"{name}[{split}] row {i}") for i, r in enumerate(rows, 1)]


# --------------------------------------------------------------------------- dispatch


def looks_like_path(spec: str) -> bool:
    """A spec the user means as a local file (so a typo never silently goes to the hub)."""
    return (os.path.exists(os.path.expanduser(spec)) or spec.startswith((".", "/", "~"))
            or spec.count("/") >= 2 or Path(spec).suffix.lower() in FILE_SUFFIXES)


def load_examples(source: str, spec: str, *, field: str, split: str = "train") -> list[dict]:
    """`source` ('e2e' | 'instruction') from a local file or, when `spec` is no path, the hub."""
    readers: dict[str, tuple[Callable, Callable]] = {
        "e2e": (read_e2e_csv, load_hub_e2e),
        "instruction": (read_instruction_file, load_hub_instruction),
    }
    if source not in readers:
        raise ConfigError(f"data.source: {source!r} is not read from files; use e2e or instruction")
    read_file, read_hub = readers[source]
    if looks_like_path(spec):
        return read_file(spec, field=field)
    return read_hub(spec, split, field=field)
