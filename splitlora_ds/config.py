"""A run's configuration: dataclasses loaded from a recipe YAML plus `--set section.key=value` overrides.

Every section is validated in `__post_init__` with errors that name the field and the value, and
unknown keys are errors (a typo such as `train.max_step` must never be silently ignored).
"""

from __future__ import annotations

import dataclasses
import difflib
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Union

import yaml

from .errors import ConfigError

MODES = ("split", "centralized", "fedlora", "sequential")
AGGREGATIONS = ("auto", "fedavg", "stacked", "zero_pad")
WIRE_DTYPES = ("float32", "bfloat16", "float16")
# split.micro_batches: measured on the E2E CPU recipe (docs/benchmarks.md, "Pipeline and packing"):
# M = 4 keeps clients and server busy at once without micro-batches so small that per-instruction overheads dominate.
DEFAULT_MICRO_BATCHES = 4
# train.pack_length: a packed row's attention is dense over the row, so its cost per token grows
# with the row's length: measured best of 256, 512 and 1024 on the pipeline target (docs/benchmarks.md).
DEFAULT_PACK_LENGTH = 512


def _require(ok: bool, name: str, value: Any, rule: str) -> None:
    if not ok:
        raise ConfigError(f"{name}: {value!r} is invalid; {rule}")


@dataclass
class ModelConfig:
    family: str = "gpt2"
    pretrained: Optional[str] = None  # local dir (always) or hub id (when online); None: random init
    config: dict = field(default_factory=dict)  # HF config fields (random init) or overrides
    attn_implementation: str = "sdpa"

    def __post_init__(self) -> None:
        _require(self.attn_implementation in ("sdpa", "eager"), "model.attn_implementation",
                 self.attn_implementation, "use 'sdpa' or 'eager'")


@dataclass
class LoraConfig:
    rank: Union[int, list[int]] = 8  # one r for everyone, or one per client (heterogeneous clients)
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None  # None: the model family's default
    # GPT-2's c_attn is one fused q|k|v projection; this lists the slices its LoRA update may
    # change (the LoRA paper adapts [q, v]). None: all three.
    fused_qkv: Optional[list[str]] = None
    # Rank of the server stages' adapters. None: lora.rank, or the largest per-client rank.
    server_rank: Optional[int] = None
    # Per-module ranks, as peft's LoraConfig.rank_pattern: {module name regex: rank}; modules it
    # does not match keep the role's rank.
    rank_pattern: Optional[dict] = None

    def __post_init__(self) -> None:
        if self.fused_qkv is not None:
            _require(len(self.fused_qkv) > 0 and set(self.fused_qkv) <= {"q", "k", "v"}
                     and len(set(self.fused_qkv)) == len(self.fused_qkv),
                     "lora.fused_qkv", self.fused_qkv, "list some of q, k, v (each once), or null for all")
        ranks = self.rank if isinstance(self.rank, list) else [self.rank]
        _require(len(ranks) > 0 and all(r >= 1 for r in ranks), "lora.rank", self.rank,
                 "must be >= 1 (or a list of ranks >= 1, one per client)")
        _require(self.server_rank is None or self.server_rank >= 1, "lora.server_rank", self.server_rank,
                 "must be >= 1 or null")
        _require(self.alpha > 0, "lora.alpha", self.alpha, "must be > 0")
        _require(0.0 <= self.dropout < 1.0, "lora.dropout", self.dropout, "must be in [0, 1)")
        if self.target_modules is not None:
            _require(len(self.target_modules) > 0, "lora.target_modules", self.target_modules,
                     "name at least one module, or leave it unset for the family default")
        for pattern, r in (self.rank_pattern or {}).items():
            _require(isinstance(pattern, str) and isinstance(r, int) and not isinstance(r, bool) and r >= 1,
                     f"lora.rank_pattern[{pattern!r}]", r, "map module-name regexes to ranks >= 1")
        _require(self.fused_qkv is None or (not isinstance(self.rank, list) and not self.rank_pattern),
                 "lora.fused_qkv", self.fused_qkv, "is not supported with per-client or per-module ranks")

    def client_rank(self, client: int) -> int:
        return self.rank[client] if isinstance(self.rank, list) else self.rank

    def server_rank_or_default(self) -> int:
        if self.server_rank is not None:
            return self.server_rank
        return max(self.rank) if isinstance(self.rank, list) else self.rank


