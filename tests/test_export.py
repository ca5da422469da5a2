"""The exported PEFT adapter (and merged model) is the model the trainer evaluated."""

import json

import pytest
import torch
import torch.nn.functional as F
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from _launch import check, launch, write_recipe
from splitlora_ds.config import load_config
from splitlora_ds.data import collate, load_tokenizer
from splitlora_ds.data.build import plan_data, tokenize_client
from splitlora_ds.export import main as export_main
from splitlora_ds.metrics import read_scalars

pytestmark = pytest.mark.launcher


def validation_loss(model, recipe):
    """Token-mean cross-entropy over every client's validation rows (the trainer's eval/loss)."""
    cfg = load_config(recipe)
    plan = plan_data(cfg.data, cfg.federation.clients, cfg.train.seed)
    tok = load_tokenizer(cfg.data.tokenizer)
    rows = [r for c in range(cfg.federation.clients) for r in tokenize_client(plan, c, tok, cfg.data)[1]]
    batch = collate(rows, tok.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    labels = batch["labels"][:, 1:]
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels.reshape(-1), ignore_index=-100).item()


@pytest.mark.parametrize("family,lora", [
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fused_qkv": ["q", "v"]}),
    ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}),
])
def test_export_matches_the_trainers_last_eval(tmp_path, family, lora):
    # AdamW at 1e-2 moves the adapters visibly in 4 steps; clients average after steps 3 and 4.
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}))
    recipe = write_recipe(tmp_path, family, deepspeed_config=str(ds), lora=lora,
                          federation={"clients": 2, "aggregate_every": 3},
                          data={"num_samples": 48, "validation_fraction": 0.25},
                          train={"max_steps": 4, "batch_size": 2}, checkpoint={"dir": str(tmp_path / "ckpt")})
    check(launch(3, ["--recipe", str(recipe)]))
    trainer_eval = read_scalars(str(tmp_path / "tb" / "server0"), "eval/loss")[-1][1]

    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "adapter")]) == 0
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").is_file()
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    untrained = validation_loss(base, recipe)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    exported = validation_loss(model, recipe)
    assert abs(exported - trainer_eval) <= 1e-4, (exported, trainer_eval)
    assert abs(untrained - trainer_eval) > 1e-2  # the adapters carry the training

    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert abs(validation_loss(merged, recipe) - trainer_eval) <= 1e-4


def test_export_of_a_missing_checkpoint_is_an_error(tmp_path, capsys):
    assert export_main(["--checkpoint", str(tmp_path / "nothing"), "--out", str(tmp_path / "o")]) == 2
    assert "no complete checkpoint" in capsys.readouterr().err


@pytest.mark.parametrize("aggregation,ranks,server_rank", [("fedavg", [4, 4], None), ("stacked", [2, 4], 2)])
def test_export_of_heterogeneous_clients(tmp_path, aggregation, ranks, server_rank):
    # client0 cuts after block 0, client1 after block 1: block 1 is held by client1 and, for
    # client0, by server0. With one rank everywhere (fedavg) every holder ends with the same
    # factors, so the export is exactly the model the trainer evaluated; with client ranks 2 and 4
    # and server rank 2 the export takes each module's highest-rank holder, at its rank.
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}))
    recipe = write_recipe(tmp_path, "gpt2", deepspeed_config=str(ds), lora={"rank": ranks, "server_rank": server_rank,
                                                                                    "target_modules": ["c_attn"]},
                          split={"client_layers": [1, 2]}, federation={"clients": 2, "aggregate_every": 3,
                                                                       "aggregation": aggregation},
                          data={"num_samples": 48, "validation_fraction": 0.25},
                          train={"max_steps": 4, "batch_size": 2}, checkpoint={"dir": str(tmp_path / "ckpt")})
    check(launch(3, ["--recipe", str(recipe)]))
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "adapter")]) == 0
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    exported = validation_loss(model, recipe)
    trainer_eval = read_scalars(str(tmp_path / "tb" / "server0"), "eval/loss")[-1][1]
    if aggregation == "fedavg":
        assert config["r"] == 4 and not config["rank_pattern"]
        assert abs(exported - trainer_eval) <= 1e-4, (exported, trainer_eval)
    else:
        # block 0 is held by both clients (ranks 2, 4) and block 1 by client1 (4) and server0 (2):
        # both export client1's rank-4 factors; blocks 2, 3 only server0 holds, at rank 2
        assert config["r"] == 2
        assert {k.replace("\\", ""): v for k, v in config["rank_pattern"].items()} == {
            "transformer.h.0.attn.c_attn": 4, "transformer.h.1.attn.c_attn": 4}
        ckpt_dir = sorted((tmp_path / "ckpt").glob("step-*"))[-1]
        from safetensors.torch import load_file
        client1 = load_file(str(ckpt_dir / "client1.safetensors"))
        a = model.base_model.model.transformer.h[0].attn.c_attn.lora_A["default"].weight
        torch.testing.assert_close(a, client1["layers.1.block.attn.c_attn.lora_A.default.weight"])
        assert abs(exported - trainer_eval) < 0.05  # the clients' own lower-rank copies differ a little


