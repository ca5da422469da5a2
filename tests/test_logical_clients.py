"""Logical clients: more data owners (federation.clients) than client ranks
(federation.client_ranks), a sample of them per round (federation.clients_per_round)."""

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from _launch import ROOT, check, launch, load_adapters, scalars, write_recipe
from splitlora_ds.config import load_config
from splitlora_ds.data import build as data_build
from splitlora_ds.metrics import read_scalars
from splitlora_ds.partition import centralized_plan
from splitlora_ds.prepare import prepare
from splitlora_ds.runtime.packing import next_token_targets
from splitlora_ds.stage import build_stage

pytestmark = pytest.mark.launcher

ADAMW = str(ROOT / "ds_configs" / "cpu-fp32.json")


def _prepare(monkeypatch, recipe, rank, world):
    monkeypatch.setenv("RANK", str(rank))
    monkeypatch.setenv("WORLD_SIZE", str(world))
    monkeypatch.setenv("LOCAL_RANK", str(rank))
    return prepare(load_config(str(recipe)))


@pytest.mark.parametrize("tail", [None, 1], ids=["standard", "u-shaped"])
def test_one_rank_per_client_is_the_run_without_logical_clients(tmp_path, tail):
    """client_ranks = clients = clients_per_round, set explicitly, runs through the logical-client
    path (participations, round sums, per-step loss weights) and gives today's run: AdamW state
    kept across rounds."""
    runs = {}
    for name, fed in (("plain", {}), ("logical", {"client_ranks": 2, "clients_per_round": 2})):
        folder = tmp_path / name
        recipe = write_recipe(folder, deepspeed_config=ADAMW, federation={"clients": 2, "aggregate_every": 2, **fed},
                              split={"client_tail_layers": tail}, data={"num_samples": 41},  # unequal weights
                              train={"max_steps": 5, "output_dir": str(folder / "out")})
        check(launch(3, ["--recipe", str(recipe)]))
        runs[name] = (scalars(folder / "tb" / ("server0" if tail is None else "client0")),
                      load_adapters(folder / "out", ["client0", "client1", "server0"]))
    (loss_a, ad_a), (loss_b, ad_b) = runs["plain"], runs["logical"]
    assert len(loss_a) == 5 and max(abs(a - b) for a, b in zip(loss_a, loss_b)) <= 1e-6
    assert max((ad_a[k] - ad_b[k]).abs().max().item() for k in ad_a) <= 1e-6


def test_fedlora_rounds_equal_a_single_process_reference(tmp_path, monkeypatch):
    """12 clients on 2 ranks, 4 per round, I = 2, plain SGD: each round's aggregate is the
    sample-weighted average of its participants, each trained from the global adapters on its
    own data, recomputed here in one process."""
    recipe = write_recipe(tmp_path, mode="fedlora",
                          federation={"clients": 12, "client_ranks": 2, "clients_per_round": 4, "aggregate_every": 2},
                          data={"num_samples": 130}, train={"max_steps": 4, "output_dir": str(tmp_path / "out")})
    check(launch(2, ["--recipe", str(recipe)]))
    run = load_file(str(tmp_path / "out" / "client0.safetensors"))
    assert all(torch.equal(run[k], v) for k, v in load_file(str(tmp_path / "out" / "client1.safetensors")).items())

    prep = _prepare(monkeypatch, recipe, 0, 2)
    cfg, p = prep.cfg, prep.participation
    assert p.rounds == 2 and all(len(plan.sampled) == 4 for plan in p.plans)
    assert len({pool_count for pool_count in prep.pool.sample_counts}) > 1  # unequal weights
    stage = build_stage(prep.family, prep.hf_config, centralized_plan(prep.family.num_blocks(prep.hf_config)),
                        cfg.lora, cfg.train.seed)
    params = stage.adapter_parameters()
    global_ = {n: t.detach().clone() for n, t in params.items()}
    for r, plan in enumerate(p.plans):
        total = {n: torch.zeros_like(t) for n, t in global_.items()}
        for c in plan.sampled:
            with torch.no_grad():
                for n, t in params.items():
                    t.copy_(global_[n])
            stream = prep.pool.stream(c, r)
            for _ in range(p.round_length(r)):
                batch = next(stream)
                targets = next_token_targets(batch["labels"], batch["attention_mask"])
                scored = targets != -100
                logits = stage(batch["input_ids"], batch["attention_mask"], scored.flatten().nonzero().squeeze(1))
                loss = F.cross_entropy(logits.float(), targets[scored], reduction="sum") / scored.sum()
                grads = torch.autograd.grad(loss, list(params.values()))
                with torch.no_grad():
                    for t, g in zip(params.values(), grads):
                        t.sub_(0.05 * g)  # ds_configs/cpu-sgd.json
            weight = prep.pool.weight(c, plan)
            for n, t in params.items():
                total[n] += weight * t.detach()
        global_ = total
    assert sorted(run) == sorted(global_)
    assert max((run[k] - global_[k]).abs().max().item() for k in run) <= 1e-5
    assert any(v.abs().max() > 0 for k, v in run.items() if "lora_B" in k)