@dataclass
class SplitConfig:
    # k: transformer blocks on each client (after the embeddings): one k, or one per client
    client_layers: Union[int, list[int]] = 2
    server_stages: int = 1  # S: pipeline stages the server's layers are partitioned into
    partition_method: str = "uniform"  # how server blocks are spread over stages (DeepSpeed's names)
    wire_dtype: Optional[str] = None  # dtype of activations/gradients on the wire; None: as computed
    # M: each step's batch runs as M micro-batches through a 1F1B pipeline (clients and server
    # stages work at once); gradients accumulate, one optimizer step per step: the same math as 1.
    # null: DEFAULT_MICRO_BATCHES, or train.batch_size if that is smaller.
    micro_batches: Optional[int] = None
    # U-shaped split: each client also holds the last m blocks, the final norm and the LM head and
    # computes its own loss, so its token ids and labels never leave it. null: the standard split
    # (the server holds the head and receives the labels); 0: the head only.
    client_tail_layers: Optional[int] = None

    def __post_init__(self) -> None:
        _require(self.micro_batches is None or self.micro_batches >= 1, "split.micro_batches", self.micro_batches,
                 "must be >= 1 or null")
        _require(self.client_tail_layers is None or (isinstance(self.client_tail_layers, int)
                                                     and not isinstance(self.client_tail_layers, bool)
                                                     and self.client_tail_layers >= 0),
                 "split.client_tail_layers", self.client_tail_layers, "must be an int >= 0 or null")
        ks = self.client_layers if isinstance(self.client_layers, list) else [self.client_layers]
        _require(len(ks) > 0 and all(k >= 1 for k in ks), "split.client_layers", self.client_layers,
                 "each client needs at least one transformer block")
        _require(self.server_stages >= 1, "split.server_stages", self.server_stages, "must be >= 1")
        _require(self.partition_method in ("uniform", "parameters"), "split.partition_method",
                 self.partition_method, "use 'uniform' or 'parameters'")
        _require(self.wire_dtype is None or self.wire_dtype in WIRE_DTYPES, "split.wire_dtype",
                 self.wire_dtype, f"use one of {', '.join(WIRE_DTYPES)} or null")

    def per_client(self, clients: int) -> list[int]:
        return list(self.client_layers) if isinstance(self.client_layers, list) else [self.client_layers] * clients


@dataclass
class ClientBudget:
    """What one client device can give: memory for the client stage (weights, adapters, optimizer
    state, activations) and its compute relative to the other clients."""

    memory_gb: Optional[float] = None
    flops: Optional[float] = None  # relative FLOP/s (any unit, the same for every client)
    # validated by FederationConfig, which knows each budget's index for the error message


@dataclass
class FederationConfig:
    clients: int = 2  # C
    aggregate_every: int = 1  # I: local steps between client-adapter averaging
    # How adapters are combined every I steps. fedavg: average A and B (SplitLoRA; equal ranks
    # only). stacked: the exact weighted sum of the clients' B A, refactored to each rank by SVD
    # (HSplitLoRA). zero_pad: HetLoRA's zero-padded average (baseline). auto: fedavg when every
    # adapter's holders share one rank, else stacked.
    aggregation: str = "auto"
    # Per-client device budgets: the planner picks each client's split point and rank from them
    # (split.client_layers and lora.rank, if set as single numbers, are then the upper limits).
    budgets: Optional[list[ClientBudget]] = None
    # Pairwise-masked aggregation (federation/secure.py, secure_lowrank.py): no participant sees
    # one client's adapters (or, heterogeneous, its update), only the weighted sum (split, fedlora).
    secure_aggregation: bool = False
    # Many logical clients (data owners) on fewer ranks (federation/participation.py). clients is
    # then N, the data owners; client_ranks R <= N ranks serve them, each running its assigned
    # clients one after another. null: one rank per client (R = N).
    client_ranks: Optional[int] = None
    # K: clients sampled (seeded) to take part in each round of aggregate_every steps; the others
    # sit the round out. null: every client, every round (K = N).
    clients_per_round: Optional[int] = None

    def __post_init__(self) -> None:
        _require(self.clients >= 1, "federation.clients", self.clients, "must be >= 1")
        _require(self.client_ranks is None or 1 <= self.client_ranks <= self.clients, "federation.client_ranks",
                 self.client_ranks, f"must be between 1 and federation.clients ({self.clients}), "
                                    "or null for one rank per client")
        _require(self.clients_per_round is None or 1 <= self.clients_per_round <= self.clients,
                 "federation.clients_per_round", self.clients_per_round,
                 f"must be between 1 and federation.clients ({self.clients}), or null for every client")
        _require(not self.secure_aggregation or self.clients >= 2, "federation.secure_aggregation",
                 self.secure_aggregation, "needs at least 2 clients (one client's sum is its own adapters)")
        _require(self.aggregate_every >= 1, "federation.aggregate_every", self.aggregate_every,
                 "must be >= 1")
        _require(self.aggregation in AGGREGATIONS, "federation.aggregation", self.aggregation,
                 f"use one of {', '.join(AGGREGATIONS)}")
        for i, b in enumerate(self.budgets or []):
            where = f"federation.budgets[{i}]"
            _require(b.memory_gb is not None or b.flops is not None, where, {}, "give memory_gb and/or flops")
            _require(b.memory_gb is None or b.memory_gb > 0, f"{where}.memory_gb", b.memory_gb, "must be > 0")
            _require(b.flops is None or b.flops > 0, f"{where}.flops", b.flops, "must be > 0")


