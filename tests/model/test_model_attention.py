"""Document masks: the mask against a loop oracle; packed logits against documents run one by one."""

import pytest
import torch

from midtrain.model import build_model, document_causal_mask, forward_packed, preset_config

VOCAB = 64


def naive_mask(position_ids: torch.Tensor) -> torch.Tensor:
    b, t = position_ids.shape
    out = torch.zeros(b, 1, t, t, dtype=torch.bool)
    for r in range(b):
        start_of = []  # start index of the document each token belongs to
        for i in range(t):
            start_of.append(i if position_ids[r, i] == 0 or i == 0 else start_of[i - 1])
        for q in range(t):
            for k in range(q + 1):
                out[r, 0, q, k] = start_of[q] == start_of[k]
    return out


def random_positions(gen: torch.Generator, b: int, t: int) -> torch.Tensor:
    rows = []
    for _ in range(b):
        pos = []
        while len(pos) < t:
            n = int(torch.randint(1, 9, (1,), generator=gen))  # includes 1-token documents
            pos.extend(range(n))
        rows.append(pos[:t])
    return torch.tensor(rows)


@pytest.mark.parametrize("seed", range(5))
def test_mask_matches_loop_oracle(seed):
    gen = torch.Generator().manual_seed(seed)
    pos = random_positions(gen, 3, 37)
    mask = document_causal_mask(pos)
    assert mask.dtype == torch.bool and mask.shape == (3, 1, 37, 37)
    assert torch.equal(mask, naive_mask(pos))
    for dtype in (torch.float32, torch.bfloat16):
        add = document_causal_mask(pos, additive=True, dtype=dtype)
        assert add.dtype == dtype
        assert torch.equal(add, torch.where(mask, 0.0, torch.finfo(dtype).min).to(dtype))


def test_mask_edge_cases():
    single = document_causal_mask(torch.arange(6)[None])  # one document = plain causal
    assert torch.equal(single[0, 0], torch.ones(6, 6, dtype=torch.bool).tril())
    zeros = document_causal_mask(torch.zeros(1, 4, dtype=torch.long))  # every token its own document
    assert torch.equal(zeros[0, 0], torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="position_ids must be"):
        document_causal_mask(torch.arange(4))


LENGTHS = [[7, 13, 10], [4, 20, 6]]  # two rows, three documents each, different boundaries


@pytest.fixture(scope="module")
def packed():
    gen = torch.Generator().manual_seed(0)
    docs = [[torch.randint(0, VOCAB, (n,), generator=gen) for n in row] for row in LENGTHS]
    batch = {
        "input_ids": torch.stack([torch.cat(row) for row in docs]),
        "position_ids": torch.tensor([[p for n in row for p in range(n)] for row in LENGTHS]),
    }
    return docs, batch


def _separate(model, docs):
    """Each document run alone, concatenated back into the packed layout."""
    return torch.stack([torch.cat([model(input_ids=d[None], use_cache=False).logits[0] for d in row]) for row in docs])


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-qwen2"])
def test_packed_equals_separate_documents(packed, impl, preset):
    docs, batch = packed
    model = build_model(preset_config(preset, VOCAB), seed=0, attn_implementation=impl).eval()
    with torch.no_grad():
        ref = _separate(model, docs)
        got = forward_packed(model, batch)
        assert got.shape == ref.shape
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
        # Controls (the test can fail): position ids alone with the config's default KV cache ...
        no_mask = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
        assert (no_mask - ref).abs().max() > 1e-2
        # ... and a bool mask under eager, which adds 0/1 to the scores instead of masking.
        if impl == "eager":
            bool_mask = document_causal_mask(batch["position_ids"])
            wrong = model(**batch, attention_mask=bool_mask, use_cache=False).logits
            assert (wrong - ref).abs().max() > 1e-2
        # the first document of each row has no earlier document: identical to plain causal attention
        plain = model(input_ids=batch["input_ids"], use_cache=False).logits
        first = min(row[0] for row in LENGTHS)
        torch.testing.assert_close(plain[:, :first], ref[:, :first], atol=1e-5, rtol=0)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_packed_bf16_autocast(packed, impl):
    docs, batch = packed
    model = build_model(preset_config("tiny-llama", VOCAB), seed=0, attn_implementation=impl).eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        ref = _separate(model, docs).float()
        got = forward_packed(model, batch).float()
        no_mask = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], use_cache=True).logits
    # bf16 rounding of different kernel shapes: measured max diff ≈2e-3; cross-document leakage is ≈0.4.
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=0)
    assert (no_mask.float() - ref).abs().max() > 1e-1


