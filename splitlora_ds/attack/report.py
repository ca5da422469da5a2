"""The attack run's outputs: results.json (one row per attack, setting and phase), a Markdown
table (one line per setting and phase, the attacks side by side) and a plot of leakage against
validation loss (the trade-off a user picks a defence on)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Optional, Sequence

ATTACK_COLUMNS = ("inversion-learned", "inversion-optimised", "label-backprojection")


def write_json(rows: Sequence[dict], path: Path) -> None:
    path.write_text(json.dumps(list(rows), indent=1) + "\n")


def _pct(value: Optional[float]) -> str:
    return "-" if value is None else f"{100 * value:.1f}%"


def _num(value: Optional[float], fmt: str = ".3f") -> str:
    return "-" if value is None else format(value, fmt)


def _defence(row: dict) -> str:
    parts = []
    if row["tail_layers"] is not None:
        parts.append(f"U-shaped, tail {row['tail_layers']}")
    for what in ("activations", "tail_gradients"):
        sigma = row.get(f"sigma_{what}")
        if sigma is not None:
            eps = row.get(f"epsilon_{what}")
            parts.append(f"DP {what.replace('_', ' ')} σ={sigma:.3g} ε={_num(eps, '.3g')}")
    return ", ".join(parts) or "none"


def table(rows: Sequence[dict]) -> str:
    """Markdown: per setting and phase, each attack's token recovery (ROUGE-L)."""
    lines = ["| setting | k | defence | val loss | phase | " + " | ".join(ATTACK_COLUMNS) + " |",
             "|---|---|---|---|---|" + "---|" * len(ATTACK_COLUMNS)]
    keyed: dict[tuple[str, str], dict[str, dict]] = {}
    for row in rows:
        if row["setting"] is not None:
            keyed.setdefault((row["setting"], row["phase"]), {})[row["attack"]] = row
    for (setting, phase), by_attack in keyed.items():
        first = next(iter(by_attack.values()))
        cells = [f"{_pct(r['token_recovery'])} ({r['rouge_l']:.2f})" if (r := by_attack.get(a)) else "-"
                 for a in ATTACK_COLUMNS]
        lines.append(f"| {setting} | {first['split_layers']} | {_defence(first)} | {_num(first['val_loss'])} | "
                     f"{phase} | " + " | ".join(cells) + " |")
    for row in rows:
        if row["setting"] is None:
            lines.append(f"\n{row['attack']} baseline: {_pct(row['token_recovery'])} of {row['tokens']} tokens "
                         f"(ROUGE-L {row['rouge_l']:.2f})")
    return "\n".join(lines) + "\n"


def plot(rows: Sequence[dict], path: Path) -> None:
    """Token recovery at the end of training against validation loss, one point per setting and attack."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.5, 5))
    ends = [r for r in rows if r["phase"] == "end" and r["val_loss"] is not None]
    for attack, marker in zip(ATTACK_COLUMNS, "os^"):
        points = [r for r in ends if r["attack"] == attack]
        if points:
            ax.scatter([r["val_loss"] for r in points], [100 * r["token_recovery"] for r in points], marker=marker,
                       label=attack, alpha=0.8)
    # one label per setting, at its most successful attack (the others sit on the same vertical)
    best: dict[str, dict] = {}
    for r in ends:
        if r["setting"] not in best or r["token_recovery"] > best[r["setting"]]["token_recovery"]:
            best[r["setting"]] = r
    for i, r in enumerate(best.values()):
        ax.annotate(r["setting"], (r["val_loss"], 100 * r["token_recovery"]), fontsize=7,
                    xytext=(4, 4 + 7 * (i % 3)), textcoords="offset points")
    for r in rows:
        if r["setting"] is None:
            ax.axhline(100 * r["token_recovery"], linestyle=":", color="grey", linewidth=1)
            ax.annotate(r["attack"], (ax.get_xlim()[0], 100 * r["token_recovery"]), fontsize=7, color="grey")
    ax.set_ylim(-5, 118)  # room for the labels above 100%
    ax.set_xlabel("validation loss (lower is better)")
    ax.set_ylabel("tokens recovered at the end of training (%)")
    ax.set_title("What the server recovers, against what each defence costs")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
