"""The README a newcomer reads: short, the first commands on the first screen, one recipes table
and one field table that match recipes/ and config.py, links that lead somewhere, and train
commands that plan (dry run) with the rank count they launch. No training runs here."""

import dataclasses
import re
import shlex
import typing
from pathlib import Path

import pytest
import yaml

from splitlora_ds.config import RunConfig, load_config

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
INSTALL = 'pip install torch==2.13.0 -e ".[dev]"'
DEMO = "deepspeed --num_gpus 3 --module splitlora_ds.train --recipe recipes/tiny-cpu.yaml"


def text_lines(path):
    """The lines of a markdown file outside fenced code blocks."""
    out, fenced = [], False
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line)
    return out


def code_lines(path):
    """The lines inside fenced code blocks, with backslash continuations joined."""
    out, fenced, pending = [], False, ""
    for line in path.read_text().splitlines():
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            pending += line.strip()
            if pending.endswith("\\"):
                pending = pending[:-1] + " "
                continue
            out.append(pending)
            pending = ""
    return out


def cells(row):
    """A table row's cells; a `|` inside a code span does not split."""
    parts, cur, in_code = [], "", False
    for ch in row.strip().strip("|"):
        if ch == "`":
            in_code = not in_code
        if ch == "|" and not in_code:
            parts.append(cur.strip())
            cur = ""
        else:
            cur += ch
    parts.append(cur.strip())
    return parts


def tables(path):
    """Every table in the file: a list of rows (header first, the --- row left out), each a list of cells."""
    found, current = [], []
    for line in text_lines(path) + [""]:
        if line.lstrip().startswith("|"):
            current.append(line)
        elif current:
            found.append(current)
            current = []
    return [[cells(r) for r in t if not re.fullmatch(r"\|?[\s:|-]+\|?", r.strip())] for t in found]


def table_with_header(path, first, second=None):
    matches = [t for t in tables(path) if t[0][0] == first and (second is None or t[0][1] == second)]
    assert len(matches) == 1, f"expected one table headed {first!r} in {path.name}, found {len(matches)}"
    return matches[0]


def headings(path):
    return [line.lstrip("#").strip() for line in text_lines(path) if re.match(r"#{1,6} ", line)]


def slug(heading):
    """GitHub's anchor for a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


# ----------------------------------------------------------------------------- shape


def test_readme_is_short():
    n = len(README.read_text().splitlines())
    assert n <= 450, f"README.md has {n} lines; move detail to docs/"


def test_first_screen_has_install_demo_tests_and_gpu_recipe():
    first = README.read_text().splitlines()[:40]
    screen = "\n".join(first)
    assert INSTALL in screen
    assert DEMO in screen
    assert any(line.strip() == "pytest" or line.strip().startswith("pytest ") for line in first)
    assert "recipes/llama2-7b-alpaca.yaml" in screen
    assert "tensorboard --logdir runs/tiny-cpu" in screen


def test_readme_install_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text()
    assert INSTALL in ci
    assert INSTALL in README.read_text()


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_no_two_headings_are_the_same(path):
    seen = headings(path)
    dupes = sorted({h for h in seen if seen.count(h) > 1})
    assert not dupes, f"{path.name}: repeated headings {dupes}"


# ----------------------------------------------------------------------------- recipes


def test_every_recipe_is_in_the_one_recipes_table():
    table = table_with_header(README, "recipe")
    width = len(table[0])
    for row in table:
        assert len(row) == width, f"recipes table row has {len(row)} cells, header {width}: {row[:1]}"
    listed = set()
    for row in table[1:]:
        listed.update(re.findall(r"recipes/([\w.-]+\.yaml)", row[0]))
    missing = sorted({p.name for p in RECIPES} - listed)
    assert not missing, f"recipes missing from the README's recipes table: {missing}"
    assert listed <= {p.name for p in RECIPES}, f"the table lists recipes that do not exist: {listed}"


def recipe_keys(path):
    """section.key for every key a recipe sets; a key's mapping value (model.config, ...) is one key."""
    raw = yaml.safe_load(path.read_text()) or {}
    keys = set()
    for top, value in raw.items():
        if isinstance(value, dict):
            keys.update(f"{top}.{k}" for k in value)
        else:
            keys.add(top)
    return keys


def field_table():
    table = table_with_header(README, "field", "default")
    width = len(table[0])
    assert all(len(row) == width for row in table), "every field-table row has field, default, meaning"
    fields = {}
    for row in table[1:]:
        names = re.findall(r"`([^`]+)`", row[0])
        assert len(names) == 1, f"one field per row: {row[0]}"
        assert names[0] not in fields, f"{names[0]} is in the field table twice"
        fields[names[0]] = row[1]
    return fields


def test_every_key_a_recipe_uses_is_in_the_field_table():
    fields = field_table()
    used = set().union(*(recipe_keys(p) for p in RECIPES))
    missing = sorted(used - set(fields))
    assert not missing, f"recipe keys missing from the README's field table: {missing}"


