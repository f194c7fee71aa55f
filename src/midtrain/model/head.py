"""The output head's inputs instead of its logits, for a loss that applies the head itself in chunks.

`forward_packed(..., loss_chunk_tokens=n)` returns `HeadInputs` (the final-normed hidden states and the head's
weight) and `midtrain.model.loss.linear_cross_entropy` computes logits, loss and gradients a chunk of rows at a
time, so the [tokens, vocab] logits never exist in full. The model is still called whole — DDP's and
torch.compile's wrappers keep running — only the output embedding's `forward` is swapped for the identity during
that call.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn

from midtrain.model.hf import unwrap_model

# Config fields of transformers models that post-process the head's logits (softcapping or scaling): the chunked
# loss would silently skip them. Value = the field's "does nothing" setting (None: any value is refused).
_LOGIT_TRANSFORMS = {
    "final_logit_softcapping": None,  # Gemma 2/3
    "logit_scale": None,  # Cohere
    "logits_scaling": 1.0,  # Granite divides the logits by it
    "lm_head_multiplier": 1.0,  # Falcon-H1
}


@dataclass(frozen=True)
class HeadInputs:
    """What the head would have turned into logits: `hidden` [B, T, d] and the bias-free `weight` [V, d]."""

    hidden: torch.Tensor
    weight: torch.Tensor
    chunk_tokens: int


def chunkable_head(model: nn.Module) -> nn.Linear:
    """The output head of a (possibly DDP/compile-wrapped) model if the chunked loss reproduces its logits exactly;
    otherwise a ValueError naming what stands in the way."""
    inner = unwrap_model(model)
    config = inner.config
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(config, name, None)
        if value is not None and value != neutral:
            raise ValueError(f"loss_chunk_tokens: the model's config sets {name}={value!r}, which transforms the "
                             "logits after the head; the chunked loss does not apply it (unset loss_chunk_tokens)")
    head = inner.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        kind = type(head).__name__ + (" with a bias" if isinstance(head, nn.Linear) else "")
        raise ValueError(f"loss_chunk_tokens needs a bias-free nn.Linear output head (get_output_embeddings() is "
                         f"{kind}); unset loss_chunk_tokens")
    return head


def gathered_weight(head: nn.Linear) -> torch.Tensor:
    """The head's weight as the model's forward left it. Under FSDP2 the root module (which holds the head in
    midtrain's `distributed: fsdp2`) is not resharded after forward, so the weight is the all-gathered parameter whose
    gradient FSDP reduce-scatters; a head sharded as its own unit would still be a shard here: refused."""
    if _is_dtensor(head.weight):
        raise ValueError("loss_chunk_tokens: the output head's weight is still sharded after the model's forward "
                         "(an FSDP unit of its own, resharded after forward); shard the head with the root module "
                         "or unset loss_chunk_tokens")
    return head.weight


AUTO_ABOVE_BYTES = 1 << 30  # `loss_chunk_tokens: auto` chunks where a micro-batch's fp32 logits would pass this
AUTO_CHUNK_ELEMENTS = 1 << 26  # logits per chunk under auto (256 MiB fp32): 2048 tokens at 32k, 512 at 128k


def resolve_loss_chunk_tokens(setting: int | str | None, model: nn.Module, batch_tokens: int) -> int | None:
    """The recipe's `loss_chunk_tokens` for batches of `batch_tokens` tokens: an int is used as given (an
    unsupported head is an error), null means full logits, "auto" chunks where the full fp32 logits would pass
    1 GiB and the head allows it (else full logits, as before)."""
    if setting != "auto":
        if setting is not None:
            chunkable_head(model)  # refuses an unsupported head before any step
        return setting
    head = unwrap_model(model).get_output_embeddings()
    vocab = head.weight.shape[0] if isinstance(head, nn.Linear) else 0  # any other head: full logits
    if batch_tokens * vocab * 4 <= AUTO_ABOVE_BYTES:
        return None
    try:
        chunkable_head(model)
    except ValueError:  # softcapped, scaled or biased head: the full logits it is
        return None
    return min(4096, max(256, AUTO_CHUNK_ELEMENTS // vocab))


def _is_dtensor(t: torch.Tensor) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return False
    return isinstance(t, DTensor)


def _identity(x: torch.Tensor) -> torch.Tensor:
    return x


@contextlib.contextmanager
def hidden_states_only(head: nn.Module) -> Iterator[None]:
    """While inside, `head(x)` returns x (its hooks still run): the model's `logits` are the head's inputs.

    Sets the instance attribute `forward` and restores whatever was there before, on error too. Under torch.compile
    the swap is a guarded attribute: a compiled model keeps one graph per setting.
    """
    had = "forward" in vars(head)
    previous = vars(head).get("forward")
    head.forward = _identity
    try:
        yield
    finally:
        if had:
            head.forward = previous
        else:
            del head.forward
