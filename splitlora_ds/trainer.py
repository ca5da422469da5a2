"""Trains one rank's part of a run, as planned by `prepare.prepare()`: builds the stage and its
DeepSpeed engine, runs the step and evaluation instructions, logs, checkpoints and resumes."""

from __future__ import annotations

import dataclasses
import logging as std_logging
import math
import os
from datetime import timedelta
from typing import Optional, Sequence

import deepspeed
import torch
import torch.distributed as dist
import yaml

from . import checkpoint as ckpt
from . import gather
from . import hosts
from .comm import P2P
from .config import RunConfig
from .ds_config import role_ds_config
from .errors import ConfigError
from .federation.build import build_aggregator
from .federation.exchange import LowRankSetup
from .federation.fedavg import FedAvg
from .federation.rounds import FedAvgRound, LowRankRound
from .federation.secure import SecureFedAvg
from .federation.strategy import Aggregator
from .federation.fedavg import sample_weights
from .runtime.executor import Executor, GradClip, Hetero, Observer, Packing, RoleParts
from .runtime.stats import EvalStats, StepStats
from .failures import PeerLost, is_peer_failure
from .privacy.dp import ClientPrivacy
from .hetero.importance import ImportanceTracker, resizable, resize_
from .hetero.replan import ImportanceReplan
from .metrics import MetricsWriter, Progress
from .plan_report import setup_report, u_shaped_line
from .prepare import Prepared
from .rank_state import load_state, rank_parts, save_state
from .run_summary import RunSummary, current_rss_bytes
from .client_figures import participation_figures, step_client_figures
from .federation.participation import participations
from .stage import build_stage, save_adapters
from .placement import place_this_rank
from .rendezvous import Rendezvous, join
from .topology import SingleRankMPU, make_groups

