"""GPT-2 as embed / blocks / head layers wrapping transformers' own GPT2Block."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn
from transformers import GPT2Config, PretrainedConfig
from transformers.models.gpt2.modeling_gpt2 import GPT2Block

from . import fused_qkv
from .base import LayerSpec, ModelFamily, c_proj_std, causal_context, construct, hf_init_, init_vocab_matrix, scored_positions

# Checkpoints saved from GPT2LMHeadModel prefix keys with "transformer."; the original OpenAI
# "gpt2" checkpoint was saved from GPT2Model and has no prefix.
_PREFIXES = ("transformer.", "")


class GPT2Embed(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.wte = nn.Embedding(config.vocab_size, config.hidden_size)
        self.wpe = nn.Embedding(config.max_position_embeddings, config.hidden_size)
        self.drop = nn.Dropout(config.embd_pdrop)

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return self.drop(self.wte(x) + self.wpe(ctx["position_ids"]))


class GPT2BlockLayer(nn.Module):
    """Holds HF's GPT2Block as `block`, so LoRA targets like `c_attn` match by suffix."""

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.block = GPT2Block(config, layer_idx=layer_idx)

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return self.block(x, attention_mask=ctx["attention_mask"])


class GPT2Head(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.ln_f = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_epsilon)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return self.lm_head(self.ln_f(scored_positions(x, ctx)))


class GPT2Context(nn.Module):
    def forward(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> dict:
        return causal_context(attention_mask, dtype)


class GPT2Family(ModelFamily):
    name = "gpt2"
    default_target_modules = ("c_attn",)
    fan_in_fan_out = True  # GPT-2 uses transformers' Conv1D (weight stored [in, out])
    config_class = GPT2Config
    fused_qkv_module = "c_attn"

    def layer_specs(self, config: PretrainedConfig) -> list[LayerSpec]:
        n = self.num_blocks(config)
        std = config.initializer_range
        tied = bool(getattr(config, "tie_word_embeddings", True))

        def build_embed() -> nn.Module:
            m = construct(lambda: GPT2Embed(config))
            hf_init_(m, std, skip=(m.wte.weight,))
            init_vocab_matrix(m.wte.weight, std)  # shared stream with a tied head
            return m

        def build_block(i: int) -> nn.Module:
            m = construct(lambda: GPT2BlockLayer(config, layer_idx=i))
            hf_init_(m, std)
            # HF: residual projections scaled by 1/sqrt(2 * n_layer)
            for proj in (m.block.attn.c_proj, m.block.mlp.c_proj):
                hf_init_(proj, c_proj_std(std, config.n_layer))
            return m

        def build_head() -> nn.Module:
            m = construct(lambda: GPT2Head(config))
            hf_init_(m, std, skip=(m.lm_head.weight,) if tied else ())
            if tied:
                # our own frozen copy of wte: same values as the embedding's, never trained apart from it
                init_vocab_matrix(m.lm_head.weight, std)
                m.lm_head.weight.requires_grad_(False)
            return m

        def keys(prefix: str):
            return lambda name: [p + prefix + name for p in _PREFIXES]

        def head_keys(name: str) -> list[str]:
            if name == "lm_head.weight":
                return ["lm_head.weight"] + ([p + "wte.weight" for p in _PREFIXES] if tied else [])
            return [p + name for p in _PREFIXES]

        specs = [LayerSpec(0, "embed", build_embed, keys(""))]
        for i in range(n):
            specs.append(
                LayerSpec(
                    i + 1,
                    "block",
                    (lambda i=i: build_block(i)),
                    (lambda name, i=i: [p + f"h.{i}." + name.removeprefix("block.") for p in _PREFIXES]),
                )
            )
        specs.append(LayerSpec(n + 1, "head", build_head, head_keys))
        return specs

    def make_context(self, config: PretrainedConfig) -> nn.Module:
        return GPT2Context()

    def restrict_fused_qkv(self, layer: nn.Module, config: PretrainedConfig, rank: int, keep: Sequence[str]) -> int:
        return fused_qkv.restrict_fused_qkv(layer, "c_attn", config.hidden_size, rank, keep)
