"""How much of a text an attack got back: exact tokens, and ROUGE-L of the decoded text.

Token recovery is the fraction of the victim's tokens (input tokens for the inversions, target
tokens for the label attack) that the attack names exactly, at the right position. ROUGE-L
(pycocoevalcap's, as the E2E scorer) compares the decoded guess with the decoded truth per
sample, over whitespace words, lowercased: it credits words in the right order even where BPE
pieces or positions differ.
"""

from __future__ import annotations

from typing import Sequence

import torch

from ..evaluate.metrics import rouge_l


def token_recovery(guesses: Sequence[torch.Tensor], truths: Sequence[torch.Tensor]) -> float:
    """Matched tokens / all tokens, over every sample."""
    total = sum(t.numel() for t in truths)
    if total == 0:
        raise ValueError("token_recovery: no tokens to score")
    return sum(int((g == t).sum()) for g, t in zip(guesses, truths)) / total


def text_rouge_l(guesses: Sequence[torch.Tensor], truths: Sequence[torch.Tensor], tokenizer) -> float:
    """Mean ROUGE-L of the decoded guesses against the decoded truths."""
    def words(ids: torch.Tensor) -> list[str]:
        return tokenizer.decode(ids.tolist()).lower().split() or ["<empty>"]

    return rouge_l([words(g) for g in guesses], [[words(t)] for t in truths])
