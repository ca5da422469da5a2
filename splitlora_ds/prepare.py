"""Everything a rank decides before the first collective call: validation and planning.

Everything that can be wrong with the input (recipe, ds_config, model, split, world size, data,
checkpoint to resume) is checked here on every rank, so a bad launch ends with the same one-line
error everywhere instead of a hang. Planning is deterministic, so all ranks agree on the run
length and the number of evaluation batches without talking to each other.
"""

from __future__ import annotations

import dataclasses
import math
import sys
from pathlib import Path
from dataclasses import dataclass, field
from typing import Callable, Iterator, Optional, Sequence

import torch

from . import checkpoint as ckpt
from .config import RunConfig
from .data import ClientBatches, collate, concat_batches, load_tokenizer, pooled_batches
from .data.build import DataPlan, plan_data, tokenize_client
from .ds_config import check_fused_adam, load_ds_config, precision_dtype
from .errors import ConfigError
from .federation.participation import Participation, assign, spread_ranks
from .federation.pool import ClientPool
from .hetero.setup import ClientSetup, resolve_setup
from .models import get_family
from .models.lora import target_modules_in_family
from .models.weights import check_layer_weights
from .modes import Mode, get_mode
from .runtime.schedules import Schedule
from .partition import SplitPlan, StagePlan, centralized_plan, make_split_plan
from .stage import build_stage
from .topology import Role, Topology, env_world


@dataclass
class Prepared:
    """What a rank knows after validation, before any process group exists."""

    cfg: RunConfig
    rank: int
    local_rank: int
    role: Role
    topology: Topology
    plan: Optional[SplitPlan]  # None in centralized mode
    stage_plan: StagePlan
    family: object
    hf_config: object
    ds_config: dict
    max_steps: int = 0
    data_plan: Optional[DataPlan] = None
    batches: Optional[Iterator[dict]] = None
    eval_batches: list[dict] = field(default_factory=list)  # this rank's validation batches, in order
    num_eval_batches: int = 0  # per evaluation, the same on every rank (0: no validation data)
    num_samples: int = 0  # this client's sample count (FedAvg weight); all samples when centralized
    streams: list[ClientBatches] = field(default_factory=list)  # the training streams this rank draws from
    resume: Optional[ckpt.Loaded] = None  # this rank's part of the checkpoint to continue from
    # --resume: the argument, and this rank's usable parts by step (its newest is `resume`, loaded
    # here). Which step the run continues from the ranks agree on after init (hosts.agree).
    resume_spec: Optional[str] = None
    resume_parts: dict[int, Path] = field(default_factory=dict)
    resume_problem: str = ""  # why a part was not usable (another run, damaged, missing), if one was not
    setup: Optional[ClientSetup] = None  # split/sequential: per-client split points, ranks, aggregation
    # Logical clients: who trains where in each round, and (on a client rank) the clients it may serve.
    participation: Optional[Participation] = None
    pool: Optional[ClientPool] = None
    client_classes: Optional[tuple[tuple[int, int], ...]] = None  # logical clients: (split point, rank) each

    @property
    def mode(self) -> Mode:
        return get_mode(self.cfg.mode, self.topology.clients, self.topology.server_stages,
                        u_shaped=self.cfg.split.client_tail_layers is not None)

    @property
    def schedule(self) -> Schedule:
        return self.mode.schedule(self.cfg.federation.aggregate_every, self.max_steps, self.cfg.micro_batches,
                                  server_aggregates=self.setup is not None and self.setup.shared_blocks,
                                  clip_global=self.clip_global, participation=self.participation)

    @property
    def clip_global(self) -> bool:
        """Gradient clipping by one norm over the ranks that train together (the trainer's), instead
        of each rank's DeepSpeed engine clipping its own gradients."""
        return (self.cfg.train.clip_scope == "global" and self.cfg.mode != "centralized"
                and self.ds_config.get("gradient_clipping", 0.0) > 0)

    @property
    def lora_rank(self) -> int:
        """This role's LoRA rank."""
        if self.setup is None:
            return self.cfg.lora.rank  # centralized and fedlora take one rank (config.py checks)
        return self.setup.client_ranks[self.role.index] if self.role.is_client else self.setup.server_rank


