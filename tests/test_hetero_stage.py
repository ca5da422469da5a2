"""Heterogeneous split points inside a server stage: each client's rows enter at its own cut and
the result is, row for row, what the whole model computes (with or without a scored head)."""

import pytest
import torch

from splitlora_ds.config import LoraConfig
from splitlora_ds.models import get_family
from splitlora_ds.partition import centralized_plan, make_split_plan
from splitlora_ds.stage import build_stage

from test_models import tiny_config

L = 3


def _batch(rows, length, seed):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 300, (rows, length), generator=g)
    mask = torch.ones_like(ids)
    mask[0, length - 2:] = 0  # one right-padded row per client
    return ids.masked_fill(mask == 0, 0), mask


@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("scored", [False, True])
def test_rows_enter_at_their_clients_cut(family, scored):
    config = tiny_config(family)
    lora = LoraConfig(rank=[2, 4], target_modules=["c_attn"] if family == "gpt2" else ["q_proj"])
    build = lambda plan, rank=None: build_stage(get_family(family), config, plan, lora, seed=3, rank=rank).eval()
    plan = make_split_plan(L, [2, 1], server_stages=1)  # client0 cuts after block 1, client1 after block 0
    clients = [build(p, rank) for p, rank in zip(plan.clients, [2, 4])]
    server = build(plan.server[0])
    whole = build(centralized_plan(L))
    assert list(server.layers) == ["2", "3", "4"]  # layer 2 (block 1) is shared; layer 2 runs for client1 only

    (ids0, mask0), (ids1, mask1) = _batch(2, 6, 0), _batch(3, 4, 1)
    with torch.no_grad():
        h0, h1 = clients[0](ids0, mask0), clients[1](ids1, mask1)
        # the server pads to the longest client and concatenates in client order
        x = torch.cat([h0, torch.nn.functional.pad(h1, (0, 0, 0, 2))])
        mask = torch.cat([mask0, torch.nn.functional.pad(mask1, (0, 2))])
        row_entry = torch.tensor([3, 3, 2, 2, 2])
        index = mask.flatten().nonzero().squeeze(1) if scored else None
        out = server(x, mask, index, row_entry=row_entry)
        ids = torch.cat([ids0, torch.nn.functional.pad(ids1, (0, 2))])
        ref = whole(ids, mask, index)
    if not scored:
        out, ref = out[mask.bool()], ref[mask.bool()]
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-5)


def test_gradients_reach_every_clients_rows():
    config = tiny_config("gpt2")
    lora = LoraConfig(rank=2, target_modules=["c_attn"])
    plan = make_split_plan(L, [2, 1], server_stages=1)
    server = build_stage(get_family("gpt2"), config, plan.server[0], lora, seed=3)
    x = torch.randn(4, 5, 32, requires_grad=True)
    mask = torch.ones(4, 5, dtype=torch.long)
    out = server(x, mask, row_entry=torch.tensor([2, 3, 2, 3]))
    out.sum().backward()
    assert all(float(g.abs().sum()) > 0 for g in x.grad)
    shared = server.layers["2"].block.attn.c_attn.lora_A.default.weight
    # the shared block's server copy trains on the rows that entered before it only
    assert shared.grad is None or float(shared.grad.abs().sum()) == 0.0  # B = 0 at init: no A gradient
    b = server.layers["2"].block.attn.c_attn.lora_B.default.weight
    assert float(b.grad.abs().sum()) > 0


def test_per_client_and_per_module_ranks():
    lora = LoraConfig(rank=[2, 4], target_modules=["c_attn", "c_fc"], rank_pattern={r"layers\.1\..*c_fc": 6})
    plan = make_split_plan(L, [2, 2], server_stages=1)
    stage = build_stage(get_family("gpt2"), tiny_config("gpt2"), plan.clients[1], lora, seed=3, rank=4)
    ranks = {n.split(".lora_A")[0]: p.shape[0] for n, p in stage.named_parameters() if ".lora_A." in n}
    assert ranks == {"layers.1.block.attn.c_attn": 4, "layers.1.block.mlp.c_fc": 6,
                     "layers.2.block.attn.c_attn": 4, "layers.2.block.mlp.c_fc": 4}
    scaling = dict(stage.named_modules())["layers.1.block.mlp.c_fc"].scaling["default"]
    assert scaling == pytest.approx(lora.alpha / 6)


def test_shared_block_weighs_rows_by_client_while_input_gradients_stay_plain():
    """SharedBlockGrad: the shared block's adapters see each row's gradient times row_scale / W,
    every other parameter and the gradient handed back to the rows are exactly the plain ones."""
    config = tiny_config("gpt2")
    lora = LoraConfig(rank=2, target_modules=["c_attn"])
    plan = make_split_plan(L, [2, 1], server_stages=1)  # layer 2 is shared: rows with entry 2 run it
    server = build_stage(get_family("gpt2"), config, plan.server[0], lora, seed=3).eval()  # no dropout
    with torch.no_grad():  # B != 0 so that A gets a gradient too
        for p in server.adapter_parameters().values():
            p.normal_(0.0, 0.1)
    x0 = torch.randn(4, 5, 32)
    mask = torch.ones(4, 5, dtype=torch.long)
    row_entry = torch.tensor([2, 3, 2, 3])
    row_scale = torch.tensor([3.0, 5.0, 0.5, 5.0])  # rows 0 and 2 run the shared block
    weight = 0.25

    def grads(shared_grad):
        server.zero_grad()
        x = x0.clone().requires_grad_(True)
        (server(x, mask, row_entry=row_entry, shared_grad=shared_grad) ** 2).sum().backward()
        return x.grad, {n: p.grad.clone() for n, p in server.adapter_parameters().items()}

    from splitlora_ds.stage import SharedBlockGrad

    plain_x, plain = grads(None)
    scaled_x, scaled = grads(SharedBlockGrad(row_scale, {2: weight, 3: 1.0, 4: 1.0}))
    torch.testing.assert_close(scaled_x, plain_x, rtol=1e-5, atol=1e-7)
    for name in plain:
        if name.startswith("layers.2."):
            continue
        torch.testing.assert_close(scaled[name], plain[name], rtol=1e-5, atol=1e-7)
    # The shared block alone, row by row: its parameter gradient is the row-weighted sum.
    shared = [n for n in plain if n.startswith("layers.2.")]
    per_row = []
    for r in (0, 2):
        server.zero_grad()
        x = x0.clone().requires_grad_(True)
        keep = torch.zeros(4, 1, 1)
        keep[r] = 1.0
        out = server(x, mask, row_entry=row_entry)
        (out ** 2 * keep).sum().backward()
        per_row.append({n: server.adapter_parameters()[n].grad.clone() for n in shared})
    for name in shared:
        expected = (row_scale[0] / weight) * per_row[0][name] + (row_scale[2] / weight) * per_row[1][name]
        torch.testing.assert_close(scaled[name], expected, rtol=1e-4, atol=1e-6)
