"""With one client, I = 1 and plain SGD, split training is centralized LoRA, number for number:
the split runs pipeline M = 4 micro-batches and pack their rows; the centralized reference runs
each step's batch whole (M = 1), so this also shows that micro-batching leaves the math alone."""

import pytest

from _launch import check, launch, load_adapters, run_single, scalars, write_recipe
from splitlora_ds.metrics import read_scalars

pytestmark = pytest.mark.launcher


# A held-out quarter of the prompts, evaluated after steps 2 and 4.
EVAL = {"data": {"num_samples": 64, "validation_fraction": 0.25}, "eval": {"every": 2}}


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def centralized(request, tmp_path_factory):
    tmp = tmp_path_factory.mktemp(f"central-{request.param}")
    recipe = write_recipe(tmp, request.param, mode="centralized", train={"output_dir": str(tmp / "out")},
                          split={"micro_batches": 1}, **EVAL)
    check(run_single(["--recipe", str(recipe)]))
    return (request.param, scalars(tmp / "tb" / "centralized"), load_adapters(tmp / "out", ["centralized"]),
            scalars(tmp / "tb" / "centralized", "eval/loss"))


@pytest.mark.parametrize("server_stages,client_layers", [(1, 2), (2, 1)])
def test_split_equals_centralized(centralized, tmp_path, server_stages, client_layers):
    family, ref_losses, ref_adapters, ref_eval = centralized
    recipe = write_recipe(tmp_path, family, split={"client_layers": client_layers, "server_stages": server_stages,
                                                   "micro_batches": 4},
                          train={"output_dir": str(tmp_path / "out")}, **EVAL)
    check(launch(1 + server_stages, ["--recipe", str(recipe)]))
    last = f"server{server_stages - 1}"
    split_losses = scalars(tmp_path / "tb" / last)
    assert len(split_losses) == len(ref_losses) == 4
    assert max(abs(a - b) for a, b in zip(split_losses, ref_losses)) <= 1e-5
    assert ref_losses[-1] < ref_losses[0]  # SGD actually moved the adapters
    split_eval = scalars(tmp_path / "tb" / last, "eval/loss")
    assert len(split_eval) == len(ref_eval) == 2
    assert max(abs(a - b) for a, b in zip(split_eval, ref_eval)) <= 1e-5

    roles = ["client0"] + [f"server{s}" for s in range(server_stages)]
    split_adapters = load_adapters(tmp_path / "out", roles)
    assert sorted(split_adapters) == sorted(ref_adapters)
    diff = max((split_adapters[k] - ref_adapters[k]).abs().max().item() for k in ref_adapters)
    assert diff <= 1e-5
    # The B factors start at zero: a non-zero B proves both sides trained.
    assert all(split_adapters[k].abs().max() > 0 for k in split_adapters if "lora_B" in k)


@pytest.mark.parametrize("server_stages,client_layers,tail", [(1, 1, 0), (2, 1, 1)])
def test_u_shaped_split_equals_centralized(centralized, tmp_path, server_stages, client_layers, tail):
    """The client keeps the head (tail 0) or the last block and the head (tail 1) and computes its
    own loss: still the centralized model's losses and adapters, and client0 logs the loss."""
    family, ref_losses, ref_adapters, ref_eval = centralized
    recipe = write_recipe(tmp_path, family, split={"client_layers": client_layers, "server_stages": server_stages,
                                                   "micro_batches": 4, "client_tail_layers": tail},
                          train={"output_dir": str(tmp_path / "out")}, **EVAL)
    check(launch(1 + server_stages, ["--recipe", str(recipe)]))
    losses = scalars(tmp_path / "tb" / "client0")
    assert len(losses) == 4 and max(abs(a - b) for a, b in zip(losses, ref_losses)) <= 1e-5
    with pytest.raises(KeyError):  # the server never sees a loss
        scalars(tmp_path / "tb" / f"server{server_stages - 1}")
    split_eval = scalars(tmp_path / "tb" / "client0", "eval/loss")
    assert len(split_eval) == 2 and max(abs(a - b) for a, b in zip(split_eval, ref_eval)) <= 1e-5
    adapters = load_adapters(tmp_path / "out", ["client0"] + [f"server{s}" for s in range(server_stages)])
    assert sorted(adapters) == sorted(ref_adapters)
    assert max((adapters[k] - ref_adapters[k]).abs().max().item() for k in ref_adapters) <= 1e-5
    client = load_adapters(tmp_path / "out", ["client0"])
    assert any(k.startswith("layers.4.") for k in client) == (tail == 1)  # the last block's adapters


def test_bf16_wire_halves_traffic_and_stays_close(centralized, tmp_path):
    family, ref_losses, _, _ = centralized
    runs = {}
    for wire in ("float32", "bfloat16"):
        recipe = write_recipe(tmp_path / wire, family, split={"wire_dtype": wire}, **EVAL)
        check(launch(2, ["--recipe", str(recipe)]))
        runs[wire] = tmp_path / wire / "tb"
    sent = {w: read_scalars(str(d / "client0"), "comm/bytes_sent")[-1][1] for w, d in runs.items()}
    # Activations dominate what a client sends; masks, labels and headers stay int64.
    assert 0.5 < sent["bfloat16"] / sent["float32"] < 0.75
    wire_losses = scalars(runs["bfloat16"] / "server0")
    assert max(abs(a - b) for a, b in zip(wire_losses, ref_losses)) < 1e-2
    assert scalars(runs["float32"] / "server0") == pytest.approx(ref_losses, abs=1e-5)
