"""GPU check of the flex_attention document-mask path: logits and gradients vs sdpa with the dense 4D mask, and
step time of both at long packed sequences. Run on a CUDA machine: python scripts/gpu_flex_check.py"""

from __future__ import annotations

import json
import time

import torch

from midtrain.model import build_model, forward_packed, preset_config


def packed_batch(b: int, t: int, doc_len: int, vocab: int, device: str) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    pos = []
    for _ in range(b):
        row = []
        while len(row) < t:
            n = int(torch.randint(doc_len // 4, doc_len * 2, (1,), generator=gen))
            row.extend(range(n))
        pos.append(row[:t])
    return {"input_ids": torch.randint(0, vocab, (b, t), generator=gen).to(device),
            "position_ids": torch.tensor(pos, device=device)}


def step_time(model, batch, repeats: int = 5) -> float:
    times = []
    for i in range(repeats + 2):
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = forward_packed(model, batch)
        logits.float().logsumexp(-1).mean().backward()
        torch.cuda.synchronize()
        if i >= 2:
            times.append(time.perf_counter() - t0)
        model.zero_grad(set_to_none=True)
    return sorted(times)[len(times) // 2]


def main() -> None:
    device = "cuda"
    out = {}
    # Separate config objects: a model reads its attention backend from its (possibly shared) config at forward.
    sdpa = build_model(preset_config("medium-llama", vocab_size=8192), seed=0).to(device)
    flex = build_model(preset_config("medium-llama", vocab_size=8192), seed=0,
                       attn_implementation="flex_attention").to(device)
    out["backends"] = [sdpa.config._attn_implementation, flex.config._attn_implementation]
    batch = packed_batch(2, 512, 100, 8192, device)
    a, b = forward_packed(sdpa, batch), forward_packed(flex, batch)
    a.float().logsumexp(-1).mean().backward()
    b.float().logsumexp(-1).mean().backward()
    g = max(float((p.grad - q.grad).abs().max()) for p, q in zip(sdpa.parameters(), flex.parameters()))
    out["fp32_logits_max_abs_diff"] = float((a - b).detach().abs().max())
    out["fp32_grad_max_abs_diff"] = g
    for t, doc in ((4096, 512), (16384, 1024)):
        batch = packed_batch(1, t, doc, 8192, device)
        ts, tf = step_time(sdpa, batch), step_time(flex, batch)
        out[f"seq{t}_doc{doc}"] = {"sdpa_dense_mask_s": ts, "flex_s": tf, "speedup": ts / tf}
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
