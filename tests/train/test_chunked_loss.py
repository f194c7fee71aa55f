"""Chunked linear cross-entropy (`loss_chunk_tokens`) against the full-logits path it replaces.

Oracle: logits = hidden @ W.T in full, then `F.cross_entropy` (sum). fp32: losses and gradients agree to 1e-5
relative (only the order of fp32 sums differs). bf16 autocast: both sides compute the same bf16 logits, so the loss
agrees to 1e-4 and the hidden-state gradient to 1e-5; the full path rounds the whole [V, d] weight gradient to bf16
once, the chunked one each chunk's share (summed in fp32): they agree to 1% in norm (measured 0.3%).
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError

from midtrain.model import build_model, forward_packed, preset_config
from midtrain.model.head import HeadInputs, chunkable_head, hidden_states_only
from midtrain.model.loss import IGNORE, linear_cross_entropy, token_loss_sums

VOCAB = 300  # unlike every other dimension of tiny-llama, so a saved [.., V] tensor is recognisable


def _problem(n: int = 45, d: int = 16, v: int = 37, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=gen)
    h[3] *= 60  # large logits (hundreds): the log-sum-exp must stay finite
    w = torch.randn(v, d, generator=gen) / d**0.5
    labels = torch.randint(0, v, (n,), generator=gen)
    labels[[0, 7, n - 1]] = IGNORE
    return h, w, labels


def _oracle(h, w, labels, scale: float, autocast: bool = False):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = F.linear(h, w)
    losses = F.cross_entropy(logits.float(), labels, ignore_index=IGNORE, reduction="none")
    (losses.sum() * scale).backward()
    return losses.sum().detach(), losses.detach(), h.grad, w.grad


def _chunked(h, w, labels, chunk: int, scale: float, autocast: bool = False):
    h, w = h.clone().requires_grad_(True), w.clone().requires_grad_(True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        total, losses = linear_cross_entropy(h, w, labels, chunk)
    assert not losses.requires_grad
    (total * scale).backward()
    return total.detach(), losses, h.grad, w.grad


@pytest.mark.parametrize("chunk", [8, 45, 64, 1])  # N % chunk != 0, chunk == N, chunk > N, one row at a time
def test_fp32_matches_full_logits(chunk):
    h, w, labels = _problem()
    ref = _oracle(h, w, labels, scale=0.37)
    got = _chunked(h, w, labels, chunk, scale=0.37)
    for name, a, b in zip(("loss", "per-token", "d hidden", "d weight"), got, ref):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    assert torch.all(got[1][[0, 7, 44]] == 0) and torch.all(got[2][[0, 7, 44]] == 0)
    assert got[1][3] > 10  # the large-logit row really is far from uniform


def test_bf16_autocast_matches_full_path_under_autocast():
    h, w, labels = _problem(n=96, d=32, v=50)
    ref = _oracle(h, w, labels, scale=1.0, autocast=True)
    got = _chunked(h, w, labels, 40, scale=1.0, autocast=True)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-4, atol=1e-4)
    assert got[2].dtype == h.dtype and got[3].dtype == w.dtype  # fp32 master weights get fp32 gradients
    torch.testing.assert_close(got[2], ref[2], rtol=1e-5, atol=1e-6)  # same bf16 products, one bf16 rounding each
    # d weight: the full path rounds the summed [V, d] product to bf16 once (~0.3% rms), the chunked path each
    # chunk's share, summed in fp32. Agree to 1% in norm, and the chunked one is no farther from the exact value
    # (fp64 from the same bf16-rounded inputs).
    assert (got[3] - ref[3]).norm() <= 1e-2 * ref[3].norm()
    hx, wx = h.bfloat16().double().requires_grad_(True), w.bfloat16().double().requires_grad_(True)
    F.cross_entropy(hx @ wx.T, labels, ignore_index=IGNORE, reduction="sum").backward()
    assert (got[3] - wx.grad).norm() <= 1.1 * (ref[3] - wx.grad).norm()
    # bf16 inputs (no autocast): bf16 gradients
    hb, wb = h.bfloat16().requires_grad_(True), w.bfloat16().requires_grad_(True)
    linear_cross_entropy(hb, wb, labels, 40)[0].backward()
    assert hb.grad.dtype == wb.grad.dtype == torch.bfloat16


def test_no_grad_gives_losses_and_no_graph():
    h, w, labels = _problem()
    ref = _oracle(h, w, labels, scale=1.0)
    with torch.no_grad():
        total, losses = linear_cross_entropy(h.requires_grad_(True), w, labels, 8)
    assert total.grad_fn is None and not total.requires_grad
    torch.testing.assert_close(total, ref[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(losses, ref[1], rtol=1e-5, atol=1e-6)


def test_one_backward_per_forward():
    h, w, labels = _problem()
    total, _ = linear_cross_entropy(h.requires_grad_(True), w, labels, 8)
    total.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="one backward"):
        total.backward()


# --------------------------------------------------------------------------- through the model


def _batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (2, 96), generator=g)
    position_ids = torch.cat([torch.arange(40), torch.arange(56)]).repeat(2, 1)  # two packed documents per row
    labels = torch.where(position_ids == 0, IGNORE, ids)
    sources = torch.cat([torch.zeros(40, dtype=torch.long), torch.ones(56, dtype=torch.long)]).repeat(2, 1)
    return {"input_ids": ids, "position_ids": position_ids, "labels": labels, "source_ids": sources}


def _model(**overrides):
    return build_model(preset_config("tiny-llama", vocab_size=VOCAB, **overrides), seed=0)


def _loss_and_grads(model, chunk: int | None):
    model.zero_grad(set_to_none=True)
    batch = _batch()
    out = forward_packed(model, batch, loss_chunk_tokens=chunk)
    assert isinstance(out, HeadInputs) == (chunk is not None)
    loss, per_source, counts = token_loss_sums(out, batch["labels"], batch["source_ids"], 2)
    (loss * 0.01).backward()
    return loss.detach(), per_source, counts, {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("tied", [False, True])
def test_model_losses_and_gradients_match(tied):
    model = _model(tie_word_embeddings=tied)
    head = model.get_output_embeddings()
    assert (head.weight is model.get_input_embeddings().weight) == tied
    ref = _loss_and_grads(model, None)
    got = _loss_and_grads(model, 50)
    assert "forward" not in vars(head)  # the identity swap is undone
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    torch.testing.assert_close(got[1], ref[1], rtol=1e-5, atol=1e-6)  # per-source sums
    assert torch.equal(got[2], ref[2])
    assert got[3].keys() == ref[3].keys()
    for name in ref[3]:  # tied: the head's and the embedding's gradients land in the one shared weight
        torch.testing.assert_close(got[3][name], ref[3][name], rtol=1e-5, atol=1e-7, msg=name)


def test_full_logits_are_never_saved_for_backward():
    """Every tensor autograd keeps for backward, by shape: the default path keeps [.., V] logits-sized ones (the
    check can fail), the chunked path none bigger than the [V, d] weight gradient."""
    model, batch = _model(), _batch()
    n = batch["input_ids"].numel()

    def saved_vocab_sized(chunk):
        sizes = []

        def pack(t):
            if VOCAB in t.shape:
                sizes.append(t.numel())
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward_packed(model, batch, loss_chunk_tokens=chunk)
            loss = token_loss_sums(out, batch["labels"], batch["source_ids"], 2, reuse_logits=True)[0]
        loss.backward()
        return sizes

    assert max(saved_vocab_sized(None)) >= n * VOCAB
    assert max(saved_vocab_sized(64)) <= VOCAB * model.config.hidden_size


def test_hidden_states_only_restores_forward_on_error():
    head = torch.nn.Linear(4, 3, bias=False)
    with pytest.raises(KeyError):
        with hidden_states_only(head):
            x = torch.randn(2, 4)
            assert torch.equal(head(x), x)
            raise KeyError
    assert "forward" not in vars(head) and head(torch.randn(2, 4)).shape == (2, 3)
    own = lambda x: x * 2  # noqa: E731  (a forward already patched by someone else comes back as it was)
    head.forward = own
    with hidden_states_only(head):
        pass
    assert head.forward is own


def test_unsupported_heads_are_refused():
    model = _model()
    model.config.final_logit_softcapping = 30.0
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        forward_packed(model, _batch(), loss_chunk_tokens=64)
    model.config.final_logit_softcapping = None
    model.config.logit_scale = 0.0625
    with pytest.raises(ValueError, match="logit_scale"):
        chunkable_head(model)
    model.config.logit_scale = None
    model.lm_head = torch.nn.Linear(model.config.hidden_size, VOCAB, bias=True)
    with pytest.raises(ValueError, match="bias-free nn.Linear.*with a bias"):
        chunkable_head(model)


@pytest.fixture
def process_group():
    import torch.distributed as dist

    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_ddp_and_fsdp2_train_like_one_process(process_group):
    """The head's gradient arrives outside the wrapper's forward: DDP still reduces it, and FSDP2 (whose root stays
    gathered after forward) reduce-scatters it. World size 1 here; 2 ranks: tests/train/test_distributed.py."""
    from torch.distributed.fsdp import fully_shard
    from torch.nn.parallel import DistributedDataParallel

    ref = _loss_and_grads(_model(), None)
    ddp = DistributedDataParallel(_model())
    got = _loss_and_grads(ddp, 50)
    for name in ref[3]:
        torch.testing.assert_close(got[3]["module." + name], ref[3][name], rtol=1e-5, atol=1e-7, msg=name)
    model = _model()
    for layer in model.model.layers:
        fully_shard(layer)
    fully_shard(model)
    got = _loss_and_grads(model, 50)
    torch.testing.assert_close(got[0], ref[0], rtol=1e-5, atol=0)
    for name in ref[3]:
        torch.testing.assert_close(got[3][name].full_tensor(), ref[3][name], rtol=1e-5, atol=1e-7, msg=name)


def test_a_head_still_sharded_after_forward_is_refused(process_group):
    from torch.distributed.fsdp import fully_shard

    model = _model()
    fully_shard(model.lm_head, reshard_after_forward=True)  # its own unit: a shard again once its forward ends
    fully_shard(model)
    with pytest.raises(ValueError, match="still sharded after the model's forward"):
        forward_packed(model, _batch(), loss_chunk_tokens=50)


def test_recipe_key_is_validated():
    from midtrain.config import Recipe

    recipe = {"base": "preset:tiny-llama", "stages": [{"name": "s", "tokens": 1024, "seq_len": 64,
                                                        "batch": {"tokens": 512}, "schedule": {"kind": "constant"}}]}
    assert Recipe.model_validate(recipe).loss_chunk_tokens == "auto"
    assert Recipe.model_validate({**recipe, "loss_chunk_tokens": 2048}).loss_chunk_tokens == 2048
    assert Recipe.model_validate({**recipe, "loss_chunk_tokens": None}).loss_chunk_tokens is None
    for bad in (0, "some"):
        with pytest.raises(ValidationError, match="loss_chunk_tokens"):
            Recipe.model_validate({**recipe, "loss_chunk_tokens": bad})


def test_auto_chunks_only_big_logits_of_heads_that_allow_it():
    from midtrain.model.head import resolve_loss_chunk_tokens

    small = _model()  # VOCAB-sized head: 1 GiB of fp32 logits takes 2^28 / VOCAB tokens
    limit = (1 << 28) // VOCAB
    assert resolve_loss_chunk_tokens("auto", small, limit) is None
    assert resolve_loss_chunk_tokens("auto", small, limit + 1) == 4096  # 2^26 / VOCAB, capped at 4096
    big = build_model(preset_config("tiny-llama", vocab_size=131072), seed=0)
    assert resolve_loss_chunk_tokens("auto", big, 8192) == 512  # Llama 3's vocabulary: 4 GiB of logits at 8k
    assert resolve_loss_chunk_tokens("auto", big, 2048) is None  # exactly 1 GiB: not above it
    assert resolve_loss_chunk_tokens(None, big, 8192) is None and resolve_loss_chunk_tokens(64, small, 1) == 64
    big.config.final_logit_softcapping = 30.0  # auto falls back to full logits; an explicit size is an error
    assert resolve_loss_chunk_tokens("auto", big, 8192) is None
    with pytest.raises(ValueError, match="final_logit_softcapping"):
        resolve_loss_chunk_tokens(512, big, 8192)


# --------------------------------------------------------------------------- the trainer


class _Steps:
    """Seeded micro-batches of random packed documents (2 per step)."""

    def __init__(self, seed: int = 0):
        self.gen = torch.Generator().manual_seed(seed)

    def next_step(self):
        out = []
        for _ in range(2):
            ids = torch.randint(0, VOCAB, (4, 64), generator=self.gen)
            cut = int(torch.randint(8, 56, (1,), generator=self.gen))
            pos = torch.cat([torch.arange(cut), torch.arange(64 - cut)]).repeat(4, 1)
            out.append({"input_ids": ids, "position_ids": pos, "labels": torch.where(pos == 0, IGNORE, ids),
                        "source_ids": torch.zeros_like(ids)})
        return out


def _trainer(chunk: int | None, steps: int):
    from midtrain.config import Recipe
    from midtrain.plan import build_plan
    from midtrain.train.distributed import DistInfo
    from midtrain.train.optim import build_optimizer
    from midtrain.train.trainer import Trainer

    recipe = Recipe.model_validate({
        "base": "preset:tiny-llama", "tokenizer": "bytes", "sources": [{"name": "s", "path": "s.jsonl"}],
        "stages": [{"name": "s", "tokens": steps * 512, "seq_len": 64, "batch": {"tokens": 512},
                    "schedule": {"kind": "constant", "peak_lr": 3e-3, "warmup_tokens": 512},
                    "data": {"mixture": {"s": 1.0}}}]})
    stage = build_plan(recipe).stages[0]
    model = _model()
    optimizer = build_optimizer(model, recipe.stages[0].optimizer, lr=stage.lr_at_step(0))
    forward = functools.partial(forward_packed, loss_chunk_tokens=chunk)
    return Trainer(model=model, optimizer=optimizer, loader=_Steps(), stage=stage, forward=forward, dist=DistInfo(),
                   domains=["s"], precision="fp32", grad_clip=1.0)


def test_trainer_steps_match_the_default_path():
    """3 AdamW steps (2 micro-batches each, default in-place loss as reference): losses, grad norms and weights."""
    ref, got = _trainer(None, 3), _trainer(48, 3)
    for _ in range(3):
        a, b = got.train_step(), ref.train_step()
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5)
        assert a["loss.s"] == pytest.approx(b["loss.s"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
    for (name, p), q in zip(got.model.named_parameters(), ref.model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_recipe_option_keeps_per_step_losses(tmp_path, monkeypatch):
    """`midtrain run` with loss_chunk_tokens: the two-stage tiny recipe trains as without it (losses to 1e-5)."""
    from midtrain.config import load_recipe
    from midtrain.run import RunOptions, run

    from .tiny import train_rows, write_recipe

    monkeypatch.setenv("MIDTRAIN_CACHE", str(tmp_path / "cache"))
    recipe_path = write_recipe(tmp_path, warm_tokens=2048, anneal_tokens=1024, every=4096)
    losses, evals = [], []
    for chunk in ("null", "100"):
        recipe = load_recipe(recipe_path, [f"run_dir={tmp_path / chunk}", f"loss_chunk_tokens={chunk}"])
        run(recipe, RunOptions(progress=False))
        losses.append([r["loss"] for r in train_rows(tmp_path / chunk)])
        # the held-out evaluation applies the head in chunks too: same numbers
        files = sorted((tmp_path / chunk / "eval").glob("*.json"))
        evals.append({p.name: json.loads(p.read_text())["metrics"] for p in files})
    assert len(losses[0]) == 6
    assert losses[1] == pytest.approx(losses[0], rel=1e-5)
    assert evals[0] and evals[0].keys() == evals[1].keys()
    for name, metrics in evals[0].items():
        losses_only = {k: v for k, v in metrics.items() if k.startswith("loss")}
        assert losses_only and {k: evals[1][name][k] for k in losses_only} == pytest.approx(losses_only, rel=1e-5)
