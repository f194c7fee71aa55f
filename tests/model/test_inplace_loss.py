"""The in-place cross-entropy against F.cross_entropy (the oracle), and a few training steps of the fast path
(in-place loss + per-document attention) against the reference path (F.cross_entropy + the dense 4D mask)."""

from __future__ import annotations

import functools

import pytest
import torch
import torch.nn.functional as F

from midtrain.model.loss import IGNORE, inplace_cross_entropy, token_loss_sums

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
    owned = logits.bfloat16() * 1  # bf16 logits: their fp32 upcast is reused, the logits themselves are not
    d = token_loss_sums(owned, labels, src, 1, reuse_logits=True)
    assert torch.equal(owned, (logits.bfloat16() * 1).detach())
    torch.testing.assert_close(d[0], token_loss_sums(owned, labels, src, 1)[0])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_logits_reuse_their_fp32_upcast(dtype):
    """Under autocast the logits are bf16: the in-place loss works in their fp32 copy; loss and gradient equal
    F.cross_entropy on that copy (the gradient to the logits' own rounding)."""
    gen = torch.Generator().manual_seed(2)
    base = (4 * torch.randn(3, 40, 50, generator=gen)).to(dtype)
    labels = torch.randint(0, 50, (3, 40), generator=gen)
    labels[0, :7] = IGNORE
    src = torch.randint(0, 2, (3, 40), generator=gen)
    grads, sums = [], []
    for reuse in (True, False):
        x = base.clone().requires_grad_(True)
        loss, per_source, counts = token_loss_sums(x * 1, labels, src, 2, reuse_logits=reuse)
        (2.5 * loss).backward()
        grads.append(x.grad)
        sums.append((loss.detach(), per_source, counts))
    torch.testing.assert_close(sums[0][0], sums[1][0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(sums[0][1], sums[1][1], rtol=1e-6, atol=1e-6)
    assert torch.equal(sums[0][2], sums[1][2])
    assert grads[0].dtype == dtype
    torch.testing.assert_close(grads[0].float(), grads[1].float(), rtol=1e-2, atol=2e-5)  # one rounding step apart


def _trainer(forward, inplace_loss: bool, steps: int, precision: str = "fp32"):
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
                   stage=stage, forward=forward, dist=DistInfo(), domains=["bench"], precision=precision,
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


def test_bf16_mixed_steps_match_with_and_without_the_inplace_loss(monkeypatch):
    """Under bf16 autocast the trainer's loss reuses the logits' fp32 upcast: same losses (the forward is identical,
    the loss is fp32 either way) and grad norms to bf16 rounding, over 2 steps (emulated bf16 on most CPUs: slow)."""
    import benchmarks.trainer
    from midtrain.model import forward_packed

    monkeypatch.setattr(benchmarks.trainer, "VOCAB", VOCAB)
    fast = _trainer(forward_packed, inplace_loss=True, steps=2, precision="bf16-mixed")
    ref = _trainer(forward_packed, inplace_loss=False, steps=2, precision="bf16-mixed")
    first_a, first_b = fast.train_step(), ref.train_step()
    assert first_a["loss"] == pytest.approx(first_b["loss"], rel=1e-6)  # same weights, same forward
    assert first_a["grad_norm"] == pytest.approx(first_b["grad_norm"], rel=1e-3)
    assert fast.train_step()["loss"] == pytest.approx(ref.train_step()["loss"], rel=1e-3)
