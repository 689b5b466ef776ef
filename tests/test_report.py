"""Report: smoothing against closed forms, judged plot data (means, s.e., paired deltas) and
what the figures draw, valid linked PNGs, summary/data tables, escaped cells, samples."""

import math
import re

import numpy as np
import pytest

from rlhf_jax.metrics import MetricsLogger, read_jsonl
from rlhf_jax.plots import (RAW_ALPHA, curve_figure, judge_figure, judge_kl_figure,
                            judged_plot_data, plot_curves, smooth_ema, smoothing_span)
from rlhf_jax.report import markdown_table, md_escape, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 100 and data[:8] == PNG_MAGIC


def _records(stage, n, **series):
    return [{"step": i, "stage": stage, **{k.replace("__", "/"): f(i) for k, f in series.items()}}
            for i in range(n)]


def _mean_se(x):
    x = np.asarray(x, np.float64)
    return float(x.mean()), float(x.std(ddof=1) / math.sqrt(len(x)))


def _judged(seed=0, n=200):
    """Per-prompt judge scores and KLs of 3 models -> the ``judged`` mapping (baseline SFT)."""
    rng = np.random.default_rng(seed)
    judge = {"SFT": rng.normal(0.0, 0.5, n)}
    judge["PPO"] = judge["SFT"] + rng.normal(0.30, 0.2, n)
    judge["DPO"] = judge["SFT"] + rng.normal(0.15, 0.2, n)
    kl = {"SFT": np.zeros(n), "PPO": rng.gamma(4.0, 1.0, n), "DPO": rng.gamma(2.0, 1.0, n)}
    judged = {}
    for m in judge:
        jm, js = _mean_se(judge[m])
        km, ks = _mean_se(kl[m])
        judged[m] = {"judge_mean": jm, "judge_se": js, "kl_mean": km, "kl_se": ks}
        if m != "SFT":
            dm, ds = _mean_se(judge[m] - judge["SFT"])
            judged[m].update(delta_mean=dm, delta_se=ds)
    return judged


# ---- smoothing ----------------------------------------------------------------------------
@pytest.mark.parametrize("span", [1, 2, 5, 30])
def test_smooth_ema_constant_is_constant(span):
    np.testing.assert_allclose(smooth_ema(np.full(17, 2.5), span), 2.5, rtol=1e-12)
    y = np.full(9, -1.0)
    y[[2, 3, 7]] = np.nan
    s = smooth_ema(y, span)
    assert np.isnan(s[[2, 3, 7]]).all()  # a gap stays a gap
    np.testing.assert_allclose(s[np.isfinite(y)], -1.0, rtol=1e-12)


@pytest.mark.parametrize("span", [1, 3, 10])
def test_smooth_ema_step_closed_form(span):
    # y_t = 0 for t < k, 1 for t >= k: s_t = (1 - w^(t-k+1)) / (1 - w^(t+1)), w = 1 - 2/(span+1)
    w, k, n = 1 - 2 / (span + 1), 4, 25
    y = (np.arange(n) >= k).astype(float)
    t = np.arange(n)
    want = np.where(t >= k, (1 - w ** (t - k + 1)) / (1 - w ** (t + 1)), 0.0) if w > 0 else y
    np.testing.assert_allclose(smooth_ema(y, span), want, rtol=1e-12, atol=1e-15)
    # With NaN gaps the weights count only finite points: same closed form in the count c_t.
    y_gap = np.insert(y, [2, 6, 6, 10], np.nan)
    s = smooth_ema(y_gap, span)
    fin = np.isfinite(y_gap)
    assert np.isnan(s[~fin]).all()
    np.testing.assert_allclose(s[fin], want, rtol=1e-12, atol=1e-15)


def test_smooth_ema_matches_weighted_sum_definition():
    rng = np.random.default_rng(1)
    y = rng.normal(size=40)
    y[[0, 5, 6, 30]] = np.nan
    span = 7
    w = 1 - 2 / (span + 1)
    fin = np.flatnonzero(np.isfinite(y))
    s = smooth_ema(y, span)
    for t in fin:
        past = fin[fin <= t]
        wt = w ** (len(past) - 1 - np.arange(len(past)))  # w^(c_t - c_j)
        assert s[t] == pytest.approx(float(np.sum(wt * y[past]) / np.sum(wt)), rel=1e-12)


