"""What a split run means with several clients and with clipping: each client trains on the
gradient of its own mean token loss (FedAvg then weighs it), clipping takes one global norm, and
server stage 0's copies of shared blocks weigh every client by its FedAvg weight."""

import json
import random

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from _launch import ROOT, check, launch, load_adapters, run_single, scalars, write_recipe
from splitlora_ds.config import load_config
from splitlora_ds.partition import centralized_plan
from splitlora_ds.prepare import prepare
from splitlora_ds.stage import build_stage

pytestmark = pytest.mark.launcher
LR = 0.05  # ds_configs/cpu-sgd.json


def equal_length_data(tmp_path, n=48):
    """Instruction records whose prompts and outputs all have the same length in bytes: every
    client batch then holds the same number of target tokens."""
    rng = random.Random(5)
    word = lambda k: "".join(rng.choice("abcdefghij") for _ in range(k))  # noqa: E731
    path = tmp_path / "equal.jsonl"
    path.write_text("".join(json.dumps({"instruction": word(16), "output": word(10)}) + "\n" for _ in range(n)))
    return {"source": "instruction", "path": str(path), "validation_fraction": 0.0}


def max_diff(a, b):
    assert sorted(a) == sorted(b)
    return max((a[k] - b[k]).abs().max().item() for k in a)


def run_pair(tmp_path, ds_config=None, **sections):
    """The same recipe centralized and split; returns their (losses, adapters) and the split's log dir."""
    out = {}
    for mode in ("centralized", "split"):
        extra = {"deepspeed_config": str(ds_config)} if ds_config else {}
        recipe = write_recipe(tmp_path / mode, mode=mode, train={"output_dir": str(tmp_path / mode / "out")},
                              **extra, **sections)
        clients = sections.get("federation", {}).get("clients", 1)
        stages = sections.get("split", {}).get("server_stages", 1)
        roles = ["centralized"] if mode == "centralized" else (
            [f"client{c}" for c in range(clients)] + [f"server{s}" for s in range(stages)])
        check(run_single(["--recipe", str(recipe)]) if mode == "centralized"
              else launch(clients + stages, ["--recipe", str(recipe)]))
        main = "centralized" if mode == "centralized" else f"server{stages - 1}"
        out[mode] = (scalars(tmp_path / mode / "tb" / main), load_adapters(tmp_path / mode / "out", roles))
    return out, tmp_path / "split" / "tb"


def test_two_clients_with_equal_shards_train_exactly_as_centralized(tmp_path):
    runs, _ = run_pair(tmp_path, federation={"clients": 2, "aggregate_every": 1}, data=equal_length_data(tmp_path))
    (ref_losses, ref_adapters), (split_losses, split_adapters) = runs["centralized"], runs["split"]
    assert len(split_losses) == len(ref_losses) == 4
    assert max(abs(a - b) for a, b in zip(split_losses, ref_losses)) <= 1e-5
    # client0 holds the averaged client adapters (client1's are identical after the last FedAvg)
    assert max_diff(split_adapters, ref_adapters) <= 1e-5
    assert all(v.abs().max() > 0 for k, v in split_adapters.items() if "lora_B" in k)  # both sides trained


def clipping_config(tmp_path, max_norm):
    path = tmp_path / "sgd-clip.json"
    path.write_text(json.dumps({"optimizer": {"type": "SGD", "params": {"lr": LR}}, "gradient_clipping": max_norm}))
    return path


