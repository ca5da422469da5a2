"""Bad input ends with one clear line naming the field, exit code 2, before any collective call."""

import pytest

from _launch import ROOT, launch, write_recipe
from splitlora_ds.train import main


@pytest.fixture
def world(monkeypatch):
    def set_world(rank, size):
        monkeypatch.setenv("RANK", str(rank))
        monkeypatch.setenv("WORLD_SIZE", str(size))
        monkeypatch.setenv("LOCAL_RANK", str(rank))
    return set_world


CASES = [
    (["--set", "split.client_layers=4"], "split.client_layers: 4 is out of range; the model has 4 blocks"),
    (["--set", "model.family=bert"], "model.family: unknown family 'bert'"),
    (["--set", "lora.target_modules=[nope]"], "lora.target_modules"),
    (["--set", "deepspeed_config=/no/such/ds.json"], "deepspeed_config: file not found: /no/such/ds.json"),
    (["--set", "data.tokenizer=./no/such/tokenizer"], "data.tokenizer"),
    (["--set", "train.max_step=3"], "train.max_step: unknown recipe key; did you mean 'train.max_steps'?"),
    (["--set", "data.num_samples=1"], "federation.clients: 2 clients but only 1 training samples"),
    (["--set", "model.config.n_layerz=2"], "model.config.n_layerz"),
    (["--set", "lora.fused_qkv=[q,v]", "--set", "lora.target_modules=[c_fc]"],
     "lora.fused_qkv: ['q', 'v'] limits LoRA on c_attn, but lora.target_modules ['c_fc'] does not adapt it"),
    (["--set", "model.family=llama", "--set", "model.config={}", "--set", "lora.fused_qkv=[q,v]"],
     "lora.fused_qkv: llama has no fused q|k|v projection"),
    (["--set", "eval.every=5"], "eval.every: 5, but there is no validation data"),
    (["--set", "data.path=train.csv"], "data.path: 'train.csv' is invalid; data.source=synthetic generates"),
    (["--set", "data.source=e2e", "--set", "data.path=/no/such.csv"], "data.path"),
    # fused q/v LoRA with a server rank unlike the clients' (heterogeneous split points share blocks)
    (["--set", "lora.fused_qkv=[q,v]", "--set", "split.client_layers=[1,2]", "--set", "lora.server_rank=8"],
     "lora.fused_qkv: ['q', 'v'] needs one LoRA rank on every holder of a module"),
    # found before the first collective call now (once only after deepspeed.initialize)
    (["--set", "importance.enabled=true", "--set", "importance.replan_threshold=0.3",
      "--set", f"deepspeed_config={ROOT / 'ds_configs' / 'gpu-bf16.json'}"],
     "importance.replan_threshold: resizing adapters needs a plain torch optimizer"),
    (["--set", "lora.target_modules=[wte]", "--set", "split.client_layers=1"],
     "lora.target_modules: ['wte'] match no module in server0"),
    (["--set", "model.pretrained=" + str(ROOT / "tests")], "model.pretrained"),
    # logical clients: ranges, the world they need, enough samples, what they do not support yet
    (["--set", "federation.client_ranks=3"], "federation.client_ranks: 3 is invalid; must be between 1 and "
                                             "federation.clients (2)"),
    (["--set", "federation.clients_per_round=0"], "federation.clients_per_round: 0 is invalid"),
    (["--set", "federation.clients=4", "--set", "federation.client_ranks=3"],
     "world size 3 != federation.client_ranks (3) + split.server_stages (1) = 4"),
    (["--set", "federation.clients=8", "--set", "federation.client_ranks=2", "--set", "data.num_samples=6"],
     "federation.clients: 8 clients but only 6 training samples"),
    (["--set", "mode=sequential", "--set", "federation.client_ranks=2"],
     "federation.client_ranks: 2 is invalid; logical clients do not support mode=sequential yet"),
    # the U-shaped split: the clients' bottom and tail must leave the server a block per stage
    (["--set", "split.client_tail_layers=2"], "split.client_tail_layers: 2 leaves 0 of 4 blocks to the server"),
    (["--set", "split.client_tail_layers=-1"], "split.client_tail_layers: -1 is invalid; must be an int >= 0"),
    (["--set", "split.client_tail_layers=true"], "split.client_tail_layers: expected an integer, got True"),
    (["--set", "split.client_layers=3", "--set", "split.client_tail_layers=1"],
     "split.client_tail_layers: 1 leaves 0 of 4 blocks to the server (split.client_layers=3)"),
]


@pytest.mark.parametrize("rank", [0, 2])  # a client and the server report the same error
@pytest.mark.parametrize("overrides,message", CASES)
def test_bad_input_is_one_line_and_exit_2(tmp_path, capsys, world, overrides, message, rank):
    world(rank, 3)
    recipe = write_recipe(tmp_path, federation={"clients": 2})
    assert main(["--recipe", str(recipe), *overrides]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("splitlora_ds: error: ")
    assert message in err[-1]


def test_missing_recipe(capsys, world):
    world(0, 1)
    assert main(["--recipe", "/no/such/recipe.yaml"]) == 2
    assert "--recipe: file not found: /no/such/recipe.yaml" in capsys.readouterr().err


def test_world_size_must_be_clients_plus_stages(tmp_path, capsys, world):
    world(0, 2)
    recipe = write_recipe(tmp_path, federation={"clients": 2})
    assert main(["--recipe", str(recipe)]) == 2
    assert ("world size 2 != federation.clients (2) + split.server_stages (1) = 3; "
            "launch with `deepspeed --num_gpus 3 ...`") in capsys.readouterr().err


def test_centralized_refuses_several_ranks(tmp_path, capsys, world):
    world(0, 3)
    recipe = write_recipe(tmp_path, mode="centralized")
    assert main(["--recipe", str(recipe)]) == 2
    assert "mode=centralized runs in one process" in capsys.readouterr().err


@pytest.mark.launcher
def test_wrong_world_size_under_the_launcher_fails_fast(tmp_path):
    recipe = write_recipe(tmp_path, federation={"clients": 2})
    proc = launch(2, ["--recipe", str(recipe)], real=True)
    assert proc.returncode != 0
    assert "splitlora_ds: error: world size 2 != federation.clients (2)" in proc.stdout + proc.stderr
