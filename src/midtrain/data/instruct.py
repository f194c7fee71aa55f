"""Instruction data in the mix: render prompt/response or chat records into tokens plus a loss mask.

A record is either `{prompt_field: str, response_field: str}` or `{messages_field: [{"role", "content"}, ...]}`.
It is rendered with the tokenizer's chat template (`template: chat`, or `auto` when the tokenizer has one) or with a
plain-text template (`simple`):

    User: <prompt>\\n
    Assistant: <response>\\n

Rendering produces *pieces* (text, trainable); each piece is tokenized separately and concatenated, so the mask is
exact by construction (no offset mapping, no guessing where a BPE merge straddles the prompt/response boundary).
Only response pieces (and the closing EOS) carry loss: the loader turns mask 0 into label -100 (CONTRACTS §2).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}
Template = Literal["auto", "chat", "simple"]


class SkipRecord(Exception):
    """The record cannot be rendered; `reason` is the skip-report key."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


@dataclass(frozen=True)
class InstructionFormat:
    prompt_field: str = "prompt"
    response_field: str = "response"
    messages_field: str = "messages"
    template: Template = "auto"

    def uses_chat_template(self, tokenizer) -> bool:
        has = bool(getattr(tokenizer, "chat_template", None))
        if self.template == "chat" and not has:
            raise ValueError("template: chat, but the tokenizer has no chat_template (use template: simple)")
        return self.template == "chat" or (self.template == "auto" and has)

    def fingerprint(self, tokenizer) -> str:
        chat = self.uses_chat_template(tokenizer)
        body = [self.prompt_field, self.response_field, self.messages_field, self.template,
                tokenizer.chat_template if chat else None]
        return hashlib.sha256(json.dumps(body).encode()).hexdigest()


def _messages(record: dict, fmt: InstructionFormat) -> list[dict[str, str]]:
    if fmt.messages_field in record:
        msgs = record[fmt.messages_field]
        if not isinstance(msgs, list) or not msgs:
            raise SkipRecord("bad_messages")
        out = []
        for m in msgs:
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise SkipRecord("bad_messages")
            out.append({"role": m["role"], "content": m["content"]})
        if not any(m["role"] == "assistant" and m["content"].strip() for m in out):
            raise SkipRecord("no_response")
        return out
    if fmt.prompt_field not in record or fmt.response_field not in record:
        raise SkipRecord("missing_field")
    prompt, response = record[fmt.prompt_field], record[fmt.response_field]
    if not isinstance(prompt, str) or not isinstance(response, str):
        raise SkipRecord("not_string")
    if not response.strip():
        raise SkipRecord("empty")
    return [{"role": "user", "content": prompt}, {"role": "assistant", "content": response}]


def simple_pieces(messages: list[dict[str, str]]) -> list[tuple[str, bool]]:
    pieces = []
    for m in messages:
        role = ROLE_NAMES.get(m["role"], m["role"].capitalize())
        if m["role"] == "assistant":
            pieces += [(f"{role}: ", False), (m["content"] + "\n", True)]
        else:
            pieces.append((f"{role}: {m['content']}\n", False))
    return pieces


def chat_pieces(messages: list[dict[str, str]], tokenizer) -> list[tuple[str, bool]]:
    """Pieces from the chat template, rendered prefix by prefix; assistant turns are the trainable deltas."""
    pieces: list[tuple[str, bool]] = []
    done = ""
    for k, m in enumerate(messages):
        if m["role"] == "assistant":
            prompt = tokenizer.apply_chat_template(messages[:k], tokenize=False, add_generation_prompt=True)
            pieces.append((_delta(done, prompt), False))
            done = prompt
        full = tokenizer.apply_chat_template(messages[: k + 1], tokenize=False)
        pieces.append((_delta(done, full), m["role"] == "assistant"))
        done = full
    return [p for p in pieces if p[0]]


def _delta(before: str, after: str) -> str:
    if not after.startswith(before):
        # e.g. templates that rewrite earlier turns (drop reasoning) cannot be masked piecewise
        raise SkipRecord("chat_template_not_prefix_stable")
    return after[len(before) :]


def render(record: dict, tokenizer, fmt: InstructionFormat, *, chat: bool | None = None) -> tuple[str, list[Any]]:
    """(plain text of the whole sample, pieces); raises SkipRecord for records that cannot be rendered."""
    messages = _messages(record, fmt)
    use_chat = fmt.uses_chat_template(tokenizer) if chat is None else chat
    pieces = chat_pieces(messages, tokenizer) if use_chat else simple_pieces(messages)
    return "".join(t for t, _ in pieces), pieces


def encode_pieces(pieces: list[tuple[str, bool]], tokenizer, *, chat: bool) -> tuple[np.ndarray, np.ndarray]:
    """Token ids and mask (1 = trainable) with BOS/EOS added unless the template already placed them.

    Chat-template text contains the template's special tokens as text, so they are parsed as specials; the simple
    template treats all text literally (a "<|eos|>" in a prompt stays text, as in pretraining documents).
    """
    ids: list[int] = []
    mask: list[int] = []
    encoded = tokenizer([t for t, _ in pieces], add_special_tokens=False, split_special_tokens=not chat)["input_ids"]
    for (_, trainable), piece_ids in zip(pieces, encoded):
        ids += piece_ids
        mask += [int(trainable)] * len(piece_ids)
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    if bos is not None and (not ids or ids[0] != bos):
        ids, mask = [bos, *ids], [0, *mask]
    if eos is not None and ids[-1] != eos:
        ids, mask = [*ids, eos], [*mask, 1]  # learning to stop is part of the response
    return np.asarray(ids, dtype=np.int64), np.asarray(mask, dtype=np.uint8)


def encode_record(record: dict, tokenizer, fmt: InstructionFormat) -> tuple[str, np.ndarray, np.ndarray]:
    chat = fmt.uses_chat_template(tokenizer)
    text, pieces = render(record, tokenizer, fmt, chat=chat)
    ids, mask = encode_pieces(pieces, tokenizer, chat=chat)
    return text, ids, mask


# --------------------------------------------------------------------------- special tokens


def add_special_tokens(tokenizer, tokens: list[str]) -> int:
    """Add tokens the recipe asks for as special tokens (never split, never merged); returns how many were new."""
    new = [t for t in tokens if t not in tokenizer.get_vocab()]
    if new:
        tokenizer.add_special_tokens({"additional_special_tokens": new}, replace_extra_special_tokens=False)
    return len(new)


def resize_embeddings(model, vocab_size: int) -> bool:
    """Grow input/output embeddings to `vocab_size` rows (new rows: the mean of the old ones); True if resized.

    Mean initialisation keeps the new tokens' initial logits close to the average token's, instead of random
    vectors that start with a large loss spike (Hewitt 2021).
    """
    emb = model.get_input_embeddings()
    if emb.num_embeddings >= vocab_size:
        return False
    model.resize_token_embeddings(vocab_size, mean_resizing=True)
    return True
