"""models/: layer specs, HF parity, masks, lazy + deterministic build, weights loading, LoRA."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import GPT2LMHeadModel, LlamaForCausalLM

from splitlora_ds.errors import ConfigError
from splitlora_ds.models import (
    build_layer,
    build_lora_layer,
    get_family,
    inject_lora,
    load_layer_weights,
    lora_state_dict,
    target_modules_in_family,
)
from splitlora_ds.models import gpt2 as gpt2_mod
from splitlora_ds.models import weights as weights_mod

TINY = {
    "gpt2": dict(n_layer=3, n_embd=32, n_head=4, vocab_size=300, n_positions=64, bos_token_id=0, eos_token_id=0),
    "llama": dict(
        num_hidden_layers=3,
        hidden_size=32,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        vocab_size=300,
        max_position_embeddings=64,
        bos_token_id=0,
        eos_token_id=0,
    ),
}
HF_CLASS = {"gpt2": GPT2LMHeadModel, "llama": LlamaForCausalLM}
LORA = dict(rank=4, alpha=8.0, dropout=0.0)


def tiny_config(family: str, attn: str = "sdpa", **extra):
    return get_family(family).load_config(None, {**TINY[family], **extra}, attn)


def save_hf(family: str, path, attn: str = "sdpa", seed: int = 0, **save_kwargs):
    config = tiny_config(family, attn)
    torch.manual_seed(seed)
    model = HF_CLASS[family](config).eval()
    model.save_pretrained(path, **save_kwargs)
    return model


def batch():
    torch.manual_seed(1)
    ids = torch.randint(1, 300, (3, 7))
    mask = torch.ones_like(ids)
    mask[0, 5:] = 0  # right padding, different length per row
    mask[2, 3:] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def run_layers(family, config, layers, ids, mask, ctx_override=None):
    ctx = get_family(family).make_context(config)(mask, torch.float32)
    if ctx_override:
        ctx.update(ctx_override)
    h = ids
    for layer in layers:
        h = layer.eval()(h, ctx)
    return h


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """One saved random HF model per family (+ its logits on the batch), reused across tests."""
    out = {}
    ids, mask = batch()
    for fam in ("gpt2", "llama"):
        path = tmp_path_factory.mktemp(fam)
        model = save_hf(fam, path)
        with torch.no_grad():
            logits = model(ids, attention_mask=mask).logits
        out[fam] = (str(path), logits)
    return out


# --------------------------------------------------------------------------------------------- parity


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("lora", [False, True])
def test_parity_with_hf(ckpt, family, attn, lora):
    path, _ = ckpt[family]
    fam = get_family(family)
    config = fam.load_config(path, {}, attn)
    assert config._attn_implementation == attn and config.use_cache is False
    torch.manual_seed(0)
    hf = HF_CLASS[family].from_pretrained(path, attn_implementation=attn).eval()
    ids, mask = batch()
    with torch.no_grad():
        ref = hf(ids, attention_mask=mask).logits
    layers = []
    for spec in fam.layer_specs(config):
        if lora:  # inject first, then load: loading must see through peft's base_layer names
            layer, _ = build_lora_layer(
                spec, 5, target_modules=fam.default_target_modules, fan_in_fan_out=fam.fan_in_fan_out, **LORA
            )
        else:
            layer = build_layer(spec, 5)
        load_layer_weights(layer, spec, path)
        layers.append(layer)
    if lora:
        assert any(lora_state_dict(layer) for layer in layers)
    with torch.no_grad():
        out = run_layers(family, config, layers, ids, mask)
    keep = mask.bool()
    assert (out[keep] - ref[keep]).abs().max().item() <= 1e-5
    if lora:  # B = 0 made them a no-op; non-zero B must change the logits (adapters are on the path)
        with torch.no_grad():
            for layer in layers:
                for name, p in layer.named_parameters():
                    if "lora_B" in name:
                        p.fill_(0.1)
            moved = run_layers(family, config, layers, ids, mask)
        assert (moved[keep] - ref[keep]).abs().max().item() > 1e-3


def test_llama_tied_head_loads_from_embeddings(tmp_path):
    config = tiny_config("llama", tie_word_embeddings=True)
    torch.manual_seed(0)
    HF_CLASS["llama"](config).save_pretrained(tmp_path)
    fam = get_family("llama")
    head_spec = fam.layer_specs(config)[-1]
    head = build_layer(head_spec, 0)
    load_layer_weights(head, head_spec, str(tmp_path))
    embed_spec = fam.layer_specs(config)[0]
    embed = build_layer(embed_spec, 1)
    load_layer_weights(embed, embed_spec, str(tmp_path))
    assert torch.equal(head.lm_head.weight, embed.embed_tokens.weight)
    assert not head.lm_head.weight.requires_grad  # frozen copy of a tied matrix


# --------------------------------------------------------------------------------------------- masks


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_eager_equals_sdpa_and_mask_is_causal(family):
    ids, mask = batch()
    mask[:] = 1  # full rows so the "later token" below is a real token
    outs = {}
    for attn in ("eager", "sdpa"):
        config = tiny_config(family, attn)
        layers = [build_layer(s, 7) for s in get_family(family).layer_specs(config)]
        with torch.no_grad():
            outs[attn] = run_layers(family, config, layers, ids, mask)
            changed = ids.clone()
            changed[:, -1] = (changed[:, -1] + 1) % 300
            later = run_layers(family, config, layers, changed, mask)
            assert (later[:, :-1] - outs[attn][:, :-1]).abs().max().item() == 0.0
            if attn == "eager":
                # Negative control: eager attention without our explicit mask attends both ways, so the
                # causality check above is sensitive to a missing mask.
                nomask = {"attention_mask": None}
                a = run_layers(family, config, layers, ids, mask, nomask)
                b = run_layers(family, config, layers, changed, mask, nomask)
                assert (a[:, :-1] - b[:, :-1]).abs().max().item() > 1e-4
    assert (outs["eager"] - outs["sdpa"]).abs().max().item() <= 1e-5


def test_context_mask_and_left_padding_positions():
    fam = get_family("llama")
    config = tiny_config("llama")
    mask = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 0]])
    ctx = fam.make_context(config)(mask, torch.bfloat16)
    # real tokens count from 0; padding positions mean nothing but must be valid indices
    real = mask.bool()
    assert ctx["position_ids"][real].tolist() == [0, 1, 0, 1, 2]
    assert int(ctx["position_ids"].min()) >= 0
    m = ctx["attention_mask"]
    assert m.shape == (2, 1, 4, 4) and m.dtype == torch.bfloat16
    allowed = m[:, 0] == 0
    for b in range(2):
        for i in range(4):
            for j in range(4):
                # a real query sees the real keys up to itself; a padding query only itself
                expected = (j <= i and mask[b, j].item() == 1) if mask[b, i].item() else i == j
                assert allowed[b, i, j].item() == expected
    assert (m[~(m == 0)] == torch.finfo(torch.bfloat16).min).all()
    cos, sin = ctx["position_embeddings"]
    assert cos.shape == (2, 4, 8) and cos.dtype == torch.bfloat16
    assert not list(fam.make_context(config).parameters())


# --------------------------------------------------------------------------------------------- build


def test_lazy_build_constructs_only_its_layer(monkeypatch):
    calls = []

    class CountingBlock(gpt2_mod.GPT2Block):
        def __init__(self, config, layer_idx=None):
            calls.append(layer_idx)
            super().__init__(config, layer_idx=layer_idx)

    monkeypatch.setattr(gpt2_mod, "GPT2Block", CountingBlock)
    # 2000 blocks of width 512: the whole model would be ~6e9 params; one block is ~3e6.
    config = tiny_config("gpt2", n_layer=2000, n_embd=512, n_head=8)
    specs = get_family("gpt2").layer_specs(config)
    assert len(specs) == 2002 and [s.kind for s in (specs[0], specs[1], specs[-1])] == ["embed", "block", "head"]
    assert calls == []  # making specs builds nothing
    block = build_layer(specs[1234], 0)
    assert calls == [1233]
    assert sum(p.numel() for p in block.parameters()) < 4_000_000
    build_layer(specs[-1], 0)
    assert calls == [1233]  # the head builds no block


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_build_is_deterministic_per_layer(family):
    config = tiny_config(family, tie_word_embeddings=True)
    specs = get_family(family).layer_specs(config)
    rng_before = torch.get_rng_state()
    a = build_layer(specs[2], seed=3).state_dict()
    b = build_layer(specs[2], seed=3).state_dict()
    c = build_layer(specs[2], seed=4).state_dict()
    d = build_layer(specs[1], seed=3).state_dict()
    assert torch.equal(torch.get_rng_state(), rng_before)  # caller's RNG untouched
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if k.endswith("weight") and a[k].std() > 0)
    assert any(not torch.equal(a[k], d[k]) for k in a if a[k].std() > 0)
    # tied head: built alone (as on another rank), it equals the embedding's vocab matrix
    head = build_layer(specs[-1], seed=3)
    embed = build_layer(specs[0], seed=3)
    vocab = embed.wte.weight if family == "gpt2" else embed.embed_tokens.weight
    assert torch.equal(head.lm_head.weight, vocab)
    assert abs(vocab.std().item() - config.initializer_range) < 0.005  # HF scheme: N(0, initializer_range)


def test_gpt2_init_scheme():
    config = tiny_config("gpt2")
    block = build_layer(get_family("gpt2").layer_specs(config)[1], 0).block
    assert torch.equal(block.ln_1.weight, torch.ones(32)) and torch.equal(block.attn.c_attn.bias, torch.zeros(96))
    ratio = block.mlp.c_proj.weight.std() / block.mlp.c_fc.weight.std()
    assert abs(ratio.item() - 1 / (2 * 3) ** 0.5) < 0.1  # c_proj scaled by 1/sqrt(2*n_layer)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_lora_build_deterministic_and_frozen(family):
    fam = get_family(family)
    spec = fam.layer_specs(tiny_config(family))[1]
    kw = dict(target_modules=fam.default_target_modules, fan_in_fan_out=fam.fan_in_fan_out, **LORA)
    a, names = build_lora_layer(spec, 3, **kw)
    b, _ = build_lora_layer(spec, 3, **kw)
    assert names and all(n.endswith(fam.default_target_modules) for n in names)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    trainable = {n for n, p in a.named_parameters() if p.requires_grad}
    assert trainable == set(lora_state_dict(a)) and trainable
    assert all("lora_A" in n or "lora_B" in n for n in trainable)
    assert all(not v.any() for k, v in lora_state_dict(a).items() if "lora_B" in k)  # B = 0 at init
    assert any(v.any() for k, v in lora_state_dict(a).items() if "lora_A" in k)


def test_inject_lora_no_match_is_noop():
    fam = get_family("gpt2")
    embed = build_layer(fam.layer_specs(tiny_config("gpt2"))[0], 0)
    assert inject_lora(embed, 4, 8.0, 0.0, ["c_attn"], True) == []
    assert lora_state_dict(embed) == {}
    assert not any(p.requires_grad for p in embed.parameters())


# --------------------------------------------------------------------------------------------- errors


def test_bad_inputs(tmp_path):
    with pytest.raises(ConfigError, match="model.family.*'bert'"):
        get_family("bert")
    with pytest.raises(ConfigError, match="model.config.n_layers"):
        get_family("gpt2").load_config(None, {"n_layers": 3}, "sdpa")
    with pytest.raises(ConfigError, match="model.attn_implementation.*'flash'"):
        get_family("llama").load_config(None, {}, "flash")
    fam = get_family("gpt2")
    config = tiny_config("gpt2")
    with pytest.raises(ConfigError, match="lora.target_modules: 'foo'.*available: .*c_attn"):
        target_modules_in_family(fam, config, ["c_attn", "foo"])
    target_modules_in_family(fam, config, ["c_attn", "mlp.c_proj", "lm_head"])
    spec = fam.layer_specs(config)[1]
    missing = str(tmp_path / "nope")
    with pytest.raises(ConfigError, match="model.pretrained.*nope"):
        load_layer_weights(build_layer(spec, 0), spec, missing)
    with pytest.raises(ConfigError, match="model.pretrained.*nope"):
        fam.load_config(missing, {}, "sdpa")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ConfigError, match="model.pretrained.*no checkpoint.*empty"):
        load_layer_weights(build_layer(spec, 0), spec, str(tmp_path / "empty"))


def test_pretrained_config_overrides_and_missing_keys(ckpt):
    path, _ = ckpt["gpt2"]
    fam = get_family("gpt2")
    config = fam.load_config(path, {"resid_pdrop": 0.0}, "eager")
    assert config.resid_pdrop == 0.0 and config._attn_implementation == "eager"
    with pytest.raises(ConfigError, match="model.config.bogus"):
        fam.load_config(path, {"bogus": 1}, "eager")
    with pytest.raises(ConfigError, match="model.family"):
        get_family("llama").load_config(path, {}, "eager")
    # a 5-block config against a 3-block checkpoint: block 5 is missing -> names the key and the source
    spec = fam.layer_specs(fam.load_config(path, {"n_layer": 5}, "eager"))[5]
    with pytest.raises(ConfigError, match=r"model.pretrained.*'block.ln_1.weight'.*transformer.h.4.ln_1.weight"):
        load_layer_weights(build_layer(spec, 0), spec, path)


# --------------------------------------------------------------------------------------------- files


def test_sharded_safetensors_opens_only_needed_shards(tmp_path, monkeypatch):
    hf = save_hf("gpt2", tmp_path, max_shard_size="60KB")
    weight_map = json.loads((tmp_path / "model.safetensors.index.json").read_text())["weight_map"]
    shards = set(weight_map.values())
    assert len(shards) >= 3
    opened = []
    real = weights_mod.safe_open
    monkeypatch.setattr(weights_mod, "safe_open", lambda p, **kw: opened.append(p) or real(p, **kw))
    fam = get_family("gpt2")
    config = fam.load_config(str(tmp_path), {}, "sdpa")
    spec = fam.layer_specs(config)[2]
    block = build_layer(spec, 0)
    load_layer_weights(block, spec, str(tmp_path))
    needed = {f for k, f in weight_map.items() if k.startswith("transformer.h.1.")}
    assert {p.rsplit("/", 1)[-1] for p in opened} == needed and len(needed) < len(shards)
    ref = hf.state_dict()
    for name, p in block.state_dict().items():
        assert torch.equal(p, ref["transformer.h.1." + name.removeprefix("block.")])


def test_pytorch_bin_fallback(tmp_path):
    hf = save_hf("llama", tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    fam = get_family("llama")
    config = fam.load_config(str(tmp_path), {}, "sdpa")
    spec = fam.layer_specs(config)[-1]
    head = build_layer(spec, 0)
    load_layer_weights(head, spec, str(tmp_path))
    assert torch.equal(head.lm_head.weight, hf.lm_head.weight)


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_head_projects_only_the_scored_positions(family):
    ids, mask = batch()
    config = tiny_config(family)
    layers = [build_layer(s, 7) for s in get_family(family).layer_specs(config)]
    index = mask.flatten().nonzero().squeeze(1)  # the real tokens, flat over batch x time
    with torch.no_grad():
        full = run_layers(family, config, layers, ids, mask)
        scored = run_layers(family, config, layers, ids, mask, {"score_index": index})
    assert scored.shape == (int(mask.sum()), full.shape[-1])
    torch.testing.assert_close(scored, full.flatten(0, 1)[index], rtol=0, atol=1e-5)
