"""Entry point: parse, build, train, close.

    deepspeed --num_gpus 3 --module splitlora_ds.train --recipe recipes/tiny-cpu.yaml
    python -m splitlora_ds.train --recipe recipes/tiny-cpu.yaml --set mode=centralized
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING, Optional, Sequence

# CPU ranks that share a machine's cores: a waiting rank's OpenMP threads must sleep at once
# instead of spinning (libgomp's default), so that whichever rank computes gets the cores
# (docs/design.md, "Threads on a shared CPU"). libgomp reads this when torch loads: before any import
# that loads torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

from .config import add_recipe_arguments, load_config  # noqa: E402
from .errors import ConfigError  # noqa: E402
from .failures import (EXIT_ERROR, EXIT_PEER_FAILED, EXIT_PEER_LOST, Failure, FailureBoard, PeerLost,  # noqa: E402
                       describe_error, format_traceback, is_peer_failure, linger_seconds, who)
from .placement import Placement, place_this_rank  # noqa: E402

if TYPE_CHECKING:  # DeepSpeed and transformers load only for real runs
    from .prepare import Prepared
    from .rendezvous import Rendezvous
    from .runtime.executor import Observer


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="splitlora_ds.train", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    add_recipe_arguments(p)
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


def main(argv: list[str] | None = None, observers: Sequence[Observer] = ()) -> int:
    """Run one rank; `observers` watch its executor after every instruction (the attack tool's
    recorder, splitlora_ds.attack.record)."""
    args = parse_args(argv)
    try:
        cfg = load_config(args.recipe, args.overrides)
        if args.world_size:
            print(cfg.world_size)
            return 0
        # Before DeepSpeed loads: it picks its accelerator (the device engines move to) at import.
        placement = None if args.dry_run else place_this_rank(cfg.dist.backend)
        from .prepare import prepare  # DeepSpeed and transformers load only for real runs

        prep = prepare(cfg, dry_run=args.dry_run, resume=args.resume)
        if args.dry_run:
            from .plan_report import plan_report

            print(plan_report(cfg, prep.family, prep.hf_config, prep.plan, args.recipe, prep.setup))
            return 0
    except ConfigError as e:
        _say(f"splitlora_ds: error: {e}")
        return 2
    rendezvous = _join(placement, cfg.dist.timeout_s)
    if rendezvous is None:
        return EXIT_PEER_LOST
    _train_or_report(prep, rendezvous, observers)
    return 0


def _join(placement: Placement, timeout_s: float) -> Optional[Rendezvous]:
    """Meet the other ranks; None (after one line saying why) when they cannot be met."""
    from .rendezvous import join

    try:
        return join(placement, timeout_s)
    except RuntimeError as e:  # the store or the process group could not be formed
        if not is_peer_failure(e):
            raise
        _say(f"splitlora_ds: error: rank {os.environ.get('RANK', '0')} could not meet the other ranks at "
             f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')} within dist.timeout_s "
             f"({timeout_s:g} s): is every rank started, with the same MASTER_ADDR and MASTER_PORT? "
             f"({type(e).__name__}: {str(e).splitlines()[0]})")
        return None


def _train_or_report(prep: Prepared, rendezvous: Rendezvous, observers: Sequence[Observer] = ()) -> None:
    """Train; on any failure print this rank's one line (failures.py says which) and leave at
    once: the process group cannot shut down cleanly with a peer gone (its teardown may wait on it)."""
    from .trainer import train
    layout = prep.mode.layout
    board = FailureBoard(rendezvous.store, rendezvous.rank, rendezvous.world,
                         linger_seconds(rendezvous.timeout_s), rendezvous.store_address)
    try:
        train(prep, observers, rendezvous=rendezvous)
    except ConfigError as e:
        # Input errors are raised before the first collective (prepare.py), except the host
        # agreement's (hosts.py), where every rank decides alike from the same gathered data and
        # so prints the same line.
        _say(f"splitlora_ds: error: {e}")
        os._exit(2)
    except PeerLost as e:
        first = board.first()
        if first is None:  # this rank is the first to see the loss: the others will name it
            board.post(Failure("lost", f"{e.what_was_lost(layout)} (seen by {who(layout, prep.rank)})", e.peers))
        _say(f"splitlora_ds: error: {e.describe(layout, prep.rank, first)}")
        board.leave()
        os._exit(EXIT_PEER_FAILED if first is not None and first.kind == "error" else EXIT_PEER_LOST)
    except Exception as e:  # noqa: BLE001 - this rank's own error: its traceback, then one line
        line = describe_error(e, who(layout, prep.rank), str(rendezvous.device))
        board.post(Failure("error", line))
        _say(format_traceback(e).rstrip() + f"\nsplitlora_ds: error: {line}")
        board.leave()
        os._exit(EXIT_ERROR)


def _say(text: str) -> None:
    """One write per report: ranks sharing a console (one launcher per host) then cannot
    interleave or run their lines together (print writes the text and the newline separately)."""
    sys.stdout.flush()
    sys.stderr.write(f"{text}\n")
    sys.stderr.flush()


if __name__ == "__main__":
    sys.exit(main())