def test_many_clients_on_few_ranks_is_reproducible_and_logs_participation(tmp_path):
    """12 clients on 2 ranks, 4 per round: the same seed gives the same run; another seed samples
    other clients. Per-client tags name the logical clients that trained."""
    def run(folder, seed):
        recipe = write_recipe(folder, federation={"clients": 12, "client_ranks": 2, "clients_per_round": 4,
                                                  "aggregate_every": 2},
                              data={"num_samples": 120}, train={"max_steps": 4, "seed": seed})
        check(launch(3, ["--recipe", str(recipe)]))
        return folder / "tb" / "server0"

    a, b, other = run(tmp_path / "a", 7), run(tmp_path / "b", 7), run(tmp_path / "c", 8)
    assert scalars(a) == scalars(b) and len(scalars(a)) == 2 * 2 * 2  # 2 rounds x 2 slots x 2 steps
    assert scalars(a) != scalars(other)
    counts = [v for _, v in read_scalars(str(a), "clients/participated")]
    assert counts[0] == 4 and 4 < counts[-1] <= 8
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    tags = EventAccumulator(str(a))
    tags.Reload()
    trained = {t.split("/")[0] for t in tags.Tags()["scalars"] if t.endswith("/loss") and t.startswith("client")}
    assert len(trained) == counts[-1]


def test_a_rank_reads_only_the_shards_of_clients_it_serves(tmp_path, monkeypatch):
    """Preparing a rank tokenizes no training shard; a shard is tokenized when its client's
    participation starts on that rank (the schedule starts only the rank's own clients)."""
    recipe = write_recipe(tmp_path, federation={"clients": 12, "client_ranks": 2, "clients_per_round": 4,
                                                "aggregate_every": 2},
                          data={"num_samples": 120, "validation_fraction": 0.2})
    calls = []
    real = data_build.tokenize_client

    def spy(plan, client, tokenizer, data, train=True, validation=True):
        calls.append((client, train, validation))
        return real(plan, client, tokenizer, data, train, validation)

    monkeypatch.setattr("splitlora_ds.prepare.tokenize_client", spy)
    prep = _prepare(monkeypatch, recipe, 1, 3)
    home = [c for c, train, validation in calls if validation]
    assert not any(train for _, train, _ in calls) and home  # validation of its home clients only
    assert prep.num_eval_batches >= len(prep.eval_batches) > 0
    calls.clear()
    plan = prep.participation.plans[0]
    for c in plan.per_rank[1]:
        prep.pool.stream(c, 0)
    assert calls == [(c, True, False) for c in plan.per_rank[1]]


