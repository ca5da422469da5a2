"""One attack run: calibrate the DP settings, train and record each setting, attack, report."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Callable, Optional

from ..config import RunConfig
from .attacks import Attacker
from .base_model import BaseModel
from .calibration import activation_norm, tail_gradient_norm
from .data import load_attack_data
from .report import plot, table, write_json
from .settings import Noise, Setting, default_grid, noise_multiplier, overrides, recipe_setting, recorded_steps
from .training import TrainedSetting, train_setting
from .views import load_view


class AttackRun:
    def __init__(self, cfg: RunConfig, recipe: str, user_overrides: list[str], out: Path, steps: int,
                 epsilons: tuple[float, ...], per_phase: int):
        if cfg.mode != "split":
            raise ValueError(f"mode: {cfg.mode}; the attacks take the server's view of a split run (mode: split)")
        if cfg.logical_clients:
            raise ValueError("federation.client_ranks / clients_per_round: the attacks follow client rank 0 as one "
                             "data owner; run them without logical clients")
        if steps < 2:
            raise ValueError(f"--steps: {steps}; at least 2 (a start and an end)")
        self.cfg, self.recipe, self.user_overrides, self.out, self.steps = cfg, recipe, user_overrides, out, steps
        self.base = BaseModel(cfg)
        own = recipe_setting(cfg)
        self.grid = ([own] if own is not None else []) + default_grid(self.base.num_blocks, epsilons)
        self.phases = recorded_steps(steps, per_phase)
        self.data = None
        self._noise: dict[tuple, Noise] = {}

    def select(self, names: Optional[str]) -> list[Setting]:
        if names is None:
            return self.grid
        known = {s.name: s for s in self.grid}
        wanted = [n.strip() for n in names.split(",") if n.strip()]
        unknown = [n for n in wanted if n not in known]
        if unknown:
            raise ValueError(f"--settings: unknown {', '.join(unknown)}; this model has {', '.join(known)}")
        return [known[n] for n in wanted]

    # ------------------------------------------------------------------ DP calibration
    def _sample_rate(self) -> float:
        return self.cfg.train.batch_size / self.data.victim_samples

    def activation_noise(self, s: Setting) -> Optional[Noise]:
        """The activation mechanism of setting s: the recipe's own, or calibrated to its epsilon."""
        dp = self.cfg.privacy
        if s.as_recipe:
            return Noise(dp.activation_clip, dp.activation_noise) if dp.activation_clip is not None else None
        return self._calibrated(("activations", s.split_layers), s.activation_epsilon,
                                lambda: activation_norm(self.base, self.data.public_ids, s.split_layers))

    def tail_gradient_noise(self, s: Setting) -> Optional[Noise]:
        """The tail-gradient mechanism of setting s: the recipe's own, or calibrated to its epsilon."""
        dp = self.cfg.privacy
        if s.as_recipe:
            return Noise(dp.tail_gradient_clip, dp.tail_gradient_noise) if dp.tail_gradient_clip is not None else None
        return self._calibrated(("tail", s.tail_layers), s.tail_gradient_epsilon,
                                lambda: tail_gradient_norm(self.base, self.data.public_ids, self.data.public_labels,
                                                           s.tail_layers, self.cfg.train.batch_size,
                                                           self.cfg.train.label_smoothing))

    def _calibrated(self, what: tuple, epsilon: Optional[float], clip: Callable[[], float]) -> Optional[Noise]:
        """Noise(median-norm clip, the multiplier that spends `epsilon`), computed once per mechanism."""
        if epsilon is None:
            return None
        key = (*what, epsilon)
        if key not in self._noise:
            sigma = noise_multiplier(epsilon, self._sample_rate(), self.steps, self.cfg.privacy.delta)
            self._noise[key] = Noise(clip(), sigma)
        return self._noise[key]

    # ------------------------------------------------------------------ the run
    def run(self, grid: list[Setting], threads: int, timeout: Optional[float], reuse: bool) -> list[dict]:
        self.data = load_attack_data(self.cfg)
        attacker = Attacker(self.base, self.data)
        record = sorted({s for steps in self.phases.values() for s in steps})
        common = [*self.user_overrides, f"train.max_steps={self.steps}", f"eval.every={self.steps}",
                  "train.epochs=null"]
        rows, baseline = [], None
        for setting in grid:
            t0 = time.perf_counter()
            act, tail = self.activation_noise(setting), self.tail_gradient_noise(setting)
            trained = train_setting(self.recipe, [*common, *overrides(setting, act, tail)],
                                    self.out / "runs" / setting.name, record, threads, timeout, reuse)
            samples = load_view(trained.view_dir)
            for phase, steps in self.phases.items():
                chosen = [x for x in samples if x.step in steps]
                for row in attacker.attack(setting, chosen, act, tail):
                    rows.append(_complete(row, setting, phase, trained, act, tail))
            if baseline is None:
                baseline = [x for x in samples if x.step in self.phases["end"]]
            print(f"[splitlora_ds.attack] {setting.name}: trained in {trained.wall_seconds:.0f} s, attacked in "
                  f"{time.perf_counter() - t0 - (0 if reuse else trained.wall_seconds):.0f} s", flush=True)
        for row in attacker.unigram(baseline):
            rows.append({**row, "setting": None, "phase": None, "split_layers": None, "tail_layers": None,
                         "epsilon": None, "val_loss": None})
        return rows

    def write(self, rows: list[dict]) -> str:
        self.out.mkdir(parents=True, exist_ok=True)
        write_json(rows, self.out / "results.json")
        text = table(rows)
        (self.out / "table.md").write_text(text)
        plot(rows, self.out / "leakage.png")
        return text


def _complete(row: dict, setting: Setting, phase: str, trained: TrainedSetting, act: Optional[Noise],
              tail: Optional[Noise]) -> dict:
    """A results row: the attack's figures plus the setting it ran against."""
    of = row.pop("epsilon_of")
    eps = trained.epsilons.get(f"epsilon_{of}") if row["dp_sigma"] is not None else None
    return {**row, "setting": setting.name, "phase": phase, "split_layers": setting.split_layers,
            "tail_layers": setting.tail_layers, "epsilon": eps, "val_loss": trained.val_loss,
            "sigma_activations": act.sigma if act else None, "clip_activations": act.clip if act else None,
            "epsilon_activations": trained.epsilons.get("epsilon_activations"),
            "sigma_tail_gradients": tail.sigma if tail else None, "clip_tail_gradients": tail.clip if tail else None,
            "epsilon_tail_gradients": trained.epsilons.get("epsilon_tail_gradients")}