# eval/ppl = exp(loss), capped so a diverged run logs a large number instead of inf.
_MAX_LOG_PPL = 50.0
# Each rank's dropout stream: seed + stride x rank (a prime, so no two ranks' streams coincide).
_RANK_SEED_STRIDE = 100_003
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def train(prep: Prepared, observers: Sequence[Observer] = (), rendezvous: Optional[Rendezvous] = None) -> None:
    """Train this rank's part; `rendezvous`: the job already joined (train.main), else joined here."""
    cfg, role, topology = prep.cfg, prep.role, prep.topology
    std_logging.getLogger("DeepSpeed").setLevel(std_logging.WARNING)
    if rendezvous is None:
        rendezvous = join(place_this_rank(cfg.dist.backend), cfg.dist.timeout_s)
    device = rendezvous.device
    _agree_across_hosts(prep)
    timeout = timedelta(seconds=cfg.dist.timeout_s)
    mode = prep.mode
    layout = mode.layout
    setup = prep.setup
    schedule = prep.schedule
    # Under NCCL, bundles' headers and integers travel over a gloo group through host memory: the
    # receiver reads them without waiting for the device (comm.P2P).
    groups = make_groups(layout, prep.rank, timeout, server_aggregates=setup is not None and setup.shared_blocks,
                         clip_sets=schedule.clip_rank_sets(), host_channel=dist.get_backend() != "gloo")
    torch.manual_seed(cfg.train.seed + _RANK_SEED_STRIDE * prep.rank)  # dropout differs per rank

    rss_before_model = current_rss_bytes()
    stage = build_stage(prep.family, prep.hf_config, prep.stage_plan, cfg.lora, cfg.train.seed,
                        cfg.model.pretrained, rank=prep.lora_rank).to(device)
    # The server packs every client's activations, except in sequential mode (one at a time).
    serves_all = role.kind == "centralized" or (role.is_server and mode.serves_all_clients)
    micro = cfg.train.batch_size * (topology.clients if serves_all else 1)
    # LR schedules span the optimizer steps this role takes: a sequential server steps for every
    # client's turn, each client only for its own.
    # With logical clients a client rank steps for every participation it runs.
    optimizer_steps = schedule.steps if role.is_server else prep.max_steps
    if role.is_client and prep.participation is not None:
        optimizer_steps = prep.participation.rank_steps(role.index)
    ds_cfg = role_ds_config(prep.ds_config, micro, optimizer_steps, clips_itself=not prep.clip_global)
    engine, *_ = deepspeed.initialize(model=stage, model_parameters=list(stage.adapter_parameters().values()),
                                      config=ds_cfg, mpu=SingleRankMPU(groups.own, prep.rank))

    # gloo cannot move CUDA tensors point to point: stage them through host memory.
    staging = torch.device("cpu") if dist.get_backend() == "gloo" else device
    sample_counts = _sample_counts(prep, groups, staging)
    client_weights = sample_weights(sample_counts) if sample_counts else []
    weight = client_weights[role.index] if role.is_client and prep.pool is None else 1.0
    if prep.pool is not None and role.is_client:
        # each rank sums its participants' weighted adapters (the pool knows their weights), and
        # the aggregator adds the ranks' sums up
        client_weights = [1.0] * topology.clients
    clip = None
    if prep.clip_global:
        # A sequential client trains alone with the server in its turn: its gradient is all there is.
        clip_weight = weight if role.is_client and mode.serves_all_clients else 1.0
        clip = GradClip(float(prep.ds_config["gradient_clipping"]), clip_weight, groups.clip)

    wire = _DTYPES[cfg.split.wire_dtype] if cfg.split.wire_dtype else None
    p2p = P2P(device, wire, staging, groups.meta)
    tracker = ImportanceTracker(cfg.importance.beta) if cfg.importance.enabled else None
    privacy = None
    clips = (cfg.privacy.activation_clip, cfg.privacy.update_clip, cfg.privacy.tail_gradient_clip)
    if role.is_client and any(c is not None for c in clips):
        privacy = ClientPrivacy(cfg.privacy, cfg.train.batch_size / prep.num_samples, topology.clients,
                                max(client_weights))
    aggregator = _aggregator(prep, stage, groups, client_weights, staging, privacy)
    if aggregator is not None:  # secure aggregation's key agreement, once per run
        p2p.bytes_sent += aggregator.setup_bytes[0]
        p2p.bytes_received += aggregator.setup_bytes[1]
    hetero = None
    if setup is not None and setup.shared_blocks and role.is_server and role.index == 0:
        hetero = Hetero(list(prep.plan.entry_layers), client_weights)
    runner = Executor(RoleParts(
        role, mode, schedule, stage, engine, p2p, groups, clients=_per_client_slots(prep), batches=prep.batches,
        packing=Packing(cfg.train.pack, cfg.train.pack_length), label_smoothing=cfg.train.label_smoothing,
        aggregator=aggregator, hetero=hetero, clip=clip, importance=tracker, privacy=privacy,
        client_weights=client_weights, pool=prep.pool, observers=observers))
    start = _restore(prep, stage, engine, p2p, tracker, privacy) if prep.resume else 0
    if start:
        runner.adapters_loaded()
    if privacy is not None:
        privacy.remember_start(list(runner.masters.values()))
    main = prep.rank == mode.main_rank
    # purge_step: a resumed run replaces whatever the first run logged after its checkpoint.
    writer = MetricsWriter(cfg.log.dir, role.name, purge_step=start if start else None)
    _log_run_start(prep, writer, main, start, weight)
    max_steps = schedule.steps
    replan = None  # bf16 is refused with re-planning in prepare: a plain torch optimizer here
    if tracker is not None and cfg.importance.replan_threshold is not None:
        replan = ImportanceReplan(stage, tracker, prep.lora_rank, cfg.importance.replan_threshold,
                                  cfg.importance.max_rank_factor, engine.optimizer, cfg.federation.aggregate_every,
                                  max_steps)
    params, trainable = stage.parameter_counts()
    summary = RunSummary(role.name, cfg.mode, params=params, trainable_params=trainable,
                         rss_before_model_bytes=rss_before_model)
    progress = Progress(max_steps, start, enabled=main or cfg.log.all_ranks, bar=main,
                        prefix=f" {role.name}:" if cfg.log.all_ranks else "")
    for step in range(start, max_steps):
        stats = summary.count_flops(lambda: runner.train_step(step))
        summary.add_step(stats.seconds, stats.compute_seconds, stats.tokens if stats.loss is not None else 0,
                         stats.positions, stats.real_tokens)
        values = _step_values(stats, p2p, role)
        if stats.loss is not None:
            values.update(step_client_figures(stats.client_loss, stats.client_tokens, _client_ids(prep, step),
                                              cfg.federation.clients))
        if main and prep.participation is not None and schedule.aggregates(step):
            round_index = prep.participation.locate(step).round.round_index
            values.update(participation_figures(participations(cfg.train.seed, round_index + 1,
                                                               cfg.federation.clients, cfg.clients_per_round)))
        if privacy is not None:
            values.update(privacy.epsilons())
        if tracker is not None:
            values.update({f"importance/{m}": v for m, v in tracker.scores.items()})
        if replan is not None:
            figures, changed = replan.after_step(step)
            values.update(figures)
            if changed:
                writer.text("importance/replan", changed, step)
        progress.update(step, stats, print_line=step % cfg.log.print_every == 0 or step == max_steps - 1)
        if prep.num_eval_batches and schedule.is_eval_step(step, cfg.eval.every):
            result = runner.evaluate(prep.eval_batches, prep.num_eval_batches, step)
            if result is not None:
                summary.eval_seconds += result.seconds
                values.update(_eval_values(result, per_client=prep.participation is None))
                progress.write(f"[splitlora_ds] eval after step {step + 1}: loss {result.loss:.4f}  "
                               f"ppl {values['eval/ppl']:.2f}  ({result.tokens} tokens, {result.seconds:.1f} s)")
        writer.scalars(step, values)
        if cfg.checkpoint.dir and (step == max_steps - 1 or schedule.is_due(step, cfg.checkpoint.every)):
            path = _save_checkpoint(prep, step + 1, stage, engine, p2p, sample_counts, tracker, privacy)
            progress.write(f"[splitlora_ds] checkpoint: {path}")
    progress.close()
    writer.close()
    summary.bytes_sent, summary.bytes_received = p2p.bytes_sent, p2p.bytes_received
    summary.finish(device)
    summary.write(writer.path)
    if cfg.log.gather:
        _gather_summaries(prep, summary, main)
    if cfg.train.output_dir:
        path = save_adapters(stage, cfg.train.output_dir, role.name)
        if main:
            print(f"[splitlora_ds] adapters: {os.path.dirname(path)}", flush=True)
    if privacy is not None:
        spent = ", ".join(f"{k.split('/')[1]} {v:.3g}" for k, v in privacy.epsilons().items())
        print(f"[splitlora_ds] {role.name}: privacy spent (delta {cfg.privacy.delta:g}): {spent}", flush=True)
    if main:
        print(f"[splitlora_ds] done: {max_steps - start} steps in {progress.elapsed:.1f} s; "
              f"TensorBoard: tensorboard --logdir {cfg.log.dir}", flush=True)
    _barrier(prep, max_steps, "the end of the run")
    dist.destroy_process_group()