def prepare(cfg: RunConfig, dry_run: bool = False, resume: Optional[str] = None) -> Prepared:
    """Validate everything and plan this rank's part. `dry_run`: plan only (no data, no world).
    `resume`: a checkpoint (step dir, checkpoint.dir or 'latest'), checked and read here."""
    rank, world, local_rank = env_world()
    family = get_family(cfg.model.family)
    hf_config = family.load_config(cfg.model.pretrained, cfg.model.config, cfg.model.attn_implementation,
                                   offline_known=dry_run)
    num_blocks = family.num_blocks(hf_config)
    target_modules_in_family(family, hf_config, cfg.lora.target_modules or list(family.default_target_modules))
    if cfg.lora.fused_qkv is not None:
        family.restrict_fused_qkv(torch.nn.Module(), hf_config, cfg.lora.rank, cfg.lora.fused_qkv)  # refuses if unsupported
        targets = cfg.lora.target_modules or list(family.default_target_modules)
        if family.fused_qkv_module not in targets:
            raise ConfigError(f"lora.fused_qkv: {cfg.lora.fused_qkv} limits LoRA on {family.fused_qkv_module}, "
                              f"but lora.target_modules {targets} does not adapt it")
    ds_config = load_ds_config(cfg.deepspeed_config)
    if not dry_run:
        check_fused_adam(ds_config, cfg.deepspeed_config)
    # Client ranks: one per client, or federation.client_ranks serving the logical clients.
    ranks_field = "federation.client_ranks" if cfg.federation.client_ranks is not None else "federation.clients"
    topology = Topology(cfg.client_ranks, cfg.split.server_stages)

    setup, client_classes = None, None
    if cfg.mode in ("split", "sequential"):
        setup, client_classes = _rank_setup(cfg, resolve_setup(cfg, family, hf_config, ds_config))
        plan = make_split_plan(num_blocks, list(setup.client_layers),
                               topology.server_stages, cfg.split.partition_method,
                               _block_weights(family, hf_config) if cfg.split.partition_method == "parameters" else None,
                               cfg.split.client_tail_layers)
        if not dry_run:
            topology.check_world_size(world, ranks_field)
        role = topology.role_of(rank if not dry_run else 0)
        stage_plan = plan.clients[role.index] if role.is_client else plan.server[role.index]
    elif cfg.mode == "fedlora":
        # The FedLoRA baseline: every client rank holds the whole model; there is no server.
        topology = Topology(cfg.client_ranks, 0)
        if world != topology.clients and not dry_run:
            raise ConfigError(f"world size {world} != {ranks_field} ({topology.clients}) for mode=fedlora "
                              f"(every rank is a client with the whole model); launch with "
                              f"`deepspeed --num_gpus {topology.clients} ...`")
        plan, role = None, topology.role_of(rank if not dry_run else 0)
        stage_plan = centralized_plan(num_blocks)
    else:
        if world != 1 and not dry_run:
            raise ConfigError(f"mode=centralized runs in one process, but the world size is {world}; "
                              "run it with `python -m splitlora_ds.train ... --set mode=centralized`")
        plan, role, stage_plan = None, Role("centralized", 0, 0), centralized_plan(num_blocks)
    if cfg.checkpoint.every and not cfg.checkpoint.dir:
        raise ConfigError("checkpoint.every: set checkpoint.dir to say where checkpoints go")
    if cfg.importance.replan_threshold is not None and precision_dtype(ds_config) != torch.float32:
        raise ConfigError(f"importance.replan_threshold: resizing adapters needs a plain torch optimizer, but "
                          f"{cfg.deepspeed_config} enables bf16 (DeepSpeed then keeps flat copies of the "
                          f"adapters); use an fp32 config")
    prep = Prepared(cfg, rank, local_rank, role, topology, plan, stage_plan, family, hf_config, ds_config,
                    setup=setup, client_classes=client_classes)
    if dry_run:
        return prep
    adapter_names = _check_stage(prep)
    _prepare_data(prep)
    if resume is not None:
        prep.resume_spec = resume
        _find_resume_parts(prep, resume, adapter_names)
    return prep


