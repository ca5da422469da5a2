"""Every recipe and ds_config is loaded, validated and planned (dry run), downloading nothing."""

import json
from pathlib import Path

import pytest

from splitlora_ds.config import load_config
from splitlora_ds.ds_config import load_ds_config
from splitlora_ds.train import main

ROOT = Path(__file__).resolve().parents[1]
RECIPES = sorted((ROOT / "recipes").glob("*.yaml"))
DS_CONFIGS = sorted((ROOT / "ds_configs").glob("*.json"))


def test_the_shipped_set_is_complete():
    names = {p.stem for p in RECIPES}
    assert {"tiny-cpu", "gpt2-e2e-cpu", "gpt2-e2e-cpu-private", "gpt2-small-e2e", "gpt2-medium-e2e", "gpt2-large-e2e",
            "llama2-7b-alpaca", "llama3-8b-alpaca", "hsplit-cpu", "hsplit-llama2-7b"} <= names


@pytest.mark.parametrize("path", DS_CONFIGS, ids=lambda p: p.name)
def test_ds_config_is_valid(path):
    cfg = load_ds_config(str(path))
    assert cfg["optimizer"]["type"] in ("AdamW", "SGD")
    json.loads(path.read_text())


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_recipe_dry_run(path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # a dry run must never reach for the hub
    cfg = load_config(path)
    assert Path(cfg.deepspeed_config).is_file()
    assert main(["--recipe", str(path), "--dry-run"]) == 0
    out = capsys.readouterr().out
    for c in range(cfg.federation.clients):
        assert f"client{c}" in out
    for s in range(cfg.split.server_stages):
        assert f"server{s}" in out


def rows(out):
    """role -> (layers, params, trainable) from the dry-run table."""
    table = {}
    for line in out.splitlines():
        parts = line.split()
        if parts and parts[0].isdigit() and len(parts) >= 4:
            # columns: rank, role, layers..., LoRA r, params, trainable
            table[parts[1]] = (" ".join(parts[2:-3]), int(parts[-2].replace(",", "")), int(parts[-1].replace(",", "")))
        if parts[:1] == ["whole"]:
            table["whole"] = ("", int(parts[-2].replace(",", "")), int(parts[-1].replace(",", "")))
    return table


def test_gpt2_paper_recipe_counts(capsys):
    assert main(["--recipe", str(ROOT / "recipes/gpt2-medium-e2e.yaml"), "--dry-run"]) == 0
    t = rows(capsys.readouterr().out)
    # LoRA on q and v, rank 4: per block 2 * (1024*4 + 4*1024) trainable (loralib's MergedLinear count).
    per_block = 2 * (1024 * 4 + 4 * 1024)
    assert t["whole"][2] == 24 * per_block
    assert t["client0"][2] == 3 * per_block and t["server0"][2] == 21 * per_block
    assert t["client0"][0] == "embeddings, blocks 0-2"


def test_llama2_recipe_splits_8_of_32_layers_per_client(capsys):
    assert main(["--recipe", str(ROOT / "recipes/llama2-7b-alpaca.yaml"), "--dry-run"]) == 0
    t = rows(capsys.readouterr().out)
    # Llama-2-7b's published 6,738,415,616 parameters plus the adapters (32 layers x 2 x 16 x 8192).
    assert t["whole"][1] == 6_738_415_616 + 32 * 2 * 16 * 8192
    assert [t[f"client{c}"][0] for c in range(3)] == ["embeddings, blocks 0-7"] * 3
    assert t["server0"][0] == "blocks 8-19" and t["server1"][0] == "blocks 20-31, head"
    # LoRA rank 16 on q_proj and k_proj (4096 -> 4096): 2 * 16 * (4096 + 4096) per layer.
    assert t["client0"][2] == 8 * 2 * 16 * 8192
