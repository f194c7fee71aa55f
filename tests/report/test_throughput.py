"""The report's throughput section from metrics rows: medians per stage without the warm-up step, MFU optional."""

import json

from midtrain.report.build import write_report


def _run_dir(tmp_path, rows):
    run = tmp_path / "run"
    run.mkdir()
    stages = [{"name": "anneal", "tokens": 4096, "steps": 4, "seq_len": 128, "init": "weights",
               "first_tokens": 0, "mixture": {"web": 1.0}},
              {"name": "extend", "tokens": 2048, "steps": 2, "seq_len": 512, "init": "weights",
               "first_tokens": 4096, "mixture": {"web": 1.0}}]
    (run / "plan.json").write_text(json.dumps({"stages": stages}))
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return run


def test_throughput_table_and_plot(tmp_path):
    rows = [{"event": "train", "stage": "anneal", "step": i + 1, "tokens": 1024 * (i + 1), "loss": 3.0, "lr": 1e-3,
             "tokens_per_s": tps, "model_tflops_per_s": tps * 1e-9, "mfu": tps / 10_000}
            for i, tps in enumerate([50.0, 1000.0, 3000.0, 2000.0])]  # the first (warm-up) step is left out
    rows += [{"event": "train", "stage": "extend", "step": 5 + i, "tokens": 4096 + 1024 * (i + 1), "loss": 2.0,
              "lr": 1e-4, "tokens_per_s": 500.0} for i in range(2)]  # no MFU logged (an MoE, emulated bf16)
    run = _run_dir(tmp_path, rows)
    write_report(run)
    md = (run / "report.md").read_text()
    assert "| anneal | 128 | 2,000 | 2e-06 | 20.0% |" in md
    assert "| extend | 512 | 500 | – | – |" in md
    png = run / "plots" / "throughput.png"
    assert png.read_bytes()[:4] == b"\x89PNG" and png.stat().st_size > 1000
