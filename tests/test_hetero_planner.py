"""Budgets to split points and ranks: every plan fits its budget, errors name the client, and the
dry run and recipes show the plan."""

import subprocess
import sys

import pytest

from splitlora_ds.config import load_config
from splitlora_ds.errors import ConfigError
from splitlora_ds.hetero.planner import GB, ModelCosts, Workload, client_memory, plan_clients, rank_choices
from splitlora_ds.hetero.setup import model_costs, resolve_setup
from splitlora_ds.models import get_family

from _launch import ROOT

# A LLaMA-2-7B-shaped model (32 blocks x 4096, 32 heads) with LoRA on q_proj and v_proj.
LLAMA7B = ModelCosts(num_blocks=32, embed_params=32000 * 4096, block_params=202_383_360,
                     lora_params_per_rank_embed=0, lora_params_per_rank_block=2 * (4096 + 4096), hidden=4096, heads=32)
FP32 = {"optimizer": {"type": "AdamW"}}  # a ds_config without bf16/fp16
BF16 = Workload(batch_size=1, seq_len=512, weight_bytes=2, act_bytes=2)


def test_memory_by_hand():
    costs = ModelCosts(num_blocks=4, embed_params=1000, block_params=100, lora_params_per_rank_embed=10,
                       lora_params_per_rank_block=20, hidden=8, heads=2)
    m = client_memory(costs, Workload(batch_size=2, seq_len=4, weight_bytes=4, act_bytes=2), k=2, rank=3)
    assert m["weights"] == (1000 + 2 * 100) * 4
    assert m["adapters"] == 3 * (10 + 2 * 20) * 16
    assert m["activations"] == 2 * 2 * 4 * 8 * (34 + 5 * 2 * 4 / 8) * 2 / 2
    assert m["total"] == m["weights"] + m["adapters"] + m["activations"]


def test_rank_choices():
    assert rank_choices(8) == [1, 2, 4, 8]
    assert rank_choices(12) == [1, 2, 4, 8, 12]
    assert rank_choices(1) == [1]


@pytest.mark.parametrize("budgets", [[5, 10, 20], [1.2, 3.3, 7.9, 14.0], [2.0, 2.0]])
def test_every_plan_fits_its_budget_and_uses_it(budgets):
    plans = plan_clients(LLAMA7B, BF16, budgets, [None] * len(budgets), max_layers=16, max_rank=16)
    for p, gb in zip(plans, budgets):
        assert 1 <= p.client_layers <= 16 and p.rank in rank_choices(16)
        assert client_memory(LLAMA7B, BF16, p.client_layers, p.rank)["total"] <= gb * GB
        assert p.memory_bytes <= gb * GB
        # nothing bigger fits: one more block (at the smallest rank) or a higher rank would not
        if p.client_layers < 16:
            assert client_memory(LLAMA7B, BF16, p.client_layers + 1, 1)["total"] > gb * GB
        higher = [r for r in rank_choices(16) if r > p.rank]
        assert all(client_memory(LLAMA7B, BF16, p.client_layers, r)["total"] > gb * GB for r in higher)
    # more memory never gets fewer blocks
    ks = [p.client_layers for _, p in sorted(zip(budgets, plans), key=lambda bp: bp[0])]
    assert ks == sorted(ks)


def test_llama7b_budgets_of_5_10_20_gb():
    plans = plan_clients(LLAMA7B, BF16, [5, 10, 20], [None] * 3, max_layers=31, max_rank=16)
    # by hand: 0.262 GB embedding; per block 0.405 GB bf16 weights + 0.113 GB activations
    # (512 x 4096 x (34 + 5 x 32 x 512 / 4096) bytes) + 0.004 GB adapters at rank 16:
    # (5 - 0.262) / 0.522 = 9.1, (10 - 0.262) / 0.522 = 18.7, 20 GB: all 31 allowed
    assert [p.client_layers for p in plans] == [9, 18, 31]
    assert all(p.rank == 16 for p in plans)


def test_flops_scale_the_split_point():
    plans = plan_clients(LLAMA7B, BF16, [None, None, None], [1.0, 2.0, 4.0], max_layers=8, max_rank=8)
    assert [p.client_layers for p in plans] == [2, 4, 8]
    assert [p.rank for p in plans] == [2, 4, 8]
    plans = plan_clients(LLAMA7B, BF16, [None, None], [3.0, 4.0], max_layers=8, max_rank=8)
    assert [(p.client_layers, p.rank) for p in plans] == [(6, 4), (8, 8)]  # rank 6 is no choice: 4
    plans = plan_clients(LLAMA7B, BF16, [None, 100.0], [0.01, 1.0], max_layers=8, max_rank=8)
    assert plans[0].client_layers == 1  # never below one block


def test_memory_binds_before_flops():
    plans = plan_clients(LLAMA7B, BF16, [2.0], [4.0], max_layers=8, max_rank=8)
    assert plans[0].client_layers == 3  # flops would allow 8, 2 GB holds (2 - 0.262) / 0.52 = 3.3


