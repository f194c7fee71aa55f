"""Instruction data: exact loss masks (simple template and a chat template), through the cache and the loader."""

from __future__ import annotations

import json

import numpy as np
import pytest

from midtrain.data import PackedLoader, byte_tokenizer, tokenize_source
from midtrain.data.instruct import (
    InstructionFormat,
    SkipRecord,
    add_special_tokens,
    encode_record,
    resize_embeddings,
)

CHAT = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def _bytes(s: str) -> list[int]:
    return list(s.encode("utf-8"))  # the byte tokenizer: id == byte


def test_simple_template_mask_is_exactly_the_response():
    tok = byte_tokenizer()
    text, ids, mask = encode_record({"prompt": "2+2?", "response": "4"}, tok, InstructionFormat(template="simple"))
    assert text == "User: 2+2?\nAssistant: 4\n"
    prompt = _bytes("User: 2+2?\nAssistant: ")
    assert ids.tolist() == [256, *prompt, *_bytes("4\n"), 257]
    assert mask.tolist() == [0] * (1 + len(prompt)) + [1, 1, 1]  # "4", "\n", EOS


def test_chat_messages_with_template_mask_every_assistant_turn():
    tok = byte_tokenizer()
    specials = ["<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]
    assert add_special_tokens(tok, specials) == 4 and add_special_tokens(tok, specials) == 0
    tok.chat_template = CHAT
    sp = {t: tok.convert_tokens_to_ids(t) for t in specials}
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "yo"}, {"role": "user", "content": "q"},
            {"role": "assistant", "content": "a"}]
    text, ids, mask = encode_record({"messages": msgs}, tok, InstructionFormat())  # auto -> chat template
    assert text == "<|system|>S<|end|><|user|>hi<|end|><|assistant|>yo<|end|><|user|>q<|end|><|assistant|>a<|end|>"
    expected = [(256, 0), (sp["<|system|>"], 0), (ord("S"), 0), (sp["<|end|>"], 0),
                (sp["<|user|>"], 0), *[(b, 0) for b in _bytes("hi")], (sp["<|end|>"], 0), (sp["<|assistant|>"], 0),
                *[(b, 1) for b in _bytes("yo")], (sp["<|end|>"], 1),
                (sp["<|user|>"], 0), (ord("q"), 0), (sp["<|end|>"], 0), (sp["<|assistant|>"], 0),
                (ord("a"), 1), (sp["<|end|>"], 1), (257, 1)]
    assert list(zip(ids.tolist(), mask.tolist())) == expected


@pytest.mark.parametrize("record,reason", [
    ({"prompt": "x"}, "missing_field"),
    ({"prompt": "x", "response": 3}, "not_string"),
    ({"prompt": "x", "response": " "}, "empty"),
    ({"messages": []}, "bad_messages"),
    ({"messages": [{"role": "user", "content": "only a question"}]}, "no_response"),
])
def test_unrenderable_records_are_skipped_with_a_reason(record, reason):
    with pytest.raises(SkipRecord) as e:
        encode_record(record, byte_tokenizer(), InstructionFormat(template="simple"))
    assert e.value.reason == reason


def test_instruction_source_through_cache_and_loader(tmp_path):
    tok = byte_tokenizer()
    f = tmp_path / "sft.jsonl"
    rows = [{"prompt": f"question {i}?", "response": f"answer {i}."} for i in range(20)]
    f.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"prompt": "no answer"}\n')
    src = tokenize_source("sft", f, "text", tok, holdout_docs=2, cache_dir=tmp_path / "c",
                          instruction=InstructionFormat(template="simple"))
    assert src.mask is not None and src.skips.counts == {"missing_field": 1}
    assert src.meta["loss_tokens"] == int(src.mask.sum())
    loader = PackedLoader([src], [1.0], seq_len=64, global_batch_seqs=2, seed=0)
    batch = loader.next_step()[0]
    ids, labels = batch["input_ids"].numpy().ravel(), batch["labels"].numpy().ravel()
    # Every labelled token lies in a response ("answer N.\n" or EOS); every response token is labelled.
    text = bytes(int(t) if t < 256 else ord("|") for t in ids).decode("latin-1")
    for start in range(len(text)):
        if text.startswith("Assistant: ", start):
            lo = start + len("Assistant: ")
            hi = text.find("\n", lo) + 1
            if hi and hi < len(text) and batch["position_ids"].numpy().ravel()[lo] != 0:
                assert (labels[lo:hi] == ids[lo:hi]).all()
    trained = labels != -100
    assert trained.sum() > 0
    assert set(bytes(ids[trained & (ids < 256)].astype(np.uint8)).decode()) <= set("answer 0123456789.\n")


def test_resize_embeddings_grows_with_mean_rows():
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=259, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                      num_attention_heads=2, num_key_value_heads=2)
    model = LlamaForCausalLM(cfg)
    old = model.get_input_embeddings().weight.detach().clone()
    assert resize_embeddings(model, 263) and not resize_embeddings(model, 263)
    new = model.get_input_embeddings().weight.detach()
    assert new.shape == (263, 16) and torch.equal(new[:259], old)
    assert model.get_output_embeddings().weight.shape[0] == 263