def test_smooth_ema_short_and_defaults():
    assert smooth_ema([], None).shape == (0,)
    np.testing.assert_array_equal(smooth_ema([3.0]), [3.0])
    assert np.isnan(smooth_ema([np.nan, np.nan])).all()
    # Default span: a tenth of the finite points, clipped to [1, 50]; span 1 is the identity.
    assert [smoothing_span(n) for n in (0, 6, 19, 20, 300, 10_000)] == [1, 1, 1, 2, 30, 50]
    y = np.array([0.0, 5.0, -2.0, 1.0])
    np.testing.assert_array_equal(smooth_ema(y), y)
    long = np.arange(300.0)
    np.testing.assert_allclose(smooth_ema(long), smooth_ema(long, 30))
    with pytest.raises(ValueError, match="span must be >= 1"):
        smooth_ema(y, 0)
    with pytest.raises(ValueError, match="1-D"):
        smooth_ema(np.zeros((2, 2)), 3)


def test_curve_figure_draws_raw_faint_and_ema_solid():
    n = 60
    recs = _records("ppo", n, objective__kl=lambda i: 0.1 * i + (-1) ** i)
    recs[10]["objective/kl"] = float("nan")
    fig, missing = curve_figure(recs, ["objective/kl", "nope"], span=5)
    assert missing == ["nope"]
    raw, smooth = fig.axes[0].get_lines()
    y = np.array([r["objective/kl"] for r in recs])
    assert raw.get_alpha() == RAW_ALPHA and smooth.get_alpha() in (None, 1.0)
    np.testing.assert_array_equal(raw.get_xdata(), np.arange(n))
    np.testing.assert_array_equal(raw.get_ydata(), y)
    np.testing.assert_allclose(smooth.get_ydata(), smooth_ema(y, 5), equal_nan=True)
    assert smooth.get_label() == "ppo"


def test_plot_curves_reports_missing(tmp_path):
    recs = _records("ppo", 5, objective__kl=lambda i: 0.1 * i) + \
        _records("ppo2", 3, objective__kl=lambda i: 0.2 * i)
    missing = plot_curves(recs, ["objective/kl", "nope/metric"], tmp_path / "a" / "kl.png",
                          title="KL")
    assert missing == ["nope/metric"]
    assert _is_png(tmp_path / "a" / "kl.png")
    assert plot_curves([], ["x"], tmp_path / "empty.png", title="t") == ["x"]
    assert _is_png(tmp_path / "empty.png")


# ---- judged comparison --------------------------------------------------------------------
def test_judged_plot_data_values():
    judged = _judged()
    d = judged_plot_data(judged, "SFT")
    assert d.models == ("SFT", "PPO", "DPO") and d.delta_models == ("PPO", "DPO")
    for i, m in enumerate(d.models):
        assert d.judge_mean[i] == judged[m]["judge_mean"]
        assert d.judge_se[i] == judged[m]["judge_se"]
        assert d.kl_mean[i] == judged[m]["kl_mean"] and d.kl_se[i] == judged[m]["kl_se"]
    np.testing.assert_array_equal(d.delta_mean, [judged[m]["delta_mean"] for m in ("PPO", "DPO")])
    np.testing.assert_array_equal(d.delta_se, [judged[m]["delta_se"] for m in ("PPO", "DPO")])
    # The paired s.e. is smaller than the unpaired one: why the second panel exists.
    unpaired = math.hypot(judged["PPO"]["judge_se"], judged["SFT"]["judge_se"])
    assert d.delta_se[0] < 0.6 * unpaired
    # Paired mean difference == difference of means.
    assert d.delta_mean[0] == pytest.approx(d.judge_mean[1] - d.judge_mean[0], abs=1e-12)

    no_base = judged_plot_data(judged)
    assert no_base.delta_models == () and no_base.delta_mean.shape == (0,)
    no_kl = judged_plot_data({m: {k: v for k, v in s.items() if not k.startswith("kl")}
                              for m, s in judged.items()}, "SFT")
    assert no_kl.kl_mean is None and no_kl.kl_se is None
    no_se = judged_plot_data({"A": {"judge_mean": 0.1}})
    assert np.isnan(no_se.judge_se[0])


@pytest.mark.parametrize("mutate, match", [
    (lambda j: j["PPO"].pop("judge_mean"), "'PPO'.*judge_mean"),
    (lambda j: j["DPO"].pop("delta_mean"), "'DPO'.*delta_mean"),
    (lambda j: j["DPO"].update(judge_se=-0.1), "standard error"),
    (lambda j: j["PPO"].update(judge_mean="high"), "must be a number"),
    (lambda j: j["PPO"].update(kl_mean=None), "kl_mean is given for"),
])
def test_judged_plot_data_rejects_bad_input(mutate, match):
    judged = _judged()
    mutate(judged)
    with pytest.raises(ValueError, match=match):
        judged_plot_data(judged, "SFT")