DATA_SOURCES = ("synthetic", "e2e", "instruction")
PARTITIONS = ("iid", "dirichlet", "by_file")


@dataclass
class DataConfig:
    source: str = "synthetic"  # synthetic (generated in code) | e2e | instruction (Alpaca-style)
    path: Optional[str] = None  # e2e/instruction: local file (CSV, JSON, JSONL) or hub dataset name
    files: Optional[list[str]] = None  # partition=by_file: one local file per client, in client order
    validation: Optional[str] = None  # a separate validation file (or hub split name)
    validation_fraction: float = 0.0  # else hold out this fraction of the distinct prompts
    num_samples: int = 512  # synthetic only: how many examples to generate
    limit: Optional[int] = None  # keep only the first N training examples (quick runs)
    tokenizer: Optional[str] = None  # None/'byte': built-in byte-level tokenizer; else AutoTokenizer source
    max_length: int = 128
    overlong: str = "truncate"  # what to do with samples longer than max_length: truncate | drop | error
    partition: str = "iid"  # how training samples are spread over clients
    dirichlet_alpha: float = 0.5  # partition=dirichlet: smaller = more skewed label mix per client
    partition_key: Optional[str] = None  # partition=dirichlet: the categorical field (E2E: eatType, ...)
    chat_template: bool = True  # instruction data: use the tokenizer's chat template when it has one
    cache_dir: Optional[str] = None  # tokenized shards are cached here (default: datasets' cache)

    def __post_init__(self) -> None:
        _require(self.source in DATA_SOURCES, "data.source", self.source, f"use one of {', '.join(DATA_SOURCES)}")
        _require(self.num_samples >= 1, "data.num_samples", self.num_samples, "must be >= 1")
        _require(self.limit is None or self.limit >= 1, "data.limit", self.limit, "must be >= 1 or null")
        _require(self.max_length >= 8, "data.max_length", self.max_length, "must be >= 8")
        _require(self.overlong in ("truncate", "drop", "error"), "data.overlong", self.overlong,
                 "use 'truncate', 'drop' or 'error'")
        _require(self.partition in PARTITIONS, "data.partition", self.partition, f"use one of {', '.join(PARTITIONS)}")
        _require(0.0 <= self.validation_fraction < 1.0, "data.validation_fraction", self.validation_fraction,
                 "must be in [0, 1)")
        _require(self.dirichlet_alpha > 0, "data.dirichlet_alpha", self.dirichlet_alpha, "must be > 0")
        _require(self.source != "synthetic" or (self.path is None and self.validation is None), "data.path",
                 self.path or self.validation, "data.source=synthetic generates its data in code; "
                 "set data.source=e2e or instruction to read a file")
        if self.source != "synthetic" and self.partition != "by_file":
            _require(self.path is not None, "data.path", self.path, f"data.source={self.source} needs a file or hub name")
        if self.partition == "by_file":
            _require(bool(self.files), "data.files", self.files, "partition=by_file needs one file per client")
        if self.partition == "dirichlet":
            _require(self.partition_key is not None, "data.partition_key", self.partition_key,
                     "partition=dirichlet needs the categorical field to skew (e.g. eatType)")
        _require(self.validation is None or self.validation_fraction == 0.0, "data.validation_fraction",
                 self.validation_fraction, "set either data.validation (a file) or a held-out fraction, not both")


