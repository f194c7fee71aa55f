"""The in-place cross-entropy against F.cross_entropy (the oracle), and a few training steps of the fast path
(in-place loss + per-document attention) against the reference path (F.cross_entropy + the dense 4D mask)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from midtrain.train.loss import IGNORE, inplace_cross_entropy, token_loss_sums

VOCAB = 256


def test_inplace_cross_entropy_matches_f_cross_entropy():
    gen = torch.Generator().manual_seed(0)
    n, v = 45, 13
    base = 3 * torch.randn(n, v, generator=gen)
    base[3] += 80  # large logits: the max subtraction must keep exp finite
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[0, 5, 44]] = IGNORE
    weights = torch.rand(n, generator=gen)

    x_ref = base.clone().requires_grad_(True)
    ref = F.cross_entropy(x_ref, labels, ignore_index=IGNORE, reduction="none")
    (ref * weights).sum().backward()

    x = base.clone().requires_grad_(True)
    logits = x * 1  # a non-leaf the forward owns, as a model's logits are
    got = inplace_cross_entropy(logits, labels)
    (got * weights).sum().backward()

    torch.testing.assert_close(got, ref, rtol=1e-6, atol=1e-6)
    assert torch.all(got[[0, 5, 44]] == 0)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-5, atol=1e-7)
    assert torch.all(x.grad[[0, 5, 44]] == 0)
    # the logits' storage now holds the gradient: documented, and why only the trainer opts in
    torch.testing.assert_close(logits.detach(), x.grad)
    with pytest.raises(ValueError, match="fp32"):
        inplace_cross_entropy(x.bfloat16() * 1, labels)


def test_token_loss_sums_reuse_logits_only_where_it_is_safe():
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 5, generator=gen, requires_grad=True)
    labels = torch.randint(0, 5, (2, 9), generator=gen)
    src = torch.zeros_like(labels)
    before = logits.detach().clone()
    # a leaf (or a view) is never overwritten: F.cross_entropy path, same numbers
    a = token_loss_sums(logits, labels, src, 1, reuse_logits=True)
    b = token_loss_sums(logits, labels, src, 1)
    a[0].backward()
    assert torch.equal(logits.detach(), before)
    torch.testing.assert_close(a[0], b[0])
    with torch.no_grad():  # evaluation: nothing to overwrite
        c = token_loss_sums(logits * 1, labels, src, 1, reuse_logits=True)
    torch.testing.assert_close(c[0], b[0])
    owned = logits.bfloat16() * 1  # bf16 logits: F.cross_entropy in fp32, as before
    d = token_loss_sums(owned, labels, src, 1, reuse_logits=True)
    assert torch.equal(owned, (logits.bfloat16() * 1).detach())
    torch.testing.assert_close(d[0], token_loss_sums(owned, labels, src, 1)[0])


def _trainer(forward, inplace_loss: bool, steps: int):
    from benchmarks.trainer import make_loader, make_source, make_stage
    from midtrain.model import build_model, preset_config
    from midtrain.train.distributed import DistInfo
    from midtrain.train.optim import build_optimizer
    from midtrain.train.trainer import Trainer

    seq_len, batch_tokens = 128, 512
    recipe, stage = make_stage(seq_len, batch_tokens, steps=steps)
    config = preset_config("tiny-llama", vocab_size=VOCAB)  # the patched benchmark vocabulary
    model = build_model(config, seed=0)
    optimizer = build_optimizer(model, recipe.stages[0].optimizer, lr=stage.lr_at_step(0))
    return Trainer(model=model, optimizer=optimizer, loader=make_loader(make_source(20_000), seq_len, batch_tokens),
                   stage=stage, forward=forward, dist=DistInfo(), domains=["bench"], precision="fp32",
                   grad_clip=1.0, inplace_loss=inplace_loss)


def test_fast_path_trains_like_the_reference_path(monkeypatch):
    """Per-step losses and grad norms of 4 AdamW steps agree to 1e-5 (fp32 reduction order only), and the weights."""
    import benchmarks.trainer
    from midtrain.model import forward_packed

    monkeypatch.setattr(benchmarks.trainer, "VOCAB", VOCAB)  # small random-id documents: a fast test

    fast = _trainer(functools.partial(forward_packed, segments=True), inplace_loss=True, steps=4)
    ref = _trainer(functools.partial(forward_packed, segments=False), inplace_loss=False, steps=4)
    pos = fast.loader.next_step()[0]["position_ids"]  # the loaders are seeded alike: peek at one, skip it in both
    assert torch.equal(ref.loader.next_step()[0]["position_ids"], pos)
    assert bool((pos[:, 1:] == 0).any())  # multi-document rows: per-document attention runs
    for _ in range(4):
        a, b = fast.train_step(), ref.train_step()
        assert a["step"] == b["step"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for (name, p), q in zip(fast.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)
