"""Recipe loading: overrides, strict keys, field-naming errors."""

import pytest

from splitlora_ds.config import RunConfig, apply_override, load_config
from splitlora_ds.errors import ConfigError


def write(tmp_path, text):
    p = tmp_path / "r.yaml"
    p.write_text(text)
    return p


def test_defaults_and_override_types(tmp_path):
    cfg = load_config(write(tmp_path, "train: {max_steps: 3}\n"),
                      ["federation.clients=3", "lora.target_modules=[q_proj,v_proj]", "split.wire_dtype=bfloat16",
                       "mode=centralized", "log.dir=/tmp/x", "lora.alpha=8"])
    assert cfg.train.max_steps == 3
    assert cfg.federation.clients == 3
    assert cfg.lora.target_modules == ["q_proj", "v_proj"]
    assert cfg.lora.alpha == 8.0 and isinstance(cfg.lora.alpha, float)
    assert cfg.split.wire_dtype == "bfloat16"
    assert cfg.mode == "centralized" and cfg.log.dir == "/tmp/x"
    assert isinstance(cfg, RunConfig)


def test_model_config_is_free_form_and_overridable(tmp_path):
    cfg = load_config(write(tmp_path, "model: {config: {n_layer: 4}}\n"), ["model.config.n_embd=64"])
    assert cfg.model.config == {"n_layer": 4, "n_embd": 64}


