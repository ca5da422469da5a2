"""A rank loading pretrained weights from a hub id fetches only the shards holding its layers.

No network here: huggingface_hub's download function is replaced by one serving a local folder
that holds a tiny GPT-2 saved in several safetensors shards, and recording what was asked for.
"""

import json

import pytest
import torch
from huggingface_hub.utils import EntryNotFoundError
from transformers import GPT2LMHeadModel

from splitlora_ds.config import LoraConfig
from splitlora_ds.errors import ConfigError
from splitlora_ds.models import get_family
from splitlora_ds.models import weights
from splitlora_ds.partition import make_split_plan
from splitlora_ds.stage import build_stage

TINY = {"n_layer": 6, "n_embd": 32, "n_head": 4, "n_positions": 64, "vocab_size": 300}


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """(repo folder, list of requested file names); `hf_hub_download` serves that folder."""
    config = get_family("gpt2").load_config(None, TINY, "sdpa")
    torch.manual_seed(0)
    model = GPT2LMHeadModel(config)
    model.save_pretrained(tmp_path / "repo", max_shard_size="40KB")
    requested = []

    def hf_hub_download(repo_id, filename, **kwargs):
        assert repo_id == "fake-org/tiny-gpt2"
        requested.append(filename)
        path = tmp_path / "repo" / filename
        if not path.is_file():
            raise EntryNotFoundError(f"{filename} not in {repo_id}")
        return str(path)

    def snapshot_download(*args, **kwargs):
        raise AssertionError("the whole repo must not be downloaded")

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    weights._hub_weight_map.cache_clear()
    yield tmp_path / "repo", requested, model
    weights._hub_weight_map.cache_clear()


def test_shards_for_picks_the_files_holding_the_keys():
    weight_map = {"wte.weight": "a.safetensors", "h.0.w": "a.safetensors", "h.1.w": "b.safetensors",
                  "h.2.w": "c.safetensors", "ln_f.weight": "c.safetensors"}
    assert weights.shards_for(weight_map, ["wte.weight", "h.0.w", "h.1.w"]) == ["a.safetensors", "b.safetensors"]
    assert weights.shards_for(weight_map, ["ln_f.weight"]) == ["c.safetensors"]


def test_a_client_stage_downloads_only_its_shards(fake_hub):
    repo, requested, model = fake_hub
    weight_map = json.loads((repo / weights.SAFE_INDEX).read_text())["weight_map"]
    shards = sorted(set(weight_map.values()))
    assert len(shards) >= 4  # the test means something only with several shards
    family = get_family("gpt2")
    config = family.load_config(None, TINY, "sdpa")
    plan = make_split_plan(6, [2], 1, "uniform")
    client = build_stage(family, config, plan.clients[0], LoraConfig(rank=4, alpha=8.0, dropout=0.0), 0,
                         pretrained="fake-org/tiny-gpt2")
    # The client holds the embeddings and blocks 0, 1: exactly the shards with their tensors.
    own = [k for k in weight_map if k.startswith(("transformer.wte", "transformer.wpe", "transformer.h.0.",
                                                  "transformer.h.1."))]
    expected = weights.shards_for(weight_map, own)
    assert sorted(set(requested) - {weights.SAFE_INDEX}) == expected
    assert requested[0] == weights.SAFE_INDEX and len(expected) < len(shards)
    hf = dict(model.named_parameters())
    loaded = dict(client.named_parameters())
    wte = next(v for k, v in loaded.items() if k.endswith("wte.weight"))
    torch.testing.assert_close(wte, hf["transformer.wte.weight"])

    requested.clear()
    server = build_stage(family, config, plan.server[0], LoraConfig(rank=4, alpha=8.0, dropout=0.0), 0,
                         pretrained="fake-org/tiny-gpt2")
    # blocks 2..5, the final norm, and the LM head, which GPT-2 ties to the token embedding
    own = [k for k in weight_map if k.startswith(tuple(f"transformer.h.{i}." for i in range(2, 6)))
           or k.startswith("transformer.ln_f") or k == "transformer.wte.weight"]
    assert sorted(set(requested)) == weights.shards_for(weight_map, own)  # the index came from the cache
    assert server is not None


def test_a_single_file_repo_is_fetched_whole(tmp_path, monkeypatch):
    config = get_family("gpt2").load_config(None, TINY, "sdpa")
    GPT2LMHeadModel(config).save_pretrained(tmp_path / "repo")
    requested = []

    def hf_hub_download(repo_id, filename, **kwargs):
        requested.append(filename)
        path = tmp_path / "repo" / filename
        if not path.is_file():
            raise EntryNotFoundError(filename)
        return str(path)

    import huggingface_hub

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", hf_hub_download)
    weights._hub_weight_map.cache_clear()
    try:
        assert set(dict(weights._hub_weight_map("fake-org/single")).values()) == {weights.SAFE_SINGLE}
        assert requested == [weights.SAFE_INDEX, weights.SAFE_SINGLE]
        with pytest.raises(ConfigError, match="hub repo 'fake-org/none' has no model.safetensors.index.json"):
            monkeypatch.setattr(huggingface_hub, "hf_hub_download",
                                lambda r, f, **k: (_ for _ in ()).throw(EntryNotFoundError(f)))
            weights._hub_weight_map("fake-org/none")
    finally:
        weights._hub_weight_map.cache_clear()