def _find_resume_parts(prep: Prepared, spec: str, adapter_names: set[str]) -> None:
    """This rank's usable checkpoint parts (its marker, this run's config and layout, files that
    load, adapters that fit its stage), newest first; the newest is loaded. A part that is not
    usable is no error here: another host may lack a step too, so what is missing is decided
    with every rank's list after init (hosts.agree), and reported the same way on every rank."""
    cfg, role = prep.cfg, prep.role
    layout = (prep.mode.layout.clients, prep.mode.layout.server_stages)
    problems = []
    candidates = ckpt.rank_candidates(spec, cfg.checkpoint.dir, role.name)
    for directory in candidates:
        try:
            ckpt.check_compatible(ckpt.read_meta(directory, role.name), cfg.to_dict(), *layout, directory)
            loaded = ckpt.load_rank(directory, role.name)
            if adapter_names != set(loaded.adapters):
                missing = sorted(adapter_names ^ set(loaded.adapters))[:3]
                raise ConfigError(f"--resume: {directory}'s {role.name} adapters do not match this stage ({missing})")
        except ConfigError as e:
            problems.append(str(e).removeprefix("--resume: "))
            continue
        prep.resume_parts[loaded.step] = directory
        if prep.resume is None:  # older parts were validated; loaded again if the ranks agree on one
            prep.resume = loaded
    if problems:
        prep.resume_problem = problems[0]
        print(f"[splitlora_ds] {role.name}: checkpoint part not usable: {problems[0]}", file=sys.stderr, flush=True)
    elif not candidates:
        where = cfg.checkpoint.dir if spec == "latest" else spec
        prep.resume_problem = f"no {role.name} part (a {ckpt.PREFIX}N folder with {role.name}{ckpt.MARK}) in {where}"


def _check_stage(prep: Prepared) -> set[str]:
    """Build every role's stage on the meta device (no memory, no weights) so that what building
    them for real would refuse (a stage with no adapted module) is refused now, by every rank
    alike; and check that a pretrained checkpoint holds this rank's weights at their shapes.
    Returns this rank's adapter names."""
    cfg = prep.cfg
    with torch.device("meta"):
        seen = {(prep.stage_plan.layers, prep.lora_rank)}
        for i, plan in enumerate(prep.plan.all_stages() if prep.plan is not None else ()):
            if (plan.layers, _rank_of(prep, i)) not in seen:  # clients alike are built once
                seen.add((plan.layers, _rank_of(prep, i)))
                build_stage(prep.family, prep.hf_config, plan, cfg.lora, cfg.train.seed, rank=_rank_of(prep, i))
        stage = build_stage(prep.family, prep.hf_config, prep.stage_plan, cfg.lora, cfg.train.seed,
                            rank=prep.lora_rank)
    if cfg.model.pretrained is not None:
        specs = prep.family.layer_specs(prep.hf_config)
        for index, layer in stage.layers.items():
            check_layer_weights(layer, specs[int(index)], cfg.model.pretrained)
    return set(stage.adapter_parameters())


def _rank_of(prep: Prepared, stage_index: int) -> int:
    """The LoRA rank of the role at `stage_index` of plan.all_stages() (clients, then server stages)."""
    if prep.setup is None:
        return prep.cfg.lora.rank
    clients = prep.topology.clients
    return prep.setup.client_ranks[stage_index] if stage_index < clients else prep.setup.server_rank


