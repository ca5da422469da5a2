"""Builds one rank's part of a run from its config and trains it.

Everything that can be wrong with the input (recipe, ds_config, model, split, world size, data)
is checked in `prepare()` on every rank before the first collective call, so a bad launch ends
with the same one-line error everywhere instead of a hang.
"""

from __future__ import annotations

import logging as std_logging
import os
import sys
import time
from dataclasses import dataclass
from datetime import timedelta
from typing import Iterator, Optional, Sequence

import deepspeed
import torch
import torch.distributed as dist
import yaml

from .aggregation import sample_weights
from .comm import P2P
from .config import RunConfig
from .data import ClientBatches, iid_partition, load_tokenizer, make_data_to_text, pooled_batches, tokenize_examples
from .ds_config import load_ds_config, role_ds_config
from .engine import Observer, StageRunner
from .errors import ConfigError
from .logging import MetricsWriter
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
    batches: Optional[Iterator[dict]]
    num_samples: int  # this client's sample count (FedAvg weight); all samples when centralized


def prepare(cfg: RunConfig) -> Prepared:
    rank, world, local_rank = env_world()
    family = get_family(cfg.model.family)
    hf_config = family.load_config(cfg.model.pretrained, cfg.model.config, cfg.model.attn_implementation)
    num_blocks = family.num_blocks(hf_config)
    target_modules_in_family(family, hf_config, cfg.lora.target_modules or list(family.default_target_modules))
    ds_config = load_ds_config(cfg.deepspeed_config)
    topology = Topology(cfg.federation.clients, cfg.split.server_stages)

    if cfg.mode == "split":
        topology.check_world_size(world)
        plan = make_split_plan(num_blocks, [cfg.split.client_layers] * topology.clients,
                               topology.server_stages, cfg.split.partition_method,
                               _block_weights(family, hf_config) if cfg.split.partition_method == "parameters" else None)
        role = topology.role_of(rank)
        stage_plan = plan.clients[role.index] if role.is_client else plan.server[role.index]
    else:
        if world != 1:
            raise ConfigError(f"mode=centralized runs in one process, but the world size is {world}; "
                              "run it with `python -m splitlora_ds.train ... --set mode=centralized`")
        plan, role, stage_plan = None, Role("centralized", 0, 0), centralized_plan(num_blocks)

    batches, num_samples = _prepare_data(cfg, role, hf_config)
    return Prepared(cfg, rank, local_rank, role, topology, plan, stage_plan, family, hf_config,
                    ds_config, batches, num_samples)


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


