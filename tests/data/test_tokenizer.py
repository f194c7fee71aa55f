from __future__ import annotations

import pytest
from transformers import AutoTokenizer

from midtrain.data import byte_tokenizer, tokenizer_fingerprint, train_bpe

from .corpus import prose_texts

SAMPLES = [
    "",
    "plain ascii, with  double spaces . and ,punctuation",
    "caf\u00e9 na\u00efve \u00fcber \u4e2d\u6587 "
    "\u0627\u0644\u0639\u0631\u0628\u064a\u0629 \u0939\u093f\u0928\u094d\u0926\u0940",
    "emoji \U0001f600\U0001f468\u200d\U0001f469\u200d\U0001f467 flags \U0001f1eb\U0001f1f7",
    "\t\ttabs\r\nCRLF\n\x00nul \x7f del \ufeffbom \U0010ffff",
    "  leading and trailing spaces  ",
]


def test_byte_tokenizer_layout():
    tok = byte_tokenizer()
    assert len(tok) == 259
    assert (tok.bos_token_id, tok.eos_token_id, tok.pad_token_id) == (256, 257, 258)
    assert (tok.bos_token, tok.eos_token, tok.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")


@pytest.mark.parametrize("text", SAMPLES)
def test_byte_tokenizer_round_trip(text):
    tok = byte_tokenizer()
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert ids == list(text.encode("utf-8"))  # id == byte value
    assert tok.decode(ids) == text


def test_byte_tokenizer_save_reload(tmp_path):
    tok = byte_tokenizer()
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    for text in SAMPLES:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert again(text, add_special_tokens=False)["input_ids"] == ids
        assert again.decode(ids) == text
    assert (again.bos_token_id, again.eos_token_id, again.pad_token_id) == (256, 257, 258)
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok)


def test_train_bpe_small_corpus(tmp_path):
    corpus = prose_texts(400)
    tok = train_bpe(corpus, vocab_size=512)
    assert 259 < len(tok) <= 512
    assert tok.convert_ids_to_tokens([tok.bos_token_id, tok.eos_token_id, tok.pad_token_id]) == [
        "<|bos|>", "<|eos|>", "<|pad|>"]
    text = corpus[-1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) < 0.7 * len(text.encode())  # merges learned: real compression on prose
    for s in SAMPLES + [text]:  # unseen bytes still round-trip
        assert tok.decode(tok(s, add_special_tokens=False)["input_ids"]) == s
    # digits are split one per token (REFERENCE §10)
    assert tok.convert_ids_to_tokens(tok("x 90210", add_special_tokens=False)["input_ids"])[-5:] == list("90210")
    tok.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    assert again(text, add_special_tokens=False)["input_ids"] == ids
    assert tokenizer_fingerprint(again) == tokenizer_fingerprint(tok) != tokenizer_fingerprint(byte_tokenizer())


def test_train_bpe_rejects_tiny_vocab():
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe(["abc"], vocab_size=100)


def test_cli_tokenizer_train_round_trips_through_autotokenizer(tmp_path):
    import json

    from typer.testing import CliRunner

    from midtrain.cli import app
    from midtrain.model import load_tokenizer

    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"body": t}) + "\n" for t in prose_texts(300)) + "{bad\n")
    out = tmp_path / "tok"
    args = ["data", "tokenizer", "train", str(corpus), "--vocab", "400", "--out", str(out), "--text-field", "body"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "invalid_json=1" in result.output
    again = AutoTokenizer.from_pretrained(out)
    ours = load_tokenizer(str(out))
    assert len(again) == len(ours) == 400
    for s in SAMPLES + prose_texts(3):
        ids = again(s, add_special_tokens=False)["input_ids"]
        assert ours(s, add_special_tokens=False)["input_ids"] == ids
        assert again.decode(ids) == s
    assert (again.bos_token, again.eos_token, again.pad_token) == ("<|bos|>", "<|eos|>", "<|pad|>")
    refused = CliRunner().invoke(app, args)  # nothing is silently overwritten
    assert refused.exit_code != 0 and "--force" in refused.output
