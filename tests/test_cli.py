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


def test_u_shaped_dry_run_puts_the_tail_and_head_on_the_clients(capsys):
    from _launch import ROOT
    from test_recipes import rows

    recipe = str(ROOT / "recipes" / "tiny-cpu.yaml")  # GPT-2, 4 blocks of 128, vocab 257, k = 2
    assert main(["--recipe", recipe, "--dry-run"]) == 0
    standard = rows(capsys.readouterr().out)
    assert main(["--recipe", recipe, "--dry-run", "--set", "split.client_tail_layers=1"]) == 0
    out = capsys.readouterr().out
    u = rows(out)
    assert "U-shaped split (split.client_tail_layers=1): each client also holds its last 1 block, the final norm " \
           "and LM head" in out
    for c in ("client0", "client1"):
        assert u[c][0] == "embeddings, blocks 0-1, tail block 3, head"
    assert u["server0"][0] == "block 2" and "head" not in u["server0"][0]
    assert standard["server0"][0] == "blocks 2-3, head"
    # the client's counts take over the last block and the head (ln_f 2 x 128, LM head 257 x 128)
    block = standard["server0"][1] - (2 * 128 + 257 * 128) - u["server0"][1]
    assert block == 12 * 128 * 128 + 13 * 128 + 8 * (128 + 384) + 8 * (128 + 512)  # GPT-2 block, LoRA r 8
    assert u["client0"][1] == standard["client0"][1] + block + 2 * 128 + 257 * 128
    assert u["client0"][1] + u["server0"][1] == u["whole"][1] == standard["whole"][1]
    assert u["client0"][2] + u["server0"][2] == u["whole"][2]
