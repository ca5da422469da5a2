"""`python -m splitlora_ds.bench.mfu [--model llama-7b|tiny] [--layers L] [--with-head] --out DIR`

Builds a server stage of a LLaMA-shaped model (random init, the project's build_stage with peft
LoRA), feeds it what a server receives (clients x batch rows of seq hidden states, batched), and
times forward + backward steps. Reports FLOPs per step (torch FlopCounterMode over one step),
the median step time after warm-up (CUDA events on GPUs), achieved TFLOP/s, MFU = achieved /
the device's dense bf16 peak (bench/peaks.py, or --peak-tflops), and peak memory. Writes
DIR/mfu.json and prints one line. MFU is null when the peak is unknown (CPUs, untabled GPUs,
float32 runs without --peak-tflops).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from ..config import LoraConfig
from ..errors import ConfigError
from .measure import count_flops, peak_memory, reset_peak_memory, time_steps
from .peaks import table_peak
from .server_step import MODELS, build_server_stage, check_targets, make_inputs, make_step, model_config

PROG = "splitlora_ds.bench.mfu"
DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad value is a ConfigError (one line, exit 2) rather than usage + error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(message)


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = _Parser(prog=f"python -m {PROG}", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="llama-7b", choices=list(MODELS))
    p.add_argument("--layers", type=int, default=4, help="transformer blocks in the stage (default 4)")
    p.add_argument("--with-head", action="store_true",
                   help="the last server stage: its blocks plus final norm, LM head and loss")
    p.add_argument("--clients", type=int, default=3, help="clients whose rows the server batches (default 3)")
    p.add_argument("--batch", type=int, default=4, help="rows per client (default 4)")
    p.add_argument("--seq", type=int, default=512, help="positions per row (default 512)")
    p.add_argument("--dtype", default="bfloat16", choices=list(DTYPES))
    p.add_argument("--device", default="auto", choices=["auto", "cuda", "cpu"],
                   help="auto: CUDA when available, else CPU")
    p.add_argument("--steps", type=int, default=10, help="timed steps; the median is reported (default 10)")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first (default 3)")
    p.add_argument("--lora-rank", type=int, default=16)
    p.add_argument("--targets", default="q_proj,v_proj", help="LoRA target modules, comma-separated")
    p.add_argument("--peak-tflops", type=float, default=None,
                   help="the device's peak TFLOP/s for this dtype (default: the bf16 table in bench/peaks.py)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="output folder for mfu.json")
    args = p.parse_args(argv)
    for name in ("layers", "clients", "batch", "steps", "lora_rank"):
        if getattr(args, name) < 1:
            raise ConfigError(f"--{name.replace('_', '-')}: {getattr(args, name)} must be >= 1")
    if args.seq < 2:
        raise ConfigError(f"--seq: {args.seq} must be >= 2 (a position needs a next token to score)")
    if args.warmup < 0:
        raise ConfigError(f"--warmup: {args.warmup} must be >= 0")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        raise ConfigError(f"--peak-tflops: {args.peak_tflops} must be > 0")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device: cuda requested but torch.cuda.is_available() is False")
    return args


def _device(choice: str) -> torch.device:
    if choice == "cpu" or (choice == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _device_name(device: torch.device) -> str:
    return torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"


def _peak(args: argparse.Namespace, device_name: str, dtype: torch.dtype) -> tuple[Optional[float], str]:
    if args.peak_tflops is not None:
        return args.peak_tflops, "--peak-tflops"
    if device_name != "cpu":
        found = table_peak(device_name, dtype)
        if found is not None:
            return found[0], f"bench/peaks.py: {found[1]}, dense bf16 vendor peak"
    why = "float32 run" if dtype != torch.bfloat16 and device_name != "cpu" else f"device {device_name!r} not tabled"
    return None, f"unknown ({why}; pass --peak-tflops)"


def measure(args: argparse.Namespace) -> dict:
    device, dtype = _device(args.device), DTYPES[args.dtype]
    targets = [t.strip() for t in args.targets.split(",") if t.strip()]
    config = model_config(args.model, args.seq)
    check_targets(config, targets)
    # alpha and dropout change no FLOP; dropout 0 keeps steps identical.
    lora = LoraConfig(rank=args.lora_rank, alpha=2.0 * args.lora_rank, dropout=0.0, target_modules=targets)
    t0 = time.perf_counter()
    stage = build_server_stage(config, args.layers, args.with_head, lora, device, dtype, args.seed)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    build_seconds = time.perf_counter() - t0
    rows = args.clients * args.batch
    inputs = make_inputs(stage, config, rows, args.seq, args.seed)
    step = make_step(stage, inputs)

    reset_peak_memory(device)
    flops = count_flops(step)  # also the first warm-up: kernels selected, allocator filled
    seconds = time_steps(step, device, args.warmup, args.steps)
    memory, memory_kind = peak_memory(device)
    median = statistics.median(seconds)
    achieved = flops / median / 1e12
    device_name = _device_name(device)
    peak, peak_source = _peak(args, device_name, dtype)
    params, trainable = stage.parameter_counts()
    return {
        "model": args.model, "stage": stage.plan.describe(), "layer_range": [stage.plan.start, stage.plan.stop],
        "blocks": len(stage.plan.blocks), "with_head": stage.plan.holds_head,
        "hidden_size": config.hidden_size, "clients": args.clients, "batch": args.batch, "seq": args.seq,
        "rows": rows, "tokens": rows * args.seq, "dtype": args.dtype, "device": str(device),
        "device_name": device_name, "lora_rank": args.lora_rank, "lora_targets": targets,
        "params": params, "trainable_params": trainable,
        "flops_per_step": flops,
        "flops_counted_by": "torch.utils.flop_counter.FlopCounterMode over one forward+backward step",
        "warmup": args.warmup, "steps": args.steps, "step_seconds": seconds, "median_step_seconds": median,
        "timing": "CUDA events per step, synchronized" if device.type == "cuda" else "time.perf_counter per step",
        "achieved_tflops": achieved, "peak_tflops": peak, "peak_source": peak_source,
        "mfu": achieved / peak if peak else None,
        "peak_memory_bytes": memory, "peak_memory_kind": memory_kind,
        "build_seconds": build_seconds, "threads": torch.get_num_threads(), "torch": torch.__version__,
    }


def summary_line(result: dict, path: Path) -> str:
    mfu = f"MFU {result['mfu']:.3f} (peak {result['peak_tflops']:g} TFLOP/s)" if result["mfu"] is not None \
        else f"MFU null: peak {result['peak_source']}"
    return (f"[mfu] {result['model']} server stage ({result['stage']}), {result['rows']}x{result['seq']} tokens, "
            f"{result['dtype']} on {result['device_name']}: {result['flops_per_step'] / 1e12:.4g} TFLOP/step, "
            f"{result['median_step_seconds']:.4g} s/step (median of {result['steps']}), "
            f"{result['achieved_tflops']:.4g} TFLOP/s, {mfu}, peak memory "
            f"{result['peak_memory_bytes'] / 2**30:.2f} GiB -> {path}")


def main(argv: Optional[list[str]] = None) -> int:
    try:
        args = parse_args(argv)
        result = measure(args)
    except ConfigError as e:
        print(f"{PROG}: error: {e}", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / "mfu.json"
    path.write_text(json.dumps(result, indent=1))
    print(summary_line(result, path), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
