"""Micro-batching changes when work happens, not what is computed: M = 1 and M = 4 give the same
train/loss and final adapters (fp32, plain SGD, 1e-5) in split, heterogeneous split and
sequential runs, with S = 1 and S = 2 (two clients, FedAvg every 2 steps), in the standard and the
U-shaped topology (clients keep the head, or the last block and the head, and compute the loss).
Split at M = 4 also equals the centralized model at M = 1 in test_split_exactness.py."""

import pytest

from _launch import check, launch, load_adapters, scalars, write_recipe

pytestmark = pytest.mark.launcher

CASES = {
    # name: (mode, client_layers, server_stages, split.client_tail_layers, lora.rank)
    "split-S1": ("split", 2, 1, None, 4),
    "split-S2": ("split", 1, 2, None, 4),
    "hetero-S1": ("split", [1, 2], 1, None, 4),  # the server also runs block 1 for client 0
    "hetero-S2": ("split", [1, 2], 2, None, 4),
    "sequential-S1": ("sequential", 2, 1, None, 4),
    "sequential-S2": ("sequential", 1, 2, None, 4),
    "u-split-S1": ("split", 2, 1, 1, 4),
    "u-split-S2": ("split", 1, 2, 0, 4),
    "u-hetero-S1": ("split", [1, 2], 1, 1, [2, 4]),  # split points and ranks differ (low-rank exchange)
    "u-sequential-S2": ("sequential", 1, 2, 1, 4),
}


def _run(tmp_path, case, micro_batches):
    mode, client_layers, stages, tail, rank = CASES[case]
    folder = tmp_path / f"m{micro_batches}"
    recipe = write_recipe(folder, mode=mode, split={"client_layers": client_layers, "server_stages": stages,
                                                    "micro_batches": micro_batches, "client_tail_layers": tail},
                          lora={"rank": rank, "alpha": 8, "dropout": 0.0},
                          federation={"clients": 2, "aggregate_every": 2},
                          train={"max_steps": 4, "batch_size": 4, "seed": 7, "output_dir": str(folder / "out")})
    check(launch(2 + stages, ["--recipe", str(recipe)]))
    roles = ["client0", "client1"] + [f"server{s}" for s in range(stages)]
    loss_role = "client0" if tail is not None else f"server{stages - 1}"  # whoever computes the loss logs it
    return scalars(folder / "tb" / loss_role), load_adapters(folder / "out", roles)


@pytest.mark.parametrize("case", list(CASES))
def test_four_micro_batches_train_exactly_as_one(tmp_path, case):
    (loss1, adapters1), (loss4, adapters4) = _run(tmp_path, case, 1), _run(tmp_path, case, 4)
    assert len(loss1) == len(loss4) >= 4
    assert max(abs(a - b) for a, b in zip(loss1, loss4)) <= 1e-5
    assert sorted(adapters1) == sorted(adapters4)
    # the runs trained: adapters moved from their initial values (B starts at zero)
    assert any(v.abs().max() > 0 for k, v in adapters4.items() if "lora_B" in k)
    if isinstance(CASES[case][4], list):
        # Per-client ranks: the stacked aggregation re-factors each update B A by an SVD, whose
        # factors are not unique (near-equal singular values rotate them freely); the update is.
        adapters1, adapters4 = _updates(adapters1), _updates(adapters4)
    assert max((adapters1[k] - adapters4[k]).abs().max().item() for k in adapters1) <= 1e-5


def _updates(adapters: dict) -> dict:
    """Each adapted module's update B A."""
    return {k: adapters[k.replace("lora_A", "lora_B")] @ a for k, a in adapters.items() if "lora_A" in k}