def _block_weights(family, hf_config) -> list[float]:
    """Parameter counts per block for the 'parameters' partitioner (built on the meta device);
    the head's count is added to the last block since it rides with the last stage."""
    specs = family.layer_specs(hf_config)
    with torch.device("meta"):
        block = sum(p.numel() for p in specs[1].build().parameters())
        head = sum(p.numel() for p in specs[-1].build().parameters())
    weights = [float(block)] * family.num_blocks(hf_config)
    weights[-1] += head
    return weights


def planned_max_steps(cfg: RunConfig, sample_counts: Sequence[int]) -> int:
    """Local steps per client of the run: train.max_steps, or train.epochs passes over the mean
    client shard (`sample_counts`: each client's training samples, from the data plan)."""
    if cfg.train.max_steps:
        return cfg.train.max_steps
    return math.ceil(cfg.train.epochs * (sum(sample_counts) / cfg.federation.clients) / cfg.train.batch_size)


def participation_of(cfg: RunConfig, max_steps: int,
                     client_class: Optional[Sequence[tuple[int, int]]] = None) -> Optional[Participation]:
    """The run's rounds with logical clients (None without): who is sampled in each round and
    which rank runs whom. A function of the config, the run length and the clients' device
    classes ((split point, LoRA rank) each; None: all alike), so every rank, and the benchmark
    after the run, compute the same plan (sampling does not depend on the classes)."""
    if not cfg.logical_clients:
        return None
    classes = tuple(client_class) if client_class is not None else ((0, 0),) * cfg.federation.clients
    return Participation(cfg.train.seed, classes, tuple(spread_ranks(classes, cfg.client_ranks)),
                         cfg.clients_per_round, cfg.federation.aggregate_every, max_steps)


def _rank_setup(cfg: RunConfig, setup: ClientSetup) -> tuple[ClientSetup, Optional[tuple[tuple[int, int], ...]]]:
    """With logical clients a client rank is a device class: the setup the runtime sees has one
    split point and rank per rank (spread_ranks), and the clients' classes are kept for the
    participation plan. Without, the setup as it is."""
    if not cfg.logical_clients:
        return setup, None
    classes = tuple(zip(setup.client_layers, setup.client_ranks))
    ranks = spread_ranks(classes, cfg.client_ranks)
    return dataclasses.replace(setup, client_layers=tuple(k for k, _ in ranks),
                               client_ranks=tuple(r for _, r in ranks)), classes


