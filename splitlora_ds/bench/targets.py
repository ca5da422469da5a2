"""`python -m splitlora_ds.bench.targets --out DIR [--recipe R]`: the performance targets of docs/benchmarks.md,
measured side by side on this machine, as ratios.

- overhead:  split with one client against centralized, same batch and threads: median step time.
- batching:  with four clients, the server's compute tokens/s serving all clients' activations as
             one batch (split) against serving them one client at a time (sequential).
- footprint: a GPT-2-small-sized random model (12 blocks x 768) with 3 blocks on the client: the
             client's peak RSS against a fedlora client's, and its trainable parameters against
             the centralized count.
- pipeline:  S = 2, C = 1 on a 6-block, 512-wide model, 2 blocks per role: tokens/s with
             split.micro_batches = 8 against 1 (1F1B keeps the three ranks busy at once).
- co-located: 3 clients + 1 server on this machine's cores against centralized on the same cores,
             a GPT-2-small-sized model (q/v rank 4, seq 128, batch 4): tokens/s, packing on in
             both; and the server's positions against its real tokens (padding).
Every rank runs with the same thread count (default 1) unless a row says otherwise. Writes
DIR/targets.json and targets.md. `--only NAME[,NAME]` runs some rows' groups.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

from ..config import load_config
from ..errors import ConfigError
from ..metrics import read_scalars
from .runs import ModeResult, collect, main_role, run_mode

GPT2_SMALL = "model.config={n_layer: 12, n_embd: 768, n_head: 12, n_positions: 1024}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m splitlora_ds.bench.targets", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default="recipes/gpt2-e2e-cpu.yaml")
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=20, help="steps per run (overhead and batching)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--cores", type=int, default=os.cpu_count() or 1,
                   help="threads of the centralized run in the co-located row (default: every core)")
    p.add_argument("--colocated-threads", type=int, default=os.cpu_count() or 1,
                   help="threads per rank of the co-located split run (default: every core; waiting "
                        "ranks sleep, see docs/design.md 'Threads on a shared CPU')")
    p.add_argument("--only", default="overhead,batching,footprint,pipeline,colocated", help=f"row groups to run (default all: {','.join(GROUPS)})")
    return p.parse_args(argv)


@dataclass
class Steps:
    """The main rank's step times and scored tokens, step by step."""

    seconds: list[float]
    tokens: list[float]

    def median_after_first(self) -> float:
        """Median step time after the first step (which pays for lazy initialisation)."""
        return statistics.median(self.seconds[1:] if len(self.seconds) > 1 else self.seconds)

    def tokens_per_s(self) -> float:
        """Scored tokens per second of training, the first step left out."""
        skip = 1 if len(self.seconds) > 1 else 0
        return sum(self.tokens[skip:]) / sum(self.seconds[skip:])


def _run(args, name: str, mode: str, extra: list[str], recipe: str | None = None,
         threads: int | None = None) -> tuple[ModeResult, Steps]:
    recipe = recipe or args.recipe
    overrides = [*args.overrides, *extra, f"mode={mode}"] if recipe == args.recipe else [*extra, f"mode={mode}"]
    cfg = load_config(recipe, overrides)
    run = run_mode(cfg, recipe, overrides, Path(args.out) / name, threads or args.threads, [])
    if run.returncode != 0:
        raise RuntimeError(f"{name}/{mode} failed (exit {run.returncode}); see {run.log_file}")
    step_times = [v for _, v in read_scalars(f"{run.log_dir}/{main_role(cfg)}", "time/step_s")]
    tokens = [v for _, v in read_scalars(f"{run.log_dir}/{main_role(cfg)}", "train/tokens")]
    print(f"[targets] {name}/{mode}: {run.wall_seconds:.0f} s wall", flush=True)
    return collect(cfg, run), Steps(step_times, tokens)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _measure(args)
    except (RuntimeError, ConfigError) as e:
        print(f"splitlora_ds.bench.targets: error: {e}", file=sys.stderr)
        return 2


QUIET = ["eval.every=0", "log.print_every=1000"]
TINY_RECIPE = "recipes/tiny-cpu.yaml"  # synthetic data, byte tokenizer: no files needed


def _overhead(args: argparse.Namespace) -> list[dict]:
    one_client = [f"train.max_steps={args.steps}", "federation.clients=1", *QUIET]
    _, central = _run(args, "overhead", "centralized", one_client)
    _, split = _run(args, "overhead", "split", one_client)
    ratio = split.median_after_first() / central.median_after_first()
    return [{"target": "split overhead: split C=1 / centralized step time", "value": ratio, "goal": "<= 1.10",
             "met": ratio <= 1.10, "detail": f"{split.median_after_first():.3f} s vs "
                                            f"{central.median_after_first():.3f} s per step"}]


def _batching(args: argparse.Namespace) -> list[dict]:
    four = [f"train.max_steps={max(2, args.steps // 2)}", "federation.clients=4", *QUIET]
    batched, _ = _run(args, "batching", "split", four)
    one_by_one, _ = _run(args, "batching", "sequential", four)
    together, alone = batched.server["compute_tokens_per_s"], one_by_one.server["compute_tokens_per_s"]
    return [{"target": "server batching: tokens/s serving 4 clients together / one at a time",
             "value": together / alone, "goal": ">= 1.3", "met": together / alone >= 1.3,
             "detail": f"{together:.0f} vs {alone:.0f} tokens/s of server compute; positions "
                       f"{batched.server['positions']:,} vs {one_by_one.server['positions']:,} for "
                       f"{batched.server['tokens']:,} scored tokens"}]


