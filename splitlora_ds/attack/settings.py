"""The settings an attack run trains and attacks: split point, U-shaped depth and DP, one axis at a
time from the most exposed setting (k = 1, no defence).

DP settings are named by the epsilon they aim at: the noise multiplier is the one Opacus's RDP
accountant gives for that epsilon at the victim's sampling rate (batch / shard) over the run's
steps, and the clip is the median per-sample norm of what is clipped, measured on public text at
the base weights (calibration.py): about half the samples are clipped.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Optional

DEFAULT_EPSILONS = (8.0, 1.0)


@dataclass(frozen=True)
class Setting:
    name: str
    split_layers: int
    tail_layers: Optional[int] = None  # None: the standard split (the server holds the head)
    activation_epsilon: Optional[float] = None  # DP on activations aiming at this epsilon (None: off)
    tail_gradient_epsilon: Optional[float] = None  # DP on the tail's gradient aiming at this epsilon
    as_recipe: bool = False  # the recipe as written: its split and its own privacy.* settings

    def __post_init__(self) -> None:
        if self.tail_gradient_epsilon is not None and self.tail_layers is None:
            raise ValueError(f"setting {self.name}: tail-gradient DP needs a U-shaped split (tail_layers)")


@dataclass(frozen=True)
class Noise:
    """A DP mechanism's clip and noise multiplier, as the recipe fields take them."""

    clip: float
    sigma: float


def recipe_setting(cfg) -> Optional[Setting]:
    """The recipe's own setting, first in the table: a user asks about the run they will make. None
    when client 0's split point is not fixed in the recipe (budgets plan it)."""
    k = cfg.split.client_layers[0] if isinstance(cfg.split.client_layers, list) else cfg.split.client_layers
    if cfg.federation.budgets is not None:
        return None
    return Setting("recipe", k, cfg.split.client_tail_layers, as_recipe=True)


def default_grid(num_blocks: int, epsilons: tuple[float, ...] = DEFAULT_EPSILONS) -> list[Setting]:
    """k = 1..3 standard; U-shaped at k = 1 with depths 0..2; activation DP at k = 1 and tail-gradient
    DP at depth 0, at each epsilon. Limited to what the model's blocks allow (the server keeps one)."""
    grid = [Setting(f"k{k}", k) for k in range(1, min(3, num_blocks - 1) + 1)]
    grid += [Setting(f"u-k1-m{m}", 1, m) for m in range(0, min(2, num_blocks - 2) + 1)]
    grid += [Setting(f"k1-dp{_eps_name(e)}", 1, activation_epsilon=e) for e in epsilons]
    grid += [Setting(f"u-k1-m0-tgdp{_eps_name(e)}", 1, 0, tail_gradient_epsilon=e) for e in epsilons]
    return grid


def _eps_name(eps: float) -> str:
    return f"-eps{eps:g}"


def noise_multiplier(epsilon: float, sample_rate: float, steps: int, delta: float) -> float:
    """The Gaussian noise multiplier that spends `epsilon` over `steps` releases at `sample_rate`."""
    from opacus.accountants.utils import get_noise_multiplier

    with warnings.catch_warnings():
        # At the edges of Opacus's RDP orders the bound is looser, never invalid (privacy/dp.py).
        warnings.filterwarnings("ignore", message="Optimal order is the")
        return float(get_noise_multiplier(target_epsilon=epsilon, target_delta=delta,
                                          sample_rate=min(1.0, sample_rate), steps=steps, accountant="rdp",
                                          epsilon_tolerance=0.01))


def overrides(setting: Setting, activation: Optional[Noise], tail_gradient: Optional[Noise]) -> list[str]:
    """The recipe overrides that make `setting` (its DP fields from the calibrated mechanisms)."""
    if setting.as_recipe:
        return ["mode=split"]
    out = ["mode=split", f"split.client_layers={setting.split_layers}",
           f"split.client_tail_layers={'null' if setting.tail_layers is None else setting.tail_layers}",
           "privacy.update_clip=null", "privacy.update_noise=0"]
    if setting.activation_epsilon is not None:
        out += [f"privacy.activation_clip={activation.clip!r}", f"privacy.activation_noise={activation.sigma!r}"]
    else:
        out += ["privacy.activation_clip=null", "privacy.activation_noise=0"]
    if setting.tail_gradient_epsilon is not None:
        out += [f"privacy.tail_gradient_clip={tail_gradient.clip!r}",
                f"privacy.tail_gradient_noise={tail_gradient.sigma!r}"]
    else:
        out += ["privacy.tail_gradient_clip=null", "privacy.tail_gradient_noise=0"]
    return out


def recorded_steps(steps: int, per_phase: int) -> dict[str, list[int]]:
    """The steps recorded "at the start" (the adapters near their init) and "at the end"."""
    n = max(1, min(per_phase, math.ceil(steps / 2)))
    return {"start": list(range(n)), "end": list(range(steps - n, steps))}