def test_packed_gradients_stay_inside_documents(packed):
    """Training path: a loss on the last document sends no gradient to earlier documents' inputs."""
    docs, batch = packed
    model = build_model(preset_config("tiny-llama", VOCAB), seed=0)
    embeds = model.get_input_embeddings()(batch["input_ids"]).detach().requires_grad_(True)
    mask = document_causal_mask(batch["position_ids"])
    logits = model(inputs_embeds=embeds, position_ids=batch["position_ids"], attention_mask=mask,
                   use_cache=False).logits
    start = sum(LENGTHS[0][:2])
    logits[0, start:].logsumexp(-1).sum().backward()
    grad = embeds.grad[0].abs().sum(-1)
    assert torch.all(grad[:start] == 0) and torch.all(grad[start:] > 0)
    assert torch.all(embeds.grad[1] == 0)


class _DDPLike(torch.nn.Module):
    def __init__(self, module):
        super().__init__()
        self.module = module
        self.calls = 0
        self.masks = []

    def forward(self, **kwargs):
        self.calls += 1
        self.masks.append(kwargs["attention_mask"])
        return self.module(**kwargs)


def test_forward_packed_calls_wrapper_and_rejects_unknown_backend(packed):
    docs, batch = packed
    model = build_model(preset_config("tiny-llama", VOCAB), seed=0).eval()
    wrapped = _DDPLike(model)
    with torch.no_grad():
        torch.testing.assert_close(forward_packed(wrapped, batch), forward_packed(model, batch), atol=0, rtol=0)
    assert wrapped.calls == 1
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(ValueError, match="'flash_attention_2'"):
        forward_packed(model, batch)


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
def test_one_document_per_row_takes_the_maskless_path_with_the_same_logits(impl):
    """Rows without a second document start skip the [T, T] mask; the result must equal the explicit mask's."""
    config = preset_config("tiny-llama", vocab_size=VOCAB)
    config._attn_implementation = impl
    model = build_model(config, seed=0).eval()
    ids = torch.randint(0, VOCAB, (2, 24), generator=torch.Generator().manual_seed(1))
    pos = torch.arange(24).expand(2, 24)
    spy = _DDPLike(model)
    with torch.no_grad():
        fast = forward_packed(spy, {"input_ids": ids, "position_ids": pos})
        masked = model(input_ids=ids, position_ids=pos, attention_mask=document_causal_mask(pos), use_cache=False)
    assert spy.masks == [None]
    torch.testing.assert_close(fast, masked.logits, rtol=1e-5, atol=1e-5)


def test_flex_block_mask_has_the_document_causal_pattern():
    """The BlockMask's mask_mod must agree with the dense mask everywhere (the GPU path's correctness on CPU)."""
    from midtrain.model.attention import document_block_mask

    pos = random_positions(torch.Generator().manual_seed(3), 2, 40)
    block = document_block_mask(pos)
    b, q, kv = torch.meshgrid(torch.arange(2), torch.arange(40), torch.arange(40), indexing="ij")
    dense = block.mask_mod(b, torch.zeros_like(b), q, kv)
    assert torch.equal(dense, document_causal_mask(pos)[:, 0])


def test_flex_attention_on_cpu_is_refused_at_launch(tmp_path):
    from midtrain.config import load_recipe
    from midtrain.run import RunError, run
    from tests.train.tiny import write_recipe

    recipe = load_recipe(write_recipe(tmp_path), ["attention=flex_attention", f"run_dir={tmp_path / 'run'}"])
    with pytest.raises(RunError, match="flex_attention needs a CUDA device"):
        run(recipe)