def _prepare_data(cfg: RunConfig, role: Role, hf_config) -> tuple[Optional[Iterator[dict]], int]:
    """Clients tokenize only their own shard; the server needs no data (labels come with the
    activations); the centralized run pools every client's batches step by step."""
    d = cfg.data
    tokenizer = load_tokenizer(d.tokenizer)
    vocab = getattr(hf_config, "vocab_size", None)
    if vocab is not None and len(tokenizer) > vocab:
        raise ConfigError(f"model.config.vocab_size: {vocab} is smaller than the tokenizer's "
                          f"{len(tokenizer)} tokens ({d.tokenizer or 'byte'})")
    positions = getattr(hf_config, "n_positions", None) or getattr(hf_config, "max_position_embeddings", None)
    if positions is not None and d.max_length > positions:
        raise ConfigError(f"data.max_length: {d.max_length} exceeds the model's {positions} positions")
    examples = make_data_to_text(d.num_samples, cfg.train.seed)
    shards = iid_partition(len(examples), cfg.federation.clients, cfg.train.seed)
    if role.is_server:
        return None, 0
    owned = [role.index] if role.is_client else list(range(cfg.federation.clients))
    streams = []
    for c in owned:
        tokenized, counts = tokenize_examples([examples[i] for i in shards[c]], tokenizer, d.max_length,
                                              overlong=d.overlong, source=f"client{c} shard")
        if counts.truncated or counts.dropped:
            print(f"[splitlora_ds] client{c}: {counts.truncated} samples truncated, {counts.dropped} "
                  f"dropped (data.overlong={d.overlong}, data.max_length={d.max_length})", file=sys.stderr)
        if not tokenized:
            raise ConfigError(f"data: client{c} has no samples left after data.overlong={d.overlong}")
        streams.append(ClientBatches(tokenized, cfg.train.batch_size, _client_seed(cfg.train.seed, c),
                                     tokenizer.pad_token_id))
    total = sum(s.num_samples for s in streams)
    if role.is_client:
        return streams[0], total
    return pooled_batches(streams, tokenizer.pad_token_id), total


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
    ds_cfg = role_ds_config(prep.ds_config, micro, cfg.train.max_steps)
    engine, *_ = deepspeed.initialize(model=stage, model_parameters=list(stage.adapter_parameters().values()),
                                      config=ds_cfg, mpu=SingleRankMPU(groups.own, prep.rank))

    # gloo cannot move CUDA tensors point to point: stage them through host memory.
    staging = torch.device("cpu") if dist.get_backend() == "gloo" else device
    weight = 1.0
    if role.is_client and topology.clients > 1:
        counts = torch.zeros(topology.clients, dtype=torch.float64, device=staging)
        counts[role.index] = prep.num_samples
        dist.all_reduce(counts, group=groups.clients)
        weight = sample_weights([int(c) for c in counts.tolist()])[role.index]

    wire = _DTYPES[cfg.split.wire_dtype] if cfg.split.wire_dtype else None
    p2p = P2P(device, wire, staging)
    runner = StageRunner(role, topology, stage, engine, p2p, groups, cfg.federation.aggregate_every,
                         prep.batches, weight, observers)
    main = role.kind == "centralized" or (role.is_server and role.index == topology.server_stages - 1)
    writer = MetricsWriter(cfg.log.dir, role.name)
    if main:
        _announce(prep)
        writer.text("config", f"```\n{_yaml(cfg)}\n```")
    if role.is_client:
        writer.scalars(0, {f"client{role.index}/samples": prep.num_samples,
                           f"client{role.index}/fedavg_weight": weight})

    t_start = time.perf_counter()
    for step in range(cfg.train.max_steps):
        stats = runner.train_step(step)
        values = {"time/step_s": stats.seconds, "train/lr": stats.lr,
                  "comm/bytes_sent": p2p.bytes_sent, "comm/bytes_received": p2p.bytes_received}
        if stats.loss is not None:
            values.update({"train/loss": stats.loss, "train/tokens": stats.tokens,
                           "train/tokens_per_s": stats.tokens / max(stats.seconds, 1e-9)})
            for c, (loss, tokens) in enumerate(zip(stats.client_loss, stats.client_tokens)):
                values[f"client{c}/loss"] = loss
                values[f"client{c}/tokens"] = tokens
        writer.scalars(step, values)
        if main and (step % cfg.log.print_every == 0 or step == cfg.train.max_steps - 1):
            print(f"[splitlora_ds] step {step + 1}/{cfg.train.max_steps}  loss {stats.loss:.4f}  "
                  f"lr {stats.lr:.2e}  {stats.seconds:.3f} s/step  "
                  f"{stats.tokens / max(stats.seconds, 1e-9):.0f} tok/s", flush=True)
    writer.close()
    if cfg.train.output_dir:
        path = save_adapters(stage, cfg.train.output_dir, role.name)
        if main:
            print(f"[splitlora_ds] adapters: {os.path.dirname(path)}", flush=True)
    if main:
        print(f"[splitlora_ds] done: {cfg.train.max_steps} steps in {time.perf_counter() - t_start:.1f} s; "
              f"TensorBoard: tensorboard --logdir {cfg.log.dir}", flush=True)
    dist.barrier()
    dist.destroy_process_group()


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


def _yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
