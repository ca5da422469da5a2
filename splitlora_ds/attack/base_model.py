"""The attacker's copy of the model: the frozen base weights, which the server holds anyway.

The server knows the base model (random-initialised from the recipe's seeded config, or the
pretrained checkpoint) and the split points; it does not know a client's adapters. Building every
layer with the recipe's seed and LoRA's zero-initialised B gives exactly the base function, the
same per-layer init the training ranks use (models/lora.py)."""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator, Optional

import torch
from torch import nn

from ..config import RunConfig
from ..models import get_family
from ..partition import StagePlan
from ..stage import build_stage


class BaseModel:
    """Layer list 0 (embeddings), 1..L (blocks), L + 1 (final norm and head), base weights, eval mode."""

    def __init__(self, cfg: RunConfig):
        family = get_family(cfg.model.family)
        self.hf_config = family.load_config(cfg.model.pretrained, cfg.model.config, cfg.model.attn_implementation,
                                            offline_known=True)
        self.num_blocks = family.num_blocks(self.hf_config)
        plan = StagePlan("attacker", 0, self.num_blocks + 2, self.num_blocks)
        self.stage = build_stage(family, self.hf_config, plan, cfg.lora, cfg.train.seed, cfg.model.pretrained).eval()
        for p in self.stage.parameters():
            p.requires_grad_(False)
        for name, p in self.stage.named_parameters():
            if "lora_B" in name and bool(p.any()):
                raise ValueError(f"{name}: LoRA B is not zero at init, so this is not the base model")
        self.token_embedding = _token_embedding(self.stage.layers["0"], self.hf_config.vocab_size)

    def run(self, x: torch.Tensor, mask: torch.Tensor, layers: range,
            score_index: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Layers `layers` on x (token ids when the range starts at 0, else hidden states [B, T, H])
        under segment ids `mask` [B, T]; the head projects `score_index` (flat positions) only."""
        ctx = self.stage.context(mask, torch.float32)
        if score_index is not None:
            ctx["score_index"] = score_index
        for i in layers:
            x = self.stage.layers[str(i)](x, ctx)
        return x

    def bottom(self, ids: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
        """A client's cut-layer activations at split point k, without its adapters."""
        return self.run(ids, mask, range(0, k + 1))

    def bottom_from_embeddings(self, embeds: torch.Tensor, mask: torch.Tensor, k: int) -> torch.Tensor:
        """The same, from token embeddings [B, T, H] in place of the ids' (the position embeddings,
        where the family has them, are added as for ids)."""
        with self._embeddings_replaced(embeds):
            return self.bottom(torch.zeros(mask.shape, dtype=torch.long), mask, k)

    def tail(self, hidden: torch.Tensor, mask: torch.Tensor, m: int, score_index: torch.Tensor) -> torch.Tensor:
        """A U-shaped client's tail of depth m (its last m blocks, norm and head): logits [N, V]."""
        return self.run(hidden, mask, range(self.num_blocks + 1 - m, self.num_blocks + 2), score_index)

    @contextmanager
    def _embeddings_replaced(self, embeds: torch.Tensor) -> Iterator[None]:
        handle = self.token_embedding.register_forward_hook(lambda _m, _i, _o: embeds)
        try:
            yield
        finally:
            handle.remove()


def _token_embedding(embed_layer: nn.Module, vocab_size: int) -> nn.Embedding:
    """The embedding layer's token table (GPT-2's wte, LLaMA's embed_tokens)."""
    tables = [m for m in embed_layer.modules() if isinstance(m, nn.Embedding) and m.num_embeddings == vocab_size]
    if len(tables) != 1:
        raise ValueError(f"expected one token embedding of {vocab_size} rows in the embedding layer, found {len(tables)}")
    return tables[0]
