"""Running one mode of a recipe for the benchmark, and reading back what it measured.

Each mode runs as its own job (the `deepspeed` launcher where it needs several ranks, plain
python for `centralized`) with its TensorBoard logs under the benchmark's output folder; the
figures come from those logs and from every rank's `summary.json` (see run_summary.py).

With logical clients (federation.client_ranks / clients_per_round) the summaries are per client
*rank*, and a rank's active steps are the local steps of the participants it ran. Every
participant runs the same model part (logical clients are all alike, config.py) for the same I
steps of its round, so one participant's work per local step is a client rank's FLOPs and bytes
per active step (the mean over the ranks), whichever device it stands for; the latency model
then charges that work to each sampled client's own device, round by round (`Sampling`).
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from ..config import RunConfig
from ..federation.participation import Participation
from ..metrics import read_scalars
from ..modes import get_mode
from ..run_summary import read_summary
from .latency import RoundWork, Sampling


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main_role(cfg: RunConfig) -> str:
    """The rank that logs the job-wide loss."""
    mode = get_mode(cfg.mode, cfg.client_ranks, cfg.split.server_stages, cfg.split.client_tail_layers is not None)
    return mode.role_of(mode.main_rank).name


def roles(cfg: RunConfig) -> tuple[list[str], list[str]]:
    """(client roles, server roles) of a run; the centralized process counts as the server. Client
    roles are ranks: with logical clients, the federation.client_ranks that serve them."""
    clients = [f"client{c}" for c in range(cfg.client_ranks)]
    if cfg.mode == "centralized":
        return [], ["centralized"]
    if cfg.mode == "fedlora":
        return clients, []
    return clients, [f"server{s}" for s in range(cfg.split.server_stages)]


def command(cfg: RunConfig, recipe: str, overrides: list[str], launcher_args: list[str],
            module: str = "splitlora_ds.train", module_args: tuple[str, ...] = ()) -> list[str]:
    """The command line that runs `module` (splitlora_ds.train, or a wrapper that takes its
    arguments after `module_args`) on the recipe: plain python for centralized, else the launcher."""
    sets = [a for o in overrides for a in ("--set", o)]
    train = [*module_args, "--recipe", recipe, *sets]
    if cfg.mode == "centralized":
        return [sys.executable, "-m", module, *train]
    deepspeed = shutil.which("deepspeed", path=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")
    if deepspeed is None:
        raise FileNotFoundError("the `deepspeed` launcher is not on PATH (pip install deepspeed)")
    port = [] if "--master_port" in launcher_args else ["--master_port", str(free_port())]
    return [deepspeed, "--num_gpus", str(cfg.world_size), *port, *launcher_args,
            "--module", module, *train]


@dataclass
class ModeRun:
    mode: str
    log_dir: str
    command: list[str]
    returncode: int = 0
    wall_seconds: float = 0.0
    log_file: str = ""


def run_mode(cfg: RunConfig, recipe: str, overrides: list[str], out_dir: Path, threads: int,
             launcher_args: list[str], timeout: Optional[float] = None, name: Optional[str] = None) -> ModeRun:
    """Run one mode to completion; its console goes to out_dir/<mode>/log.txt. A launch that
    cannot start or runs past `timeout` comes back as a failed run (returncode != 0), never as
    an exception, so the other modes still run. `name`: the run's label and folder (a variant
    such as hsplit); `overrides` must then hold the variant's settings (cfg is built from them)."""
    name = name or cfg.mode
    mode_dir = out_dir / name
    log_dir = mode_dir / "tb"
    if log_dir.exists():
        shutil.rmtree(log_dir)  # a rerun must not mix its curves with an earlier run's
    mode_dir.mkdir(parents=True, exist_ok=True)
    sets = [*overrides, f"mode={cfg.mode}", f"log.dir={log_dir}", "checkpoint.dir=null",
            "checkpoint.every=0", "train.output_dir=null"]
    env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONUNBUFFERED="1")
    log_file = mode_dir / "log.txt"
    t0 = time.perf_counter()
    with open(log_file, "w") as log:
        try:
            cmd = command(cfg, recipe, sets, launcher_args)
            returncode = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout).returncode
        except FileNotFoundError as e:
            cmd, returncode = [], 127
            log.write(f"splitlora_ds.bench: {e}\n")
        except subprocess.TimeoutExpired:
            returncode = 124  # subprocess.run has killed the launcher; its ranks time out on their own
            log.write(f"splitlora_ds.bench: {name} ran past --timeout {timeout} s\n")
    return ModeRun(name, str(log_dir), cmd, returncode, time.perf_counter() - t0, str(log_file))


