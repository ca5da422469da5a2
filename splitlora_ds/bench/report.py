"""The benchmark's outputs: results.json, results.md (a table) and PNG plots."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Optional, Sequence

from .runs import ModeResult


def time_to_target(result: ModeResult, target: float) -> None:
    """First evaluation at or below `target`: the main rank's summed step time up to it, and
    rounds (one local step of every client taking part) up to it. None when the run never got there."""
    for point in result.curve:
        if point["loss"] <= target:
            result.time_to_target_s, result.rounds_to_target = point["seconds"], point["round"]
            return
    result.time_to_target_s = result.rounds_to_target = None


def write_json(path: Path, meta: dict, results: Sequence[ModeResult]) -> None:
    payload = {**meta, "modes": [dataclasses.asdict(r) for r in results]}
    path.write_text(json.dumps(payload, indent=1))


def _num(value: Optional[float], fmt: str = "{:.3g}", scale: float = 1.0) -> str:
    return "-" if value is None else fmt.format(value / scale)


def _traffic(client: dict) -> str:
    """A client's KB per step sent / received / both: the total is what two topologies compare on."""
    sent, received = client.get("bytes_sent_per_step"), client.get("bytes_received_per_step")
    total = None if sent is None or received is None else sent + received
    return " / ".join(_num(v, "{:.1f}", 1e3) for v in (sent, received, total))


def markdown(meta: dict, results: Sequence[ModeResult]) -> str:
    lines = [f"# splitlora_ds benchmark: {meta['recipe']}", "",
             f"Target validation loss {meta['target_loss']:.4f} ({meta['target_from']}). "
             f"{meta['threads']} thread(s) per rank. Measured on this machine: time, tokens/s, memory, "
             "FLOPs (torch FlopCounterMode), bytes." + (" Simulated from those with the latency model: "
                                                      f"the `sim.` columns ({meta['devices']})." if meta.get("devices") else ""),
             "", "Time to target counts the main rank's step times (start-up and evaluation excluded).", ""]
    head = ["mode", "final val loss", "ppl", "time to target (s)", "rounds to target", "step (s)", "tokens/s",
            "trainable client / server", "peak RSS client / server (MB)", "GFLOP/step client / server",
            "KB/step per client sent / recv / total"]
    if meta.get("devices"):
        head += ["sim. round (s)", "sim. to target (s)", "memory misfits"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in results:
        c, s = r.client or {}, r.server or {}
        row = [r.mode, _num(r.final_loss, "{:.4f}"), _num(r.final_ppl, "{:.2f}"),
               _num(r.time_to_target_s, "{:.1f}"), _num(r.rounds_to_target, "{:g}"),
               _num(r.step_seconds, "{:.3f}"), _num(r.tokens_per_s, "{:.0f}"),
               f"{_num(c.get('trainable_params'), '{:,.0f}')} / {_num(s.get('trainable_params'), '{:,.0f}')}",
               f"{_num(c.get('peak_rss_bytes'), '{:.0f}', 2**20)} / {_num(s.get('peak_rss_bytes'), '{:.0f}', 2**20)}",
               f"{_num(c.get('flops_per_step'), '{:.2f}', 1e9)} / {_num(s.get('flops_per_step'), '{:.2f}', 1e9)}",
               _traffic(c)]
        if meta.get("devices"):
            sim = r.simulated or {}
            row += [_num(sim.get("round_s"), "{:.3g}"), _num(sim.get("to_target_s"), "{:.4g}"),
                    ", ".join(sim.get("memory_misfits", [])) or "-"]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Plots: `loss_vs_time.png`, `loss_vs_bytes.png`"
              + (", `loss_vs_simulated_time.png`" if meta.get("devices") else "") + "."]
    return "\n".join(lines) + "\n"


def plot(path: Path, results: Sequence[ModeResult], x: str, xlabel: str, target: float,
         scale: float = 1.0, skip_zero: bool = False) -> None:
    import matplotlib

    matplotlib.use("Agg")  # files only, no display
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    for r in results:
        points = [(p[x] / scale, p["loss"]) for p in r.curve if p.get(x) is not None]
        if skip_zero and points and all(px == 0 for px, _ in points):
            ax.plot([], [], label=f"{r.mode} (none)")
            continue
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", label=r.mode)
    ax.axhline(target, color="grey", linestyle="--", linewidth=1, label=f"target {target:.3f}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel("validation loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