def _prepare_data(prep: Prepared) -> None:
    """Every rank plans the data (cheap: no tokenization) so that errors surface everywhere and
    all ranks agree on the run length and the number of evaluation batches. Clients tokenize only
    their own shard; the server needs no data (labels come with the activations); the centralized
    run pools every client's batches step by step."""
    cfg, role = prep.cfg, prep.role
    d, clients, seed = cfg.data, cfg.federation.clients, cfg.train.seed
    tokenizer = load_tokenizer(d.tokenizer)
    vocab = getattr(prep.hf_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"model.config.vocab_size: {vocab} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens ({d.tokenizer or 'byte'})")
    positions = getattr(prep.hf_config, "n_positions", None) or getattr(prep.hf_config, "max_position_embeddings", None)
    if positions is not None and d.max_length > positions:
        raise ConfigError(f"data.max_length: {d.max_length} exceeds the model's {positions} positions")
    data_plan = plan_data(d, clients, seed)
    prep.data_plan = data_plan
    counts = data_plan.sample_counts()
    prep.max_steps = planned_max_steps(cfg, counts)
    eval_bs = cfg.eval.batch_size or cfg.train.batch_size
    if role.kind != "centralized":
        prep.participation = participation_of(cfg, prep.max_steps, prep.client_classes)
    # A client rank evaluates the validation shards of its clients (its home clients with logical
    # clients: the ones it would run if every client took part).
    val_sizes = [sum(len(data_plan.val_shards[c]) for c in home) for home in _home_clients(prep)]
    longest_val = max(val_sizes, default=0)
    prep.num_eval_batches = min(math.ceil(longest_val / eval_bs), cfg.eval.max_batches or 10**12)
    if cfg.eval.every and not prep.num_eval_batches:
        raise ConfigError(f"eval.every: {cfg.eval.every}, but there is no validation data; set "
                          "data.validation or data.validation_fraction")
    if role.is_server:
        if prep.participation is not None:  # who trains when, and their weights (U-shaped loss)
            prep.pool = ClientPool(prep.participation, counts)
        return

    def stream(c: int, train_rows: list[dict]) -> ClientBatches:
        return ClientBatches(train_rows, cfg.train.batch_size, _client_seed(seed, c), tokenizer.pad_token_id)

    if prep.participation is not None:
        _prepare_logical_clients(prep, tokenizer, stream)
        return
    owned = [role.index] if role.is_client else list(range(clients))
    streams, val_batches = [], []
    for c in owned:
        train_rows, val_rows, tok_counts = tokenize_client(data_plan, c, tokenizer, d)
        if tok_counts.truncated or tok_counts.dropped:
            print(f"[splitlora_ds] client{c}: {tok_counts.truncated} samples truncated, {tok_counts.dropped} "
                  f"dropped (data.overlong={d.overlong}, data.max_length={d.max_length})", file=sys.stderr)
        streams.append(stream(c, train_rows))
        val_batches.append([collate(val_rows[i:i + eval_bs], tokenizer.pad_token_id)
                            for i in range(0, len(val_rows), eval_bs)][:prep.num_eval_batches])
    prep.num_samples = sum(s.num_samples for s in streams)
    prep.streams = streams
    if role.is_client:
        prep.batches, prep.eval_batches = streams[0], val_batches[0]
    else:
        prep.batches = pooled_batches(streams, tokenizer.pad_token_id)
        prep.eval_batches = _pool_eval_batches(val_batches, prep.num_eval_batches, tokenizer.pad_token_id)


def _pool_eval_batches(per_client: list[list[dict]], count: int, pad_token_id: int) -> list[dict]:
    """The centralized run's evaluation batches: batch j joins every client's j-th batch, so it
    scores exactly the tokens the split run's server scores."""
    pooled = []
    for j in range(count):
        parts = [batches[j] for batches in per_client if j < len(batches)]
        batch = concat_batches(parts, pad_token_id)
        batch["client_sizes"] = [batches[j]["input_ids"].shape[0] if j < len(batches) else 0
                                 for batches in per_client]
        pooled.append(batch)
    return pooled


def _home_clients(prep: Prepared) -> list[list[int]]:
    """Per client rank, the clients whose validation shards it evaluates: itself, or with logical
    clients those it would run if every client took part."""
    clients = prep.cfg.federation.clients
    if prep.participation is None:  # the centralized run pools batch j of every client (the same count)
        return [[c] for c in range(clients)]
    return assign(range(clients), prep.participation.client_class, prep.participation.rank_class)


def _prepare_logical_clients(prep: Prepared, tokenizer, stream: Callable[[int, list[dict]], ClientBatches]) -> None:
    """A client rank serving logical clients tokenizes a client's shard when it starts serving it
    (ClientPool), and its home clients' validation shards now, as one list of batches."""
    cfg, data_plan, d = prep.cfg, prep.data_plan, prep.cfg.data
    eval_bs = cfg.eval.batch_size or cfg.train.batch_size

    def make_stream(c: int) -> ClientBatches:
        train_rows, _, _ = tokenize_client(data_plan, c, tokenizer, d, validation=False)
        return stream(c, train_rows)

    prep.pool = ClientPool(prep.participation, data_plan.sample_counts(), make_stream)
    home = _home_clients(prep)[prep.role.index]
    rows = [row for c in home for row in tokenize_client(data_plan, c, tokenizer, d, train=False)[1]]
    prep.eval_batches = [collate(rows[i:i + eval_bs], tokenizer.pad_token_id)
                         for i in range(0, len(rows), eval_bs)][:prep.num_eval_batches]


def _client_seed(seed: int, client: int) -> int:
    return seed * 1009 + client
