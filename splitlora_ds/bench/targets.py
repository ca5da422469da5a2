"""`python -m splitlora_ds.bench.targets --out DIR [--recipe R]`: the README's performance targets,
measured side by side on this machine, as ratios.

- overhead:  split with one client against centralized, same batch and threads: median step time.
- batching:  with four clients, the server's compute tokens/s serving all clients' activations as
             one batch (split) against serving them one client at a time (sequential).
- footprint: a GPT-2-small-sized random model (12 blocks x 768) with 3 blocks on the client: the
             client's peak RSS against a fedlora client's, and its trainable parameters against
             the centralized count.
Every rank runs with the same thread count (default 1). Writes DIR/targets.json and targets.md.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
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
    return p.parse_args(argv)


def _run(args, name: str, mode: str, extra: list[str]) -> tuple[ModeResult, list[float]]:
    overrides = [*args.overrides, *extra, f"mode={mode}"]
    cfg = load_config(args.recipe, overrides)
    run = run_mode(cfg, args.recipe, overrides, Path(args.out) / name, args.threads, [])
    if run.returncode != 0:
        raise RuntimeError(f"{name}/{mode} failed (exit {run.returncode}); see {run.log_file}")
    step_times = [v for _, v in read_scalars(f"{run.log_dir}/{main_role(cfg)}", "time/step_s")]
    print(f"[targets] {name}/{mode}: {run.wall_seconds:.0f} s wall", flush=True)
    return collect(cfg, run), step_times


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return _measure(args)
    except (RuntimeError, ConfigError) as e:
        print(f"splitlora_ds.bench.targets: error: {e}", file=sys.stderr)
        return 2


def _measure(args: argparse.Namespace) -> int:
    steps = f"train.max_steps={args.steps}"
    quiet = ["eval.every=0", "log.print_every=1000"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []

    one_client = [steps, "federation.clients=1", *quiet]
    _, central = _run(args, "overhead", "centralized", one_client)
    _, split = _run(args, "overhead", "split", one_client)
    # Median of the steps after the first (which pays for lazy initialisation).
    ratio = statistics.median(split[1:]) / statistics.median(central[1:])
    rows.append({"target": "split overhead: split C=1 / centralized step time", "value": ratio, "goal": "<= 1.10",
                 "met": ratio <= 1.10, "detail": f"{statistics.median(split[1:]):.3f} s vs "
                                                 f"{statistics.median(central[1:]):.3f} s per step"})

    four = [f"train.max_steps={max(2, args.steps // 2)}", "federation.clients=4", *quiet]
    batched, _ = _run(args, "batching", "split", four)
    one_by_one, _ = _run(args, "batching", "sequential", four)
    together, alone = batched.server["compute_tokens_per_s"], one_by_one.server["compute_tokens_per_s"]
    rows.append({"target": "server batching: tokens/s serving 4 clients together / one at a time",
                 "value": together / alone, "goal": ">= 1.3", "met": together / alone >= 1.3,
                 "detail": f"{together:.0f} vs {alone:.0f} tokens/s of server compute; padded positions "
                           f"{batched.server['positions']:,} vs {one_by_one.server['positions']:,} for "
                           f"{batched.server['tokens']:,} scored tokens"})

    small = ["train.max_steps=3", "federation.clients=1", "split.client_layers=3", GPT2_SMALL,
             "lora.target_modules=[c_attn]", "lora.fused_qkv=null", *quiet, "eval.max_batches=1"]
    client, _ = _run(args, "footprint", "split", small)
    whole, _ = _run(args, "footprint", "fedlora", small)
    rss = client.client["peak_rss_bytes"] / whole.client["peak_rss_bytes"]
    rows.append({"target": "client footprint: split client / fedlora client peak RSS (GPT-2-small size, k=3)",
                 "value": rss, "goal": "<= 0.5", "met": rss <= 0.5,
                 "detail": f"{client.client['peak_rss_bytes'] / 2**20:.0f} MB vs "
                           f"{whole.client['peak_rss_bytes'] / 2**20:.0f} MB"})
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
