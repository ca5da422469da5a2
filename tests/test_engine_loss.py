"""The last stage's loss: mean token cross-entropy over every client's target tokens."""

import pytest
import torch
import torch.nn.functional as F

from splitlora_ds.comm import P2P
from splitlora_ds.engine import StageRunner, StepStats
from splitlora_ds.schedule import Schedule
from splitlora_ds.topology import Role, Topology


def runner(smoothing):
    r = StageRunner(Role("centralized", 0, 0), Schedule("centralized", Topology(2, 1), 1, 4), stage=None, engine=None,
                    p2p=P2P(torch.device("cpu")), groups=None, label_smoothing=smoothing)
    r.stats = StepStats(0)
    return r


def batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.tensor([[-100, 4, 2, -100, -100], [-100, -100, 7, 1, 3], [-100, 5, 5, 5, -100]])
    return logits, labels


def test_loss_is_token_mean_over_all_clients_with_per_client_split():
    logits, labels = batch()
    r = runner(0.0)
    r.output, r.labels, r.sizes = logits, labels, torch.tensor([2, 1])  # client0: rows 0-1, client1: row 2
    r._compute_loss(None)
    flat = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none")
    valid = labels[:, 1:].reshape(-1) != -100
    assert r.stats.tokens == 8
    torch.testing.assert_close(r.loss, flat[valid].mean())
    per_row = flat.view(3, 4).sum(1)
    torch.testing.assert_close(torch.tensor(r.stats.client_loss), torch.stack([per_row[:2].sum() / 5, per_row[2] / 3]))


def test_label_smoothing_applies_to_training_only():
    logits, labels = batch()
    r = runner(0.1)
    r.output, r.labels, r.sizes = logits, labels, torch.tensor([3])
    r._compute_loss(None)
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), label_smoothing=0.1)
    torch.testing.assert_close(r.loss, expected)
    r.training = False
    r.stats = StepStats(0)
    r._compute_loss(None)
    plain = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1))
    torch.testing.assert_close(r.loss, plain)


def test_logits_of_target_positions_only_give_the_same_figures():
    """The last stage projects only positions with a target (engine._forward): same loss."""
    logits, labels = batch()
    full, part = runner(0.1), runner(0.1)
    full.output, full.labels, full.sizes = logits, labels, torch.tensor([2, 1])
    has_target = F.pad(labels[:, 1:] != -100, (0, 1), value=False)
    part.output, part.labels, part.sizes = logits.flatten(0, 1)[has_target.flatten()], labels, torch.tensor([2, 1])
    full._compute_loss(None)
    part._compute_loss(None)
    assert part.output.shape == (8, 11)
    assert part.stats.loss == pytest.approx(full.stats.loss, abs=1e-6)
    assert part.stats.client_loss == pytest.approx(full.stats.client_loss, abs=1e-6)
    assert part.stats.client_tokens == full.stats.client_tokens == [5, 3]
