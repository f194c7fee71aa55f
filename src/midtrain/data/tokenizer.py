"""Tokenizers that need no download: a byte-level tokenizer and a small byte-level BPE trainer.

Both are plain Hugging Face fast tokenizers, so `save_pretrained` / `AutoTokenizer.from_pretrained` round-trip them and
they ship with exported checkpoints like any other tokenizer.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerBase, PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|eos|>", "<|pad|>"
SPECIAL_TOKENS = [BOS, EOS, PAD]


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character map (what `pre_tokenizers.ByteLevel` emits)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = list(bs)
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def _wrap(tk: Tokenizer) -> PreTrainedTokenizerFast:
    # clean_up_tokenization_spaces would rewrite " ." -> "." and break decode(encode(x)) == x.
    return PreTrainedTokenizerFast(
        tokenizer_object=tk, bos_token=BOS, eos_token=EOS, pad_token=PAD, clean_up_tokenization_spaces=False
    )


def byte_tokenizer() -> PreTrainedTokenizerFast:
    """256 byte tokens (id == byte value) + `<|bos|>`=256, `<|eos|>`=257, `<|pad|>`=258; lossless for any text."""
    b2u = _bytes_to_unicode()
    tk = Tokenizer(models.BPE(vocab={b2u[b]: b for b in range(256)}, merges=[]))
    # No merges, so regex pre-splitting would change nothing but costs ~3x in encode speed.
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tk.decoder = decoders.ByteLevel()
    tk.add_special_tokens(SPECIAL_TOKENS)
    return _wrap(tk)


def train_bpe(texts: Iterable[str], vocab_size: int) -> PreTrainedTokenizerFast:
    """Train a byte-level BPE (digits split one per token, REFERENCE §10) with the same special tokens."""
    minimum = 256 + len(SPECIAL_TOKENS)
    if vocab_size < minimum:
        raise ValueError(f"vocab_size={vocab_size} is below {minimum} (256 bytes + {len(SPECIAL_TOKENS)} specials)")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)]
    )
    tk.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte stays encodable
        show_progress=False,
    )
    tk.train_from_iterator(texts, trainer=trainer)
    return _wrap(tk)


def tokenizer_fingerprint(tok: PreTrainedTokenizerBase) -> str:
    """sha256 over the tokenizer's canonical JSON and its special-token ids (stable across save/reload)."""
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        body = json.dumps(json.loads(backend.to_str()), sort_keys=True, ensure_ascii=False)
    else:  # slow tokenizer: the vocabulary is the best description we have
        body = type(tok).__name__ + json.dumps(sorted(tok.get_vocab().items()), ensure_ascii=False)
    specials = [tok.bos_token_id, tok.eos_token_id, tok.pad_token_id, len(tok)]
    h = hashlib.sha256(body.encode("utf-8"))
    h.update(json.dumps(specials).encode())
    return h.hexdigest()