@pytest.mark.parametrize("text,overrides,needle", [
    ("train: {max_step: 3}\n", [], "train.max_step: unknown recipe key; did you mean 'train.max_steps'?"),
    ("", ["federation.client=3"], "federation.client: unknown recipe key"),
    ("trian: {}\n", [], "trian: unknown recipe key"),
    ("", ["train.max_steps=many"], "train.max_steps: expected an integer, got 'many'"),
    ("", ["train.max_steps=0"], "train.max_steps: 0 is invalid"),
    ("", ["mode=parallel"], "mode: 'parallel' is invalid"),
    ("", ["split.client_layers=0"], "split.client_layers: 0 is invalid"),
    ("", ["federation.aggregate_every=0"], "federation.aggregate_every: 0 is invalid"),
    ("", ["split.wire_dtype=int8"], "split.wire_dtype: 'int8' is invalid"),
    ("", ["lora.dropout=1.5"], "lora.dropout: 1.5 is invalid"),
    ("train: {max_steps: 3}\n", ["train.max_steps.x=1"], "'max_steps' is a value, not a section"),
    ("", ["train.seed.x=1"], "train.seed: expected an integer, got {'x': 1}"),
    ("", ["train.max_steps"], "expected section.key=value"),
    ("- a\n- b\n", [], "must hold a mapping"),
    # heterogeneous clients
    ("", ["lora.rank=[2, x]"], "lora.rank: expected an integer or a list of integers, got [2, 'x']"),
    ("", ["lora.rank=[2, 0]"], "lora.rank: [2, 0] is invalid"),
    ("", ["split.client_layers=[1, 2, 3]"], "split.client_layers: [1, 2, 3] is invalid; give one entry per client"),
    ("", ["federation.budgets=[{flops: 1}, {}]"], "federation.budgets[1]: {} is invalid; give memory_gb and/or flops"),
    ("", ["federation.budgets=[{flops: 1}, {memory_gb: -1}]"], "federation.budgets[1].memory_gb: -1.0 is invalid"),
    ("", ["federation.budgets=[{flops: 1}, {flops: 1, cores: 2}]"], "federation.budgets[1].cores: unknown recipe key"),
    ("", ["federation.aggregation=mean"], "federation.aggregation: 'mean' is invalid"),
    ("", ["mode=fedlora", "lora.rank=[2, 4]"], "per-client split points, ranks and budgets need mode=split"),
    ("", ["lora.rank=[2, 4]", "lora.fused_qkv=[q, v]"], "lora.fused_qkv: ['q', 'v'] is invalid"),
    ("", ["importance.replan_threshold=0.3"], "re-planning needs importance.enabled: true"),
    ("", ["importance.enabled=true", "importance.replan_threshold=0.3", "federation.aggregation=fedavg"],
     "re-planning gives modules different ranks"),
    # q/v-only LoRA keeps a block layout that resizing and the stacked SVD would break
    ("", ["lora.fused_qkv=[q, v]", "importance.enabled=true", "importance.replan_threshold=0.3",
          "federation.aggregation=stacked"], "lora.fused_qkv: ['q', 'v'] is invalid; cannot be combined with "
                                             "importance.replan_threshold"),
    ("", ["lora.fused_qkv=[q, v]", "federation.aggregation=stacked"],
     "cannot be combined with federation.aggregation: stacked"),
    ("", ["lora.fused_qkv=[q, v]", "federation.budgets=[{flops: 1}, {flops: 2}]"],
     "cannot be combined with federation.budgets"),
    ("", ["train.clip_scope=server"], "train.clip_scope: 'server' is invalid; use global or role"),
    # pipeline and packing
    ("", ["split.micro_batches=0"], "split.micro_batches: 0 is invalid; must be >= 1 or null"),
    ("", ["split.micro_batches=9", "train.batch_size=8", "train.max_steps=2"], "split.micro_batches: 9 is invalid; is more than "
                                                          "train.batch_size (8)"),
    ("", ["train.pack_length=0"], "train.pack_length: 0 is invalid"),
    # secure aggregation (heterogeneous clients too; DP update clipping stays FedAvg-only)
    ("", ["federation.secure_aggregation=true", "federation.clients=1"], "needs at least 2 clients"),
    ("", ["federation.secure_aggregation=true", "mode=sequential"], "mode=sequential has no aggregation"),
    ("", ["federation.secure_aggregation=true", "federation.clients=2", "lora.rank=[2, 4]", "privacy.update_clip=1.0"],
     "privacy.update_clip: 1.0 is invalid; supports FedAvg of equal client ranks and split points only (not "
     "per-client values, budgets, stacked or zero_pad; with or without secure aggregation)"),
    # differential privacy
    ("", ["privacy.activation_noise=1.0"], "privacy.activation_noise: 1.0 is invalid; noise needs a sensitivity bound"),
    ("", ["privacy.update_noise=1.0"], "set privacy.update_clip"),
    ("", ["privacy.activation_clip=0"], "privacy.activation_clip: 0.0 is invalid"),
    ("", ["privacy.update_clip=1.0", "federation.clients=1"], "at least 2 clients"),
    ("", ["privacy.activation_clip=1.0", "mode=fedlora"], "not mode=fedlora"),
    ("", ["privacy.update_clip=1.0", "lora.rank=[2, 4]"], "FedAvg of equal client ranks"),
    ("", ["privacy.delta=1.5"], "privacy.delta: 1.5 is invalid"),
    # ... on the gradient a U-shaped client's tail returns
    ("", ["privacy.tail_gradient_clip=0.1"], "privacy.tail_gradient_clip: 0.1 is invalid; applies to the gradient a "
                                             "U-shaped client's tail returns (set split.client_tail_layers)"),
    ("", ["privacy.tail_gradient_clip=0.1", "split.client_tail_layers=1", "mode=fedlora"],
     "privacy.tail_gradient_clip: 0.1 is invalid; applies to the gradient a U-shaped client's tail returns to the "
     "server (split, sequential), not mode=fedlora"),
    ("", ["privacy.tail_gradient_noise=1.0", "split.client_tail_layers=1"],
     "privacy.tail_gradient_noise: 1.0 is invalid; noise needs a sensitivity bound: set privacy.tail_gradient_clip"),
    ("", ["privacy.tail_gradient_clip=-1", "split.client_tail_layers=1"],
     "privacy.tail_gradient_clip: -1.0 is invalid; must be > 0, or null for off"),
    ("", ["privacy.tail_gradient_clip=1", "privacy.tail_gradient_noise=-0.5", "split.client_tail_layers=1"],
     "privacy.tail_gradient_noise: -0.5 is invalid; must be >= 0"),
    ("", ["privacy.tail_gradient_clip=1", "split.client_tail_layers=1", "federation.clients=2",
          "federation.client_ranks=1"], "logical clients do not support privacy.tail_gradient_clip yet"),
    # many logical clients on fewer ranks, partial participation
    ("", ["federation.clients=3", "federation.client_ranks=4"],
     "federation.client_ranks: 4 is invalid; must be between 1 and federation.clients (3)"),
    ("", ["federation.client_ranks=0"], "federation.client_ranks: 0 is invalid"),
    ("", ["federation.client_ranks=two"], "federation.client_ranks: expected an integer, got 'two'"),
    ("", ["federation.clients=3", "federation.clients_per_round=4"],
     "federation.clients_per_round: 4 is invalid; must be between 1 and federation.clients (3)"),
    ("", ["federation.clients_per_round=0"], "federation.clients_per_round: 0 is invalid"),
    ("", ["federation.clients=4", "federation.client_ranks=2", "split.client_layers=[1, 2, 3, 1]"],
     "federation.client_ranks: 2 is invalid; the clients form 3 device classes"),
    ("", ["federation.clients=4", "federation.client_ranks=1", "lora.rank=[2, 2, 4, 4]"],
     "federation.client_ranks: 1 is invalid; the clients form 2 device classes"),
])
def test_bad_recipes_name_the_field(tmp_path, text, overrides, needle):
    with pytest.raises(ConfigError) as e:
        load_config(write(tmp_path, text), overrides)
    assert needle in str(e.value)


