"""Entry point: parse, build, train, close.

    deepspeed --num_gpus 3 --module splitlora_ds.train --recipe recipes/tiny-cpu.yaml
    python -m splitlora_ds.train --recipe recipes/tiny-cpu.yaml --set mode=centralized
"""

from __future__ import annotations

import argparse
import os
import sys

# CPU ranks that share a machine's cores: a waiting rank's OpenMP threads must sleep at once
# instead of spinning (libgomp's default), so that whichever rank computes gets the cores
# (docs/design.md, "Threads on a shared CPU"). libgomp reads this when torch loads: before any import
# that loads torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import load_config  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .failures import EXIT_PEER_LOST, PeerLost  # noqa: E402


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="splitlora_ds.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", required=True, help="recipe YAML (see recipes/)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="SECTION.KEY=VALUE",
                   help="override a recipe field; the value is parsed as YAML (repeatable)")
    p.add_argument("--dry-run", action="store_true",
                   help="print the split plan (layers, parameters, trainable parameters per role) and exit; "
                        "downloads nothing")
    p.add_argument("--resume", metavar="DIR|latest",
                   help="continue from a checkpoint: a step-N folder, a checkpoint.dir (its latest), or 'latest'")
    p.add_argument("--world-size", action="store_true",
                   help="print the number of ranks the recipe needs (clients + server stages) and exit")
    # The deepspeed launcher appends --local_rank; the rank layout itself comes from the environment.
    p.add_argument("--local_rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.world_size:
            print(cfg.world_size)
            return 0
        from .prepare import prepare
        from .trainer import train  # DeepSpeed and transformers load only for real runs

        prep = prepare(cfg, dry_run=args.dry_run, resume=args.resume)
        if args.dry_run:
            from .plan_report import plan_report

            print(plan_report(cfg, prep.family, prep.hf_config, prep.plan, args.recipe, prep.setup))
            return 0
    except ConfigError as e:
        print(f"splitlora_ds: error: {e}", file=sys.stderr, flush=True)
        return 2
    try:
        train(prep)
    except ConfigError as e:
        # Input errors are raised before the first collective (prepare.py), except the host
        # agreement's (hosts.py), where every rank decides alike from the same gathered data and
        # so prints the same line. The process group may still wait on peers at teardown: leave
        # at once. One write call: ranks sharing a console (one launcher per host) then cannot
        # interleave their lines (print writes the text and the newline separately).
        sys.stderr.flush()
        os.write(2, f"splitlora_ds: error: {e}\n".encode())
        os._exit(2)
    except PeerLost as e:
        layout = prep.mode.layout
        print(f"splitlora_ds: error: {e.describe(layout, prep.rank)}", file=sys.stderr, flush=True)
        # The process group cannot shut down cleanly with a peer gone (its teardown may wait on
        # it): leave at once, with the one line above as the only report.
        os._exit(EXIT_PEER_LOST)
    return 0


if __name__ == "__main__":
    sys.exit(main())