@dataclass
class ModeResult:
    """What the benchmark reports for one mode (see docs/benchmarks.md)."""

    mode: str
    clients: int
    steps_per_round: int  # sequential: one client per step, so C steps make a round
    wall_seconds: float  # the whole job: start-up, training, evaluation
    train_seconds: float  # the main rank's step times summed (what time-to-target counts)
    step_seconds: float
    tokens_per_s: float
    curve: list[dict] = field(default_factory=list)  # eval points: step, round, seconds, bytes, loss
    final_loss: Optional[float] = None
    final_ppl: Optional[float] = None
    client: Optional[dict] = None  # per client (mean over clients)
    server: Optional[dict] = None  # all server stages together (the centralized process)
    round_work: Optional[RoundWork] = None
    # Logical clients: the run's sampled clients and local steps, round by round (None: every
    # client in every round). The latency model times each round by its own participants.
    sampling: Optional[Sampling] = None
    time_to_target_s: Optional[float] = None
    rounds_to_target: Optional[float] = None
    simulated: Optional[dict] = None


def collect(cfg: RunConfig, run: ModeRun) -> ModeResult:
    clients, servers = roles(cfg)
    main = os.path.join(run.log_dir, main_role(cfg))
    summaries = {r: read_summary(os.path.join(run.log_dir, r)) for r in clients + servers}
    main_summary = summaries[main_role(cfg)]
    per_round = cfg.federation.clients if cfg.mode == "sequential" else 1
    participation = run_participation(cfg)

    step_times = read_scalars(main, "time/step_s")
    elapsed, cumulative = 0.0, {}
    for step, seconds in step_times:
        elapsed += seconds
        cumulative[step] = elapsed
    traffic: dict[int, float] = {}
    for r in clients:
        for step, value in _client_traffic(os.path.join(run.log_dir, r), summaries[r], list(cumulative)):
            traffic[step] = traffic.get(step, 0.0) + value
    curve = [{"step": step + 1, "round": _rounds_done(step, per_round, participation), "seconds": cumulative[step],
              "bytes": traffic.get(step, 0.0), "loss": loss}
             for step, loss in read_scalars(main, "eval/loss")]

    result = ModeResult(run.mode, cfg.federation.clients, per_round, run.wall_seconds,
                        main_summary["train_seconds"], main_summary["train_seconds"] / max(main_summary["steps"], 1),
                        main_summary["tokens"] / max(main_summary["train_seconds"], 1e-9), curve)
    if curve:
        result.final_loss = curve[-1]["loss"]
        result.final_ppl = math.exp(min(result.final_loss, 50.0))
    if clients:
        result.client = _client_figures([summaries[r] for r in clients])
    if servers:
        result.server = _server_figures([summaries[r] for r in servers], per_round)
        if participation is not None:
            result.server["flops_per_round"] = cfg.federation.clients * participant_server_flops(
                [summaries[r] for r in clients], [summaries[r] for r in servers])
    if participation is not None:
        result.sampling = sampling_of(participation)
    result.round_work = _round_work(cfg, result)
    return result


def run_participation(cfg: RunConfig) -> Optional[Participation]:
    """The participation plan the run followed (None without logical clients), recomputed from its
    config as every rank computed it (prepare.participation_of). The run length comes from
    train.max_steps, or, with train.epochs, from the data plan (which loads the data, no tokenizing)."""
    if not cfg.logical_clients or cfg.mode == "centralized":
        return None
    from ..data.build import plan_data
    from ..prepare import participation_of, planned_max_steps  # here, not at the top: it imports DeepSpeed (seconds)

    counts = [] if cfg.train.max_steps else plan_data(cfg.data, cfg.federation.clients, cfg.train.seed).sample_counts()
    return participation_of(cfg, planned_max_steps(cfg, counts))


def sampling_of(participation: Participation) -> Sampling:
    """Each round's sampled clients and local steps, for the latency model."""
    return Sampling(tuple(plan.sampled for plan in participation.plans),
                    tuple(participation.round_length(r) for r in range(participation.rounds)))


def _rounds_done(step: int, per_round: int, participation: Optional[Participation]) -> float:
    """Rounds (one local step of every client taking part) done by the end of `step`. With logical
    clients a step is one slot's step, so this is the local steps of the completed rounds
    (evaluations fall at round ends)."""
    if participation is None:
        return (step + 1) / per_round
    return participation.progress(step)


def participant_server_flops(client_summaries: list[dict], server_summaries: list[dict]) -> float:
    """With logical clients: the server's FLOPs per local step of one participant, its stages' total
    FLOPs over the participant steps they served (every client rank's active steps; a slot where
    some ranks sit out serves fewer). The server's work is linear in the participants it serves."""
    served = sum(s["active_steps"] for s in client_summaries)
    if not served:
        raise ValueError("participant_server_flops: the client ranks' summary.json files record no active steps")
    return sum(s["flops_per_step"] * s["active_steps"] for s in server_summaries) / served