@dataclass
class TrainConfig:
    max_steps: Optional[int] = None  # steps per rank; when set it wins over epochs (as in HF Trainer)
    epochs: Optional[float] = None  # else passes over the mean client shard: ceil(epochs * N / (C * batch))
    batch_size: int = 4  # micro-batch per client and step
    seed: int = 42
    label_smoothing: float = 0.0  # training loss only; eval/loss is plain cross-entropy
    output_dir: Optional[str] = None  # where each role writes its final adapters (safetensors)
    # How the ds_config's gradient_clipping applies. global: one norm over every role that trains
    # together (as centralized LoRA clips all adapters by one norm; one scalar all-reduce per
    # step). role: each client and server stage clips by its own norm (no party shares a norm).
    clip_scope: str = "global"
    # Pack the rows of a micro-batch into as few rows as fit `pack_length` tokens each (a
    # block-diagonal causal mask keeps sequences apart) instead of padding them to the longest.
    pack: bool = True
    pack_length: Optional[int] = DEFAULT_PACK_LENGTH  # null: one packed row per micro-batch

    def __post_init__(self) -> None:
        _require(self.pack_length is None or self.pack_length >= 1, "train.pack_length", self.pack_length,
                 "must be >= 1 or null")
        _require(self.clip_scope in ("global", "role"), "train.clip_scope", self.clip_scope, "use global or role")
        _require(self.max_steps is None or self.max_steps >= 1, "train.max_steps", self.max_steps, "must be >= 1")
        _require(self.epochs is None or self.epochs > 0, "train.epochs", self.epochs, "must be > 0")
        _require(self.max_steps is not None or self.epochs is not None, "train.max_steps", self.max_steps,
                 "set train.max_steps or train.epochs")
        _require(self.batch_size >= 1, "train.batch_size", self.batch_size, "must be >= 1")
        _require(0.0 <= self.label_smoothing < 1.0, "train.label_smoothing", self.label_smoothing,
                 "must be in [0, 1)")


@dataclass
class EvalConfig:
    every: int = 0  # validation loss every N steps (0: only after the last step); needs validation data
    batch_size: Optional[int] = None  # per client; default train.batch_size
    max_batches: Optional[int] = None  # per client and evaluation; None: the whole validation shard

    def __post_init__(self) -> None:
        _require(self.every >= 0, "eval.every", self.every, "must be >= 0")
        _require(self.batch_size is None or self.batch_size >= 1, "eval.batch_size", self.batch_size, "must be >= 1")
        _require(self.max_batches is None or self.max_batches >= 1, "eval.max_batches", self.max_batches,
                 "must be >= 1 or null")


@dataclass
class LogConfig:
    dir: str = "runs/default"  # TensorBoard log dir; each role writes its own run under it
    print_every: int = 10  # console line every N steps (TensorBoard gets every step)
    all_ranks: bool = False  # also print every other rank's step lines (default: the main rank only)
    # Copy every role's summary.json to the main rank's log.dir at the end (hosts without a
    # shared filesystem: the benchmark then works from the main rank's machine alone).
    gather: bool = False

    def __post_init__(self) -> None:
        _require(self.print_every >= 1, "log.print_every", self.print_every, "must be >= 1")


@dataclass
class CheckpointConfig:
    dir: Optional[str] = None  # where step-N/ checkpoints go; None: no checkpoints
    every: int = 0  # save every N steps (0: only after the last step); needs checkpoint.dir
    keep: int = 2  # complete checkpoints to keep (older ones are deleted)
    # Send the clients' final adapters to server0 and write them into its checkpoint folder at
    # the last step (off by default: the adapters are the data owners' to share).
    gather_adapters: bool = False

    def __post_init__(self) -> None:
        _require(self.every >= 0, "checkpoint.every", self.every, "must be >= 0")
        _require(self.keep >= 1, "checkpoint.keep", self.keep, "must be >= 1")