def _footprint(args: argparse.Namespace) -> list[dict]:
    small = ["train.max_steps=3", "federation.clients=1", "split.client_layers=3", GPT2_SMALL,
             "lora.target_modules=[c_attn]", "lora.fused_qkv=null", *QUIET, "eval.max_batches=1"]
    client, _ = _run(args, "footprint", "split", small)
    whole, _ = _run(args, "footprint", "fedlora", small)
    rss = client.client["peak_rss_bytes"] / whole.client["peak_rss_bytes"]
    rows = [{"target": "client footprint: split client / fedlora client peak RSS (GPT-2-small size, k=3)",
             "value": rss, "goal": "<= 0.5", "met": rss <= 0.5,
             "detail": f"{client.client['peak_rss_bytes'] / 2**20:.0f} MB vs "
                       f"{whole.client['peak_rss_bytes'] / 2**20:.0f} MB"}]
    # The same ratio above each process's own pre-model baseline (interpreter, torch,
    # transformers, datasets, tokenizer and data, the same for both): what the model and its
    # training cost the client. Reported beside the target, not instead of it.
    added = [(r.client["peak_rss_bytes"] - r.client["rss_before_model_bytes"]) for r in (client, whole)]
    rows.append({"target": "client footprint above the pre-model baseline (informational)",
                 "value": added[0] / added[1], "goal": "-", "met": None,
                 "detail": f"{added[0] / 2**20:.0f} MB vs {added[1] / 2**20:.0f} MB added to "
                           f"{client.client['rss_before_model_bytes'] / 2**20:.0f} MB vs "
                           f"{whole.client['rss_before_model_bytes'] / 2**20:.0f} MB before the model"})
    share = client.client["trainable_params"] / whole.client["trainable_params"]
    rows.append({"target": "client trainable parameters / centralized", "value": share, "goal": "== 3/12",
                 "met": abs(share - 3 / 12) < 1e-9,
                 "detail": f"{client.client['trainable_params']:,} of {whole.client['trainable_params']:,}"})
    return rows




def _pipeline(args: argparse.Namespace) -> list[dict]:
    shape = ["model.config={n_layer: 6, n_embd: 512, n_head: 8, n_positions: 320, vocab_size: 257, "
             "bos_token_id: 256, eos_token_id: 256}", "split.client_layers=2", "split.server_stages=2",
             "federation.clients=1", "train.batch_size=8", f"train.max_steps={args.steps}", *QUIET]
    rates = {}
    for m in (1, 8):
        _, steps = _run(args, f"pipeline-m{m}", "split", [*shape, f"split.micro_batches={m}"], TINY_RECIPE, 1)
        rates[m] = steps.tokens_per_s()
    ratio = rates[8] / rates[1]
    return [{"target": "pipeline: S=2, C=1, 6 x 512, 1 thread per rank: tokens/s at M=8 / M=1", "value": ratio,
             "goal": ">= 1.4", "met": ratio >= 1.4, "detail": f"{rates[8]:.0f} vs {rates[1]:.0f} tokens/s"}]


def _colocated(args: argparse.Namespace) -> list[dict]:
    shape = [GPT2_SMALL, "lora.target_modules=[c_attn]", "lora.fused_qkv=[q, v]", "lora.rank=4", "lora.alpha=8",
             "data.max_length=128", "data.overlong=truncate", "federation.clients=3", "train.batch_size=4",
             f"train.max_steps={args.steps}", *QUIET]
    split, split_steps = _run(args, "colocated", "split", shape, threads=args.colocated_threads)
    _, central_steps = _run(args, "colocated", "centralized", shape, threads=args.cores)
    rate_split, rate_central = split_steps.tokens_per_s(), central_steps.tokens_per_s()
    ratio = rate_split / rate_central
    padding = split.server["positions"] / max(split.server["real_tokens"], 1)
    return [{"target": f"co-located: 3 clients + 1 server / centralized tokens/s, {args.cores} cores", "value": ratio,
             "goal": ">= 0.9", "met": ratio >= 0.9,
             "detail": f"{rate_split:.0f} vs {rate_central:.0f} tokens/s ({args.colocated_threads} thread(s) per "
                       f"split rank, {args.cores} for centralized)"},
            {"target": "server positions / real tokens (packing)", "value": padding, "goal": "<= 1.05",
             "met": padding <= 1.05, "detail": f"{split.server['positions']:,} positions for "
                                               f"{split.server['real_tokens']:,} real tokens"}]


GROUPS = {"overhead": _overhead, "batching": _batching, "footprint": _footprint, "pipeline": _pipeline,
          "colocated": _colocated}


def _measure(args: argparse.Namespace) -> int:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    unknown = [g for g in args.only.split(",") if g not in GROUPS]
    if unknown:
        raise ConfigError(f"--only: unknown group {unknown[0]!r}; use {', '.join(GROUPS)}")
    rows = [row for g in args.only.split(",") for row in GROUPS[g](args)]
    (out / "targets.json").write_text(json.dumps({"recipe": args.recipe, "threads": args.threads, "rows": rows}, indent=1))
    lines = [f"# splitlora_ds performance targets ({args.recipe}, {args.threads} thread(s) per rank)", "",
             "| target | measured | goal | met | detail |", "|---|---|---|---|---|"]
    lines += [f"| {r['target']} | {r['value']:.3f} | {r['goal']} | {_met(r['met'])} | {r['detail']} |"
              for r in rows]
    (out / "targets.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines), flush=True)
    return 0 if all(r["met"] is not False for r in rows) else 1


def _met(met: bool | None) -> str:
    return "-" if met is None else "yes" if met else "NO"


if __name__ == "__main__":
    sys.exit(main())
