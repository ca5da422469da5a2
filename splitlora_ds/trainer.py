"""Builds one rank's part of a run from its config and trains it.

Everything that can be wrong with the input (recipe, ds_config, model, split, world size, data)
is checked in `prepare()` on every rank before the first collective call, so a bad launch ends
with the same one-line error everywhere instead of a hang.
"""

from __future__ import annotations

import logging as std_logging
import math
import os
import sys
import time
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Iterator, Optional, Sequence

import deepspeed
import torch
import torch.distributed as dist
import yaml

from . import checkpoint as ckpt
from .aggregation import sample_weights
from .comm import P2P
from .config import RunConfig
from .data import ClientBatches, collate, concat_batches, load_tokenizer, pooled_batches
from .data.build import DataPlan, plan_data, tokenize_client
from .ds_config import load_ds_config, role_ds_config
from .engine import Observer, StageRunner
from .schedule import is_eval_step
from .errors import ConfigError
from .logging import MetricsWriter, Progress
from .models import get_family
from .models.lora import target_modules_in_family
from .partition import SplitPlan, StagePlan, centralized_plan, make_split_plan
from .stage import build_stage, save_adapters
from .topology import (Role, SingleRankMPU, Topology, env_world, init_distributed, make_groups, select_device,
                       share_cpu_threads)

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


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
    ds_config = load_ds_config(cfg.deepspeed_config)
    topology = Topology(cfg.federation.clients, cfg.split.server_stages)

    if cfg.mode == "split":
        plan = make_split_plan(num_blocks, [cfg.split.client_layers] * topology.clients,
                               topology.server_stages, cfg.split.partition_method,
                               _block_weights(family, hf_config) if cfg.split.partition_method == "parameters" else None)
        if not dry_run:
            topology.check_world_size(world)
        role = topology.role_of(rank if not dry_run else 0)
        stage_plan = plan.clients[role.index] if role.is_client else plan.server[role.index]
    else:
        if world != 1 and not dry_run:
            raise ConfigError(f"mode=centralized runs in one process, but the world size is {world}; "
                              "run it with `python -m splitlora_ds.train ... --set mode=centralized`")
        plan, role, stage_plan = None, Role("centralized", 0, 0), centralized_plan(num_blocks)
    if cfg.checkpoint.every and not cfg.checkpoint.dir:
        raise ConfigError("checkpoint.every: set checkpoint.dir to say where checkpoints go")
    prep = Prepared(cfg, rank, local_rank, role, topology, plan, stage_plan, family, hf_config, ds_config)
    if not dry_run:
        _prepare_data(prep)
    if resume is not None and not dry_run:
        directory = ckpt.resolve(resume, cfg.checkpoint.dir)
        layout = (topology.clients, topology.server_stages) if cfg.mode == "split" else (1, 0)
        ckpt.check_compatible(ckpt.read_meta(directory), cfg.to_dict(), *layout, directory)
        prep.resume = ckpt.load_rank(directory, role.name)
        if prep.resume.step >= prep.max_steps:
            raise ConfigError(f"--resume: {directory} is at step {prep.resume.step}, the run ends at "
                              f"{prep.max_steps}; raise train.max_steps to train further")
    return prep


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
    prep.max_steps = cfg.train.max_steps or math.ceil(cfg.train.epochs * (sum(counts) / clients) / cfg.train.batch_size)
    eval_bs = cfg.eval.batch_size or cfg.train.batch_size
    longest_val = max(len(v) for v in data_plan.val_shards) if data_plan.val_shards else 0
    prep.num_eval_batches = min(math.ceil(longest_val / eval_bs), cfg.eval.max_batches or 10**12)
    if role.is_server:
        return

    owned = [role.index] if role.is_client else list(range(clients))
    streams, val_batches = [], []
    for c in owned:
        train_rows, val_rows, tok_counts = tokenize_client(data_plan, c, tokenizer, d)
        if tok_counts.truncated or tok_counts.dropped:
            print(f"[splitlora_ds] client{c}: {tok_counts.truncated} samples truncated, {tok_counts.dropped} "
                  f"dropped (data.overlong={d.overlong}, data.max_length={d.max_length})", file=sys.stderr)
        if not train_rows:
            raise ConfigError(f"data: client{c} has no samples left after data.overlong={d.overlong}")
        streams.append(ClientBatches(train_rows, cfg.train.batch_size, _client_seed(seed, c), tokenizer.pad_token_id))
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


def _client_seed(seed: int, client: int) -> int:
    return seed * 1009 + client


# ---------------------------------------------------------------------------------- training