def test_no_plan_fits_names_the_client_and_the_need():
    with pytest.raises(ConfigError, match=r"federation.budgets\[1\]: memory_gb 0.3 cannot hold the embeddings plus "
                                          r"1 block at rank 1 \(needs 0.78 GB: weights 0.67, adapters and optimizer 0.00, "
                                          r"activations 0.11 at batch 1 x 512 tokens\)"):
        plan_clients(LLAMA7B, BF16, [20, 0.3], [None, None], max_layers=8, max_rank=8)


def test_model_costs_count_the_built_layers():
    cfg = load_config(ROOT / "recipes" / "tiny-cpu.yaml")
    family = get_family("gpt2")
    hf = family.load_config(None, cfg.model.config, "sdpa")
    costs = model_costs(family, hf, ["c_attn", "c_fc"])
    assert costs.embed_params == 257 * 128 + 320 * 128
    assert costs.block_params == 12 * 128 * 128 + 13 * 128  # GPT-2 block: 12 h^2 weights + 13 h biases/norms
    assert costs.lora_params_per_rank_block == (128 + 384) + (128 + 512)


def test_resolve_setup_from_budgets_and_from_lists():
    recipe = ROOT / "recipes" / "tiny-cpu.yaml"
    family = get_family("gpt2")
    cfg = load_config(recipe, ["federation.clients=3", "split.client_layers=3",
                               "federation.budgets=[{memory_gb: 0.07}, {flops: 1}, {flops: 3}]"])
    hf = family.load_config(None, cfg.model.config, "sdpa")
    setup = resolve_setup(cfg, family, hf, FP32)
    assert setup.client_layers == (1, 1, 3) and setup.plan_text and "client2" in setup.plan_text
    cfg = load_config(recipe, ["federation.clients=2", "split.client_layers=[1,3]", "lora.rank=[4,8]"])
    setup = resolve_setup(cfg, family, hf, FP32)
    assert (setup.client_layers, setup.client_ranks, setup.server_rank, setup.aggregation) == ((1, 3), (4, 8), 8, "stacked")
    cfg = load_config(recipe, ["federation.clients=2", "split.client_layers=[1,3]"])
    assert resolve_setup(cfg, family, hf, FP32).aggregation == "fedavg"  # one rank everywhere: FedAvg still applies
    cfg = load_config(recipe, ["federation.clients=2", "lora.rank=[4,8]", "federation.aggregation=fedavg"])
    with pytest.raises(ConfigError, match="federation.aggregation: fedavg averages factors of one rank"):
        resolve_setup(cfg, family, hf, FP32)


def test_config_rejects_mixed_budgets_and_lists():
    with pytest.raises(ConfigError, match="split.client_layers: .* federation.budgets plans per-client values"):
        load_config(None, ["federation.clients=2", "split.client_layers=[1,2]", "federation.budgets=[{flops: 1}, {flops: 2}]"])
    with pytest.raises(ConfigError, match=r"lora.rank: \[4, 8, 2\] is invalid; give one entry per client"):
        load_config(None, ["federation.clients=2", "lora.rank=[4,8,2]"])


def test_dry_run_prints_the_plan():
    out = subprocess.run([sys.executable, "-m", "splitlora_ds.train", "--recipe", "recipes/hsplit-cpu.yaml", "--dry-run"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "client plan from federation.budgets:" in out.stdout
    assert "aggregation stacked" in out.stdout
    assert "LoRA r" in out.stdout


def test_bench_variants_of_a_heterogeneous_recipe():
    from splitlora_ds.bench.variants import variant_overrides

    recipe = str(ROOT / "recipes" / "hsplit-cpu.yaml")
    weakest = variant_overrides("split-weakest", recipe, [])
    assert "split.client_layers=1" in weakest and "lora.rank=2" in weakest  # the phone's plan, for everyone
    cfg = load_config(recipe, weakest)
    assert cfg.federation.budgets is None and cfg.federation.aggregation == "fedavg"
    assert load_config(recipe, variant_overrides("hetlora", recipe, [])).federation.aggregation == "zero_pad"
    assert variant_overrides("fedlora", recipe, []) == ["mode=fedlora"]
    with pytest.raises(ConfigError, match="unknown run 'hsplitt'"):
        variant_overrides("hsplitt", recipe, [])


def test_half_precision_ds_configs_plan_with_two_byte_weights():
    cfg = load_config(ROOT / "recipes" / "hsplit-llama2-7b.yaml", ["federation.budgets=[{memory_gb: 5}, {memory_gb: 10}, {memory_gb: 20}]"])
    family = get_family("llama")
    hf = family.load_config(cfg.model.pretrained, cfg.model.config, "sdpa", offline_known=True)
    bf16 = resolve_setup(cfg, family, hf, {"bf16": {"enabled": True}})
    fp32 = resolve_setup(cfg, family, hf, FP32)
    assert all(b > f for b, f in zip(bf16.client_layers, fp32.client_layers))
