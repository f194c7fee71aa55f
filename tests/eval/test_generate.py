"""Batched greedy decoding equals one-prompt-at-a-time decoding, and equals HF's own greedy generate."""

from __future__ import annotations

import torch

from midtrain.eval.generate import greedy_generate
from midtrain.model import build_model, preset_config


def test_batched_left_padded_greedy_matches_single_prompts_and_hf_generate():
    model = build_model(preset_config("tiny-llama", vocab_size=64), seed=1)
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(0, 60, (n,), generator=gen).tolist() for n in (9, 17, 17, 30)]
    batched = greedy_generate(model, prompts, 6, pad_id=63, batch_size=4)
    single = [greedy_generate(model, [p], 6, pad_id=63)[0] for p in prompts]
    assert batched == single and all(len(o) == 6 for o in batched)
    with torch.no_grad():
        hf = model.generate(torch.tensor([prompts[1]]), max_new_tokens=6, do_sample=False, use_cache=True,
                            pad_token_id=63)
    assert hf[0, len(prompts[1]):].tolist() == single[1]
    assert model.training  # restored


def test_stops_at_eos_and_drops_it():
    model = build_model(preset_config("tiny-llama", vocab_size=64), seed=1)
    first = greedy_generate(model, [[1, 2, 3]], 4, pad_id=63)[0]
    assert greedy_generate(model, [[1, 2, 3]], 4, pad_id=63, eos_id=first[1])[0] == first[:1]


def test_evaluated_tasks_keep_every_position_inside_their_length():
    """BOS + prompt + all generated tokens fit in the task's length: no answer is decoded at an untrained position."""
    from midtrain.data import byte_tokenizer
    from midtrain.eval.suite import run_generative
    from midtrain.eval.tasks import TokenCounter, niah_samples, passkey_samples, ruler_samples

    tokenizer = byte_tokenizer()
    count = TokenCounter(tokenizer)
    length = 1024
    samples = (passkey_samples(count, [length], 2, 0) + niah_samples(count, [length], [0.5], 2, 0)
               + ruler_samples(count, ["niah_multivalue", "vt", "cwe", "fwe"], [length], 1, 0))
    model = build_model(preset_config("tiny-llama", vocab_size=len(tokenizer)), seed=0)
    seen: list[int] = []
    model.register_forward_pre_hook(lambda _m, _a, kw: seen.append(int(kw["position_ids"].max())), with_kwargs=True)
    eos, tokenizer.eos_token_id = tokenizer.eos_token_id, None  # a random model must not stop early
    try:
        run_generative(model, tokenizer, samples, batch_size=4)
    finally:
        tokenizer.eos_token_id = eos
    # the last generated token is never fed back, so the highest position the model computes is one below its own
    assert length - 64 <= max(seen) + 1 < length