def test_judged_plot_data_rejects_unknown_baseline_and_empty():
    with pytest.raises(ValueError, match="baseline 'REF' is not a judged model"):
        judged_plot_data(_judged(), "REF")
    with pytest.raises(ValueError, match="empty"):
        judged_plot_data({})


def _errorbar_segments(ax):
    """(x, y_low, y_high) or (y, x_low, x_high) of every error-bar segment in ``ax``."""
    from matplotlib.container import ErrorbarContainer
    segs = []
    for c in ax.containers:
        if isinstance(c, ErrorbarContainer):
            for coll in c.lines[2]:
                segs += [np.asarray(s) for s in coll.get_segments()]
    return segs


def test_judge_figure_draws_means_and_se():
    d = judged_plot_data(_judged(), "SFT")
    fig = judge_figure(d)
    left, right = fig.axes
    heights = [p.get_height() for p in left.patches]
    np.testing.assert_allclose(heights, d.judge_mean)
    segs = _errorbar_segments(left)
    np.testing.assert_allclose([s[:, 1].min() for s in segs], d.judge_mean - d.judge_se)
    np.testing.assert_allclose([s[:, 1].max() for s in segs], d.judge_mean + d.judge_se)
    assert [t.get_text() for t in left.get_xticklabels()] == ["SFT", "PPO", "DPO"]
    assert "±1 s.e." in left.get_ylabel()
    # Right panel: paired deltas of the non-baseline models only.
    np.testing.assert_allclose([p.get_height() for p in right.patches], d.delta_mean)
    segs = _errorbar_segments(right)
    np.testing.assert_allclose([s[:, 1].max() - s[:, 1].min() for s in segs], 2 * d.delta_se)
    assert [t.get_text() for t in right.get_xticklabels()] == ["PPO", "DPO"]
    assert "SFT" in right.get_ylabel() and "±1 s.e." in right.get_ylabel()
    # Same colour for a model in both panels.
    assert left.patches[1].get_facecolor() == right.patches[0].get_facecolor()
    # Without a baseline: one panel.
    assert len(judge_figure(judged_plot_data(_judged())).axes) == 1


def test_judge_kl_figure_draws_both_error_bars():
    d = judged_plot_data(_judged(), "SFT")
    ax = judge_kl_figure(d).axes[0]
    from matplotlib.container import ErrorbarContainer
    conts = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    assert [c.get_label() for c in conts] == ["SFT", "PPO", "DPO"]
    for i, c in enumerate(conts):
        x, y = c.lines[0].get_data()
        assert (x[0], y[0]) == (d.kl_mean[i], d.judge_mean[i])
        xbar, ybar = [np.asarray(coll.get_segments()[0]) for coll in c.lines[2]]
        np.testing.assert_allclose(sorted(xbar[:, 0]), [d.kl_mean[i] - d.kl_se[i],
                                                        d.kl_mean[i] + d.kl_se[i]])
        np.testing.assert_allclose(sorted(ybar[:, 1]), [d.judge_mean[i] - d.judge_se[i],
                                                        d.judge_mean[i] + d.judge_se[i]])
    assert [t.get_text() for t in ax.texts] == ["SFT", "PPO", "DPO"]
    assert "nats" in ax.get_xlabel() and "s.e." in ax.get_xlabel()
    with pytest.raises(ValueError, match="kl_mean"):
        judge_kl_figure(judged_plot_data({"A": {"judge_mean": 0.0}}))


# ---- Markdown and the whole report --------------------------------------------------------
def test_markdown_escaping():
    assert md_escape("a|b\nc") == "a\\|b<br>c"
    assert md_escape("<|im_end|>") == "&lt;\\|im_end\\|&gt;"
    table = markdown_table([{"model": "x|y", "score": 0.123456}, {"model": "z", "extra": None}])
    lines = table.splitlines()
    assert lines[0] == "| model | score | extra |"
    assert lines[2] == "| x\\|y | 0.1235 |  |"
    assert len(lines) == 4