def _log_run_start(prep: Prepared, writer: MetricsWriter, main: bool, start: int, weight: float) -> None:
    """What the run is, once: the console plan and the recipe, data and clients as TensorBoard text
    (main rank); each client's sample count, FedAvg weight and label histogram."""
    cfg, role = prep.cfg, prep.role
    if main:
        _announce(prep)
        if start:
            print(f"[splitlora_ds] resumed at step {start} from {prep.resume.directory}", flush=True)
        writer.text("config", f"```\n{_yaml(cfg)}\n```")
        writer.text("data", f"```\n{prep.data_plan.describe()}\n```")
        if prep.setup is not None and (prep.setup.exchanges or prep.setup.plan_text):
            writer.text("clients", f"```\n{setup_report(prep.setup)}\n```")
    if role.is_client and not start and prep.pool is None:  # with logical clients a rank is no client
        c = role.index
        writer.scalars(0, {f"client{c}/samples": prep.num_samples, f"client{c}/fedavg_weight": weight})
        writer.text(f"client{c}/label_histogram", str(prep.data_plan.histograms[c]))


def _step_values(stats: StepStats, p2p: P2P, role) -> dict[str, float]:
    """A training step's TensorBoard scalars (see docs/metrics.md)."""
    values = {"time/step_s": stats.seconds, "time/compute_s": stats.compute_seconds, "train/lr": stats.lr,
              "comm/bytes_sent": p2p.bytes_sent, "comm/bytes_received": p2p.bytes_received}
    if role.is_client:
        values["comm/adapter_bytes_sent"] = p2p.adapter_bytes_sent
    if stats.grad_norm is not None:
        values["train/grad_norm"] = stats.grad_norm
    if stats.loss is not None:
        values.update({"train/loss": stats.loss, "train/tokens": stats.tokens,
                       "train/tokens_per_s": stats.tokens / max(stats.seconds, 1e-9)})
    return values


