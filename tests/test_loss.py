"""The loss as a pure function: token cross-entropy over the scored positions, per client."""

import torch
import torch.nn.functional as F

from splitlora_ds.runtime.loss import IGNORE, token_loss
from splitlora_ds.runtime.packing import next_token_targets


def _batch():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 11)
    labels = torch.tensor([[-100, 4, 2, -100, -100], [-100, -100, 7, 1, 3], [-100, 5, 5, 5, -100]])
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [1, 1, 1, 1, 0]])
    owner = torch.tensor([0, 0, 1])[:, None].expand(3, 5).where(mask > 0, -1)
    return logits, labels, mask, owner


def test_token_sum_and_per_client_split_equal_cross_entropy_by_hand():
    logits, labels, mask, owner = _batch()
    targets = next_token_targets(labels, mask)
    loss = token_loss(logits, targets, owner, clients=2)
    # position t predicts token t + 1: the usual shifted cross-entropy, summed
    flat = F.cross_entropy(logits[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1), reduction="none",
                           ignore_index=IGNORE).view(3, 4)
    assert loss.tokens == 8  # the labels at (0,1) (0,2) (1,2) (1,3) (1,4) (2,1) (2,2) (2,3)
    torch.testing.assert_close(loss.total, flat.sum())
    torch.testing.assert_close(loss.client_sum, torch.stack([flat[:2].sum(), flat[2].sum()]).double())
    assert loss.client_tokens.tolist() == [5, 3]


def test_scored_logits_give_the_same_figures_as_all_positions():
    """The head projects only positions with a target (executor._forward): same loss."""
    logits, labels, mask, owner = _batch()
    targets = next_token_targets(labels, mask)
    full = token_loss(logits, targets, owner, 2, label_smoothing=0.1)
    scored = logits.flatten(0, 1)[(targets != IGNORE).flatten()]
    part = token_loss(scored, targets, owner, 2, label_smoothing=0.1)
    torch.testing.assert_close(full.total, part.total)
    torch.testing.assert_close(full.client_sum, part.client_sum)


def test_label_smoothing_changes_the_loss():
    logits, labels, mask, owner = _batch()
    targets = next_token_targets(labels, mask)
    plain, smooth = token_loss(logits, targets, owner, 2), token_loss(logits, targets, owner, 2, 0.1)
    valid = targets != IGNORE
    torch.testing.assert_close(smooth.total, F.cross_entropy(logits[valid], targets[valid], label_smoothing=0.1,
                                                             reduction="sum"))
    assert abs(float(plain.total - smooth.total)) > 1e-3
