"""Everything a stage computes with follows `.to(device)`: the CPU stand-ins for GPU bugs where a
hook, buffer or mask stays on the CPU while the parameters move to CUDA."""

import functools

import torch

from splitlora_ds.federation.lowrank import refactor
from splitlora_ds.models.fused_qkv import PINNED_BUFFER

from test_fused_qkv import H, R, c_attn, tiny_stage


def _captured_tensors(hook) -> list[torch.Tensor]:
    """Tensors a hook holds on to by itself (default arguments, closure cells, partial arguments)."""
    if isinstance(hook, functools.partial):
        held = [*hook.args, *hook.keywords.values()] + _captured_tensors(hook.func)
    else:
        held = list(getattr(hook, "__defaults__", None) or ())
        held += [cell.cell_contents for cell in (getattr(hook, "__closure__", None) or ())]
    return [t for t in held if isinstance(t, torch.Tensor)]


def test_no_gradient_hook_holds_a_tensor_of_its_own():
    stage = tiny_stage(["q", "v"])
    hooked = [p for p in stage.parameters() if p._backward_hooks]
    assert hooked, "fused q/v LoRA pins B through a gradient hook"
    for p in hooked:
        for hook in p._backward_hooks.values():
            assert not _captured_tensors(hook), "a captured tensor would not follow .to(device)"


def test_the_pinned_mask_is_a_buffer_that_moves_with_the_stage():
    stage = tiny_stage(["q", "v"])
    lora_b = c_attn(stage).lora_B["default"]
    pinned = getattr(lora_b, PINNED_BUFFER)
    assert pinned.shape == (3 * H, 2 * R) and pinned[H:2 * H].all() and not pinned[:H, :R].any()
    assert PINNED_BUFFER not in lora_b.state_dict()  # checkpoints and PEFT exports stay plain
    moved = stage.to("meta")
    assert getattr(c_attn(moved).lora_B["default"], PINNED_BUFFER).device.type == "meta"


def test_the_gradient_hook_reads_the_buffer_the_module_holds_now():
    stage = tiny_stage(["q", "v"])
    lora_b = c_attn(stage).lora_B["default"]
    setattr(lora_b, PINNED_BUFFER, torch.zeros_like(getattr(lora_b, PINNED_BUFFER)))  # as after a move
    ids = torch.randint(0, 257, (2, 12))
    stage(ids, torch.ones_like(ids)).sum().backward()
    assert lora_b.weight.grad[H:2 * H].abs().sum() > 0  # nothing pinned any more: the key slice moves


def test_refactor_makes_extra_rank_directions_on_the_inputs_device():
    # A rank larger than the stack's (a re-plan growing a module) draws orthonormal complement
    # rows; they must come out on the inputs' device, not the CPU.
    A = torch.randn(2, 6, dtype=torch.float64, device="meta")
    B = torch.randn(5, 2, dtype=torch.float64, device="meta")
    A_new, B_new = refactor(A, B, rank=4, scale=1.0)
    assert A_new.device.type == B_new.device.type == "meta"
    assert A_new.shape == (4, 6) and B_new.shape == (5, 4)