def _client_ids(prep: Prepared, step: int) -> list[Optional[int]]:
    """The client behind each of the executor's per-client figures in step `step`."""
    if prep.participation is None:
        return list(range(prep.cfg.federation.clients))
    place = prep.participation.locate(step)
    return [place.client_of(r) for r in range(prep.topology.clients)]


def _eval_values(result: EvalStats, per_client: bool = True) -> dict[str, float]:
    """`per_client`: one rank per client (with logical clients a rank scores several clients'
    validation shards as one, so there is no per-client figure)."""
    ppl = math.exp(min(result.loss, _MAX_LOG_PPL))
    values = {"eval/loss": result.loss, "eval/ppl": ppl, "eval/tokens": result.tokens}
    if per_client:
        values.update({f"client{c}/eval_loss": loss for c, loss in enumerate(result.client_loss)})
    return values


def _per_client_slots(prep: Prepared) -> int:
    """The length of the executor's per-client figures: one per client, or one per client rank
    when ranks serve logical clients (the trainer maps rank to client for logging)."""
    return prep.topology.clients if prep.participation is not None else prep.cfg.federation.clients


def _barrier(prep: Prepared, step: int, during: str) -> None:
    """A barrier of every rank; a rank lost meanwhile is reported as such (see failures)."""
    try:
        dist.barrier()
    except RuntimeError as e:
        if not is_peer_failure(e):
            raise
        world = dist.get_world_size()
        raise PeerLost([r for r in range(world) if r != prep.rank], e, step, during) from e


def _sample_counts(prep: Prepared, groups, staging: torch.device) -> list[int]:
    """Every client's training sample count (FedAvg weights; recorded in checkpoints). Clients
    learn them with one all-reduce (server stage 0 too when it aggregates shared blocks, every
    server stage in a U-shaped split); the centralized run has them all; other server ranks need
    none."""
    if prep.role.kind == "centralized":
        return [s.num_samples for s in prep.streams]
    if prep.participation is not None:  # every rank planned the data: the logical clients' counts
        return prep.data_plan.sample_counts()
    group = groups.aggregation if prep.setup is not None and prep.setup.shared_blocks else groups.clients
    if prep.mode.u_shaped:
        group = dist.group.WORLD  # the server weighs each client's loss by its FedAvg weight
    if group is None:
        return []
    counts = torch.zeros(prep.topology.clients, dtype=torch.float64, device=staging)
    if prep.role.is_client:
        counts[prep.role.index] = prep.num_samples
    if dist.get_world_size(group) > 1:
        dist.all_reduce(counts, group=group)
    return [int(c) for c in counts.tolist()]