def test_write_report(tmp_path):
    # Records go through the JSONL logger, as in a real run.
    run = tmp_path / "run"
    with MetricsLogger(run) as log:
        for i in range(6):
            log.log(i, {"sft/loss": 3.0 - 0.3 * i}, stage="sft")
            log.log(i, {"rm/accuracy": 0.5 + 0.05 * i, "rm/loss": 0.69 - 0.05 * i}, stage="rm")
            log.log(i, {"objective/score": 0.1 * i, "objective/kl": 0.02 * i}, stage="ppo")
            log.log(i, {"dpo/rewards/margins": 0.2 * i}, stage="dpo")
        for m in ("sft", "ppo", "dpo"):  # one evaluation point per model: not a curve
            log.log(0, {"eval/judge": 0.1, "eval/judge_se": 0.01}, stage=f"eval_{m}")
    recs = read_jsonl(run / "metrics.jsonl")
    stages = {}
    for r in recs:
        stages.setdefault(r["stage"], []).append(r)

    prompts = ["Write a review of the movie.", "Describe the | weather\ntoday."]
    samples = {m: [(p, f"{m} says {j} <|im_end|>") for j, p in enumerate(prompts)]
               for m in ("SFT", "PPO", "DPO")}
    rows = [{"model": "SFT", "judge score": 0.01, "kl": 0.0},
            {"model": "PPO", "judge score": 0.25, "kl": 0.1},
            {"model": "DPO", "judge score": 0.2, "kl": 0.08}]
    data_rows = [{"source": "movie reviews", "kept": 980, "skipped: too long": 12,
                  "skipped: empty": 0},
                 {"source": "tweets", "kept": 400, "skipped: too long": 0, "skipped: empty": 3}]
    out = tmp_path / "report"
    path = write_report(out, title="Tiny RLHF run", stages=stages, summary_rows=rows,
                        samples=samples, notes="Trained on *fake* data.", judged=_judged(),
                        baseline="SFT", data_rows=data_rows)
    assert path == out / "report.md"
    text = path.read_text()
    assert text.startswith("# Tiny RLHF run")

    # Summary table with one row per model.
    table = text.split("## Summary")[1].split("##")[0]
    body = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert body[0] == "| model | judge score | kl |"
    assert [ln.split("|")[1].strip() for ln in body[2:]] == ["SFT", "PPO", "DPO"]

    # Plots exist, are PNGs, are linked relatively, each with a one-line caption under it.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    stems = [l.split("/")[-1] for l in links]
    assert stems[:2] == ["judge.png", "judge_vs_kl.png"]
    assert {"reward.png", "kl.png", "rm.png", "dpo.png", "sft.png"} <= set(stems)
    assert "ppo.png" not in stems and "rollout.png" not in stems  # no such keys logged
    assert len(stems) == len(set(stems))  # the judge appears once, as bars, never as a curve
    for link in links:
        assert not link.startswith("/")
        assert _is_png(out / link)
        caption = text.split(f"]({link})\n\n", 1)[1].split("\n", 1)[0]
        assert caption.startswith("*") and caption.endswith("*") and "?" in caption, link
    judged_sec = text.split("## Judged comparison")[1].split("## Training curves")[0]
    assert "±1 s.e." in judged_sec and "paired difference to SFT" in judged_sec
    assert "Rafailov et al. 2023" in judged_sec
    assert "EMA" in text or "exponential moving average" in text

    # Data section: per source kept / skipped counts.
    data_sec = text.split("## Data")[1].split("## Samples")[0]
    assert "| source | kept | skipped: too long | skipped: empty |" in data_sec
    assert "| tweets | 400 | 0 | 3 |" in data_sec

    # Samples: each prompt once, each model's completion under it, escaped.
    samples_sec = text.split("## Samples")[1].split("## Notes")[0]
    assert samples_sec.count("### Prompt") == 2
    assert "Describe the \\| weather<br>today." in samples_sec
    for m in ("SFT", "PPO", "DPO"):
        for j in range(2):
            assert f"| {m} | {m} says {j} &lt;\\|im_end\\|&gt; |" in samples_sec
    assert "Trained on *fake* data." in text.split("## Notes")[1]


def test_write_report_judged_without_kl_or_baseline(tmp_path):
    judged = {m: {"judge_mean": v, "judge_se": 0.02} for m, v in (("A", 0.1), ("B", 0.3))}
    text = write_report(tmp_path, title="t", stages={}, judged=judged).read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links == ["plots/judge.png"] and _is_png(tmp_path / links[0])
    assert not (tmp_path / "plots" / "judge_vs_kl.png").exists()
    assert "paired difference" not in text and "## Data" not in text
    with pytest.raises(ValueError, match="clash"):
        write_report(tmp_path, title="t", stages={}, judged=judged,
                     plots=[("judge", "Judge", ("*judge*",))])


def test_write_report_uneven_samples(tmp_path):
    samples = {"SFT": [("p1", "a"), ("p2", "b")], "PPO": [("p1", "c")]}
    path = write_report(tmp_path, title="t", stages={}, summary_rows=[], samples=samples)
    text = path.read_text()
    assert "| PPO | - |" in text  # PPO has nothing for p2: shown, not dropped
    assert "## Training curves" not in text and "## Judged comparison" not in text