@pytest.mark.parametrize("family,lora,tail_module", [
    ("gpt2", {"target_modules": ["c_attn", "c_fc"], "fused_qkv": ["q", "v"]}, "transformer.h.3.mlp.c_fc"),
    ("llama", {"target_modules": ["q_proj", "v_proj", "down_proj"]}, "model.layers.3.self_attn.q_proj"),
])
def test_export_of_a_u_shaped_split(tmp_path, family, lora, tail_module):
    # The clients hold block 0 and, at the top of the model, block 3 and the head
    # (split.client_tail_layers: 1); the server blocks 1-2. The export has every block's adapters,
    # the tail's being the clients' FedAvg (after the last aggregation: any client's copy).
    ds = tmp_path / "ds.json"
    ds.write_text(json.dumps({"optimizer": {"type": "AdamW", "params": {"lr": 1e-2, "torch_adam": True}}}))
    recipe = write_recipe(tmp_path, family, deepspeed_config=str(ds), lora=lora,
                          split={"client_layers": 1, "client_tail_layers": 1, "micro_batches": 2},
                          federation={"clients": 2, "aggregate_every": 3},
                          data={"num_samples": 52, "validation_fraction": 0.25},
                          train={"max_steps": 4, "batch_size": 2},
                          checkpoint={"dir": str(tmp_path / "ckpt"), "every": 2})
    check(launch(3, ["--recipe", str(recipe)]))
    trainer_eval = read_scalars(str(tmp_path / "tb" / "client0"), "eval/loss")[-1][1]  # the clients score

    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "adapter")]) == 0
    exported = load_file(str(tmp_path / "adapter" / "adapter_model.safetensors"))
    prefix = "model.layers." if family == "llama" else "transformer.h."
    blocks = {int(k.split(prefix, 1)[1].split(".")[0]) for k in exported}
    assert blocks == {0, 1, 2, 3}  # the server's middle and both ends the clients hold
    ckpt_dir = sorted((tmp_path / "ckpt").glob("step-*"))[-1]
    client0, client1 = (load_file(str(ckpt_dir / f"client{c}.safetensors")) for c in range(2))
    server0 = load_file(str(ckpt_dir / "server0.safetensors"))
    assert {int(k.split(".")[1]) for k in client0} == {1, 4} and {int(k.split(".")[1]) for k in server0} == {2, 3}
    assert all(torch.equal(client0[k], client1[k]) for k in client0)  # the last step aggregated
    spec_module = tail_module.split(".", 3)[3]  # "mlp.c_fc" / "self_attn.q_proj"
    for factor in ("A", "B"):
        ours = next(v for k, v in client0.items() if k.startswith("layers.4.") and f"{spec_module}.lora_{factor}." in k)
        theirs = exported[f"base_model.model.{tail_module}.lora_{factor}.weight"]
        assert ours.abs().max() > 0
        torch.testing.assert_close(theirs, ours, rtol=1e-6, atol=1e-8)  # w0 x + w1 x: x up to rounding

    # Mid-turn (after step 2, before the aggregation after step 3) the clients' tails differ: the
    # export takes their average weighted by the recorded sample counts.
    mid = tmp_path / "ckpt" / "step-000002"
    assert export_main(["--checkpoint", str(mid), "--out", str(tmp_path / "mid")]) == 0
    counts = json.loads((mid / "client0.done.json").read_text())["sample_counts"]
    w = [n / sum(counts) for n in counts]
    assert counts[0] != counts[1]  # unequal weights: a plain mean would not pass
    mid_exported = load_file(str(tmp_path / "mid" / "adapter_model.safetensors"))
    clients = [load_file(str(mid / f"client{c}.safetensors")) for c in range(2)]
    for factor in ("A", "B"):
        key = next(k for k in clients[0] if k.startswith("layers.4.") and f"{spec_module}.lora_{factor}." in k)
        assert not torch.equal(clients[0][key], clients[1][key])
        torch.testing.assert_close(mid_exported[f"base_model.model.{tail_module}.lora_{factor}.weight"],
                                   w[0] * clients[0][key] + w[1] * clients[1][key], rtol=1e-6, atol=1e-8)

    base = AutoModelForCausalLM.from_pretrained(tmp_path / "adapter" / "base")
    untrained = validation_loss(base, recipe)
    model = PeftModel.from_pretrained(base, tmp_path / "adapter").eval()
    assert abs(validation_loss(model, recipe) - trainer_eval) <= 1e-4
    assert abs(untrained - trainer_eval) > 1e-2  # the adapters carry the training
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(tmp_path / "merged"), "--merge"]) == 0
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    assert abs(validation_loss(merged, recipe) - trainer_eval) <= 1e-4