def test_a_binding_clip_takes_one_norm_over_client_and_server(tmp_path):
    max_norm = 0.01
    runs, split_tb = run_pair(tmp_path, ds_config=clipping_config(tmp_path, max_norm))
    norms = scalars(split_tb / "server0", "train/grad_norm")
    assert len(norms) == 4 and min(norms) > 2 * max_norm  # the clip binds at every step
    assert scalars(split_tb / "client0", "train/grad_norm") == pytest.approx(norms, rel=1e-9)  # one norm for both
    (ref_losses, ref_adapters), (split_losses, split_adapters) = runs["centralized"], runs["split"]
    assert max(abs(a - b) for a, b in zip(split_losses, ref_losses)) <= 1e-5
    assert max_diff(split_adapters, ref_adapters) <= 1e-5

    # Per-role clipping (parties that share no norm) is a different update: the test above can tell.
    recipe = write_recipe(tmp_path / "role", deepspeed_config=str(clipping_config(tmp_path, max_norm)),
                          train={"output_dir": str(tmp_path / "role" / "out"), "clip_scope": "role"})
    check(launch(2, ["--recipe", str(recipe)]))
    assert max_diff(load_adapters(tmp_path / "role" / "out", ["client0", "server0"]), ref_adapters) > 1e-4


def test_heterogeneous_split_points_take_the_fedavg_weighted_sgd_step(tmp_path):
    """Clients cut after blocks 1 and 2; block 2 is held by client1 and, for client0's rows, by
    server stage 0. After one SGD step and the aggregation, every client-held or shared adapter
    is theta0 - lr * sum_c w_c grad(mean loss of client c), and every server-only adapter is
    theta0 - lr * grad(mean loss over all tokens): computed here by hand in one process."""
    sections = {"split": {"client_layers": [1, 2]}, "federation": {"clients": 2, "aggregate_every": 1},
                "train": {"max_steps": 1}, "data": {"num_samples": 40}}
    recipe = write_recipe(tmp_path, **sections)
    check(launch(3, ["--recipe", str(recipe), "--out", str(tmp_path)], script=str(ROOT / "tests/scripts/record_adapters.py")))
    recorded = {}  # {adapter: {role: value after step 0 and its aggregation}}
    for role in ("client0", "client1", "server0"):
        snap = load_file(str(tmp_path / f"{role}.safetensors"))
        after = {tag: {} for tag in ("opt", "avg")}
        for key, value in snap.items():
            step, tag, name = key.split("/", 2)
            if step == "0" and tag in after:
                after[tag][name] = value
        for name, value in after["opt"].items():  # server-only adapters are not aggregated
            recorded.setdefault(name, {})[role] = after["avg"].get(name, value)

    cfg = load_config(str(recipe))
    batches, counts = [], []
    for c in range(2):
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("RANK", str(c)), mp.setenv("WORLD_SIZE", "3"), mp.setenv("LOCAL_RANK", str(c))
            prep = prepare(cfg)
        batches.append(next(prep.batches))
        counts.append(prep.num_samples)
    weights = [n / sum(counts) for n in counts]
    stage = build_stage(prep.family, prep.hf_config, centralized_plan(prep.family.num_blocks(prep.hf_config)),
                        cfg.lora, cfg.train.seed)
    theta0 = {n: p.detach().clone() for n, p in stage.adapter_parameters().items()}

    def grads(token_sums_over):
        stage.zero_grad()
        total, tokens = 0.0, 0
        for b in token_sums_over:
            logits = stage(b["input_ids"], b["attention_mask"])
            valid = b["labels"][:, 1:] != -100
            total = total + F.cross_entropy(logits[:, :-1][valid], b["labels"][:, 1:][valid], reduction="sum")
            tokens += int(valid.sum())
        (total / tokens).backward()
        return {n: p.grad.clone() for n, p in stage.adapter_parameters().items()}

    own = [grads([b]) for b in batches]  # each client's own mean loss
    pooled = grads(batches)  # the mean over every token of the step
    server_only = 0
    for name, copies in recorded.items():
        layer = int(name.split(".")[1])
        if layer <= 2:  # held by a client (block 1: both; block 2: client1 and server stage 0)
            expected = theta0[name] - LR * sum(w * g[name] for w, g in zip(weights, own))
        else:
            expected = theta0[name] - LR * pooled[name]
            server_only += 1
        for role, value in copies.items():
            torch.testing.assert_close(value, expected, atol=1e-6, rtol=1e-5, msg=f"{role} {name}")
    assert server_only and any("server0" in c and "client1" in c for c in recorded.values())