@dataclass
class DistConfig:
    timeout_s: float = 300.0  # a rank waiting longer than this on a peer fails instead of hanging
    # auto: DeepSpeed's choice (nccl on GPUs, gloo on CPU). gloo on GPU machines lets CPU-only
    # clients and a GPU server share one job; tensors then travel through host memory.
    backend: str = "auto"

    def __post_init__(self) -> None:
        _require(self.timeout_s > 0, "dist.timeout_s", self.timeout_s, "must be > 0")
        _require(self.backend in ("auto", "gloo", "nccl"), "dist.backend", self.backend,
                 "use 'auto', 'gloo' or 'nccl'")


@dataclass
class ImportanceConfig:
    """Per-module importance (HSplitLoRA's important-weight identification, hetero/importance.py)."""

    enabled: bool = False  # score every adapted module during training (TensorBoard importance/<module>)
    beta: float = 0.85  # EMA smoothing of the scores over steps
    # Re-allocate each role's ranks to its most important modules (same adapter budget) when the
    # ranking has moved this far (normalised Kendall tau distance, 0-1) from the one the current
    # ranks came from; checked after every aggregation. None: never (the default).
    replan_threshold: Optional[float] = None
    max_rank_factor: int = 2  # at a re-plan a module may get up to this x the role's rank

    def __post_init__(self) -> None:
        _require(0.0 <= self.beta < 1.0, "importance.beta", self.beta, "must be in [0, 1)")
        _require(self.replan_threshold is None or 0.0 <= self.replan_threshold < 1.0, "importance.replan_threshold",
                 self.replan_threshold, "must be in [0, 1), or null for never")
        _require(self.replan_threshold is None or self.enabled, "importance.replan_threshold", self.replan_threshold,
                 "re-planning needs importance.enabled: true")
        _require(self.max_rank_factor >= 1, "importance.max_rank_factor", self.max_rank_factor, "must be >= 1")


@dataclass
class PrivacyConfig:
    """Differential-privacy options (off by default; privacy/dp.py, docs/privacy.md "Differential privacy")."""

    # On activations: each sample's cut-layer activations are clipped to this L2 norm before they
    # leave the client, then Gaussian noise of std activation_noise x activation_clip is added.
    activation_clip: Optional[float] = None
    activation_noise: float = 0.0
    # On adapters (DP-FedAvg, client level): each client's update since the last aggregation is
    # clipped to this L2 norm; the aggregate gets Gaussian noise of std update_noise x
    # update_clip x (the largest client weight), each client adding its share.
    update_clip: Optional[float] = None
    update_noise: float = 0.0
    # On the gradient a U-shaped client's tail returns (split.client_tail_layers): each sample's
    # gradient at its real positions is clipped to this L2 norm, then Gaussian noise of std
    # tail_gradient_noise x tail_gradient_clip is added before it leaves the client.
    tail_gradient_clip: Optional[float] = None
    tail_gradient_noise: float = 0.0
    delta: float = 1e-5  # epsilon is reported for this delta

    def __post_init__(self) -> None:
        for name in ("activation", "update", "tail_gradient"):
            clip, noise = getattr(self, f"{name}_clip"), getattr(self, f"{name}_noise")
            _require(clip is None or clip > 0, f"privacy.{name}_clip", clip, "must be > 0, or null for off")
            _require(noise >= 0, f"privacy.{name}_noise", noise, "must be >= 0")
            _require(noise == 0 or clip is not None, f"privacy.{name}_noise", noise,
                     f"noise needs a sensitivity bound: set privacy.{name}_clip")
        _require(0 < self.delta < 1, "privacy.delta", self.delta, "must be in (0, 1)")


