"""Every attack against one recorded setting, as rows of the results table."""

from __future__ import annotations

from typing import Optional

import torch

from ..privacy.dp import clip_rows
from .base_model import BaseModel
from .data import AttackData
from .inversion import LearnedInversion, Mechanism, match_moments, optimisation_inversion, public_activations
from .labels import infer_targets
from .scoring import text_rouge_l, token_recovery
from .settings import Noise, Setting
from .views import VictimSample


def release_mechanism(noise: Optional[Noise], seed: int = 0) -> Optional[Mechanism]:
    """The client's activation mechanism (privacy/dp.py: clip each sample, add N(0, (sigma C)^2) at
    real positions), which the attacker applies to its public activations: it reads the job's config."""
    if noise is None:
        return None
    gen = torch.Generator().manual_seed(seed)

    def release(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = clip_rows(hidden, mask, noise.clip)
        std = noise.sigma * noise.clip
        return out + torch.randn(out.shape, generator=gen) * std * mask.unsqueeze(-1).to(out.dtype)

    return release


class Attacker:
    """The server's attacks, with the learned inverters cached by (split point, DP mechanism)."""

    def __init__(self, base: BaseModel, data: AttackData, optimisation_samples: int = 16,
                 optimisation_steps: int = 100):
        self.base, self.data = base, data
        self.optimisation_samples = optimisation_samples
        self.optimisation_steps = optimisation_steps
        self._inverters: dict[tuple, LearnedInversion] = {}
        self._references: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def inverter(self, k: int, noise: Optional[Noise]) -> LearnedInversion:
        key = (k, noise)
        if key not in self._inverters:
            feats, tokens = public_activations(self.base, self.data.public_ids, k, release_mechanism(noise))
            self._inverters[key] = LearnedInversion().fit(feats, tokens)
        return self._inverters[key]

    def reference(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The per-feature mean and spread of the base bottom's activations at k on public text."""
        if k not in self._references:
            feats, _ = public_activations(self.base, self.data.public_ids, k, None, max_positions=20_000)
            self._references[k] = (feats.mean(0), feats.std(0))
        return self._references[k]

    def attack(self, setting: Setting, samples: list[VictimSample], activation: Optional[Noise],
               tail_gradient: Optional[Noise]) -> list[dict]:
        """Rows (attack, token_recovery, rouge_l, tokens, dp_sigma, epsilon key) for one phase's samples."""
        tok = self.data.tokenizer
        ids = [s.ids for s in samples]
        learned = self.inverter(setting.split_layers, activation)
        guesses = list(learned.predict(torch.cat([s.hidden for s in samples])).split([len(i) for i in ids]))
        act_sigma = activation.sigma if activation is not None else None
        rows = [_row("inversion-learned", guesses, ids, tok, act_sigma, "activations")]
        # the optimisation matches the base bottom's function: moment-match to its noise-free output
        adapted = match_moments([s.hidden for s in samples], *self.reference(setting.split_layers))
        few = slice(0, self.optimisation_samples)
        found = optimisation_inversion(self.base, adapted[few], setting.split_layers, steps=self.optimisation_steps)
        rows.append(_row("inversion-optimised", found, ids[few], tok, act_sigma, "activations"))
        if setting.tail_layers is not None:
            inferred = infer_targets(self.base, setting.tail_layers, [s.tail_input for s in samples],
                                     [s.tail_grad for s in samples])
            targets = [s.targets[s.scored] for s in samples]
            label_guess = [guess[s.scored] for (guess, _), s in zip(inferred, samples)]
            row = _row("label-backprojection", label_guess, targets, tok,
                       tail_gradient.sigma if tail_gradient is not None else None, "tail_gradients")
            found_positions = sum(int((has == s.scored).sum()) for (_, has), s in zip(inferred, samples))
            row["positions_found"] = found_positions / sum(len(s.ids) for s in samples)
            rows.append(row)
        return rows

    def unigram(self, samples: list[VictimSample]) -> list[dict]:
        """The baselines: every input token guessed as the public text's most frequent one, every
        target as the public answers' most frequent one."""
        tok = self.data.tokenizer
        inputs = [s.ids for s in samples]
        targets = [s.targets[s.scored] for s in samples]
        return [_row("unigram", [torch.full_like(t, self.data.most_common_token()) for t in inputs], inputs, tok,
                     None, None),
                _row("unigram-targets", [torch.full_like(t, self.data.most_common_target()) for t in targets],
                     targets, tok, None, None)]


def _row(attack: str, guesses, truths, tokenizer, sigma: Optional[float], epsilon_of: Optional[str]) -> dict:
    return {"attack": attack, "token_recovery": token_recovery(guesses, truths),
            "rouge_l": text_rouge_l(guesses, truths, tokenizer), "tokens": sum(t.numel() for t in truths),
            "dp_sigma": sigma, "epsilon_of": epsilon_of}
