"""Token losses against F.cross_entropy on explicitly shifted logits (the textbook form) as the oracle."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from midtrain.model.loss import IGNORE, label_count, token_loss_sums, token_losses


def test_sums_per_source_and_counts_match_the_shifted_logits_oracle():
    gen = torch.Generator().manual_seed(0)
    b, t, v, n_sources = 3, 11, 17, 3
    logits = torch.randn(b, t, v, generator=gen)
    labels = torch.randint(0, v, (b, t), generator=gen)
    labels[0, :4] = IGNORE  # e.g. prompt tokens of instruction data
    labels[2, 7] = IGNORE
    source_ids = torch.randint(0, n_sources, (b, t), generator=gen)

    total, per_source, counts = token_loss_sums(logits, labels, source_ids, n_sources)

    flat = F.cross_entropy(logits[:, :-1].reshape(-1, v), labels[:, 1:].reshape(-1), reduction="none",
                           ignore_index=IGNORE).double()
    keep = labels[:, 1:].reshape(-1) != IGNORE
    src = source_ids[:, 1:].reshape(-1)
    torch.testing.assert_close(total.double(), flat[keep].sum(), rtol=1e-6, atol=0)
    for s in range(n_sources):
        mask = keep & (src == s)
        torch.testing.assert_close(per_source[s].double(), flat[mask].sum(), rtol=1e-6, atol=1e-6)
        assert counts[s] == mask.sum()
    assert label_count(labels) == int(keep.sum()) == int(counts.sum())


def test_gradient_matches_the_oracle():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 5, generator=gen, requires_grad=True)
    labels = torch.randint(0, 5, (2, 9), generator=gen)
    token_loss_sums(logits, labels, torch.zeros_like(labels), 1)[0].backward()
    ours = logits.grad.clone()
    logits.grad = None
    F.cross_entropy(logits[:, :-1].reshape(-1, 5), labels[:, 1:].reshape(-1), reduction="sum").backward()
    torch.testing.assert_close(ours, logits.grad)
    assert torch.all(ours[:, -1] == 0)  # the last position predicts nothing


def test_token_losses_shift_labels_and_sources_like_the_training_loss():
    torch.manual_seed(0)
    logits = torch.randn(1, 4, 5)
    labels = torch.tensor([[-100, 1, 2, 3]])
    source_ids = torch.tensor([[0, 0, 1, 1]])
    losses, sources = token_losses(logits, labels, source_ids)
    want = F.cross_entropy(logits[0, :3], labels[0, 1:], reduction="none")
    assert torch.allclose(losses[:3], want) and float(losses[3]) == 0.0
    assert sources.tolist() == [0, 1, 1, -1]  # the label's source; nothing is predicted from the last position