@dataclass
class RunConfig:
    mode: str = "split"
    deepspeed_config: str = "ds_configs/cpu-fp32.json"
    model: ModelConfig = field(default_factory=ModelConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    split: SplitConfig = field(default_factory=SplitConfig)
    federation: FederationConfig = field(default_factory=FederationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    train: TrainConfig = field(default_factory=lambda: TrainConfig(max_steps=100))
    eval: EvalConfig = field(default_factory=EvalConfig)
    log: LogConfig = field(default_factory=LogConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    importance: ImportanceConfig = field(default_factory=ImportanceConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)

    def __post_init__(self) -> None:
        _require(self.mode in MODES, "mode", self.mode, f"use one of {', '.join(MODES)}")
        _require(self.split.micro_batches is None or self.train.batch_size >= self.split.micro_batches,
                 "split.micro_batches", self.split.micro_batches,
                 f"is more than train.batch_size ({self.train.batch_size}): a micro-batch needs at least one row")
        # Gathered adapters go into server0's last checkpoint: there must be both.
        _require(not self.checkpoint.gather_adapters or self.checkpoint.dir is not None, "checkpoint.gather_adapters",
                 True, "writes into server0's checkpoint folder; set checkpoint.dir")
        _require(not self.checkpoint.gather_adapters or self.mode in ("split", "sequential"),
                 "checkpoint.gather_adapters", True, f"needs a server to gather to; mode={self.mode} has none")
        _require(self.importance.replan_threshold is None or self.mode == "split", "importance.replan_threshold",
                 self.importance.replan_threshold, "re-planning ranks needs mode=split")
        _require(self.importance.replan_threshold is None or self.federation.aggregation != "fedavg",
                 "federation.aggregation", self.federation.aggregation,
                 "re-planning gives modules different ranks; use stacked or zero_pad (auto picks stacked)")
        # q/v-only LoRA keeps B block-diagonal; a re-plan's resize and the stacked SVD write dense
        # factors (and per-client ranks would change the block layout), so they cannot be combined.
        fused = self.lora.fused_qkv
        _require(fused is None or self.importance.replan_threshold is None, "lora.fused_qkv", fused,
                 "cannot be combined with importance.replan_threshold (resizing breaks the q/v block layout)")
        _require(fused is None or self.federation.aggregation != "stacked", "lora.fused_qkv", fused,
                 "cannot be combined with federation.aggregation: stacked (its SVD fills the pinned slices); "
                 "use fedavg")
        _require(fused is None or self.federation.budgets is None, "lora.fused_qkv", fused,
                 "cannot be combined with federation.budgets (planned per-client ranks change the block layout)")
        c = self.federation.clients
        per_client = (("split.client_layers", self.split.client_layers), ("lora.rank", self.lora.rank),
                      ("federation.budgets", self.federation.budgets))
        for name, value in per_client:
            if isinstance(value, list):
                _require(len(value) == c, name, value, f"give one entry per client (federation.clients={c})")
        if self.federation.budgets is not None:
            for name, value in per_client[:2]:
                _require(not isinstance(value, list), name, value,
                         "federation.budgets plans per-client values; give a single upper limit or drop the budgets")
        if self.federation.client_ranks is not None:
            # A rank is a device class (split point and rank) and serves only clients of its class,
            # so every class present needs a rank of its own. Budget-planned classes are only known
            # once planned; the participation plan refuses those (participation.spread_ranks).
            classes = len(set(zip(self.split.per_client(c), (self.lora.client_rank(i) for i in range(c)))))
            _require(classes <= self.federation.client_ranks, "federation.client_ranks", self.federation.client_ranks,
                     f"the clients form {classes} device classes (split.client_layers x lora.rank) "
                     "and each needs at least one rank")
        hetero = (isinstance(self.split.client_layers, list) or isinstance(self.lora.rank, list)
                  or self.federation.budgets is not None)
        _require(not hetero or self.mode == "split", "mode", self.mode,
                 "per-client split points, ranks and budgets need mode=split")
        _require(self.federation.aggregation in ("auto", "fedavg") or self.mode == "split", "federation.aggregation",
                 self.federation.aggregation, "stacked and zero_pad aggregate split clients (mode=split)")
        dp = self.privacy
        _require(dp.activation_clip is None or self.mode in ("split", "sequential"), "privacy.activation_clip",
                 dp.activation_clip, f"applies to activations a client sends (split, sequential), not mode={self.mode}")
        _require(dp.tail_gradient_clip is None or self.mode in ("split", "sequential"), "privacy.tail_gradient_clip",
                 dp.tail_gradient_clip, "applies to the gradient a U-shaped client's tail returns to the server "
                 f"(split, sequential), not mode={self.mode}")
        _require(dp.tail_gradient_clip is None or self.split.client_tail_layers is not None,
                 "privacy.tail_gradient_clip", dp.tail_gradient_clip, "applies to the gradient a U-shaped client's "
                 "tail returns (set split.client_tail_layers)")
        _require(dp.update_clip is None or (self.mode in ("split", "fedlora") and self.federation.clients >= 2),
                 "privacy.update_clip", dp.update_clip, "applies to aggregated client updates (split or fedlora "
                 "with at least 2 clients)")
        _require(dp.update_clip is None or (not hetero and self.federation.aggregation in ("auto", "fedavg")),
                 "privacy.update_clip", dp.update_clip, "supports FedAvg of equal client ranks and split points only "
                 "(not per-client values, budgets, stacked or zero_pad; with or without secure aggregation)")
        secure = self.federation.secure_aggregation
        _require(not secure or self.mode in ("split", "fedlora"), "federation.secure_aggregation", secure,
                 f"aggregates client adapters (mode split or fedlora); mode={self.mode} has no aggregation")
        # Heterogeneous clients (per-client ranks and split points, budgets; stacked and zero_pad)
        # aggregate securely too (federation/secure_lowrank.py). DP update clipping stays
        # FedAvg-only (refused above), with or without secure aggregation.
        if self.logical_clients:
            self._check_logical_clients(hetero)

    def _check_logical_clients(self, hetero: bool) -> None:
        """Logical clients (federation.client_ranks / clients_per_round) run in split (standard or
        U-shaped, heterogeneous device classes too) and fedlora; the rest is refused by name."""
        field = "federation.client_ranks" if self.federation.client_ranks is not None else "federation.clients_per_round"
        value = getattr(self.federation, field.split(".")[1])
        unsupported = [
            (self.mode not in ("split", "fedlora"), f"mode={self.mode}"),
            (hetero and self.federation.secure_aggregation, "per-client split points, ranks or budgets with "
                                                            "federation.secure_aggregation"),
            (self.federation.secure_aggregation and self.client_ranks < 2, "federation.secure_aggregation on one "
                                                                           "client rank"),
            (self.privacy.update_clip is not None, "privacy.update_clip"),
            # DP counts releases and sets its sampling rate per client rank, not per data owner
            (self.privacy.activation_clip is not None, "privacy.activation_clip"),
            (self.privacy.tail_gradient_clip is not None, "privacy.tail_gradient_clip"),
            (self.importance.enabled, "importance"),
        ]
        for refused, what in unsupported:
            _require(not refused, field, value, f"logical clients do not support {what} yet")

    @property
    def logical_clients(self) -> bool:
        """More data owners than client ranks, or a sample of them per round: ranks serve logical
        clients (federation/participation.py). Set explicitly, even to federation.clients."""
        return self.federation.client_ranks is not None or self.federation.clients_per_round is not None

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @property
    def micro_batches(self) -> int:
        """split.micro_batches, resolved: M micro-batches per step."""
        if self.split.micro_batches is not None:
            return self.split.micro_batches
        return min(DEFAULT_MICRO_BATCHES, self.train.batch_size)

    @property
    def client_ranks(self) -> int:
        """federation.client_ranks, resolved: R ranks serve the federation.clients logical clients."""
        f = self.federation
        return f.client_ranks if f.client_ranks is not None else f.clients

    @property
    def clients_per_round(self) -> int:
        """federation.clients_per_round, resolved: K clients take part in each round."""
        f = self.federation
        return f.clients_per_round if f.clients_per_round is not None else f.clients

    @property
    def world_size(self) -> int:
        """Ranks this run needs: R + S when split, R for fedlora, 1 when centralized (R: the client
        ranks, federation.clients unless federation.client_ranks says fewer)."""
        return {"centralized": 1, "fedlora": self.client_ranks}.get(self.mode, self.client_ranks + self.split.server_stages)


# --------------------------------------------------------------------------- loading


def add_recipe_arguments(parser, recipe_help: str = "recipe YAML (see recipes/)",
                         set_help: str = "override a recipe field; the value is parsed as YAML (repeatable)") -> None:
    """--recipe and --set, as every command line that takes a recipe spells them (args.recipe, args.overrides)."""
    parser.add_argument("--recipe", required=True, help=recipe_help)
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                        help=set_help)


def load_config(recipe: str | Path | None, overrides: list[str] = ()) -> RunConfig:
    """Read a recipe YAML (or start from defaults when `recipe` is None) and apply overrides."""
    raw: dict = {}
    if recipe is not None:
        path = Path(recipe)
        if not path.is_file():
            raise ConfigError(f"--recipe: file not found: {path}")
        try:
            raw = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"--recipe: {path} is not valid YAML: {str(e).splitlines()[0]}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"--recipe: {path} must hold a mapping of sections, got {type(raw).__name__}")
    for item in overrides:
        apply_override(raw, item)
    cfg = from_dict(RunConfig, raw, prefix="")
    if recipe is not None:
        base = Path(recipe).parent
        cfg.deepspeed_config = _resolve_path(cfg.deepspeed_config, base)
        # Only values that name an existing file or folder change: hub ids pass through.
        d = cfg.data
        d.path, d.validation, d.tokenizer = (_resolve_path(v, base) if v else v
                                             for v in (d.path, d.validation, d.tokenizer))
        d.files = [_resolve_path(f, base) for f in d.files] if d.files else d.files
        if cfg.model.pretrained:
            cfg.model.pretrained = _resolve_path(cfg.model.pretrained, base)
    return cfg


def apply_override(raw: dict, item: str) -> None:
    """Apply one `a.b.c=value` override in place; the value is parsed as YAML (`[q,v]`, `3`, `null`)."""
    key, sep, text = item.partition("=")
    if not sep or not key:
        raise ConfigError(f"--set: expected section.key=value, got {item!r}")
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError as e:
        raise ConfigError(f"--set {key}: value {text!r} is not valid YAML") from e
    node = raw
    parts = key.split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"--set {key}: {part!r} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _resolve_path(value: str, recipe_dir: Path) -> str:
    """Relative paths work from the current directory or, failing that, from the recipe's folder
    and its parent (so `recipes/x.yaml` can say `ds_configs/cpu-fp32.json` from anywhere)."""
    p = Path(value)
    if p.is_absolute() or p.exists():
        return str(p)
    for base in (recipe_dir, recipe_dir.parent):
        if (base / p).exists():
            return str(base / p)
    return str(p)


def from_dict(cls: type, raw: Any, prefix: str) -> Any:
    """Build dataclass `cls` from a mapping, rejecting unknown keys and values of the wrong type."""
    where = prefix.rstrip(".") or "recipe"
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: expected a mapping, got {raw!r}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        name = unknown[0]
        hint = difflib.get_close_matches(name, fields, n=1)
        did_you_mean = f"; did you mean '{prefix}{hint[0]}'?" if hint else ""
        raise ConfigError(f"{prefix}{name}: unknown recipe key{did_you_mean} "
                          f"(known: {', '.join(sorted(fields))})")
    hints = typing.get_type_hints(cls)
    kwargs = {name: _convert(raw[name], hints[name], f"{prefix}{name}") for name in raw}
    return cls(**kwargs)


def _type_name(tp: Any) -> str:
    if typing.get_origin(tp) is list:
        item = typing.get_args(tp)[0]
        return "a list of " + {int: "integers", float: "numbers", str: "strings"}.get(item, str(item))
    return {int: "an integer", float: "a number", str: "a string", bool: "true or false"}.get(tp, str(tp))


def _convert(value: Any, tp: Any, name: str) -> Any:
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, prefix=f"{name}.")
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        if len(inner) == 1:
            return _convert(value, inner[0], name)
        # int | list[int]: a list goes to the list type, anything else to the first that takes it
        for a in sorted(inner, key=lambda a: typing.get_origin(a) is not list or not isinstance(value, list)):
            try:
                return _convert(value, a, name)
            except ConfigError:
                continue
        raise ConfigError(f"{name}: expected {' or '.join(_type_name(a) for a in inner)}, got {value!r}")
    if origin is list:
        if isinstance(value, str):  # `--set lora.target_modules=c_attn` means a one-item list
            value = [value]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{name}: expected a list, got {value!r}")
        (item_tp,) = typing.get_args(tp)
        return [_convert(v, item_tp, f"{name}[{i}]") for i, v in enumerate(value)]
    if tp is dict or origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{name}: expected a mapping, got {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{name}: expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{name}: expected an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{name}: expected a number, got {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{name}: expected a string, got {value!r}")
        return value
    if origin is Literal:
        return value
    raise TypeError(f"unsupported config type {tp} for {name}")  # a bug in this file, not user input