def _aggregator(prep: Prepared, stage, groups, client_weights: list[float], staging: torch.device,
                privacy: Optional[ClientPrivacy]) -> Optional[Aggregator]:
    """This rank's aggregation strategy (federation/), or None where it never aggregates."""
    setup, cfg = prep.setup, prep.cfg
    lowrank = None
    if setup is not None and setup.exchanges:
        lowrank = LowRankSetup(setup.aggregation, tuple(prep.plan.entry_layers), prep.plan.shared_layers)
    if prep.pool is not None and cfg.federation.clients > 1 and prep.mode.averages_adapters:
        # logical clients: a rank brings all of its participants to the round (federation/rounds.py)
        if lowrank is not None:
            if groups.aggregation is None:
                return None
            shared = None if prep.role.is_client else set(prep.plan.shared_layers)
            return LowRankRound(stage, lowrank.method, groups.aggregation, prep.pool, shared)
        if not prep.role.is_client:
            return None
        ranks = prep.topology.clients
        inner: Aggregator = (SecureFedAvg(prep.role.index, groups.clients, ranks, 1.0, staging)
                             if cfg.federation.secure_aggregation else FedAvg(1.0, groups.clients, staging))
        return FedAvgRound(inner)
    return build_aggregator(prep.role, prep.topology.clients, groups, stage, client_weights, staging,
                            averages=prep.mode.averages_adapters, lowrank=lowrank,
                            secure=cfg.federation.secure_aggregation, privacy=privacy)


def _save_checkpoint(prep: Prepared, steps_done: int, stage, engine, p2p: P2P, sample_counts: list[int],
                     tracker: Optional[ImportanceTracker], privacy: Optional[ClientPrivacy]) -> str:
    """Every rank writes its part and its marker under checkpoint.dir as resolved on its host,
    then prunes its own old parts; no rank reads another's files (hosts need not share a disk)."""
    cfg = prep.cfg
    directory = ckpt.step_dir(cfg.checkpoint.dir, steps_done)
    state = save_state(rank_parts(engine, p2p, prep.streams, tracker, privacy))
    adapters = stage.adapter_parameters()
    ckpt.save_rank(directory, prep.role.name, adapters, state)
    layout = prep.mode.layout
    roles = [prep.mode.role_of(r).name for r in range(layout.world_size)]
    config = cfg.to_dict()
    meta = {"format": ckpt.FORMAT, "step": steps_done, "run_steps": prep.schedule.steps, "config": config,
            "digest": ckpt.config_digest(config), "roles": roles,
            "world": {"clients": layout.clients, "server_stages": layout.server_stages},
            "sample_counts": sample_counts, "host": hosts.host_label(), "rank": prep.rank,
            "setup": dataclasses.asdict(prep.setup) if prep.setup is not None else None}
    if cfg.checkpoint.gather_adapters and steps_done == prep.schedule.steps and layout.server_stages:
        counts = gather.client_adapters_to_server(prep, adapters, sample_counts, directory)
        meta["sample_counts"] = counts or sample_counts
    ckpt.write_marker(directory, prep.role.name, meta)
    ckpt.prune(cfg.checkpoint.dir, prep.role.name, cfg.checkpoint.keep)
    _barrier(prep, steps_done, "checkpoint")  # every part is marked before any rank moves on
    return str(directory)


def _agree_across_hosts(prep: Prepared) -> None:
    """One all_gather_object right after init: the same recipe everywhere, and at --resume the
    newest step complete on every host (see hosts.py for why raising after it is safe)."""
    config = prep.cfg.to_dict()
    steps = tuple(sorted(prep.resume_parts, reverse=True))
    report = hosts.RankReport(hosts.host_label(), prep.rank, prep.role.name,
                              hosts.recipe_digest(config, prep.ds_config), steps, prep.resume_problem)
    step = hosts.agree(report, resume=prep.resume_spec is not None)
    if step is None:
        return
    if step >= prep.schedule.steps:
        raise ConfigError(f"--resume: the newest checkpoint on every host is at step {step}, the run ends at "
                          f"{prep.schedule.steps}; raise train.max_steps to train further")
    if prep.resume.step != step:  # this rank has a newer part than some other host
        prep.resume = ckpt.load_rank(prep.resume_parts[step], prep.role.name)


