"""The command line: world size for launch wrappers, overrides reaching the config."""

from _launch import write_recipe
from splitlora_ds.train import main


def test_world_size_is_clients_plus_server_stages(tmp_path, capsys):
    recipe = write_recipe(tmp_path, federation={"clients": 3}, split={"client_layers": 1, "server_stages": 2})
    assert main(["--recipe", str(recipe), "--world-size"]) == 0
    assert capsys.readouterr().out.strip() == "5"
    assert main(["--recipe", str(recipe), "--set", "mode=centralized", "--world-size"]) == 0
    assert capsys.readouterr().out.strip() == "1"


def test_epochs_set_the_run_length(tmp_path, monkeypatch):
    from splitlora_ds.config import load_config
    from splitlora_ds.prepare import prepare

    monkeypatch.setenv("WORLD_SIZE", "3")
    monkeypatch.setenv("RANK", "2")
    recipe = write_recipe(tmp_path, federation={"clients": 2}, data={"num_samples": 64},
                          train={"max_steps": None, "epochs": 2, "batch_size": 4})
    # 64 samples over 2 clients: 32 each; 2 passes of batches of 4 -> 16 steps.
    assert prepare(load_config(recipe)).max_steps == 16
    # max_steps, when set, wins (as in the Hugging Face Trainer).
    assert prepare(load_config(recipe, ["train.max_steps=5"])).max_steps == 5