def test_a_hundred_clients_on_three_ranks(tmp_path):
    """N = 100, K = 10, R = 3 on the tiny CPU recipe: per-client tags give way to summaries."""
    recipe = write_recipe(tmp_path, federation={"clients": 100, "client_ranks": 3, "clients_per_round": 10,
                                                "aggregate_every": 2},
                          data={"num_samples": 400}, train={"max_steps": 4, "batch_size": 2})
    check(launch(4, ["--recipe", str(recipe)]))
    server = tmp_path / "tb" / "server0"
    assert len(scalars(server)) == 2 * 4 * 2  # 2 rounds x ceil(10 / 3) slots x 2 steps
    assert [v for _, v in read_scalars(str(server), "clients/active")][0] == 3
    participated = [v for _, v in read_scalars(str(server), "clients/participated")]
    assert participated[0] == 10 and 10 < participated[-1] <= 20


def test_resume_continues_the_sampling_and_the_data_positions(tmp_path):
    """A run stopped after its first round and resumed ends exactly where the straight run does:
    the sampling sequence and every client's data position follow from the seed and the round."""
    def recipe_in(folder, every):
        return write_recipe(folder, deepspeed_config=ADAMW,
                            federation={"clients": 6, "client_ranks": 2, "clients_per_round": 3, "aggregate_every": 2},
                            data={"num_samples": 90}, train={"max_steps": 6, "output_dir": str(folder / "out")},
                            checkpoint={"dir": str(folder / "ckpt"), "every": every})

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    check(launch(3, ["--recipe", str(recipe_in(straight, 2))]))
    steps = sorted(p.name for p in (straight / "ckpt").iterdir())
    check(launch(3, ["--recipe", str(recipe_in(resumed, 0)), "--resume", str(straight / "ckpt" / steps[0])]))
    a, b = scalars(straight / "tb" / "server0"), scalars(resumed / "tb" / "server0")
    done = int(steps[0].split("-")[1])  # checkpoints come at round ends: 4 steps a round here
    assert len(a) == 3 * 2 * 2 and done % 4 == 0 and len(b) == len(a) - done
    assert max(abs(x - y) for x, y in zip(a[done:], b)) <= 1e-6
    roles = ["client0", "client1", "server0"]
    ad_a, ad_b = load_adapters(straight / "out", roles), load_adapters(resumed / "out", roles)
    assert max((ad_a[k] - ad_b[k]).abs().max().item() for k in ad_a) <= 1e-6


def test_u_shaped_logical_clients_keep_the_loss_on_the_clients(tmp_path):
    """6 clients on 2 ranks, 3 per round, U-shaped: client 0 logs the job-wide loss and the
    participants' figures; the server logs none."""
    recipe = write_recipe(tmp_path, federation={"clients": 6, "client_ranks": 2, "clients_per_round": 3,
                                                "aggregate_every": 2},
                          split={"client_tail_layers": 1}, data={"num_samples": 90}, train={"max_steps": 4})
    check(launch(3, ["--recipe", str(recipe)]))
    assert len(scalars(tmp_path / "tb" / "client0")) == 2 * 2 * 2
    assert [v for _, v in read_scalars(str(tmp_path / "tb" / "client0"), "clients/participated")][0] == 3
    with pytest.raises(KeyError):
        scalars(tmp_path / "tb" / "server0")


def test_export_of_a_logical_run(tmp_path):
    """The export of 6 clients on 2 ranks: the global adapters (every client rank holds them at a
    checkpoint, which comes at a round end) plus the server's, and it loads as a PEFT model."""
    from splitlora_ds.export import main as export_main

    recipe = write_recipe(tmp_path, federation={"clients": 6, "client_ranks": 2, "clients_per_round": 3,
                                                "aggregate_every": 2},
                          data={"num_samples": 90}, train={"max_steps": 4},
                          checkpoint={"dir": str(tmp_path / "ckpt")})
    check(launch(3, ["--recipe", str(recipe)]))
    out = tmp_path / "export"
    assert export_main(["--checkpoint", str(tmp_path / "ckpt"), "--out", str(out)]) == 0
    step = sorted((tmp_path / "ckpt").iterdir())[-1]
    client = load_file(str(step / "client0.safetensors"))
    assert all(torch.equal(client[k], v) for k, v in load_file(str(step / "client1.safetensors")).items())
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert len(exported) == len(client) + len(load_file(str(step / "server0.safetensors")))