def train(prep: Prepared, observers: Sequence[Observer] = ()) -> None:
    cfg, role, topology = prep.cfg, prep.role, prep.topology
    std_logging.getLogger("DeepSpeed").setLevel(std_logging.WARNING)
    share_cpu_threads()
    init_distributed(cfg.dist.timeout_s, cfg.dist.backend)
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    layout = topology if cfg.mode == "split" else Topology(1, 0)
    groups = make_groups(layout, prep.rank, timeout)
    device = select_device(prep.local_rank)
    torch.manual_seed(cfg.train.seed + 100_003 * prep.rank)  # dropout differs per rank

    stage = build_stage(prep.family, prep.hf_config, prep.stage_plan, cfg.lora, cfg.train.seed,
                        cfg.model.pretrained).to(device)
    micro = cfg.train.batch_size * (topology.clients if (role.is_server or role.kind == "centralized") else 1)
    ds_cfg = role_ds_config(prep.ds_config, micro, prep.max_steps)
    engine, *_ = deepspeed.initialize(model=stage, model_parameters=list(stage.adapter_parameters().values()),
                                      config=ds_cfg, mpu=SingleRankMPU(groups.own, prep.rank))

    # gloo cannot move CUDA tensors point to point: stage them through host memory.
    staging = torch.device("cpu") if dist.get_backend() == "gloo" else device
    sample_counts = _sample_counts(prep, groups, staging)
    weight = sample_weights(sample_counts)[role.index] if role.is_client else 1.0

    wire = _DTYPES[cfg.split.wire_dtype] if cfg.split.wire_dtype else None
    p2p = P2P(device, wire, staging)
    runner = StageRunner(role, topology, stage, engine, p2p, groups, cfg.federation.aggregate_every,
                         prep.batches, weight, observers, cfg.train.label_smoothing, prep.max_steps)
    start = _restore(prep, stage, engine, p2p) if prep.resume else 0
    main = role.kind == "centralized" or (role.is_server and role.index == topology.server_stages - 1)
    # purge_step: a resumed run replaces whatever the first run logged after its checkpoint.
    writer = MetricsWriter(cfg.log.dir, role.name, purge_step=start if start else None)
    if main:
        _announce(prep)
        if start:
            print(f"[splitlora_ds] resumed at step {start} from {prep.resume.directory}", flush=True)
        writer.text("config", f"```\n{_yaml(cfg)}\n```")
        writer.text("data", f"```\n{prep.data_plan.describe()}\n```")
    if role.is_client and not start:
        c = role.index
        writer.scalars(0, {f"client{c}/samples": prep.num_samples, f"client{c}/fedavg_weight": weight})
        writer.text(f"client{c}/label_histogram", str(prep.data_plan.histograms[c]))

    max_steps = prep.max_steps
    progress = Progress(max_steps, start, enabled=main or cfg.log.all_ranks, bar=main,
                        prefix=f" {role.name}:" if cfg.log.all_ranks else "")
    for step in range(start, max_steps):
        stats = runner.train_step(step)
        values = {"time/step_s": stats.seconds, "train/lr": stats.lr,
                  "comm/bytes_sent": p2p.bytes_sent, "comm/bytes_received": p2p.bytes_received}
        if stats.loss is not None:
            values.update({"train/loss": stats.loss, "train/tokens": stats.tokens,
                           "train/tokens_per_s": stats.tokens / max(stats.seconds, 1e-9)})
            for c, (loss, tokens) in enumerate(zip(stats.client_loss, stats.client_tokens)):
                values[f"client{c}/loss"] = loss
                values[f"client{c}/tokens"] = tokens
        progress.update(step, stats, print_line=step % cfg.log.print_every == 0 or step == max_steps - 1)
        if prep.num_eval_batches and is_eval_step(step, cfg.eval.every, max_steps):
            result = runner.evaluate(prep.eval_batches, prep.num_eval_batches)
            if result is not None:
                ppl = math.exp(min(result.loss, 50.0))
                values.update({"eval/loss": result.loss, "eval/ppl": ppl, "eval/tokens": result.tokens})
                for c, loss in enumerate(result.client_loss):
                    values[f"client{c}/eval_loss"] = loss
                progress.write(f"[splitlora_ds] eval after step {step + 1}: loss {result.loss:.4f}  ppl {ppl:.2f}  "
                               f"({result.tokens} tokens, {result.seconds:.1f} s)")
        writer.scalars(step, values)
        if cfg.checkpoint.dir and (step == max_steps - 1 or (cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0)):
            path = _save_checkpoint(prep, step + 1, stage, engine, p2p, sample_counts)
            progress.write(f"[splitlora_ds] checkpoint: {path}")
    progress.close()
    writer.close()
    if cfg.train.output_dir:
        path = save_adapters(stage, cfg.train.output_dir, role.name)
        if main:
            print(f"[splitlora_ds] adapters: {os.path.dirname(path)}", flush=True)
    if main:
        print(f"[splitlora_ds] done: {max_steps - start} steps in {progress.elapsed:.1f} s; "
              f"TensorBoard: tensorboard --logdir {cfg.log.dir}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


def _sample_counts(prep: Prepared, groups, staging: torch.device) -> list[int]:
    """Every client's training sample count (FedAvg weights; recorded in checkpoints). Clients
    learn them with one all-reduce; the centralized run has them all; server ranks need none."""
    if prep.role.kind == "centralized":
        return [s.num_samples for s in prep.streams]
    if not prep.role.is_client:
        return []
    counts = torch.zeros(prep.topology.clients, dtype=torch.float64, device=staging)
    counts[prep.role.index] = prep.num_samples
    if prep.topology.clients > 1:
        dist.all_reduce(counts, group=groups.clients)
    return [int(c) for c in counts.tolist()]


def _save_checkpoint(prep: Prepared, steps_done: int, stage, engine, p2p: P2P, sample_counts: list[int]) -> str:
    cfg = prep.cfg
    directory = ckpt.step_dir(cfg.checkpoint.dir, steps_done)
    scheduler = engine.lr_scheduler.state_dict() if engine.lr_scheduler is not None else {}
    state = {"optimizer": engine.optimizer.state_dict(), "scheduler": scheduler, "rng": ckpt.rng_state(),
             "data": [s.state_dict() for s in prep.streams], "bytes": [p2p.bytes_sent, p2p.bytes_received]}
    ckpt.save_rank(directory, prep.role.name, stage.adapter_parameters(), state)
    dist.barrier()  # every rank's files are in place before the checkpoint is marked complete
    if prep.rank == 0:
        roles = ([p.name for p in prep.plan.all_stages()] if prep.plan else ["centralized"])
        ckpt.write_meta(directory, {"format": 1, "step": steps_done, "config": cfg.to_dict(), "roles": roles,
                                    "world": {"clients": prep.topology.clients if prep.plan else 1,
                                              "server_stages": prep.topology.server_stages if prep.plan else 0},
                                    "sample_counts": sample_counts})
        ckpt.prune(cfg.checkpoint.dir, cfg.checkpoint.keep)
    dist.barrier()  # nobody races ahead into a checkpoint that is still being pruned
    return str(directory)


def _restore(prep: Prepared, stage, engine, p2p: P2P) -> int:
    """Load this rank's checkpoint part: adapters, optimizer, scheduler, RNG, data position."""
    loaded = prep.resume
    params = stage.adapter_parameters()
    if set(params) != set(loaded.adapters):
        missing = sorted(set(params) ^ set(loaded.adapters))[:3]
        raise ConfigError(f"--resume: the checkpoint's {prep.role.name} adapters do not match this stage ({missing})")
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(loaded.adapters[name].to(p.device, p.dtype))
    engine.optimizer.load_state_dict(loaded.state["optimizer"])
    if engine.lr_scheduler is not None and loaded.state["scheduler"]:
        engine.lr_scheduler.load_state_dict(loaded.state["scheduler"])
    for stream, state in zip(prep.streams, loaded.state["data"]):
        stream.load_state_dict(state)
    p2p.bytes_sent, p2p.bytes_received = loaded.state["bytes"]
    ckpt.set_rng_state(loaded.state["rng"])
    engine.global_steps = loaded.step
    return loaded.step


def _announce(prep: Prepared) -> None:
    cfg = prep.cfg
    if prep.plan is None:
        print(f"[splitlora_ds] mode=centralized: {prep.stage_plan.describe()}", flush=True)
        return
    print(f"[splitlora_ds] mode=split: {prep.topology.clients} clients + {prep.topology.server_stages} "
          f"server stage(s), {prep.plan.num_blocks} blocks, FedAvg every {cfg.federation.aggregate_every} "
          f"step(s)", flush=True)
    for rank, sp in enumerate(prep.plan.all_stages()):
        print(f"[splitlora_ds]   rank {rank} {sp.name}: {sp.describe()}", flush=True)
    for line in prep.data_plan.describe().splitlines():
        print(f"[splitlora_ds]   {line}", flush=True)


def _yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
