"""Model-family interface: a causal LM as a flat list of lazily built layers.

Index 0 is the embedding, 1..L the transformer blocks, L+1 the head (final norm + LM head).
A pipeline stage builds only the specs of its own slice, so no rank materialises the whole model.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import math
import os
import re
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Callable, Iterator, Sequence

import torch
from torch import nn
from transformers import AutoConfig, PretrainedConfig
from transformers.pytorch_utils import Conv1D

from ..errors import ConfigError

ATTN_IMPLEMENTATIONS = ("sdpa", "eager")


@dataclass(frozen=True)
class LayerSpec:
    index: int  # 0 = embed, 1..L = blocks, L+1 = head
    kind: str  # "embed" | "block" | "head"
    build: Callable[[], nn.Module]  # randomly initialised layer (HF init scheme)
    # one of OUR param/buffer names -> candidate HF checkpoint keys, in order of preference
    checkpoint_keys: Callable[[str], list[str]]


# ---------------------------------------------------------------------------------------------
# Deterministic, per-layer random init
# ---------------------------------------------------------------------------------------------

# The base seed of the build in progress. Tied vocab matrices (embedding wte == head lm_head) are
# drawn from a generator derived from this seed alone, not from the layer index, so an embedding
# and a head built by different ranks agree bit for bit.
_BUILD_SEED: contextvars.ContextVar[int] = contextvars.ContextVar("splitlora_build_seed", default=0)


def derive_seed(seed: int, *parts: object) -> int:
    """A stable 63-bit seed from (seed, *parts); stable across processes, unlike hash()."""
    text = ":".join(str(p) for p in (seed, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "little") >> 1


@contextlib.contextmanager
def seeded_build(seed: int, *parts: object) -> Iterator[None]:
    """Fork the CPU RNG, seed it from (seed, *parts) and publish `seed` for tied-vocab init.

    Used by build_layer and lora.build_lora_layer; the caller's RNG state is restored on exit.
    """
    with torch.random.fork_rng(devices=[]):
        # only the CPU generator: CUDA state is not forked, so torch.manual_seed would leak into it
        torch.default_generator.manual_seed(derive_seed(seed, *parts))
        token = _BUILD_SEED.set(seed)
        try:
            yield
        finally:
            _BUILD_SEED.reset(token)


def build_layer(spec: LayerSpec, seed: int) -> nn.Module:
    """Build one layer, randomly initialised, deterministically from (seed, spec.index).

    Independent of which other layers this process builds and of the global RNG state (which is
    restored afterwards). For base + LoRA adapters use `models.lora.build_lora_layer`.
    """
    with seeded_build(seed, spec.index):
        return spec.build()


def _fill_normal(t: torch.Tensor, std: float, generator: torch.Generator | None = None) -> None:
    # Draw on the CPU (seeded) generator whatever the tensor's device, so a layer built under
    # `torch.device("cuda")` gets the same values as one built on the CPU. Meta: nothing to fill.
    if t.is_meta:
        return
    with torch.no_grad():
        if t.device.type == "cpu":
            t.normal_(0.0, std, generator=generator)
        else:
            t.copy_(torch.empty(t.shape, dtype=t.dtype).normal_(0.0, std, generator=generator))


def init_vocab_matrix(weight: torch.Tensor, std: float, padding_idx: int | None = None) -> None:
    """Init a (possibly tied) vocab matrix from a generator derived from the build seed only."""
    if weight.is_meta:
        return
    gen = torch.Generator().manual_seed(derive_seed(_BUILD_SEED.get(), "vocab"))
    _fill_normal(weight, std, generator=gen)
    if padding_idx is not None:
        with torch.no_grad():
            weight[padding_idx].zero_()


def hf_init_(module: nn.Module, std: float, skip: tuple[nn.Parameter, ...] = ()) -> None:
    """HF's default scheme: N(0, std) Linear/Conv1D/Embedding weights, zero biases, norms = 1/0."""
    skip_ids = {id(p) for p in skip}
    for m in module.modules():
        weight = getattr(m, "weight", None)
        bias = getattr(m, "bias", None)
        is_norm = isinstance(m, nn.LayerNorm) or "RMSNorm" in type(m).__name__ or "LayerNorm" in type(m).__name__
        with torch.no_grad():
            if isinstance(m, (nn.Linear, Conv1D, nn.Embedding)):
                if weight is not None and id(weight) not in skip_ids:
                    _fill_normal(weight, std)
                    pad = getattr(m, "padding_idx", None)
                    if isinstance(m, nn.Embedding) and pad is not None and not weight.is_meta:
                        weight[pad].zero_()
                if isinstance(bias, torch.Tensor) and not bias.is_meta:
                    bias.zero_()
            elif is_norm:
                if isinstance(weight, torch.Tensor) and not weight.is_meta:
                    weight.fill_(1.0)
                if isinstance(bias, torch.Tensor) and not bias.is_meta:
                    bias.zero_()


