"""Per-document `is_causal` attention (`DocumentSegments`) against SDPA with the dense document mask (the oracle):
the plan's index maps, the attention's outputs and gradients, and whole-model logits and gradients."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from midtrain.model import attention as attn
from midtrain.model import build_model, document_causal_mask, forward_packed, preset_config
from midtrain.model.attention import DocumentSegments, segment_attention, use_segments

VOCAB = 64

# Rows of document lengths: 1-token documents, a row holding one document, equal lengths, a long tail.
ROWS = [[1, 20, 43], [64], [30, 1, 1, 32], [5, 5, 5, 49], [17, 17, 17, 13]]


def positions(rows: list[list[int]]) -> torch.Tensor:
    return torch.tensor([[p for n in row for p in range(n)] for row in rows])


def random_rows(gen: torch.Generator, b: int, t: int, max_len: int) -> list[list[int]]:
    rows = []
    for _ in range(b):
        row: list[int] = []
        while sum(row) < t:
            row.append(min(int(torch.randint(1, max_len + 1, (1,), generator=gen)), t - sum(row)))
        rows.append(row)
    return rows


@pytest.mark.parametrize("quantum", [1, 4, 16, None])
def test_plan_covers_every_token_once_and_windows_start_at_documents(quantum):
    pos = positions(ROWS)
    b, t = pos.shape
    plan = DocumentSegments.from_position_ids(pos, quantum=quantum, group_cost=0 if quantum == 1 else None)
    assert (plan.batch, plan.seq_len) == (b, t)
    assert plan.gather.numel() == sum(n * w for n, w in zip(plan.counts, plan.widths))
    # every token's output row holds that token
    assert torch.equal(plan.gather[plan.scatter], torch.arange(b * t))
    assert len(set(plan.scatter.tolist())) == b * t
    # the rows that hold no token are exactly the padding rows
    assert sorted(plan.padding.tolist()) == sorted(set(range(plan.gather.numel())) - set(plan.scatter.tolist()))
    # each window begins at a document start; widths cover the documents and never exceed T
    starts = {r * t + sum(row[:i]) for r, row in enumerate(ROWS) for i in range(len(row))}
    firsts, offset = [], 0
    for n, w in zip(plan.counts, plan.widths):
        assert w <= t
        firsts += plan.gather[offset : offset + n * w].view(n, w)[:, 0].tolist()
        offset += n * w
    assert sorted(firsts) == sorted(starts)
    if quantum == 1:  # exact lengths: one group per distinct length
        assert sorted(plan.widths) == sorted({n for row in ROWS for n in row})


def test_plan_treats_a_row_start_as_a_document_start():
    """A row may begin mid-document (split documents): its leading tokens form their own segment, as in the mask."""
    pos = torch.tensor([[5, 6, 7, 0, 1, 2], [0, 1, 2, 3, 4, 5]])
    plan = DocumentSegments.from_position_ids(pos, quantum=1, group_cost=0)
    assert sorted(plan.widths) == [3, 6] and sorted(plan.counts) == [1, 2]


def _oracle(q, k, v, pos):
    rep = q.shape[1] // k.shape[1]
    mask = document_causal_mask(pos)
    return F.scaled_dot_product_attention(q, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                          attn_mask=mask).transpose(1, 2)


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("quantum, group_cost", [(1, 0), (8, None), (None, None), (None, 1e9)])
def test_segment_attention_equals_masked_sdpa_forward_and_backward(seed, quantum, group_cost):
    gen = torch.Generator().manual_seed(seed)
    rows = ROWS if seed == 0 else random_rows(gen, 4, 64, 40)
    pos = positions(rows)
    b, t = pos.shape
    h, hkv, d = 4, 2, 8
    q = torch.randn(b, h, t, d, generator=gen, requires_grad=True)
    k = torch.randn(b, hkv, t, d, generator=gen, requires_grad=True)
    v = torch.randn(b, hkv, t, d, generator=gen, requires_grad=True)
    upstream = torch.randn(b, t, h, d, generator=gen)

    ref = _oracle(q, k, v, pos)
    ref_grads = torch.autograd.grad((ref * upstream).sum(), (q, k, v))
    got = segment_attention(q, k, v, DocumentSegments.from_position_ids(pos, quantum, group_cost))
    got_grads = torch.autograd.grad((got * upstream).sum(), (q, k, v))

    assert got.shape == (b, t, h, d)
    torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-6)
    for g, r in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)
    # control: the same computation with one segment per row (plain causal) differs, so the test can fail
    causal = segment_attention(q, k, v, DocumentSegments.from_position_ids(torch.arange(t).expand(b, t)))
    assert (causal - ref).abs().max() > 1e-2


def test_transformers_sdpa_is_wrapped_and_unchanged_without_segments():
    attn.install_document_attention()  # explicit since importing midtrain.model registers nothing
    fn = ALL_ATTENTION_FUNCTIONS["sdpa"]
    assert fn.__name__ == "sdpa_with_document_segments" and fn.__wrapped__ is sdpa_attention_forward
    attn.install_document_attention()  # idempotent: never wraps the wrapper
    assert ALL_ATTENTION_FUNCTIONS["sdpa"] is fn


@pytest.fixture(scope="module")
def gqa_model():
    config = preset_config("small-llama", vocab_size=VOCAB)  # 4 heads, 2 KV heads (GQA)
    config.num_hidden_layers = 2
    config.hidden_size, config.intermediate_size = 64, 128
    return build_model(config, seed=0)


def _logits_and_grads(model, batch, **kw):
    model.zero_grad(set_to_none=True)
    logits = forward_packed(model, batch, **kw)
    logits.float().logsumexp(-1).mean().backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize("preset", ["gqa", "tiny-qwen2"])
def test_forward_packed_segments_match_the_mask_path(gqa_model, preset):
    model = gqa_model if preset == "gqa" else build_model(preset_config(preset, VOCAB), seed=0)
    pos = positions(ROWS)
    batch = {"input_ids": torch.randint(0, VOCAB, pos.shape, generator=torch.Generator().manual_seed(4)),
             "position_ids": pos}
    calls = []
    real = attn.segment_attention

    def spy(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    attn.segment_attention = spy
    try:
        assert use_segments(model, pos)
        new, new_grads = _logits_and_grads(model, batch, segments=True)
        assert len(calls) == model.config.num_hidden_layers
        old, old_grads = _logits_and_grads(model, batch, segments=False)
        assert len(calls) == model.config.num_hidden_layers
    finally:
        attn.segment_attention = real
    torch.testing.assert_close(new, old, rtol=1e-5, atol=1e-6)
    for name in old_grads:
        torch.testing.assert_close(new_grads[name], old_grads[name], rtol=1e-5, atol=1e-7)


def test_segments_are_not_used_where_they_would_not_pay_or_be_wrong(gqa_model):
    pos = positions(ROWS)

    class Compiled(torch.nn.Module):  # what torch.compile's wrapper looks like to unwrap_model
        def __init__(self, inner):
            super().__init__()
            self._orig_mod = inner

    assert not use_segments(Compiled(gqa_model), pos)
    config = preset_config("tiny-llama", VOCAB)
    config.sliding_window = 32  # shorter than the row: the mask is not plain document-causal
    windowed = build_model(config, seed=0)
    assert not use_segments(windowed, pos)
    with pytest.raises(ValueError, match="sliding-window"):
        forward_packed(windowed, {"input_ids": torch.zeros_like(pos), "position_ids": pos}, segments=True)
    config.sliding_window = 64  # as long as the row: harmless
    assert use_segments(build_model(config, seed=0), pos)


def test_the_default_uses_segments_only_where_they_save_most_of_the_work(gqa_model):
    many = positions([[8] * 8, [16] * 4])  # short documents: a fraction of the dense mask's work
    few = positions([[60, 4], [64]])  # mostly one long document per row: not worth the extra kernels
    assert DocumentSegments.from_position_ids(many).worth_it()
    assert not DocumentSegments.from_position_ids(few).worth_it()
    seen = []

    class Spy(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.module = inner

        def forward(self, **kwargs):
            seen.append("document_segments" in kwargs)
            return self.module(**kwargs)

    with torch.no_grad():
        for pos in (many, few):
            forward_packed(Spy(gqa_model), {"input_ids": torch.zeros_like(pos), "position_ids": pos})
    assert seen == [True, False]
