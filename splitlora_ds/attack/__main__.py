"""What an honest-but-curious server recovers of a client's text, setting by setting.

    python -m splitlora_ds.attack --recipe recipes/gpt2-e2e-cpu.yaml --out runs/attack

For each setting (split point k, U-shaped depth, DP on activations, DP on the tail's gradient;
settings.py) this trains the recipe for --steps steps as a real split run, records what the
server receives from client 0 (record.py), and runs the attacks from the server's position: two
input inversions and, in the U-shaped split, label inference (see docs/privacy.md). It writes
DIR/results.json, DIR/table.md and DIR/leakage.png. --reuse attacks the recorded runs already in
DIR/runs instead of training them again.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

# As splitlora_ds.train does, before torch loads (the attacks' threads share the cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from ..config import add_recipe_arguments, load_config  # noqa: E402
from ..errors import ConfigError  # noqa: E402
from .settings import DEFAULT_EPSILONS  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="splitlora_ds.attack", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(p, "recipe YAML (mode split; see recipes/)", "override a recipe field for every setting (repeatable)")
    p.add_argument("--out", required=True, help="output folder: results.json, table.md, leakage.png, runs/")
    p.add_argument("--steps", type=int, default=30, help="training steps per setting (default 30)")
    p.add_argument("--settings", default=None,
                   help="comma-separated setting names to run (default: all; --list shows them)")
    p.add_argument("--epsilons", default=",".join(f"{e:g}" for e in DEFAULT_EPSILONS),
                   help="the epsilons the DP settings aim at (default 8,1)")
    p.add_argument("--record-steps", type=int, default=4,
                   help="steps recorded at the start and at the end of training (default 4 each)")
    p.add_argument("--reuse", action="store_true", help="attack runs already recorded under DIR/runs")
    p.add_argument("--list", action="store_true", help="print the settings and exit")
    p.add_argument("--threads", type=int, default=1, help="OMP_NUM_THREADS of each training rank (default 1)")
    p.add_argument("--timeout", type=float, default=1800, help="seconds one setting's training may take")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        epsilons = tuple(float(e) for e in args.epsilons.split(",") if e.strip())
        from .run import AttackRun  # torch, transformers: after the arguments are known to be good

        run = AttackRun(cfg, args.recipe, args.overrides, Path(args.out), args.steps, epsilons, args.record_steps)
        grid = run.select(args.settings)
    except (ConfigError, ValueError) as e:
        print(f"splitlora_ds.attack: error: {e}", file=sys.stderr)
        return 2
    if args.list:
        for s in grid:
            print(s.name)
        return 0
    t0 = time.perf_counter()
    try:
        rows = run.run(grid, threads=args.threads, timeout=args.timeout, reuse=args.reuse)
    except (RuntimeError, ValueError) as e:  # a setting's training failed, or the data leaves no public text
        print(f"splitlora_ds.attack: error: {e}", file=sys.stderr)
        return 1
    print(run.write(rows), end="")
    print(f"[splitlora_ds.attack] {len(grid)} settings in {time.perf_counter() - t0:.0f} s: "
          f"{args.out}/results.json, table.md, leakage.png", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

