"""LoRA on GPT-2's fused c_attn limited to q and v: the LoRA paper's update, as a plain PEFT adapter."""

import torch

from splitlora_ds.config import LoraConfig
from splitlora_ds.models import get_family
from splitlora_ds.partition import centralized_plan
from splitlora_ds.stage import build_stage

H, R, ALPHA = 16, 2, 8.0


def tiny_stage(fused):
    family = get_family("gpt2")
    cfg = family.load_config(None, {"n_layer": 2, "n_embd": H, "n_head": 2, "vocab_size": 257, "n_positions": 32,
                                    "bos_token_id": 256, "eos_token_id": 256}, "eager")
    lora = LoraConfig(rank=R, alpha=ALPHA, target_modules=["c_attn"], fused_qkv=fused)
    return build_stage(family, cfg, centralized_plan(2), lora, seed=1)


def c_attn(stage):
    return stage.layers["1"].block.attn.c_attn


def train_a_little(stage, steps=3):
    opt = torch.optim.AdamW(stage.adapter_parameters().values(), lr=0.05, weight_decay=0.1)
    ids = torch.randint(0, 257, (2, 12))
    mask = torch.ones_like(ids)
    for _ in range(steps):
        logits = stage(ids, mask)
        loss = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 257), ids[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()


def test_key_slice_stays_untouched_and_update_is_per_slice_lora():
    stage = tiny_stage(["q", "v"])
    train_a_little(stage)
    m = c_attn(stage)
    a, b = m.lora_A["default"].weight, m.lora_B["default"].weight  # [2R, H], [3H, 2R]
    assert a.shape == (2 * R, H) and b.shape == (3 * H, 2 * R)
    assert m.scaling["default"] == ALPHA / R  # alpha doubled with the rank: loralib's alpha / r
    delta = m.scaling["default"] * b @ a  # [3H, H] in q|k|v row order
    assert torch.count_nonzero(delta[H:2 * H]) == 0  # the key projection never changes
    aq, av = a[:R], a[R:]
    bq, bv = b[:H, :R], b[2 * H:, R:]
    torch.testing.assert_close(delta[:H], (ALPHA / R) * bq @ aq)
    torch.testing.assert_close(delta[2 * H:], (ALPHA / R) * bv @ av)
    assert bq.abs().max() > 0 and bv.abs().max() > 0  # q and v did train
    # Off-block entries (q rows x v columns and vice versa) stayed exactly zero under AdamW + decay.
    assert torch.count_nonzero(b[:H, R:]) == 0 and torch.count_nonzero(b[2 * H:, :R]) == 0


def test_trainable_count_excludes_pinned_entries():
    stage = tiny_stage(["q", "v"])
    _, trainable = stage.parameter_counts()
    assert trainable == 2 * 2 * (R * H + H * R)  # 2 blocks x (q, v) x (A_s + B_s)
    _, all_slices = tiny_stage(None).parameter_counts()
    assert all_slices == 2 * (R * H + 3 * H * R)


def test_without_restriction_every_slice_moves():
    stage = tiny_stage(None)
    train_a_little(stage)
    m = c_attn(stage)
    delta = m.lora_B["default"].weight @ m.lora_A["default"].weight
    assert torch.count_nonzero(delta[H:2 * H]) > 0
