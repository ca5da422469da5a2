"""The command line: world size for launch wrappers, overrides reaching the config."""

from _launch import write_recipe
from splitlora_ds.train import main


def test_world_size_is_clients_plus_server_stages(tmp_path, capsys):
    recipe = write_recipe(tmp_path, federation={"clients": 3}, split={"client_layers": 1, "server_stages": 2})
    assert main(["--recipe", str(recipe), "--world-size"]) == 0
    assert capsys.readouterr().out.strip() == "5"
    assert main(["--recipe", str(recipe), "--set", "mode=centralized", "--world-size"]) == 0
    assert capsys.readouterr().out.strip() == "1"
