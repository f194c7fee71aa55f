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


def _attended_keys(seq_len: int, window: int | None) -> float:
    """Mean keys a causal query attends at row length T, counted by brute force (the oracle for the formula)."""
    span = window or seq_len
    return sum(min(q + 1, span) for q in range(seq_len)) / seq_len


@pytest.mark.parametrize("window", [8, 24, 64, 100])
def test_sliding_layers_count_the_keys_their_window_lets_them_attend(window):
    from transformers import AutoConfig

    seq_len = 64
    common = dict(vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4, head_dim=16)
    full = AutoConfig.for_model("gemma3_text", **common, layer_types=["full_attention"] * 4)
    hybrid = AutoConfig.for_model("gemma3_text", **common, sliding_window=window,
                                  layer_types=["sliding_attention", "full_attention"] * 2)
    per_full_layer = attention_flops_per_token(full, seq_len) / 4
    ratio = _attended_keys(seq_len, window) / _attended_keys(seq_len, None)
    # the formula counts T/2 keys for a full layer where the exact mean is (T+1)/2: within that 1/T rounding
    assert attention_flops_per_token(hybrid, seq_len) == pytest.approx(2 * per_full_layer * (1 + ratio), rel=2e-2)
    if window < seq_len:
        assert attention_flops_per_token(hybrid, seq_len) < attention_flops_per_token(full, seq_len)


def test_per_layer_head_dims_are_counted_per_layer():
    """Gemma 4: global layers twice as wide, read from the per-layer configs (the global head_dim is refused)."""
    from transformers import AutoConfig

    config = AutoConfig.for_model(
        "gemma4_text", vocab_size=64, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=128, vocab_size_per_layer_input=64,
        hidden_size_per_layer_input=8, layer_types=["sliding_attention", "full_attention"],
        per_layer_config={"01": {"head_dim": 32}})
    assert attention_flops_per_token(config, 64) == 6 * 64 * 4 * (16 + 32)


def test_recurrent_layers_add_no_attention_term():
    from transformers import AutoConfig

    config = AutoConfig.for_model("lfm2", vocab_size=64, hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
                                  num_key_value_heads=2, layer_types=["conv", "full_attention"] * 2)
    assert attention_flops_per_token(config, 64) == 2 * 6 * 64 * 64


def _family_config(model_type: str, **overrides):
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    from tests.model.families import tiny_config

    if model_type not in CONFIG_MAPPING_NAMES:
        pytest.skip(f"transformers has no {model_type}")
    return tiny_config(model_type, **overrides)


def test_sliding_window_layers_count_the_keys_they_attend():
    """Gemma 2's sliding/full hybrid (window 8): the sliding layers attend at most 8 keys, so the hybrid costs less
    than the same model with every layer global, and exactly as much once the window covers the row."""
    hybrid = _family_config("gemma2")
    all_global = _family_config("gemma2", layer_types=["full_attention"] * 4)
    per_full_layer = 6 * 48 * hybrid.num_attention_heads * hybrid.head_dim
    window = hybrid.sliding_window
    assert window < 48
    per_sliding_layer = 6 * (2 * window * 48 - window**2) * hybrid.num_attention_heads * hybrid.head_dim // 48
    assert attention_flops_per_token(all_global, 48) == 4 * per_full_layer
    assert attention_flops_per_token(hybrid, 48) == 2 * per_full_layer + 2 * per_sliding_layer
    assert attention_flops_per_token(hybrid, 48) < attention_flops_per_token(all_global, 48)
    assert attention_flops_per_token(hybrid, window) == attention_flops_per_token(all_global, window)
    # a uniform sliding family (Mistral: no layer_types) counts its window on every layer
    mistral = _family_config("mistral")
    assert attention_flops_per_token(mistral, 48) == 4 * per_sliding_layer


def test_chunked_layers_count_their_chunk():
    """Llama 4's chunked layers attend within chunks of attention_chunk_size: c/2 keys on average, as a full
    layer at row length c."""
    cfg = _family_config("llama4_text")
    chunk = cfg.attention_chunk_size
    per_layer = 6 * cfg.num_attention_heads * cfg.head_dim
    assert attention_flops_per_token(cfg, 48) == 2 * per_layer * chunk + 2 * per_layer * 48


def test_recurrent_layers_have_no_attention_term():
    cfg = _family_config("qwen3_next")  # linear_attention / full_attention alternating
    assert attention_flops_per_token(cfg, 48) == 2 * 6 * 48 * cfg.num_attention_heads * cfg.head_dim


def test_gemma4_per_layer_head_dims_match_torchs_counter():
    """Gemma 4 reads head_dim per layer (its global layers are twice as wide; the global config refuses to say):
    the count neither crashes nor uses one width for all layers, and torch's counter agrees with it."""
    cfg = _family_config("gemma4_text", sliding_window=64)  # a window past the row: eager computes what we count
    with pytest.raises(RuntimeError):  # transformers' AmbiguousGlobalPerLayerAttributeError
        getattr(cfg, "head_dim", None)  # a default does not help: it raises, not AttributeError
    head_dims = [cfg.per_layer_config[i].head_dim for i in range(cfg.num_hidden_layers)]
    assert head_dims == [16, 32, 16, 32]
    seq_len, batch = 48, 2
    assert attention_flops_per_token(cfg, seq_len) == 6 * seq_len * cfg.num_attention_heads * sum(head_dims)
    model = build_model(cfg, seed=0, attn_implementation="eager")
    ids = torch.randint(0, cfg.vocab_size, (batch, seq_len))
    with FlopCounterMode(display=False) as counter:
        model(input_ids=ids, use_cache=False).logits.float().sum().backward()
    counts = {str(op): n for op, n in counter.get_flop_counts()["Global"].items()}
    tokens = seq_len * batch
    assert counts["aten.mm"] + counts.get("aten.addmm", 0) == 6 * matmul_parameters(model) * tokens
    assert counts["aten.bmm"] == 2 * attention_flops_per_token(model.config, seq_len) * tokens
    assert training_flops_per_token(model, seq_len) == (
        6 * matmul_parameters(model) + attention_flops_per_token(model.config, seq_len))
    windowed = _family_config("gemma4_text")  # window 8: the sliding (narrow) layers attend fewer keys
    assert attention_flops_per_token(windowed, seq_len) < attention_flops_per_token(cfg, seq_len)
