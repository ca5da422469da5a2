"""Differential privacy on the gradient a U-shaped client's tail returns (privacy.tail_gradient_*):
per-sample clipping over a sample's positions (with packing, one segment of a row), Gaussian
noise, one accounted release per training step, and a real run whose every tail-gradient message
is clipped per sample on the wire."""

import pytest
import torch

from _launch import ROOT, check, launch, scalars, write_recipe
from splitlora_ds.config import PrivacyConfig, load_config
from splitlora_ds.privacy.dp import ClientPrivacy, clip_samples, epsilon
from splitlora_ds.runtime.packing import sample_ids


def sample_norms(values: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each sample's L2 norm over its rows, the slow obvious way."""
    return torch.stack([values[ids == i].norm() for i in ids.unique()])


def test_clip_samples_scales_each_sample_over_all_its_positions():
    # sample 3: rows (3, 0) and (0, 4), norm 5, scaled to 2 (x 0.4); sample 1: norm 0.5, unchanged.
    # The ids are those of real positions only (no padding id), interleaved, not starting at 0.
    values = torch.tensor([[3.0, 0.0], [0.3, 0.0], [0.0, 4.0], [0.0, 0.4]])
    ids = torch.tensor([3, 1, 3, 1])
    out = clip_samples(values, ids, max_norm=2.0)
    assert torch.allclose(out, torch.tensor([[1.2, 0.0], [0.3, 0.0], [0.0, 1.6], [0.0, 0.4]]))
    assert clip_samples(values.bfloat16(), ids, 2.0).dtype == torch.bfloat16
    assert clip_samples(torch.zeros(0, 2), torch.zeros(0, dtype=torch.long), 2.0).shape == (0, 2)


def test_sample_ids_number_each_segment_of_each_row():
    # row 0 packs two samples (ids 1, 2) then padding; row 1 holds one sample whose id (1) repeats row 0's
    segments = torch.tensor([[1, 1, 2, 2, 0], [1, 1, 1, 0, 0]])
    assert sample_ids(segments).tolist() == [0, 0, 1, 1, 2, 2, 2]  # the real positions, flat order
    assert sample_ids(torch.zeros(0, 1, dtype=torch.long)).numel() == 0


def test_release_without_noise_keeps_every_sample_inside_the_ball():
    torch.manual_seed(0)
    dp = ClientPrivacy(PrivacyConfig(tail_gradient_clip=0.1), sample_rate=0.25, clients=2, max_weight=0.5)
    values = torch.randn(200, 16)
    ids = torch.randint(0, 10, (200,))
    norms = sample_norms(dp.release_tail_gradient(values, ids, training=True), ids)
    assert (norms <= 0.1 + 1e-6).all() and norms.max() > 0.1 - 1e-6  # clipped: these are far outside


def test_release_noise_has_std_sigma_times_clip_and_counts_training_steps():
    torch.manual_seed(0)
    cfg = PrivacyConfig(tail_gradient_clip=0.5, tail_gradient_noise=3.0)
    dp = ClientPrivacy(cfg, sample_rate=0.25, clients=2, max_weight=0.5)
    values, ids = torch.randn(4096, 64), torch.arange(4096) // 64
    noise = dp.release_tail_gradient(values, ids, training=True) - clip_samples(values, ids, 0.5)
    assert noise.std().item() == pytest.approx(3.0 * 0.5, rel=0.03)
    dp.release_tail_gradient(values, ids, training=False)  # not this step's counted release (or eval)
    assert (dp.tail_releases, dp.releases) == (1, 0)  # the activations' count is another mechanism's
    # off: the values as they are, nothing counted
    off = ClientPrivacy(PrivacyConfig(activation_clip=1.0), 0.25, 2, 0.5)
    assert off.release_tail_gradient(values, ids, training=True) is values and off.tail_releases == 0


def test_epsilon_tail_gradients_is_the_accountants_and_falls_with_more_noise():
    def spent(sigma: float) -> dict:
        dp = ClientPrivacy(PrivacyConfig(activation_clip=1.0, activation_noise=2.0, tail_gradient_clip=1.0,
                                         tail_gradient_noise=sigma), 0.05, 2, 0.5)
        dp.tail_releases, dp.releases = 30, 10
        return dp.epsilons()

    assert spent(1.0)["privacy/epsilon_tail_gradients"] == epsilon(1.0, 0.05, 30, 1e-5)
    assert spent(1.0)["privacy/epsilon_activations"] == epsilon(2.0, 0.05, 10, 1e-5)  # its own count
    eps = [spent(s)["privacy/epsilon_tail_gradients"] for s in (0.7, 1.0, 2.0, 4.0)]
    assert eps == sorted(eps, reverse=True) and len(set(eps)) == 4
    assert "privacy/epsilon_tail_gradients" not in ClientPrivacy(PrivacyConfig(activation_clip=1.0), 0.05, 2,
                                                                 0.5).epsilons()


def test_the_tail_release_count_is_checkpointed_and_old_checkpoints_load():
    cfg = PrivacyConfig(tail_gradient_clip=1.0, tail_gradient_noise=1.0)
    dp = ClientPrivacy(cfg, 0.05, 2, 0.5)
    dp.tail_releases, dp.releases, dp.rounds = 7, 3, 2
    back = ClientPrivacy(cfg, 0.05, 2, 0.5)
    back.load_state_dict(dp.state_dict())
    assert (back.tail_releases, back.releases, back.rounds) == (7, 3, 2)
    old = {k: v for k, v in dp.state_dict().items() if k != "tail_releases"}  # saved before the option existed
    back.load_state_dict(old)
    assert (back.tail_releases, back.releases, back.rounds) == (0, 3, 2)


# ---------------------------------------------------------------------------- a real run
# U-shaped (one bottom block, one tail block), 2 clients, 2 steps, 2 micro-batches: every
# tail-gradient message on the wire ([n_c, H] floats from a client to the last server stage).

CLIP = 1e-3


def u_recipe(folder, noise: float):
    return write_recipe(folder, split={"client_layers": 1, "client_tail_layers": 1, "micro_batches": 2},
                        federation={"clients": 2, "aggregate_every": 2}, train={"max_steps": 2},
                        data={"num_samples": 40},
                        privacy={"tail_gradient_clip": CLIP, "tail_gradient_noise": noise})


def per_sample_norms(values: torch.Tensor, mask: torch.Tensor) -> list[float]:
    """The norm of each (row, segment id) of `mask` over its rows of `values` (the real positions,
    flat order), grouped independently of splitlora_ds.runtime.packing.sample_ids."""
    flat = mask.flatten()
    real = flat > 0
    rows = (torch.arange(flat.numel()) // mask.shape[1])[real]
    segs = flat[real]
    assert values.shape[0] == int(real.sum())
    return [values[(rows == r) & (segs == s)].norm().item() for r, s in sorted(set(zip(rows.tolist(), segs.tolist())))]


@pytest.mark.launcher
def test_a_u_shaped_run_clips_each_samples_tail_gradient_on_the_wire_and_accounts_it(tmp_path):
    quiet = u_recipe(tmp_path / "clip", noise=0.0)
    proc = launch(3, ["--recipe", str(quiet), "--out", str(tmp_path / "clip")],
                  script=str(ROOT / "tests/scripts/record_wire.py"))
    check(proc)
    m = load_config(str(quiet)).micro_batches
    for c in range(2):
        log = torch.load(tmp_path / "clip" / f"client{c}.wire.pt")["log"]
        sent = [e["tensors"] for e in log if e["dir"] == "sent"]
        masks = [bundle[1] for bundle in sent if len(bundle) == 2]  # [activations, segment ids] to stage 0
        tail_grads = [bundle[0] for bundle in sent if len(bundle) == 1 and bundle[0].dim() == 2]
        assert len(masks) == len(tail_grads) == 2 * m  # in order: micro-batch by micro-batch
        norms = [n for grad, mask in zip(tail_grads, masks) for n in per_sample_norms(grad, mask)]
        assert len(norms) >= 8 and max(norms) <= CLIP + 1e-6
        assert max(norms) > CLIP / 2  # the bound bites: unclipped they are larger
    assert "client0: privacy spent (delta 1e-05): epsilon_tail_gradients inf" in proc.stdout  # no noise

    noisy = u_recipe(tmp_path / "noise", noise=1.0)
    proc = launch(3, ["--recipe", str(noisy)])
    check(proc)
    assert "client1: privacy spent (delta 1e-05): epsilon_tail_gradients" in proc.stdout
    samples = scalars(tmp_path / "noise" / "tb" / "client0", "client0/samples")[0]
    assert scalars(tmp_path / "noise" / "tb" / "client0", "privacy/epsilon_tail_gradients") == pytest.approx(
        [epsilon(1.0, 4 / samples, s + 1, 1e-5) for s in range(2)])
