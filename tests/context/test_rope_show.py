"""rope_show: the per-dimension table and the wavelength-vs-scale plot."""

from __future__ import annotations

import pytest

from midtrain.context import rope_show


def test_table_lists_every_dimension_and_the_attention_factor():
    out = rope_show("yarn", 4, 1e4, 64, 256, beta_fast=32)
    assert out.splitlines()[0].startswith(
        "RoPE remapping: head_dim 64 (d = 64 rotated), base 10000, L0 256, target 1024"
    )
    assert "attention_factor 1.13863 (logits x1.29648)" in out  # 0.1 ln 4 + 1, squared on the logits
    rows = [line.split() for line in out.splitlines() if line.strip() and line.split()[0].isdigit()]
    assert [int(r[0]) for r in rows] == list(range(32))
    assert rows[0][-1] == "kept" and rows[-1][-1] == "interpolated" and float(rows[-1][3]) == 4.0


def test_several_methods_and_their_own_parameters():
    out = rope_show("linear, ntk,dynamic,longrope,abf", 4, 1e4, 64, 256, rope_theta=5e5)
    for name in ("linear", "ntk", "dynamic", "longrope", "abf"):
        assert f"[{name}]" in out
    assert "identity up to 256" in out  # dynamic exports max_position_embeddings = L0
    assert "YaRN ramp" in out  # longrope without lists shows the LongRoPE search's start
    with pytest.raises(ValueError, match="beta_fats"):
        rope_show("yarn", 4, 1e4, 64, 256, beta_fats=4)
    with pytest.raises(ValueError, match="unknown RoPE method"):
        rope_show("pi", 4, 1e4, 64, 256)


def test_plot_is_written_atomically(tmp_path):
    path = tmp_path / "plots" / "rope.png"
    out = rope_show(["yarn", "linear"], 4, 1e4, 64, 256, plot=path)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["rope.png"]  # no temp file left
    assert str(path) in out


def test_rope_show_reads_the_rotary_settings_of_a_checkpoint(tmp_path):
    """head_dim, base and partial rotary from config.json; L0 from the export's record of its training length
    (issue 24: it assumed head_dim 64 / L0 256 whatever the model)."""
    from typer.testing import CliRunner

    from midtrain.cli import app
    from midtrain.model import build_model, preset_config, save_hf_checkpoint

    config = preset_config("tiny-llama", vocab_size=300)
    config.rope_parameters = {"rope_type": "default", "rope_theta": 50000.0}
    out = save_hf_checkpoint(build_model(config, seed=0), None, tmp_path / "hf", extra={"seq_len": 96})
    head_dim = config.hidden_size // config.num_attention_heads
    result = CliRunner().invoke(app, ["rope", "show", "--method", "linear", "--factor", "2", "--checkpoint", str(out)])
    assert result.exit_code == 0, result.output
    assert f"head_dim {head_dim} " in result.output and "base 50000, L0 96, target 192" in result.output
    (out / "midtrain.json").unlink()  # a plain HF checkpoint: L0 is not guessed from max_position_embeddings
    result = CliRunner().invoke(app, ["rope", "show", "--method", "linear", "--factor", "2", "--checkpoint", str(out)])
    assert result.exit_code == 2 and "does not record L0" in result.output