def config_fields():
    """section.key -> default for every field of the recipe dataclasses."""
    out = {}
    hints = typing.get_type_hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            for g in dataclasses.fields(tp):
                out[f"{f.name}.{g.name}"] = g.default if g.default is not dataclasses.MISSING else g.default_factory()
        else:
            out[f.name] = f.default
    return out


def test_field_table_lists_every_config_field_with_its_default():
    fields = field_table()
    known = config_fields()
    assert sorted(set(known) - set(fields)) == [], "config fields missing from the README's field table"
    assert sorted(set(fields) - set(known)) == [], "the field table names fields config.py does not have"
    for name, cell in fields.items():
        shown = re.fullmatch(r"`([^`]*)`", cell)
        assert shown, f"{name}: default {cell!r} is not one code span"
        assert yaml.safe_load(shown.group(1)) == known[name], f"{name}: README says {cell}, config.py {known[name]!r}"


# ----------------------------------------------------------------------------- links and paths

LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_relative_links_lead_to_files_and_headings(path):
    broken = []
    for target in LINK.findall("\n".join(text_lines(path))):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        dest = (path.parent / file).resolve() if file else path
        if not dest.exists():
            broken.append(target)
        elif anchor and dest.suffix == ".md" and anchor not in {slug(h) for h in headings(dest)}:
            broken.append(target)
    assert not broken, f"{path.name}: broken links {broken}"


@pytest.mark.parametrize("path", [README, *DOCS], ids=lambda p: p.name)
def test_every_recipe_path_mentioned_exists(path):
    named = set(re.findall(r"recipes/[\w.-]+\.yaml", path.read_text()))
    missing = sorted(p for p in named if not (ROOT / p).is_file())
    assert not missing, f"{path.name} names recipes that do not exist: {missing}"


def test_docs_exist_and_are_linked_from_the_readme():
    assert DOCS, "docs/ holds the detail the README links to"
    text = README.read_text()
    unlinked = [p.name for p in DOCS if f"(docs/{p.name}" not in text]
    assert not unlinked, f"docs not linked from the README: {unlinked}"


# ----------------------------------------------------------------------------- commands


def train_commands():
    """(file, argv) for every `splitlora_ds.train --recipe ...` command in a code block of the
    README and docs/ (placeholders such as RECIPE are not in code blocks)."""
    found = []
    for path in [README, *DOCS]:
        for line in code_lines(path):
            line = line.split(" #")[0] if not line.startswith("#") else ""
            if "splitlora_ds.train" not in line:
                continue
            found.append((path.name, shlex.split(line)))
    return found


COMMANDS = train_commands()


def test_the_readme_has_train_commands():
    files = {f for f, _ in COMMANDS}
    assert "README.md" in files and len(COMMANDS) >= 5


@pytest.mark.parametrize("argv", [a for _, a in COMMANDS], ids=lambda a: " ".join(a[a.index("--recipe"):])[:90])
def test_train_command_plans_with_the_ranks_it_launches(argv, capsys, monkeypatch):
    """Each documented train command loads, passes validation and planning (a dry run on the meta
    device, offline), and a `deepspeed --num_gpus N` launch gives the recipe the N ranks it needs."""
    from splitlora_ds.train import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    module = argv.index("splitlora_ds.train")
    args = argv[module + 1:]
    if "--resume" in args:  # resuming needs a checkpoint from an earlier run; the plan does not
        i = args.index("--resume")
        del args[i:i + 2]
    overrides = [args[i + 1] for i, a in enumerate(args) if a == "--set"]
    cfg = load_config(args[args.index("--recipe") + 1], overrides)
    if argv[0] == "deepspeed":
        n = int(argv[argv.index("--num_gpus") + 1])
        assert n == cfg.world_size, f"--num_gpus {n}, but the recipe needs {cfg.world_size} ranks"
    else:
        assert cfg.mode == "centralized", "only a centralized run starts without the launcher"
    assert main(args + ["--dry-run"]) == 0, capsys.readouterr().err


def attack_commands():
    """(file, argv) for every `splitlora_ds.attack` command in a code block of the README and docs/."""
    found = []
    for path in [README, *DOCS]:
        for line in code_lines(path):
            if line.startswith("python ") and "-m splitlora_ds.attack " in line:
                found.append((path.name, shlex.split(line.split(" #")[0])))
    return found


def test_the_privacy_docs_show_the_attack_command():
    files = {f for f, _ in attack_commands()}
    assert {"README.md", "privacy.md"} <= files


@pytest.mark.parametrize("argv", [a for _, a in attack_commands()], ids=lambda a: " ".join(a[a.index("--recipe"):])[:90])
def test_attack_command_loads_and_names_known_settings(argv, capsys, monkeypatch):
    """Each documented attack command parses, its recipe loads, and its settings exist (--list
    plans them without training or reading data)."""
    from splitlora_ds.attack.__main__ import main

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(ROOT)
    args = argv[argv.index("splitlora_ds.attack") + 1:]
    args = [a for a in args if a != "--reuse"]
    assert main(args + ["--list"]) == 0, capsys.readouterr().err
