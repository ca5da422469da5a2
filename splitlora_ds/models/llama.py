"""LLaMA as embed / blocks / head layers wrapping transformers' own LlamaDecoderLayer."""

from __future__ import annotations

import torch
from torch import nn
from transformers import LlamaConfig, PretrainedConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRMSNorm, LlamaRotaryEmbedding

from .base import LayerSpec, ModelFamily, causal_context, construct, hf_init_, init_vocab_matrix, scored_positions


class LlamaEmbed(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(config.vocab_size, config.hidden_size, config.pad_token_id)

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return self.embed_tokens(x)


class LlamaBlockLayer(nn.Module):
    """Holds HF's LlamaDecoderLayer as `block`, so LoRA targets like `q_proj` match by suffix."""

    def __init__(self, config: PretrainedConfig, layer_idx: int) -> None:
        super().__init__()
        self.block = LlamaDecoderLayer(config, layer_idx=layer_idx)

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return self.block(
            x,
            attention_mask=ctx["attention_mask"],
            position_ids=ctx["position_ids"],
            position_embeddings=ctx["position_embeddings"],
        )


class LlamaHead(nn.Module):
    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.norm = LlamaRMSNorm(config.hidden_size, eps=config.rms_norm_eps)
        self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)

    def forward(self, x: torch.Tensor, ctx: dict) -> torch.Tensor:
        return self.lm_head(self.norm(scored_positions(x, ctx)))


class LlamaContext(nn.Module):
    """Per-stage rotary embedding (buffers only, no trainable params) + the causal mask."""

    def __init__(self, config: PretrainedConfig) -> None:
        super().__init__()
        self.rotary_emb = LlamaRotaryEmbedding(config=config)

    def forward(self, attention_mask: torch.Tensor, dtype: torch.dtype) -> dict:
        ctx = causal_context(attention_mask, dtype)
        # the rotary module only reads dtype/device from its first argument
        probe = torch.empty(0, dtype=dtype, device=attention_mask.device)
        ctx["position_embeddings"] = self.rotary_emb(probe, ctx["position_ids"])
        return ctx


class LlamaFamily(ModelFamily):
    name = "llama"
    default_target_modules = ("q_proj", "v_proj")
    fan_in_fan_out = False
    config_class = LlamaConfig
    extra_config_keys = ("rope_theta", "rope_scaling")  # legacy aliases folded into rope_parameters

    def layer_specs(self, config: PretrainedConfig) -> list[LayerSpec]:
        n = self.num_blocks(config)
        std = config.initializer_range
        tied = bool(getattr(config, "tie_word_embeddings", False))
        pad = config.pad_token_id

        def build_embed() -> nn.Module:
            m = construct(lambda: LlamaEmbed(config))
            init_vocab_matrix(m.embed_tokens.weight, std, pad)  # shared stream with a tied head
            return m

        def build_block(i: int) -> nn.Module:
            m = construct(lambda: LlamaBlockLayer(config, layer_idx=i))
            hf_init_(m, std)
            return m

        def build_head() -> nn.Module:
            m = construct(lambda: LlamaHead(config))
            hf_init_(m, std, skip=(m.lm_head.weight,) if tied else ())
            if tied:
                # our own frozen copy of embed_tokens (HF shares the tensor, zeroed pad row included)
                init_vocab_matrix(m.lm_head.weight, std, pad)
                m.lm_head.weight.requires_grad_(False)
            return m

        def head_keys(name: str) -> list[str]:
            if name == "lm_head.weight":
                return ["lm_head.weight"] + (["model.embed_tokens.weight"] if tied else [])
            return ["model." + name]

        specs = [LayerSpec(0, "embed", build_embed, lambda name: ["model." + name])]
        for i in range(n):
            specs.append(
                LayerSpec(
                    i + 1,
                    "block",
                    (lambda i=i: build_block(i)),
                    (lambda name, i=i: [f"model.layers.{i}." + name.removeprefix("block.")]),
                )
            )
        specs.append(LayerSpec(n + 1, "head", build_head, head_keys))
        return specs

    def make_context(self, config: PretrainedConfig) -> nn.Module:
        return LlamaContext(config)