def _client_traffic(run_dir: str, summary: dict, steps: list[int]) -> list[tuple[int, float]]:
    """(step, bytes sent + received so far) of one client: from its TensorBoard run, or, when that
    run stayed on the client's own host (multi-host runs gather only summaries, log.gather), from
    its summary's totals spread evenly over the steps (an approximation docs/benchmarks.md states)."""
    if os.path.isdir(run_dir) and any(f.name.startswith("events.") for f in os.scandir(run_dir)):
        sent = dict(read_scalars(run_dir, "comm/bytes_sent"))
        received = dict(read_scalars(run_dir, "comm/bytes_received"))
        return [(step, sent[step] + received.get(step, 0.0)) for step in sent]
    total = summary["bytes_sent"] + summary["bytes_received"]
    return [(step, total * (i + 1) / len(steps)) for i, step in enumerate(steps)]


def _client_figures(summaries: list[dict]) -> dict:
    n = len(summaries)

    def mean(key: str, per_active_step: bool = False) -> float:
        return sum(s[key] / (max(s["active_steps"], 1) if per_active_step else 1) for s in summaries) / n

    return {"params": summaries[0]["params"], "trainable_params": summaries[0]["trainable_params"],
            "flops_per_step": mean("flops_per_step"),
            "bytes_sent_per_step": mean("bytes_sent", True), "bytes_received_per_step": mean("bytes_received", True),
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in summaries),
            "rss_before_model_bytes": max(s.get("rss_before_model_bytes", 0) for s in summaries),
            "cuda_max_allocated_bytes": max(s["cuda_max_allocated_bytes"] for s in summaries),
            # client by client, in client order (they differ when clients are heterogeneous)
            "per_client_flops_per_step": [s["flops_per_step"] for s in summaries],
            "per_client_memory_bytes": [s["cuda_max_allocated_bytes"] or s["peak_rss_bytes"] for s in summaries]}


def _server_figures(summaries: list[dict], steps_per_round: int) -> dict:
    tokens = sum(s["tokens"] for s in summaries)
    compute = sum(s["compute_seconds"] for s in summaries)
    return {"params": sum(s["params"] for s in summaries),
            "trainable_params": sum(s["trainable_params"] for s in summaries),
            "flops_per_step": sum(s["flops_per_step"] for s in summaries),
            "flops_per_round": sum(s["flops_per_step"] for s in summaries) * steps_per_round,
            # Tokens per second of the server's own compute (forward, loss, backward, optimizer),
            # waiting on clients excluded: how well it uses batching.
            "compute_tokens_per_s": tokens / compute if compute else 0.0,
            "positions": summaries[0]["positions"],  # positions (packed or padded) the first stage ran
            "real_tokens": summaries[0].get("real_tokens", 0),  # of those, the real ones
            "tokens": tokens,
            "peak_rss_bytes": max(s["peak_rss_bytes"] for s in summaries),
            "rss_before_model_bytes": max(s.get("rss_before_model_bytes", 0) for s in summaries),
            "cuda_max_allocated_bytes": max(s["cuda_max_allocated_bytes"] for s in summaries)}


def _round_work(cfg: RunConfig, r: ModeResult) -> RoundWork:
    every = cfg.federation.aggregate_every
    # One-way messages per client per round: activations up and gradients down each step, plus
    # the adapters up and down at every averaging (split, fedlora) or hand-over (sequential).
    messages = {"split": 2 + 2 / every, "sequential": 2 + 1 / every, "fedlora": 2 / every}.get(cfg.mode, 0.0)
    client, server = r.client or {}, r.server or {}
    memory = client.get("cuda_max_allocated_bytes") or client.get("peak_rss_bytes", 0)
    flops, memories = client.get("per_client_flops_per_step", []), client.get("per_client_memory_bytes", [])
    # Heterogeneous clients: each device gets its own client's work. With logical clients the
    # figures are per client rank, not per client, and every participant does the same work (the
    # ranks' mean per active step); server flops_per_round is then for all N clients (see collect).
    hetero = len(set(flops)) > 1 and not cfg.logical_clients
    return RoundWork(cfg.mode, cfg.federation.clients, client.get("flops_per_step", 0.0),
                     server.get("flops_per_round", 0.0), client.get("bytes_sent_per_step", 0.0),
                     client.get("bytes_received_per_step", 0.0), messages, memory,
                     tuple(flops) if hetero else (), tuple(memories) if hetero else ())
