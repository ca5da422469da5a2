"""`python -m splitlora_ds.bench --recipe R [--modes split,centralized,fedlora,sequential] --out DIR`

Runs each mode of one recipe (same model, data, LoRA, metrics), then writes DIR/results.json,
DIR/results.md and PNG plots of validation loss against time and bytes. With `--devices FILE`
the measured FLOPs and bytes also become simulated times on those devices and links.
On a recipe with heterogeneous clients, `--modes split-weakest,hsplit,hetlora` compares
SplitLoRA sized for the weakest client, HSplitLoRA and HetLoRA's zero-padding (bench/variants.py);
on any recipe, `--modes split-standard,split-u-shaped` compares the standard and the U-shaped split.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

from ..config import MODES, load_config
from ..errors import ConfigError
from .latency import elapsed_seconds, load_profile, simulate
from .report import markdown, plot, time_to_target, write_json
from .runs import collect, run_mode
from .variants import VARIANTS, variant_overrides


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m splitlora_ds.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True)
    p.add_argument("--modes", default="centralized,split,fedlora,sequential",
                   help="comma-separated, from " + ", ".join(MODES) + " (centralized runs first: it sets the "
                        "target), and the variants of bench/variants.py: " + ", ".join(VARIANTS))
    p.add_argument("--out", required=True, help="output folder (each mode's logs go to OUT/<mode>/)")
    p.add_argument("--target-loss", type=float, default=None,
                   help="validation loss to reach (default: the centralized run's final loss + 2%%)")
    p.add_argument("--devices", default=None, help="device/link profile YAML for the latency model (devices/*.yaml)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="recipe override applied to every mode (repeatable)")
    p.add_argument("--threads", type=int, default=None,
                   help="OMP threads per rank, the same in every mode (default: CPU cores / largest world size)")
    p.add_argument("--launcher-args", default="", help="extra arguments for the deepspeed launcher (e.g. --hostfile H)")
    p.add_argument("--timeout", type=float, default=None, help="seconds one mode may take")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        bad = [m for m in modes if m not in MODES + VARIANTS]
        if bad or not modes:
            raise ConfigError(f"--modes: unknown mode(s) {bad}; use {', '.join(MODES + VARIANTS)}")
        modes.sort(key=lambda m: m != "centralized")  # its final loss is the default target
        sets = {m: [*args.overrides, *variant_overrides(m, args.recipe, args.overrides)] for m in modes}
        configs = {m: load_config(args.recipe, sets[m]) for m in modes}
        for m, cfg in configs.items():
            if not (cfg.data.validation or cfg.data.validation_fraction):
                raise ConfigError(f"{args.recipe}: the benchmark compares validation loss; set data.validation "
                                  "or data.validation_fraction")
        profile = load_profile(args.devices) if args.devices else None
        if args.target_loss is None and "centralized" not in modes:
            print("[bench] no centralized run: the target is the best final loss + 2%", file=sys.stderr)
    except ConfigError as e:
        print(f"splitlora_ds.bench: error: {e}", file=sys.stderr)
        return 2

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    threads = args.threads or max(1, (os.cpu_count() or 1) // max(c.world_size for c in configs.values()))
    launcher = args.launcher_args.split()
    t0 = time.perf_counter()
    results, failed = [], []
    for m in modes:
        cfg = configs[m]
        print(f"[bench] {m}: {cfg.world_size} rank(s), {threads} thread(s) each ...", flush=True)
        run = run_mode(cfg, args.recipe, sets[m], out, threads, launcher, args.timeout, name=m)
        if run.returncode != 0:
            print(f"[bench] {m} failed (exit {run.returncode}); see {run.log_file}", file=sys.stderr)
            failed.append(m)
            continue
        result = collect(cfg, run)
        print(f"[bench] {m}: final val loss {result.final_loss:.4f}, {result.step_seconds:.3f} s/step, "
              f"{run.wall_seconds:.0f} s wall", flush=True)
        results.append(result)
    if not results:
        print(f"[bench] every mode failed; nothing to compare (logs under {out})", file=sys.stderr)
        return 1

    if args.target_loss is not None:
        target, origin = args.target_loss, "--target-loss"
    elif any(r.mode == "centralized" for r in results):
        target = next(r for r in results if r.mode == "centralized").final_loss * 1.02
        origin = "centralized final loss + 2%"
    else:
        target, origin = min(r.final_loss for r in results) * 1.02, "best final loss + 2%"
    for r in results:
        time_to_target(r, target)
    if profile is not None:
        # With logical clients each round waits for its own sampled clients (r.sampling).
        sims = simulate([r.round_work for r in results], [r.rounds_to_target for r in results], profile,
                        [r.sampling for r in results])
        for r, sim in zip(results, sims):
            r.simulated = sim
            for point in r.curve:
                point["sim_seconds"] = elapsed_seconds(r.round_work, profile, r.sampling, point["round"])

    meta = {"recipe": args.recipe, "modes": modes, "overrides": args.overrides, "target_loss": target,
            "target_from": origin, "threads": threads, "devices": args.devices, "failed": failed,
            "bench_seconds": time.perf_counter() - t0}
    write_json(out / "results.json", meta, results)
    (out / "results.md").write_text(markdown(meta, results))
    plot(out / "loss_vs_time.png", results, "seconds", "training time (s, measured)", target)
    plot(out / "loss_vs_bytes.png", results, "bytes", "bytes communicated, all clients (MB)", target,
         scale=1e6, skip_zero=True)
    if profile is not None:
        plot(out / "loss_vs_simulated_time.png", results, "sim_seconds",
             f"simulated time (s, {Path(args.devices).name})", target)
    print(f"[bench] wrote {out / 'results.md'} ({meta['bench_seconds']:.0f} s)", flush=True)
    print((out / "results.md").read_text(), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
