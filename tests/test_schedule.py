"""LR schedules against closed forms written independently here (CONTRACTS.md §1.1, REFERENCE.md §3)."""

from __future__ import annotations

import math

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from midtrain.schedule import LRSchedule, horizon_tokens_for, plot_schedules

PEAK, MIN = 3e-4, 3e-5
SHAPES = ["linear", "cosine", "1-sqrt", "exponential"]


def closed_form_w(shape: str, p: float, h: float = 0.1) -> float:
    # Independent of the module: spelled out per shape.
    return {
        "linear": 1 - p,
        "cosine": (1 + math.cos(math.pi * p)) / 2,
        "1-sqrt": 1 - p**0.5,
        "exponential": (2 ** (-p / h) - 2 ** (-1 / h)) / (1 - 2 ** (-1 / h)),
    }[shape]


def expect(w: float) -> float:
    return MIN + (PEAK - MIN) * w


# --- warm-up -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["constant", "cosine", "linear", "wsd"])
def test_warmup_endpoints_and_midpoint(kind):
    s = LRSchedule(kind, PEAK, horizon_tokens=10_000, warmup_tokens=1000, min_lr=MIN)
    assert s.lr(0) == 0.0
    assert s.lr(500) == pytest.approx(PEAK / 2, rel=1e-12)
    assert s.lr(250) == pytest.approx(PEAK / 4, rel=1e-12)
    assert s.lr(1000) == pytest.approx(PEAK, rel=1e-12)


def test_rewarm_from_nonzero_start_lr():
    s = LRSchedule("wsd", PEAK, horizon_tokens=10_000, start_lr=1e-4, warmup_tokens=1000, min_lr=MIN)
    assert s.lr(0) == 1e-4
    assert s.lr(500) == pytest.approx((1e-4 + PEAK) / 2, rel=1e-12)
    assert s.lr(1000) == PEAK
    # a warm-"down" (start above peak) is a linear ramp too
    d = LRSchedule("constant", 1e-4, horizon_tokens=100, start_lr=3e-4, warmup_tokens=10)
    assert d.lr(0) == 3e-4 and d.lr(5) == pytest.approx(2e-4) and d.lr(10) == 1e-4


def test_start_lr_without_warmup_is_ignored():
    # With no warm-up, t = 0 is already past the (empty) warm-up: the schedule's own value applies.
    s = LRSchedule("cosine", PEAK, horizon_tokens=100, start_lr=1e-5)
    assert s.lr(0) == PEAK


# --- decays ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 1.0])
def test_wsd_decay_shapes(shape, p):
    T, f = 10_000, 0.2
    s = LRSchedule("wsd", PEAK, T, min_lr=MIN, decay_fraction=f, decay_shape=shape, warmup_tokens=500)
    start = T * (1 - f)
    assert s.lr(start + p * (T - start)) == pytest.approx(expect(closed_form_w(shape, p)), rel=1e-12, abs=1e-18)


@pytest.mark.parametrize("h", [0.05, 0.1, 0.5, 1.0])
def test_exponential_half_life(h):
    s = LRSchedule("wsd", 1.0, 1000, decay_fraction=1.0, decay_shape="exponential", half_life=h)
    w_raw = 2 ** (-1 / h)
    assert s.lr(0) == 1.0
    assert s.lr(1000 * h) == pytest.approx((0.5 - w_raw) / (1 - w_raw), rel=1e-12)
    assert s.lr(1000) == 0.0


@pytest.mark.parametrize("kind", ["cosine", "linear"])
@pytest.mark.parametrize("p", [0.0, 0.25, 0.5, 1.0])
def test_cosine_linear_decay_from_end_of_warmup(kind, p):
    W, T = 1000, 9000
    s = LRSchedule(kind, PEAK, T, min_lr=MIN, warmup_tokens=W)
    assert s.lr(W + p * (T - W)) == pytest.approx(expect(closed_form_w(kind, p)), rel=1e-12)


def test_wsd_stable_region_equals_peak():
    s = LRSchedule("wsd", PEAK, 10_000, min_lr=MIN, warmup_tokens=1000, decay_fraction=0.2)
    for t in [1000, 1001, 4000, 7999, 8000]:
        assert s.lr(t) == PEAK
    assert s.lr(8001) < PEAK
    assert s.decay_start_tokens == 8000