def construct(factory: Callable[[], nn.Module]) -> nn.Module:
    """Construct on the meta device (skipping torch's default init, which we overwrite anyway),
    then materialise on the caller's default device (stays meta under `torch.device("meta")`).
    Only for modules without buffers: to_empty leaves buffers uninitialised."""
    device = torch.get_default_device()
    with torch.device("meta"):
        module = factory()
    assert not list(module.buffers()), "construct() is only for buffer-free modules"
    if device.type != "meta":
        module = module.to_empty(device=device)
    return module


# ---------------------------------------------------------------------------------------------
# Family interface
# ---------------------------------------------------------------------------------------------


def causal_context(attention_mask: torch.Tensor, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """position_ids [B,T] and an explicit additive block-causal mask [B,1,T,T].

    `attention_mask` [B,T] holds SEGMENT IDS: 0 = padding, a positive value = the id of the
    sequence (segment) the position belongs to, so several sequences can share a packed row
    (runtime.packing). A plain 0/1 mask is one segment per row, right or left padded.
    - Query i may attend key j iff j <= i and both carry the same nonzero id (block-diagonal
      causal). A padding query attends to itself only, so no row of the mask is all-masked.
    - A token's position is the number of earlier positions of its segment in the row: 0 at a
      segment's first token. For a 0/1 mask that is the number of real tokens before it, as a
      single-sequence model numbers them; padding positions get a value >= 0 that means nothing.
    Both depend on the ids only through "same id", so dropping padding from a row (packing) keeps
    every real token's mask and position: a packed run computes what the padded one does.

    Explicit so it does not depend on the attention implementation: eager attention given no mask
    attends both ways; sdpa only becomes causal when it gets no mask at all.
    """
    if attention_mask.dim() != 2:
        raise ValueError(f"attention_mask must be [B,T], got shape {tuple(attention_mask.shape)}")
    seg = attention_mask.to(torch.long)
    t = seg.shape[1]
    causal = torch.ones(t, t, dtype=torch.bool, device=seg.device).tril()
    same = seg[:, :, None] == seg[:, None, :]  # [B,T(query),T(key)]
    real_key = (seg > 0)[:, None, :]
    allowed = causal & same & (real_key | torch.eye(t, dtype=torch.bool, device=seg.device))
    # counting (not cumsum from a run start) keeps today's numbering for a 0/1 mask with holes
    position_ids = (causal & same).sum(-1) - 1  # >= 0: the diagonal always counts
    additive = torch.zeros((seg.shape[0], 1, t, t), dtype=dtype, device=seg.device)
    additive.masked_fill_(~allowed[:, None], torch.finfo(dtype).min)
    return {"position_ids": position_ids, "attention_mask": additive}


def scored_positions(x: torch.Tensor, ctx: dict) -> torch.Tensor:
    """The hidden states the head should project: all of them, or, when the context names the
    positions that have a target (`score_index`, flat over batch x time), only those [N, H].
    The vocabulary projection dominates a small model's cost, and prompt and padding positions
    have nothing to score."""
    index = ctx.get("score_index")
    return x if index is None else x.flatten(0, 1).index_select(0, index)


_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def looks_like_hub_id(source: str) -> bool:
    """'gpt2' or 'org/name'; anything with a path-ish shape is treated as a (missing) local dir."""
    return bool(_HUB_ID.match(source)) and not source.endswith((".", "/")) and ".." not in source


class ModelFamily(ABC):
    name: str
    default_target_modules: tuple[str, ...]
    fan_in_fan_out: bool
    config_class: type[PretrainedConfig]
    # keys the config class accepts although they are not in to_dict() (legacy aliases)
    extra_config_keys: tuple[str, ...] = ()

    def _known_keys(self, config: PretrainedConfig) -> set[str]:
        keys = set(config.to_dict()) | set(getattr(config, "attribute_map", {})) | set(self.extra_config_keys)
        return {k for k in keys if not k.startswith("_")}

    def _check_overrides(self, config: PretrainedConfig, overrides: dict) -> None:
        known = self._known_keys(config)
        for key in overrides:
            if key not in known:
                raise ConfigError(
                    f"model.config.{key}: unknown {self.name} config key {key!r} (value {overrides[key]!r})"
                )

    def load_config(self, pretrained: str | None, overrides: dict, attn_implementation: str,
                    offline_known: bool = False) -> PretrainedConfig:
        """`offline_known`: for a hub id in models.known and no local directory of that name, use
        the tabled architecture instead of asking the hub (planning only: no weights come with it)."""
        overrides = dict(overrides or {})
        if offline_known and pretrained is not None and not os.path.isdir(pretrained):
            from .known import known_config

            table = known_config(pretrained)
            if table is not None:
                self._check_overrides(self.config_class(), overrides)
                return self.load_config(None, {**table, **overrides}, attn_implementation)
        if attn_implementation not in ATTN_IMPLEMENTATIONS:
            raise ConfigError(
                f"model.attn_implementation: unknown value {attn_implementation!r}; "
                f"known: {', '.join(ATTN_IMPLEMENTATIONS)}"
            )
        if pretrained is None:
            self._check_overrides(self.config_class(), overrides)
            try:
                config = self.config_class(**overrides)
            except (TypeError, ValueError) as e:
                raise ConfigError(f"model.config: invalid {self.name} config {overrides!r}: {e}") from e
        else:
            if not os.path.isdir(pretrained) and not looks_like_hub_id(pretrained):
                raise ConfigError(f"model.pretrained: no such directory {pretrained!r}")
            try:
                base = AutoConfig.from_pretrained(pretrained)
            except (OSError, ValueError) as e:
                raise ConfigError(f"model.pretrained: cannot load a config from {pretrained!r}: {e}") from e
            if base.model_type != self.name:
                raise ConfigError(
                    f"model.family: {self.name!r} but {pretrained!r} holds a {base.model_type!r} model"
                )
            self._check_overrides(base, overrides)
            config = AutoConfig.from_pretrained(pretrained, **overrides) if overrides else base
        config._attn_implementation = attn_implementation
        if config._attn_implementation != attn_implementation:  # pragma: no cover - transformers changed
            raise ConfigError(f"model.attn_implementation: {attn_implementation!r} did not take effect")
        config.use_cache = False
        return config

    def num_blocks(self, config: PretrainedConfig) -> int:
        return int(config.num_hidden_layers)

    @abstractmethod
    def layer_specs(self, config: PretrainedConfig) -> list[LayerSpec]: ...

    @abstractmethod
    def make_context(self, config: PretrainedConfig) -> nn.Module: ...

    fused_qkv_module: str | None = None  # the fused q|k|v projection's name, if the family has one

    def restrict_fused_qkv(self, layer: nn.Module, config: PretrainedConfig, rank: int, keep: Sequence[str]) -> int:
        """Limit LoRA on the fused q|k|v projection to the `keep` slices (lora.fused_qkv); returns
        the number of pinned adapter entries. Families without a fused projection refuse."""
        raise ConfigError(f"lora.fused_qkv: {self.name} has no fused q|k|v projection; "
                          "name the projections (e.g. q_proj, v_proj) in lora.target_modules instead")


def strip_peft(name: str) -> str:
    """Our name of a base weight after LoRA injection ('x.c_attn.base_layer.weight') -> plain name."""
    return name.replace(".base_layer.", ".")


def named_tensors(module: nn.Module) -> Iterator[tuple[str, torch.Tensor, bool]]:
    """(name, tensor, is_param) for params and persistent buffers, LoRA adapters excluded."""
    persistent = set(module.state_dict(keep_vars=True))
    for name, p in module.named_parameters():
        if "lora_" not in name:
            yield name, p, True
    for name, b in module.named_buffers():
        if name in persistent and "lora_" not in name:
            yield name, b, False


def c_proj_std(std: float, n_layer: int) -> float:
    """GPT-2 residual-projection scaling: 2 residual paths per block."""
    return std / math.sqrt(2 * n_layer)
