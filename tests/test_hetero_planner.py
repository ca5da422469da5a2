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

# A LLaMA-2-7B-shaped model (32 blocks x 4096, 32 heads) with LoRA on q_proj and v_proj; its head is
# the final RMSNorm (4096) and the untied 32000 x 4096 LM head.
LLAMA7B = ModelCosts(num_blocks=32, embed_params=32000 * 4096, block_params=202_383_360,
                     lora_params_per_rank_embed=0, lora_params_per_rank_block=2 * (4096 + 4096), hidden=4096, heads=32,
                     head_params=32000 * 4096 + 4096, lora_params_per_rank_head=0, vocab=32000)
FP32 = {"optimizer": {"type": "AdamW"}}  # a ds_config without bf16/fp16
BF16 = Workload(batch_size=1, seq_len=512, weight_bytes=2, act_bytes=2)


def test_memory_by_hand():
    costs = ModelCosts(num_blocks=4, embed_params=1000, block_params=100, lora_params_per_rank_embed=10,
                       lora_params_per_rank_block=20, hidden=8, heads=2, head_params=50, lora_params_per_rank_head=7,
                       vocab=11)
    m = client_memory(costs, Workload(batch_size=2, seq_len=4, weight_bytes=4, act_bytes=2), k=2, rank=3)
    assert m["weights"] == (1000 + 2 * 100) * 4
    assert m["adapters"] == 3 * (10 + 2 * 20) * 16
    assert m["activations"] == 2 * 2 * 4 * 8 * (34 + 5 * 2 * 4 / 8) * 2 / 2
    assert m["logits"] == 0  # the standard split: the server holds the head
    assert m["total"] == m["weights"] + m["adapters"] + m["activations"]


def test_u_shaped_memory_by_hand():
    costs = ModelCosts(num_blocks=6, embed_params=1000, block_params=100, lora_params_per_rank_embed=10,
                       lora_params_per_rank_block=20, hidden=8, heads=2, head_params=50, lora_params_per_rank_head=7,
                       vocab=11)
    work = Workload(batch_size=2, seq_len=4, weight_bytes=4, act_bytes=2)
    m = client_memory(costs, work, k=2, rank=3, tail_layers=1)  # 2 blocks at the bottom, 1 at the top, the head
    assert m["weights"] == (1000 + 3 * 100 + 50) * 4
    assert m["adapters"] == 3 * (10 + 3 * 20 + 7) * 16
    assert m["activations"] == 3 * 2 * 4 * 8 * (34 + 5 * 2 * 4 / 8) * 2 / 2
    assert m["logits"] == 2 * 4 * 11 * (2 + 4)  # bf16 logits and their fp32 log-probabilities
    assert m["total"] == m["weights"] + m["adapters"] + m["activations"] + m["logits"]
    head_only = client_memory(costs, work, k=2, rank=3, tail_layers=0)
    assert head_only["weights"] == (1000 + 2 * 100 + 50) * 4 and head_only["logits"] == m["logits"]


def test_u_shaped_llama7b_head_costs_its_vocab_matrix():
    standard, u = (client_memory(LLAMA7B, BF16, 4, 16, tail) for tail in (None, 0))
    assert u["weights"] - standard["weights"] == (32000 * 4096 + 4096) * 2  # LM head + final RMSNorm, bf16
    assert u["logits"] == 1 * 512 * 32000 * (2 + 4) and u["activations"] == standard["activations"]
    two = client_memory(LLAMA7B, BF16, 4, 16, 2)
    assert two["weights"] - u["weights"] == 2 * 202_383_360 * 2  # the two tail blocks
    assert two["adapters"] - u["adapters"] == 16 * 2 * 2 * 8192 * 16


def test_u_shaped_clients_get_fewer_blocks_from_the_same_budget():
    # by hand, bf16, rank 16: one block 0.522 GB (see above); fixed cost standard 0.262 GB (embedding),
    # head only 0.262 + 0.262 (head) + 0.098 (logits 512 x 32000 x 6 bytes) = 0.623 GB, two tail
    # blocks 0.623 + 2 x 0.522 = 1.667 GB: 5 GB holds 9.1, 8.4 and 6.4 bottom blocks
    ks = [plan_clients(LLAMA7B, BF16, [5, 20], [None, None], max_layers=29, max_rank=16, tail_layers=tail)
          for tail in (None, 0, 2)]
    assert [p[0].client_layers for p in ks] == [9, 8, 6]
    assert all(p[1].client_layers == 29 for p in ks)  # 20 GB: every block allowed (29 + 2 + head: 16.8 GB)
    assert ks[2][1].memory_bytes == client_memory(LLAMA7B, BF16, 29, 16, 2)["total"] < 20 * GB


