"""MFU's numerator against torch's own FLOP counter (an independent oracle), and the matmul peak's sanity."""

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from midtrain.model import build_model, preset_config
from midtrain.train.flops import (
    attention_flops_per_token,
    matmul_parameters,
    measure_matmul_peak,
    training_flops_per_token,
)


def _counted(preset: str, seq_len: int, batch: int = 2) -> tuple[torch.nn.Module, dict[str, int]]:
    """FLOPs torch counts for one forward + backward, by op (eager attention: plain bmm we can count)."""
    model = build_model(preset_config(preset, vocab_size=512), seed=0, attn_implementation="eager")
    ids = torch.randint(0, 512, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.float().sum().backward()
    return model, {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}


@pytest.mark.parametrize("preset", ["tiny-llama", "tiny-llama-4h", "tiny-qwen2"])
def test_flops_per_token_match_torchs_counter(preset):
    seq_len, batch = 48, 2
    model, counts = _counted(preset, seq_len, batch)
    tokens = seq_len * batch
    # Every projection and the head: exactly 6 FLOPs per weight per token.
    assert counts["aten.mm"] + counts.get("aten.addmm", 0) == 6 * matmul_parameters(model) * tokens
    # Eager attention computes the full T x T square; causal attention needs half of it (what MFU counts).
    assert counts["aten.bmm"] == 2 * attention_flops_per_token(model.config, seq_len) * tokens
    assert training_flops_per_token(model, seq_len) == (
        6 * matmul_parameters(model) + attention_flops_per_token(model.config, seq_len))


def test_tied_head_counts_as_a_matmul():
    tied = build_model(preset_config("tiny-qwen2", vocab_size=512), seed=0)
    embedding = tied.get_input_embeddings().weight
    assert tied.get_output_embeddings().weight is embedding  # one tensor, two uses
    layers = sum(p.numel() for name, p in tied.named_parameters()
                 if p.dim() == 2 and p is not embedding)  # q/k/v/o and MLP weights
    assert matmul_parameters(tied) == layers + embedding.numel()


def test_attention_term_uses_head_dim_not_hidden_size():
    cfg = preset_config("tiny-qwen2", vocab_size=512)
    cfg.head_dim = 2 * cfg.hidden_size // cfg.num_attention_heads
    assert attention_flops_per_token(cfg, 100) == 6 * cfg.num_hidden_layers * 100 * 2 * cfg.hidden_size


def test_matmul_peak_is_plausible():
    peak = measure_matmul_peak(torch.float32, size=256, seconds=0.05)
    assert 1e8 < peak < 1e14  # a CPU core does 1-100 GFLOP/s; anything else means the timing is broken


def _fake_trainer(precision: str, world_size: int = 1):
    from types import SimpleNamespace

    dist = SimpleNamespace(device=torch.device("cpu"), world_size=world_size)
    return SimpleNamespace(dist=dist, precision=precision)


def test_throughput_monitor_adds_flops_and_mfu_to_train_rows():
    from midtrain.train.callbacks import ThroughputMonitor

    monitor = ThroughputMonitor(flops_per_token=3_000_000, measure_seconds=0.05)
    trainer = _fake_trainer("fp32", world_size=2)
    monitor.on_stage_start(trainer)
    assert monitor.peak_flops > 1e8
    row = {"tokens_per_s": 20_000.0}
    monitor.on_step_end(trainer, row)
    assert row["model_tflops_per_s"] == pytest.approx(3e6 * 2e4 / 1e12)
    assert row["mfu"] == pytest.approx(3e6 * 2e4 / (monitor.peak_flops * 2))  # the peak of every rank


def test_throughput_monitor_gives_no_mfu_for_emulated_bf16(monkeypatch):
    from midtrain.train import callbacks

    monkeypatch.setattr("midtrain.train.precision.native_bf16", lambda device: False)
    monitor = callbacks.ThroughputMonitor(flops_per_token=10)
    monitor.on_stage_start(_fake_trainer("bf16-mixed"))
    row = {"tokens_per_s": 5.0}
    monitor.on_step_end(_fake_trainer("bf16-mixed"), row)
    assert row["model_tflops_per_s"] == pytest.approx(50 / 1e12) and "mfu" not in row


def test_measuring_the_peak_leaves_the_global_rng_alone():
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    measure_matmul_peak(torch.float32, size=64, seconds=0.01)
    assert torch.equal(torch.rand(3), expected)


def test_progress_lines_show_mfu_when_logged():
    import io
    from types import SimpleNamespace

    from rich.console import Console

    from midtrain.train.callbacks import ProgressBar

    out = io.StringIO()
    bar = ProgressBar(is_main=True, console=Console(file=out, force_terminal=False, width=200))
    trainer = SimpleNamespace(stage=SimpleNamespace(name="anneal", steps=2), state=SimpleNamespace(stage_step=0))
    bar.on_stage_start(trainer)
    trainer.state.stage_step = 1
    bar.on_step_end(trainer, {"loss": 2.5, "lr": 1e-3, "tokens_per_s": 1234.0, "mfu": 0.561})
    trainer.state.stage_step = 2
    bar.on_step_end(trainer, {"loss": 2.4, "lr": 1e-3, "tokens_per_s": 1200.0})
    lines = out.getvalue().splitlines()
    assert "1,234 tok/s  mfu 56%" in lines[0] and "anneal 1/2" in lines[0]
    assert "1,200 tok/s  eta" in lines[1]  # no mfu logged (an MoE, emulated bf16): none shown