def _updates(adapters: dict) -> dict:
    """Each adapted module's update B A (the stacked aggregation's factors are not unique)."""
    return {k: adapters[k.replace("lora_A", "lora_B")] @ a for k, a in adapters.items() if "lora_A" in k}


def test_device_classes_one_rank_per_client_is_the_heterogeneous_run(tmp_path):
    """Split points [1, 2] and ranks [2, 4] (stacked aggregation, server stage 0 holding block 1
    for client 0): with client_ranks = clients set explicitly, the run goes through the round
    strategy (every participant its own entry in the exchange) and equals the plain run."""
    runs = {}
    for name, fed in (("plain", {}), ("logical", {"client_ranks": 2})):
        folder = tmp_path / name
        recipe = write_recipe(folder, federation={"clients": 2, "aggregate_every": 2, **fed},
                              split={"client_layers": [1, 2]}, lora={"rank": [2, 4], "alpha": 8, "dropout": 0.0},
                              data={"num_samples": 41}, train={"max_steps": 4, "output_dir": str(folder / "out")})
        check(launch(3, ["--recipe", str(recipe)]))
        runs[name] = (scalars(folder / "tb" / "server0"),
                      {r: load_file(str(folder / "out" / f"{r}.safetensors")) for r in ("client0", "client1", "server0")})
    (loss_a, ad_a), (loss_b, ad_b) = runs["plain"], runs["logical"]
    assert len(loss_a) == 4 and max(abs(a - b) for a, b in zip(loss_a, loss_b)) <= 1e-5
    for role in ad_a:
        ua, ub = _updates(ad_a[role]), _updates(ad_b[role])
        assert sorted(ua) == sorted(ub) and max((ua[k] - ub[k]).abs().max().item() for k in ua) <= 1e-5


def test_device_classes_serve_only_their_own_clients(tmp_path):
    """6 clients in two device classes (split point 1 at rank 2, split point 2 at rank 4) on 2
    ranks, 3 per round: each rank runs only clients of its class, and after each round every rank
    of a class holds its class's global adapters (the ranks' last outputs here)."""
    recipe = write_recipe(tmp_path, federation={"clients": 6, "client_ranks": 2, "clients_per_round": 3,
                                                "aggregate_every": 2},
                          split={"client_layers": [1, 2, 1, 2, 1, 2]},
                          lora={"rank": [2, 4, 2, 4, 2, 4], "alpha": 8, "dropout": 0.0},
                          data={"num_samples": 90}, train={"max_steps": 4, "output_dir": str(tmp_path / "out")})
    proc = launch(3, ["--recipe", str(recipe)])
    check(proc)
    loss = scalars(tmp_path / "tb" / "server0")
    assert len(loss) >= 4 and all(v == v for v in loss)
    c0, c1 = (load_file(str(tmp_path / "out" / f"client{r}.safetensors")) for r in (0, 1))
    assert {k.split(".")[1] for k in c0} == {"1"} and {k.split(".")[1] for k in c1} == {"1", "2"}
    assert {v.shape[0] for k, v in c0.items() if "lora_A" in k} == {2}
    assert {v.shape[0] for k, v in c1.items() if "lora_A" in k} == {4}
    # Block 0 (layer 1) is held by both classes. After the last aggregation each holds the round's
    # summed update at its own rank (stacked: a truncated SVD), so the rank-2 class's update is
    # the best rank-2 approximation of the rank-4 class's (truncations nest). LoRA scale: alpha / r.
    u0, u1 = _updates(c0), _updates(c1)
    shared = [k for k in u0 if k in u1]
    assert shared
    for k in shared:
        U, S, Vh = torch.linalg.svd((8 / 4) * u1[k].double())
        best2 = (U[:, :2] * S[:2]) @ Vh[:2]
        assert ((8 / 2) * u0[k].double() - best2).abs().max().item() <= 1e-5
