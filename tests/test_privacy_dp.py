"""Differential privacy: per-sample clipping of activations, DP-FedAvg update clipping with noise
shares, and epsilons from Opacus's accountant, in the run's logs."""

import math

import pytest
import torch

from _launch import check, launch, scalars, write_recipe
from splitlora_ds.config import PrivacyConfig
from splitlora_ds.privacy.dp import ClientPrivacy, clip_rows, clip_update_, epsilon


def test_rows_are_clipped_over_their_real_positions_only():
    h = torch.randn(3, 5, 4) * 10
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 0, 0, 0, 0]])
    h[2, 0] = torch.tensor([0.1, 0.0, 0.0, 0.0])  # already inside the ball: unchanged
    out = clip_rows(h, mask, max_norm=2.0)
    norms = (out * mask.unsqueeze(-1)).flatten(1).norm(dim=1)
    assert torch.allclose(norms[:2], torch.tensor([2.0, 2.0])) and torch.allclose(out[2, 0], h[2, 0])
    assert out[0, 3:].abs().sum() == 0  # padding carries nothing
    # gradients flow through the clip (the client's adapters train through it)
    x = h.clone().requires_grad_(True)
    clip_rows(x, mask, 2.0).sum().backward()
    assert x.grad is not None and x.grad[1].abs().sum() > 0


def test_update_clipping_scales_the_whole_update():
    start = [torch.zeros(3), torch.ones(2)]
    current = [torch.tensor([3.0, 0.0, 0.0]), torch.tensor([1.0, 5.0])]  # update norm 5
    assert clip_update_(current, start, 1.0) == pytest.approx(5.0)
    assert torch.allclose(current[0], torch.tensor([0.6, 0.0, 0.0])) and torch.allclose(current[1], torch.tensor([1.0, 1.8]))


def test_noise_shares_of_all_clients_add_up_to_the_mechanism():
    torch.manual_seed(0)
    cfg = PrivacyConfig(update_clip=0.5, update_noise=2.0)
    clients, weights = 4, [0.1, 0.2, 0.3, 0.4]
    total = torch.zeros(20000)
    for w in weights:
        dp = ClientPrivacy(cfg, sample_rate=0.1, clients=clients, max_weight=max(weights))
        dp.remember_start([torch.zeros(20000)])
        contribution = [torch.zeros(20000)]
        dp.before_aggregation_(contribution, w)
        total += w * contribution[0]  # the all-reduce's weighted sum
    assert total.std().item() == pytest.approx(2.0 * 0.5 * 0.4, rel=0.03)  # sigma * S * w_max


def test_activation_release_adds_noise_of_sigma_times_clip_and_counts_training_releases():
    torch.manual_seed(0)
    dp = ClientPrivacy(PrivacyConfig(activation_clip=1.0, activation_noise=3.0), 0.25, 2, 0.5)
    h, mask = torch.zeros(8, 64, 32), torch.ones(8, 64)
    assert dp.release(h, mask, training=True).std().item() == pytest.approx(3.0, rel=0.03)
    dp.release(h, mask, training=False)
    assert dp.releases == 1
    assert dp.epsilons()["privacy/epsilon_activations"] == epsilon(3.0, 0.25, 1, 1e-5)


def test_epsilon_comes_from_opacus_and_grows_with_steps():
    from opacus.accountants import RDPAccountant

    accountant = RDPAccountant()
    for _ in range(50):
        accountant.step(noise_multiplier=1.1, sample_rate=0.05)
    assert epsilon(1.1, 0.05, 50, 1e-5) == pytest.approx(accountant.get_epsilon(1e-5))
    assert epsilon(1.1, 0.05, 50, 1e-5) < epsilon(1.1, 0.05, 100, 1e-5)
    assert math.isinf(epsilon(0.0, 0.05, 10, 1e-5)) and epsilon(1.0, 0.05, 0, 1e-5) == 0.0


@pytest.mark.launcher
@pytest.mark.parametrize("tail", [None, 1], ids=["standard", "u-shaped"])
def test_a_private_secure_run_logs_what_it_spent_and_resumes_exactly(tmp_path, tail):
    """Every client logs the epsilons of what it released so far and prints them at the end; noise
    draws, the last global adapters and the epsilon counters come back from a checkpoint taken
    between two aggregations (secure aggregation starts a fresh key agreement). The same holds with
    every option at once: the U-shaped split, DP on both releases and secure aggregation."""
    from safetensors.torch import load_file

    privacy = {"activation_clip": 1.0, "activation_noise": 0.3, "update_clip": 0.05, "update_noise": 0.5}

    def recipe_in(folder, **checkpoint):
        return write_recipe(folder, federation={"clients": 2, "aggregate_every": 2, "secure_aggregation": True},
                            privacy=privacy, train={"max_steps": 6, "output_dir": str(folder / "out")},
                            split={"client_tail_layers": tail},
                            data={"num_samples": 40}, checkpoint={"dir": str(folder / "ckpt"), **checkpoint})

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    proc = launch(3, ["--recipe", str(recipe_in(straight, every=3))])
    check(proc)
    assert "client0: privacy spent (delta 1e-05): epsilon_activations" in proc.stdout
    samples = scalars(straight / "tb" / "client0", "client0/samples")[0]
    acts = scalars(straight / "tb" / "client0", "privacy/epsilon_activations")
    assert acts == pytest.approx([epsilon(0.3, 4 / samples, s + 1, 1e-5) for s in range(6)])
    rounds = [(s + 1) // 2 for s in range(6)]  # aggregations after steps 2, 4 and 6
    assert scalars(straight / "tb" / "client0", "privacy/epsilon_updates") == pytest.approx(
        [epsilon(0.5, 1.0, r, 1e-5) for r in rounds])
    check(launch(3, ["--recipe", str(recipe_in(resumed)), "--resume", str(straight / "ckpt" / "step-000003")]))
    for role in ("client0", "client1", "server0"):
        a = load_file(str(straight / "out" / f"{role}.safetensors"))
        b = load_file(str(resumed / "out" / f"{role}.safetensors"))
        assert max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    assert scalars(resumed / "tb" / "client0", "privacy/epsilon_updates")[-1] == pytest.approx(
        scalars(straight / "tb" / "client0", "privacy/epsilon_updates")[-1])