def test_u_shaped_budget_too_small_names_the_tail_and_head():
    with pytest.raises(ConfigError, match=r"federation.budgets\[1\]: memory_gb 0.3 cannot hold the embeddings plus 1 "
                                          r"block, the last 2 blocks, the final norm and LM head "
                                          r"\(split.client_tail_layers=2\) at rank 1 \(needs 2.18 GB: weights 1.74, "
                                          r"adapters and optimizer 0.00, activations 0.34 at batch 1 x 512 tokens, "
                                          r"logits 0.10 \(1 x 512 x 32000 vocab\)\)"):
        plan_clients(LLAMA7B, BF16, [20, 0.3], [None, None], max_layers=8, max_rank=8, tail_layers=2)
    with pytest.raises(ConfigError, match=r"cannot hold the embeddings plus 1 block, the final norm and LM head "
                                          r"\(split.client_tail_layers=0\)"):
        plan_clients(LLAMA7B, BF16, [0.3], [None], max_layers=8, max_rank=8, tail_layers=0)
    with pytest.raises(ConfigError, match=r"split.client_layers: 30 is out of range for a 32-block model whose "
                                          r"clients keep the last 2 \(split.client_tail_layers\)"):
        plan_clients(LLAMA7B, BF16, [20], [None], max_layers=30, max_rank=8, tail_layers=2)


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
    # the head as models/ build it: ln_f (weight, bias) and a 257 x 128 LM head, tied to wte but its
    # own frozen copy, so a client holding the embeddings too holds that matrix twice
    assert costs.head_params == 2 * 128 + 257 * 128 and costs.vocab == 257
    assert costs.lora_params_per_rank_head == 0  # c_attn and c_fc are not in the head


def test_model_costs_head_comes_from_the_model_config():
    family = get_family("llama")
    cfg = load_config(ROOT / "recipes" / "hsplit-llama2-7b.yaml")
    hf = family.load_config(cfg.model.pretrained, cfg.model.config, "sdpa", offline_known=True)
    costs = model_costs(family, hf, ["q_proj", "v_proj"])
    assert costs.head_params == 32000 * 4096 + 4096 and costs.vocab == 32000  # LLaMA-2-7B: untied head + RMSNorm
    assert costs.embed_params == 32000 * 4096 and costs.block_params == LLAMA7B.block_params
    assert model_costs(family, hf, ["lm_head"]).lora_params_per_rank_head == 4096 + 32000  # an adapted head


def test_resolve_setup_from_budgets_and_from_lists():
    recipe = ROOT / "recipes" / "tiny-cpu.yaml"
    family = get_family("gpt2")
    cfg = load_config(recipe, ["federation.clients=3", "split.client_layers=3",
                               "federation.budgets=[{memory_gb: 0.07}, {flops: 1}, {flops: 3}]"])
    hf = family.load_config(None, cfg.model.config, "sdpa")
    setup = resolve_setup(cfg, family, hf, FP32)
    assert setup.client_layers == (1, 1, 3) and setup.plan_text and "client2" in setup.plan_text
    # 0.15 GB: one block's activations are 8 x 320 x 128 x (34 + 5 x 4 x 320 / 128) x 4 / 2 = 55 MB, so
    # the standard client holds 2 blocks, the U-shaped one 1 (+ the tail block and 8 x 320 x 257 x 8 logits)
    budgets = "federation.budgets=[{memory_gb: 0.15}, {flops: 1}, {flops: 3}]"
    standard = load_config(recipe, ["federation.clients=3", "split.client_layers=2", budgets])
    assert resolve_setup(standard, family, hf, FP32).client_layers == (2, 1, 2)
    u = load_config(recipe, ["federation.clients=3", "split.client_layers=2", "split.client_tail_layers=1", budgets])
    u_setup = resolve_setup(u, family, hf, FP32)
    assert u_setup.client_layers == (1, 1, 2)
    assert "every client also holds the last 1 block, the final norm and LM head" in u_setup.plan_text
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
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
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