def test_wsd_decay_never_starts_before_warmup_ends():
    s = LRSchedule("wsd", PEAK, 1000, warmup_tokens=500, decay_fraction=1.0)
    assert s.decay_start_tokens == 500
    assert s.lr(500) == PEAK
    assert s.lr(750) == pytest.approx(PEAK / 2)


DECAYING = [("cosine", "linear"), ("linear", "linear")] + [("wsd", sh) for sh in SHAPES]


@pytest.mark.parametrize("kind,shape", DECAYING)
@pytest.mark.parametrize("n_steps,batch", [(2, 1), (7, 4096), (1000, 131_072)])
def test_last_step_is_exactly_min_lr(kind, shape, n_steps, batch):
    T = horizon_tokens_for(n_steps, batch)
    s = LRSchedule(kind, PEAK, T, min_lr=MIN, decay_shape=shape)
    assert s.lr((n_steps - 1) * batch) == MIN  # exact, not approx
    assert s.lr(T + 10 * batch) == MIN  # past the horizon stays at the final value
    assert s.lr(0) == PEAK  # first step at the start LR (no warm-up → peak)


def test_constant_is_peak_everywhere_after_warmup():
    s = LRSchedule("constant", PEAK, 1000, min_lr=0.0, warmup_tokens=100)
    assert [s.lr(t) for t in (100, 500, 1000, 10**9)] == [PEAK] * 4
    assert s.final_lr == PEAK


# --- degenerate horizons -----------------------------------------------------------------------------


@pytest.mark.parametrize("kind,shape", DECAYING)
def test_one_step_stage_T_zero(kind, shape):
    s = LRSchedule(kind, PEAK, 0, min_lr=MIN, start_lr=1e-5, decay_shape=shape)
    assert s.lr(0) == MIN  # the only step is the last step
    assert LRSchedule("constant", PEAK, 0).lr(0) == PEAK
    with pytest.raises(ValueError, match="warmup_tokens"):
        LRSchedule(kind, PEAK, 0, warmup_tokens=1)


@pytest.mark.parametrize("kind", ["cosine", "linear", "wsd"])
def test_warmup_equal_to_horizon(kind):
    s = LRSchedule(kind, PEAK, 1000, min_lr=MIN, warmup_tokens=1000)
    assert s.lr(500) == pytest.approx(PEAK / 2)
    assert s.lr(999) == pytest.approx(PEAK * 0.999)
    assert s.lr(1000) == MIN


def test_constant_warmup_longer_than_horizon_is_allowed():
    s = LRSchedule("constant", PEAK, 100, warmup_tokens=1000)
    assert s.lr(100) == pytest.approx(PEAK / 10)


def test_horizon_tokens_for():
    assert horizon_tokens_for(1, 4096) == 0
    assert horizon_tokens_for(10, 4096) == 9 * 4096
    with pytest.raises(ValueError):
        horizon_tokens_for(0, 4096)


# --- monotonicity (property) -------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(
    kind_shape=st.sampled_from(DECAYING),
    peak=st.floats(1e-7, 1.0),
    min_frac=st.floats(0.0, 1.0),
    T=st.integers(0, 10**9),
    warm_frac=st.floats(0.0, 1.0),
    f=st.floats(1e-6, 1.0),
    h=st.floats(1e-3, 1.0),
    a=st.floats(0.0, 1.2),
    b=st.floats(0.0, 1.2),
)
def test_monotone_after_warmup(kind_shape, peak, min_frac, T, warm_frac, f, h, a, b):
    kind, shape = kind_shape
    W = int(T * warm_frac)
    s = LRSchedule(kind, peak, T, min_lr=peak * min_frac, warmup_tokens=W,
                   decay_fraction=f, decay_shape=shape, half_life=h)
    t1, t2 = sorted((W + a * (T - W), W + b * (T - W)))
    lo, hi = s.lr(t1), s.lr(t2)
    assert hi <= lo
    assert s.min_lr <= hi <= lo <= s.peak_lr
    assert s.lr(T) == s.min_lr


