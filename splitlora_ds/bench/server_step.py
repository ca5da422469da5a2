"""One training step of a server stage, as the server runs it, for the MFU benchmark (bench/mfu.py).

The stage is the project's own: `build_stage` over a `StagePlan` of the LLaMA layer list, with
peft LoRA on the targets. Its input is what a server receives from its clients: hidden states
of every client's rows batched together, a leaf that needs a gradient (the server sends it back).
A middle stage backpropagates a gradient for its output (as the next stage sends one); the last
stage, `with_head`, projects only positions that have a next-token target and computes the loss
as engine._forward / engine._compute_loss do.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from transformers import PretrainedConfig

from ..config import LoraConfig
from ..errors import ConfigError
from ..models import get_family, target_modules_in_family
from ..models.known import known_config
from ..partition import StagePlan
from ..stage import Stage, build_stage

# Architectures the benchmark can build. llama-7b is the table the dry runs use for
# meta-llama/Llama-2-7b-hf; tiny is a small LLaMA of the same structure for CPU tests.
MODELS: MappingProxyType = MappingProxyType({
    "llama-7b": known_config("meta-llama/Llama-2-7b-hf"),
    "tiny": {"vocab_size": 512, "hidden_size": 128, "intermediate_size": 352, "num_hidden_layers": 8,
             "num_attention_heads": 4, "num_key_value_heads": 4, "max_position_embeddings": 1024,
             "rms_norm_eps": 1e-5, "bos_token_id": 1, "eos_token_id": 2, "tie_word_embeddings": False},
})


def model_config(model: str, seq: int) -> PretrainedConfig:
    """The architecture, checked against the sequence length before anything is built."""
    if model not in MODELS:
        raise ConfigError(f"--model: unknown model {model!r}; known: {', '.join(MODELS)}")
    config = get_family("llama").load_config(None, dict(MODELS[model]), "sdpa")
    if seq > config.max_position_embeddings:
        raise ConfigError(f"--seq: {seq} exceeds the model's {config.max_position_embeddings} positions")
    return config


def check_targets(config: PretrainedConfig, targets: list[str]) -> None:
    """Every LoRA target names a LLaMA module (checked on the meta device, before the build)."""
    try:
        target_modules_in_family(get_family("llama"), config, targets)
    except ConfigError as e:
        raise ConfigError(f"--targets: {e}") from None


def server_plan(num_blocks: int, layers: int, with_head: bool) -> StagePlan:
    """`layers` blocks of the server: the last ones plus the head (`with_head`), or a slice from
    the middle of the model. Layer indices follow models.base.LayerSpec (0 = embeddings)."""
    if not 1 <= layers < num_blocks:
        raise ConfigError(f"--layers: {layers} is out of range; the model has {num_blocks} blocks and a "
                          f"client holds at least one, so a server stage holds 1..{num_blocks - 1}")
    if with_head:
        stop = num_blocks + 2
        start = stop - 1 - layers
    else:
        start = 1 + (num_blocks - layers) // 2
        stop = start + layers
    return StagePlan("server0", start, stop, num_blocks)


@dataclass
class StepInputs:
    hidden: torch.Tensor  # [rows, seq, H], a leaf that requires grad (the clients' activations)
    attention_mask: torch.Tensor  # [rows, seq]
    score_index: Optional[torch.Tensor]  # flat positions the head projects (with the head)
    targets: Optional[torch.Tensor]  # their next tokens (with the head)
    grad_output: Optional[torch.Tensor]  # the next stage's gradient for our output (without)


def build_server_stage(config: PretrainedConfig, layers: int, with_head: bool, lora: LoraConfig,
                       device: torch.device, dtype: torch.dtype, seed: int = 0) -> Stage:
    plan = server_plan(int(config.num_hidden_layers), layers, with_head)
    # Built under the target device: construct() materialises each layer there and the seeded
    # init copies CPU draws into it, so a 7B block never sits in host memory on a GPU node.
    # The cast afterwards matches what DeepSpeed's bf16 mode does to the whole module.
    with torch.device(device):
        stage = build_stage(get_family("llama"), config, plan, lora, seed)
    return stage.to(device=device, dtype=dtype)


def make_inputs(stage: Stage, config: PretrainedConfig, rows: int, seq: int, seed: int = 0) -> StepInputs:
    """Random activations and targets, every row full length (no padding: every position is
    real work, so the FLOP count is that of `rows x seq` tokens)."""
    device, dtype = next(stage.parameters()).device, stage.compute_dtype
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(rows, seq, config.hidden_size, generator=gen).to(device, dtype).requires_grad_(True)
    mask = torch.ones(rows, seq, dtype=torch.long, device=device)
    if stage.plan.holds_head:
        labels = torch.randint(0, config.vocab_size, (rows, seq), generator=gen).to(device)
        # As engine._forward: position t predicts token t + 1, so the last position scores nothing.
        has_target = F.pad(torch.ones(rows, seq - 1, dtype=torch.bool, device=device), (0, 1), value=False)
        return StepInputs(hidden, mask, has_target.flatten().nonzero().squeeze(1), labels[:, 1:].flatten(), None)
    grad_output = torch.randn(rows, seq, config.hidden_size, generator=gen).to(device, dtype)
    return StepInputs(hidden, mask, None, None, grad_output)


def make_step(stage: Stage, inputs: StepInputs) -> Callable[[], None]:
    """Forward + backward of one step (gradients of the adapters and of the input activations).
    The optimizer step is left out: it touches only the adapters, a tiny share of the time."""
    stage.train()
    params = list(stage.adapter_parameters().values())

    def step() -> None:
        inputs.hidden.grad = None
        for p in params:
            p.grad = None
        out = stage(inputs.hidden, inputs.attention_mask, inputs.score_index)
        if inputs.targets is not None:
            loss = F.cross_entropy(out.float(), inputs.targets)  # logits [N, V], as engine._compute_loss
            loss.backward()
        else:
            # Same gradients as engine._backward's sum(out * g), without materialising the product.
            out.backward(inputs.grad_output)

    return step
