"""Checkpoints: atomic, pruned, refused when they do not fit the run."""

import json

import pytest
import torch

from splitlora_ds import checkpoint as ckpt
from splitlora_ds.errors import ConfigError


def save(root, step, roles=("client0", "server0")):
    d = ckpt.step_dir(root, step)
    for r in roles:
        ckpt.save_rank(d, r, {"w": torch.full((2,), float(step))}, {"step": torch.tensor(step), "data": [{"epoch": 0}]})
    ckpt.write_meta(d, {"step": step, "config": {"lora": {"rank": 4}}, "world": {"clients": 1, "server_stages": 1}})
    return d


def test_round_trip_and_latest(tmp_path):
    save(tmp_path, 2)
    save(tmp_path, 10)
    assert ckpt.resolve("latest", str(tmp_path)).name == "step-000010"
    assert ckpt.resolve(str(tmp_path), None).name == "step-000010"
    loaded = ckpt.load_rank(ckpt.resolve(str(tmp_path / "step-000002"), None), "client0")
    assert loaded.step == 2 and torch.equal(loaded.adapters["w"], torch.full((2,), 2.0))
    assert int(loaded.state["step"]) == 2


def test_interrupted_write_leaves_previous_checkpoint_loadable(tmp_path, monkeypatch):
    save(tmp_path, 2)

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(ckpt, "save_file", crash)
    with pytest.raises(KeyboardInterrupt):
        save(tmp_path, 4)
    # The half-written step-4 has no meta.json: it is not a checkpoint, step 2 is the latest.
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000002"]
    assert ckpt.load_rank(ckpt.resolve("latest", str(tmp_path)), "server0").step == 2


def test_prune_keeps_the_newest(tmp_path):
    for s in (1, 2, 3, 4):
        save(tmp_path, s)
    ckpt.prune(tmp_path, keep=2)
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000003", "step-000004"]


def test_truncated_files_are_refused(tmp_path):
    d = save(tmp_path, 3)
    blob = (d / "client0.safetensors").read_bytes()
    (d / "client0.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(ConfigError, match="client0.safetensors is damaged or truncated"):
        ckpt.load_rank(d, "client0")
    state = (d / "server0.state.pt").read_bytes()
    (d / "server0.state.pt").write_bytes(state[:100])
    with pytest.raises(ConfigError, match="server0.state.pt is damaged or truncated"):
        ckpt.load_rank(d, "server0")


def test_other_config_or_layout_is_refused(tmp_path):
    d = save(tmp_path, 3)
    meta = ckpt.read_meta(d)
    with pytest.raises(ConfigError, match=r"has lora.rank=4 but this run has lora.rank=8"):
        ckpt.check_compatible(meta, {"lora": {"rank": 8}}, 1, 1, d)
    with pytest.raises(ConfigError, match="saved by 1 clients \\+ 1 server stages, this run has 2 \\+ 1"):
        ckpt.check_compatible(meta, {"lora": {"rank": 4}}, 2, 1, d)
    with pytest.raises(ConfigError, match="has no client1.safetensors"):
        ckpt.load_rank(d, "client1")


def test_no_checkpoint_to_resume(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        ckpt.resolve(str(tmp_path), None)
    with pytest.raises(ConfigError, match="set checkpoint.dir"):
        ckpt.resolve("latest", None)


def test_state_files_load_with_weights_only(tmp_path):
    d = save(tmp_path, 1)
    torch.load(d / "client0.state.pt", weights_only=True)  # would raise on arbitrary pickles
    assert json.loads((d / "meta.json").read_text())["step"] == 1