@settings(max_examples=100, deadline=None)
@given(start=st.floats(0.0, 1.0), peak=st.floats(0.0, 1.0), W=st.integers(1, 10**7), x=st.floats(0.0, 1.0))
def test_warmup_stays_between_start_and_peak(start, peak, W, x):
    s = LRSchedule("wsd", peak, 2 * W, start_lr=start, warmup_tokens=W)
    assert min(start, peak) - 1e-15 <= s.lr(x * W) <= max(start, peak) + 1e-15


# --- validation --------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs,field",
    [
        (dict(kind="step"), "kind"),
        (dict(peak_lr=-1e-4), "peak_lr"),
        (dict(peak_lr=float("nan")), "peak_lr"),
        (dict(start_lr=-1.0), "start_lr"),
        (dict(min_lr=-1.0), "min_lr"),
        (dict(min_lr=1e-3), "min_lr"),  # > peak for a decaying kind
        (dict(horizon_tokens=-1), "horizon_tokens"),
        (dict(horizon_tokens=1.5), "horizon_tokens"),
        (dict(warmup_tokens=-5), "warmup_tokens"),
        (dict(warmup_tokens=2000), "warmup_tokens"),  # > horizon
        (dict(decay_fraction=0.0), "decay_fraction"),
        (dict(decay_fraction=1.5), "decay_fraction"),
        (dict(half_life=0.0), "half_life"),
        (dict(half_life=2.0), "half_life"),
        (dict(decay_shape="square"), "decay_shape"),
    ],
)
def test_validation_names_the_field(kwargs, field):
    base = dict(kind="wsd", peak_lr=3e-4, horizon_tokens=1000)
    with pytest.raises(ValueError, match=rf"^{field}: "):
        LRSchedule(**{**base, **kwargs})


def test_constant_accepts_min_lr_above_peak():
    LRSchedule("constant", 1e-4, 100, min_lr=1e-3)  # min_lr is unused by constant


def test_negative_tokens_rejected():
    with pytest.raises(ValueError, match="tokens"):
        LRSchedule("constant", 1e-4, 100).lr(-1)


# --- boundaries and plot -----------------------------------------------------------------------------


def test_boundaries():
    s = LRSchedule("wsd", PEAK, 10_000, start_lr=1e-5, min_lr=MIN, warmup_tokens=1000, decay_fraction=0.2)
    assert s.boundaries() == {
        "start_lr": 1e-5,
        "warmup_end_tokens": 1000.0,
        "warmup_end_lr": PEAK,
        "decay_start_tokens": 8000.0,
        "decay_start_lr": PEAK,
        "end_tokens": 10_000.0,
        "end_lr": MIN,
    }
    c = LRSchedule("cosine", PEAK, 100, min_lr=MIN, warmup_tokens=10).boundaries()
    assert c["decay_start_tokens"] == 10.0 and c["end_lr"] == MIN


def test_plot_writes_png(tmp_path):
    stages = [
        ("warm", LRSchedule("constant", 3e-4, 1000, warmup_tokens=200), 0),
        ("main", LRSchedule("wsd", 3e-4, 4000, start_lr=3e-4, min_lr=3e-5, decay_shape="1-sqrt"), 1000),
        ("one-step", LRSchedule("cosine", 3e-4, 0, min_lr=3e-5), 5000),
    ]
    out = plot_schedules(stages, tmp_path / "sub" / "lr.png")
    assert out.exists() and out.stat().st_size > 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in out.parent.iterdir()] == ["lr.png"]  # no temp file left behind
    with pytest.raises(ValueError, match="schedules"):
        plot_schedules([], tmp_path / "x.png")


def test_the_lr_plot_is_written_with_the_mode_of_any_new_file(tmp_path):
    """It was written through mkstemp, which makes files 0600: a plot others could not read (issue 24)."""
    plain = tmp_path / "plain.txt"
    plain.write_text("x")
    out = plot_schedules([("s", LRSchedule(kind="constant", peak_lr=1e-3, horizon_tokens=1000), 0)], tmp_path / "lr.png")
    assert out.stat().st_mode & 0o777 == plain.stat().st_mode & 0o777
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
