"""`midtrain run` with a gate: a failing gate stops (exit 3, resumable, stops again), --override-gate goes on,
a relaxed gate passes without retraining; the report is written with its plots. Also `midtrain eval` on its own."""

from __future__ import annotations

import json

import pytest

from ..train.tiny import midtrain, write_recipe

pytestmark = pytest.mark.slow

EVAL = ("    eval: {max_docs: 4, tasks: [loss, ppl, passkey, niah, arith], lengths: [64, 384], samples: 2, "
        "depths: [0, 1]}\n"
        '    gate: {passkey@384: ">= 0.9", ppl.general: "<= +50%"}\n')


@pytest.fixture(scope="module")
def gated(tmp_path_factory):
    root = tmp_path_factory.mktemp("gated")
    recipe = write_recipe(root, warm_tokens=1024, anneal_tokens=1024)
    recipe.write_text(recipe.read_text().replace("    eval: {max_docs: 4}\n", EVAL))
    args = ("run", str(recipe), "--set", f"run_dir={root / 'out'}")
    first = midtrain(*args, cache=root / "cache", check=False)
    return root, args, first


def test_failing_gate_stops_with_exit_3_and_names_the_condition(gated):
    root, _, first = gated
    assert first.returncode == 3, first.stderr
    assert "stage 'anneal' failed its gate" in first.stderr
    assert "passkey@384 >= 0.9: got 0 -> FAILED" in first.stderr
    assert "ppl.general" not in first.stderr  # only failed conditions are listed
    assert "--override-gate anneal" in first.stderr and "Traceback" not in first.stderr
    after = json.loads((root / "out/eval/anneal.json").read_text())
    assert after["gate"]["passed"] is False and not after["gate"]["overridden"]
    assert {"passkey@384", "niah@384", "ppl@64", "loss@64", "arith", "ppl.general"} <= set(after["metrics"])
    assert "ppl@384" in after["details"]["skipped"]  # no held-out document is that long
    assert set(after["details"]["niah"]["384"]) == {"0", "1"}
    # The report was written where the gate stopped the run.
    assert (root / "out/report.html").is_file()


def test_rerun_stops_again_without_retraining_then_override_and_relaxed_gate_go_on(gated):
    root, args, _ = gated
    metrics = (root / "out/metrics.jsonl").read_text()
    again = midtrain(*args, cache=root / "cache", check=False)
    assert again.returncode == 3 and "already finished" in again.stdout
    assert (root / "out/metrics.jsonl").read_text() == metrics

    relaxed = midtrain(*args, "--set", "stages.anneal.gate.passkey@384=>= 0", cache=root / "cache", check=False)
    assert relaxed.returncode == 0, relaxed.stderr
    assert "passed its gate" in relaxed.stdout
    assert (root / "out/metrics.jsonl").read_text() == metrics  # a gate change re-checks; it does not retrain

    over = midtrain(*args, "--override-gate", "anneal", cache=root / "cache", check=False)
    assert over.returncode == 0, over.stderr
    assert "overridden" in over.stdout
    gate = json.loads((root / "out/eval/anneal.json").read_text())["gate"]
    assert gate["passed"] is False and gate["overridden"] is True
    later = midtrain(*args, cache=root / "cache", check=False)  # the override is recorded
    assert later.returncode == 0, later.stderr



def test_report_has_every_plot_and_the_gate_table(gated):
    root, _, _ = gated
    run_dir = root / "out"
    result = midtrain("report", str(run_dir), cache=root / "cache")
    assert "report:" in result.stdout
    html, md = (run_dir / "report.html").read_text(), (run_dir / "report.md").read_text()
    for png in ["loss.png", "lr_mixture.png", "throughput.png", "ppl_length.png", "passkey.png", "niah_anneal.png",
                "tasks.png"]:
        path = run_dir / "plots" / png
        assert path.stat().st_size > 1000 and path.read_bytes()[:4] == b"\x89PNG", png
        assert f'src="plots/{png}"' in html and f"(plots/{png})" in md
    assert "| anneal | passkey@384 | >= 0.9 |" in md
    assert "| ppl.general |" in md  # the before/after table
    assert "| stage | seq_len | tokens/s (median) | model TFLOP/s | MFU |" in md  # every stage's throughput


def test_report_html_references_only_real_images(gated):
    """Every <img> of report.html points at a PNG that exists beside it and decodes (what a browser would load)."""
    import re
    from html.parser import HTMLParser

    from matplotlib.image import imread

    root, _, _ = gated
    report = root / "out/report.html"

    class Images(HTMLParser):
        srcs: list[str] = []

        def handle_starttag(self, tag, attrs):
            if tag == "img":
                self.srcs.append(dict(attrs)["src"])

    parser = Images()
    parser.feed(report.read_text())
    assert len(parser.srcs) >= 3, parser.srcs
    for src in parser.srcs:
        assert not re.match(r"^[a-z]+://", src) and ".." not in src, src  # relative, inside the run dir
        image = imread(report.parent / src)
        assert image.shape[0] > 100 and image.shape[1] > 100, (src, image.shape)


def test_eval_command_is_reproducible(gated, tmp_path):
    root, _, _ = gated
    hf = root / "out/stages/anneal/hf"
    outs = []
    for k in range(2):
        out = tmp_path / f"eval{k}.json"
        midtrain("eval", str(hf), "--tasks", "loss,ppl,passkey,niah,ruler.niah_single,arith", "--lengths", "128,384",
                 "--samples", "2", "--depths", "0,0.5", "--data", str(root / "prose.jsonl"), "--max-docs", "8",
                 "--out", str(out), cache=root / "cache")
        outs.append(json.loads(out.read_text()))
    assert outs[0] == outs[1]
    metrics = outs[0]["metrics"]
    assert {"loss.prose", "ppl@128", "passkey@384", "niah@384", "ruler.niah_single@384", "ruler@384", "arith"} <= set(
        metrics)
    assert outs[0]["stage"] == "anneal" and outs[0]["when"] == "standalone"
    bad = midtrain("eval", str(hf), "--tasks", "passkey", cache=root / "cache", check=False)
    assert bad.returncode == 2 and "need --lengths" in bad.stderr