def test_secure_aggregation_accepts_heterogeneous_clients(tmp_path):
    for extra in (["lora.rank=[2, 4]"], ["split.client_layers=[1, 2]"], ["federation.aggregation=zero_pad"]):
        cfg = load_config(write(tmp_path, ""), ["federation.secure_aggregation=true", "federation.clients=2", *extra])
        assert cfg.federation.secure_aggregation


def test_tail_gradient_dp_accepts_every_u_shaped_split_with_a_server(tmp_path):
    """Its mechanism is the client's own: sequential, heterogeneous clients and secure aggregation
    change nothing about it."""
    u_shaped = ["split.client_tail_layers=0", "privacy.tail_gradient_clip=0.5", "privacy.tail_gradient_noise=1.0"]
    for extra in ([], ["mode=sequential"], ["federation.clients=2", "lora.rank=[2, 4]", "split.client_layers=[1, 2]"],
                  ["federation.clients=2", "federation.secure_aggregation=true"]):
        privacy = load_config(write(tmp_path, ""), [*u_shaped, *extra]).privacy
        assert (privacy.tail_gradient_clip, privacy.tail_gradient_noise) == (0.5, 1.0)


def test_missing_recipe(tmp_path):
    with pytest.raises(ConfigError, match="--recipe: file not found"):
        load_config(tmp_path / "nope.yaml")


def test_ds_config_path_resolves_from_recipe_folder(tmp_path, monkeypatch):
    (tmp_path / "ds_configs").mkdir()
    (tmp_path / "ds_configs" / "a.json").write_text("{}")
    (tmp_path / "recipes").mkdir()
    recipe = tmp_path / "recipes" / "r.yaml"
    recipe.write_text("deepspeed_config: ds_configs/a.json\n")
    monkeypatch.chdir("/")
    cfg = load_config(recipe)
    assert cfg.deepspeed_config == str(tmp_path / "ds_configs" / "a.json")


def test_apply_override_creates_sections():
    raw = {}
    apply_override(raw, "a.b.c=[1, 2]")
    assert raw == {"a": {"b": {"c": [1, 2]}}}


def test_gathering_adapters_needs_a_checkpoint_dir_and_a_server(tmp_path):
    recipe = write(tmp_path, "train: {max_steps: 3}\ncheckpoint: {gather_adapters: true}\n")
    with pytest.raises(ConfigError, match="checkpoint.gather_adapters: True is invalid; .*set checkpoint.dir"):
        load_config(recipe)
    with pytest.raises(ConfigError, match="checkpoint.gather_adapters: .*mode=fedlora has none"):
        load_config(recipe, ["checkpoint.dir=ckpt", "mode=fedlora"])
    cfg = load_config(recipe, ["checkpoint.dir=ckpt", "log.gather=true"])
    assert cfg.checkpoint.gather_adapters and cfg.log.gather


def test_micro_batches_default_to_four_or_the_batch_size():
    assert load_config(None, ["train.max_steps=2", "train.batch_size=8"]).micro_batches == 4
    assert load_config(None, ["train.max_steps=2", "train.batch_size=2"]).micro_batches == 2
    assert load_config(None, ["train.max_steps=2", "train.batch_size=8", "split.micro_batches=8"]).micro_batches == 8


def test_client_ranks_and_clients_per_round_resolve():
    cfg = load_config(None, ["train.max_steps=2", "federation.clients=5"])
    assert (cfg.federation.client_ranks, cfg.federation.clients_per_round) == (None, None)
    assert (cfg.client_ranks, cfg.clients_per_round) == (5, 5)  # null: today's one rank per client
    cfg = load_config(None, ["train.max_steps=2", "federation.clients=100", "federation.client_ranks=4",
                             "federation.clients_per_round=10"])
    assert (cfg.client_ranks, cfg.clients_per_round) == (4, 10)
    assert cfg.world_size == 5 and cfg.logical_clients  # 4 client ranks + 1 server stage
    # Device classes: (split point, rank) pairs; two classes fit on two ranks.
    cfg = load_config(None, ["train.max_steps=2", "federation.clients=4", "federation.client_ranks=2",
                             "split.client_layers=[1, 2, 1, 2]", "lora.rank=[2, 4, 2, 4]"])
    assert cfg.client_ranks == 2
    with pytest.raises(ConfigError, match="logical clients do not support per-client split points, ranks or budgets "
                                          "with federation.secure_aggregation"):
        load_config(None, ["train.max_steps=2", "federation.clients=4", "federation.client_ranks=2",
                           "split.client_layers=[1, 2, 1, 2]", "federation.secure_aggregation=true"])
