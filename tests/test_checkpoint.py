"""Checkpoints: atomic, pruned, refused when they do not fit the run."""

import json

import pytest
import torch

from splitlora_ds import checkpoint as ckpt
from splitlora_ds.errors import ConfigError


META = {"config": {"lora": {"rank": 4}}, "world": {"clients": 1, "server_stages": 1},
        "roles": ["client0", "server0"]}


def save(root, step, roles=("client0", "server0"), legacy=False):
    """Each role's part and marker (format 2), or format 1's single meta.json after every part."""
    d = ckpt.step_dir(root, step)
    for r in roles:
        ckpt.save_rank(d, r, {"w": torch.full((2,), float(step))}, {"step": torch.tensor(step), "data": [{"epoch": 0}]})
        if not legacy:
            ckpt.write_marker(d, r, {"format": 2, "step": step, **META})
    if legacy:
        ckpt.write_meta(d, {"step": step, **META})
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
    # The half-written step-4 has no marker: it is not a checkpoint, step 2 is the latest.
    assert [p.name for p in ckpt.complete_checkpoints(tmp_path)] == ["step-000002"]
    assert ckpt.load_rank(ckpt.resolve("latest", str(tmp_path)), "server0").step == 2


def test_prune_keeps_the_newest(tmp_path):
    for s in (1, 2, 3, 4):
        save(tmp_path, s)
    # Each role prunes its own parts (hosts without a shared folder each prune theirs); a folder
    # goes once no role's part is left in it.
    ckpt.prune(tmp_path, "client0", keep=2)
    assert [p.name for p in ckpt.rank_checkpoints(tmp_path, "client0")] == ["step-000003", "step-000004"]
    assert [p.name for p in ckpt.rank_checkpoints(tmp_path, "server0")] == [f"step-00000{s}" for s in (1, 2, 3, 4)]
    assert not (tmp_path / "step-000001" / "client0.safetensors").exists()
    assert (tmp_path / "step-000001" / "server0.safetensors").exists()
    ckpt.prune(tmp_path, "server0", keep=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000003", "step-000004"]


def test_prune_tolerates_a_folder_another_rank_removed_meanwhile(tmp_path, monkeypatch):
    """Ranks sharing a checkpoint folder prune at the same time: the last one to leave a step
    folder removes it while another may be looking into it."""
    for s in (1, 2, 3):
        save(tmp_path, s)
    real_glob = type(tmp_path).glob

    def glob_after_removal(self, pattern):
        if self.name == "step-000001":
            raise FileNotFoundError(str(self))  # what os.scandir says once the folder is gone
        return real_glob(self, pattern)

    monkeypatch.setattr(type(tmp_path), "glob", glob_after_removal)
    ckpt.prune(tmp_path, "client0", keep=2)
    assert [p.name for p in ckpt.rank_checkpoints(tmp_path, "client0")] == ["step-000002", "step-000003"]


def test_per_host_folders_and_pruning(tmp_path):
    # Two hosts, no shared disk: each folder holds one role's parts and is complete for it only.
    a, b = tmp_path / "host-a", tmp_path / "host-b"
    for s in (1, 2, 3):
        save(a, s, roles=("client0",))
    for s in (2, 3):
        save(b, s, roles=("server0",))
    assert ckpt.complete_checkpoints(a) == [] and ckpt.complete_checkpoints(b) == []
    assert [ckpt.step_of(p) for p in ckpt.rank_candidates(str(a), None, "client0")] == [3, 2, 1]
    assert ckpt.rank_candidates(str(a), None, "server0") == []
    ckpt.prune(a, "client0", keep=1)
    assert [p.name for p in a.iterdir()] == ["step-000003"]
    assert sorted(p.name for p in b.iterdir()) == ["step-000002", "step-000003"]


def test_a_shared_folder_is_complete_when_every_role_marked(tmp_path):
    d = save(tmp_path, 5, roles=("client0",))
    assert ckpt.complete_checkpoints(tmp_path) == []
    save(tmp_path, 5, roles=("server0",))
    assert ckpt.complete_checkpoints(tmp_path) == [d]


def test_format_1_checkpoints_still_load(tmp_path):
    d = save(tmp_path, 4, legacy=True)
    assert not list(d.glob("*.done.json"))
    assert ckpt.resolve("latest", str(tmp_path)) == d
    assert [ckpt.step_of(p) for p in ckpt.rank_candidates(str(tmp_path), None, "server0")] == [4]
    assert ckpt.load_rank(d, "server0").step == 4


def test_config_digest_follows_the_trajectory_fields():
    cfg = {"lora": {"rank": 4}, "train": {"seed": 1, "max_steps": 10}, "log": {"dir": "a"}}
    same = {"lora": {"rank": 4}, "train": {"seed": 1, "max_steps": 20}, "log": {"dir": "b"}}
    other = {"lora": {"rank": 8}, "train": {"seed": 1, "max_steps": 10}, "log": {"dir": "a"}}
    assert ckpt.config_digest(cfg) == ckpt.config_digest(same)  # run length and logging may change
    assert ckpt.config_digest(cfg) != ckpt.config_digest(other)


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
    with pytest.raises(ConfigError, match="has no client1 part"):
        ckpt.load_rank(d, "client1")


def test_no_checkpoint_to_resume(tmp_path):
    with pytest.raises(ConfigError, match="no complete checkpoint"):
        ckpt.resolve(str(tmp_path), None)
    with pytest.raises(ConfigError, match="set checkpoint.dir"):
        ckpt.resolve("latest", None)


def test_state_files_load_with_weights_only(tmp_path):
    d = save(tmp_path, 1)
    torch.load(d / "client0.state.pt", weights_only=True)  # would raise on arbitrary pickles
    assert json.loads((d / "client0.done.json").read_text())["step"] == 1


def test_a_checkpoint_from_before_a_field_existed_resumes_with_its_default(tmp_path):
    from splitlora_ds.checkpoint import check_compatible
    from splitlora_ds.config import RunConfig

    current = RunConfig().to_dict()
    old = RunConfig().to_dict()
    del old["privacy"], old["train"]["clip_scope"], old["federation"]["secure_aggregation"]
    check_compatible({"world": {"clients": 2, "server_stages": 1}, "config": old}, current, 2, 1, tmp_path)
    current["federation"]["secure_aggregation"] = True  # a real change is still refused
    with pytest.raises(ConfigError, match="federation.secure_aggregation=False but this run has"):
        check_compatible({"world": {"clients": 2, "server_stages": 1}, "config": old}, current, 2, 1, tmp_path)