def _gather_summaries(prep: Prepared, summary: RunSummary, main: bool) -> None:
    """log.gather: every role's summary.json also on the main rank's host (the benchmark reads
    them from one log.dir)."""
    main_rank = prep.mode.main_rank
    gathered = gather.to_rank(summary.as_dict(), main_rank)
    if main:
        gather.write_summaries(prep.cfg.log.dir, gathered)


def _restore(prep: Prepared, stage, engine, p2p: P2P, tracker: Optional[ImportanceTracker],
             privacy: Optional[ClientPrivacy]) -> int:
    """Load this rank's checkpoint part: adapters, optimizer, scheduler, RNG, data position."""
    loaded = prep.resume
    for module, (rank, _cost) in resizable(stage).items():  # ranks a re-plan changed before the save
        saved = loaded.adapters.get(f"{module}.lora_A.default.weight")
        if saved is not None and saved.shape[0] != rank:
            resize_(stage, module, saved.shape[0])
    params = stage.adapter_parameters()  # the same names as the checkpoint's (prepare checked)
    with torch.no_grad():
        for name, p in params.items():
            p.copy_(loaded.adapters[name].to(p.device, p.dtype))
    load_state(rank_parts(engine, p2p, prep.streams, tracker, privacy), loaded.state)
    engine.global_steps = loaded.step
    return loaded.step


def _announce(prep: Prepared) -> None:
    cfg = prep.cfg
    if cfg.mode == "sequential":
        print(f"[splitlora_ds] mode=sequential (vanilla split learning): {prep.topology.clients} clients take "
              f"turns of {cfg.federation.aggregate_every} step(s), each starting from the previous client's "
              f"adapters; {prep.schedule.steps} steps ({prep.max_steps} per client)", flush=True)
    if cfg.mode == "fedlora":
        print(f"[splitlora_ds] mode=fedlora: {prep.topology.clients} clients, each with the whole model "
              f"({prep.stage_plan.describe()}), FedAvg every {cfg.federation.aggregate_every} step(s)", flush=True)
        return
    if prep.plan is None:
        print(f"[splitlora_ds] mode=centralized: {prep.stage_plan.describe()}", flush=True)
        return
    setup = prep.setup
    if cfg.mode == "split":
        how = "FedAvg" if setup is None or setup.aggregation == "fedavg" else f"{setup.aggregation} aggregation"
        # with logical clients the client roles (client0, ...) are ranks, each serving many clients
        clients = f"{prep.topology.clients} client rank(s)" if prep.participation is not None else f"{prep.topology.clients} clients"
        print(f"[splitlora_ds] mode=split: {clients} + {prep.topology.server_stages} "
              f"server stage(s), {prep.plan.num_blocks} blocks, {how} every {cfg.federation.aggregate_every} "
              f"step(s)", flush=True)
    if prep.mode.u_shaped:
        print(f"[splitlora_ds]   {u_shaped_line(cfg.split.client_tail_layers)}", flush=True)
    if prep.participation is not None:
        p = prep.participation
        print(f"[splitlora_ds]   logical clients: {p.num_clients} on {p.num_ranks} client rank(s), {p.per_round} per "
              f"round (seed {cfg.train.seed}); {p.rounds} rounds of up to "
              f"{max(plan.slots for plan in p.plans)} slot(s) x {cfg.federation.aggregate_every} step(s), "
              f"{p.steps} steps in all", flush=True)
    if setup is not None and setup.plan_text:
        for line in setup.plan_text.splitlines():
            print(f"[splitlora_ds]   {line}", flush=True)
    for rank, sp in enumerate(prep.plan.all_stages()):
        r = setup.client_ranks[rank] if rank < prep.topology.clients else setup.server_rank
        print(f"[splitlora_ds]   rank {rank} {sp.name}: {sp.describe()}; LoRA rank {r}", flush=True)
    for line in prep.data_plan.describe().splitlines():
        print(f"[splitlora_ds]   {line}", flush=True)


def _yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(cfg.to_dict(), sort_keys=False)
