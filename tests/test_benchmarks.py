"""The benchmark suite's own batch builders: what they time must be correct work."""

import numpy as np
import torch

from benchmarks.packing import PaddedLoader, _useful
from benchmarks.trainer import make_source
from midtrain.model import build_model, forward_packed, preset_config
from midtrain.model.loss import token_loss_sums


def test_padded_batches_give_each_documents_own_loss():
    source = make_source(20_000, seed=3)
    loader = PaddedLoader(source, seq_len=384, rows=4, to_longest=True, seed=1)
    (batch,) = loader.next_step()
    model = build_model(preset_config("tiny-llama", vocab_size=8192), seed=0)
    with torch.no_grad():
        padded, _, _ = token_loss_sums(forward_packed(model, batch), batch["labels"], batch["source_ids"], 1)
        alone = 0.0
        for r, i in enumerate(loader.order[:4]):  # each document on its own, unpadded (truncated like the loader)
            start, end = int(source.offsets[i]), int(source.offsets[i + 1])
            ids = torch.from_numpy(source.tokens[start : min(end, start + 384)].astype(np.int64))[None]
            n = ids.shape[1]
            assert int((batch["labels"][r] != -100).sum()) == n - 1  # pads and the first token carry no loss
            logits = model(input_ids=ids, use_cache=False).logits
            alone += float(torch.nn.functional.cross_entropy(logits[0, :-1], ids[0, 1:], reduction="sum"))
    assert abs(float(padded) - alone) <= 1e-4 * alone  # right pads are invisible to causal attention
    assert _useful([batch]) == int((batch["labels"] != -100).sum())


def test_padding_to_seq_len_keeps_the_row_width():
    source = make_source(20_000, seed=3)
    (batch,) = PaddedLoader(source, seq_len=512, rows=3, to_longest=False).next_step()
    assert batch["input_ids"].shape == (3, 512)
    (longest,) = PaddedLoader(source, seq_len=512, rows=3, to_longest=True).next_step()
    assert int((longest["labels"] != -100).sum()) == int((batch["labels"] != -100).sum())
