"""Plots that answer questions: training curves and the judged comparison of models.

Every figure is a bare matplotlib ``Figure`` (rendered with Agg; pyplot's global backend and
state are never touched); ``rlhf_jax.report.write_report`` saves them next to the report.

- Training curves (``curve_series``, ``curve_figure``, ``plot_curves``): how did the training
  metrics move? Raw values faint (alpha ``RAW_ALPHA``), a bias-corrected exponential moving
  average (``smooth_ema``, span ``smoothing_span``) solid on top, one series per stage.
- Judged comparison (``judged_plot_data`` validates and arranges, ``JudgedPlotData``):
  ``judge_figure`` answers which model the judge prefers and whether the gap is larger than
  the noise (one bar per model, mean ±1 s.e., and the paired difference to a baseline);
  ``judge_kl_figure`` answers how much judge score each model bought per nat of KL from the
  reference (the reward–KL plane of Rafailov et al. 2023, Figure 2).
- Sweeps (``sweep_metric_figure``): how does a summary metric move along one grid axis? The
  mean over seeds per grid point with ±1 s.e. bars, one line per value of the other axes.
- Overoptimization (``probe_curve``, ``gold_proxy_arm``, ``overoptimization_figure``): does
  the gold score peak and fall while the proxy reward keeps rising as the policy moves away
  from its start? Gold and proxy against sqrt(KL) per arm (Gao et al. 2023, Fig. 1).
- The reward–KL frontier (``FrontierPoint``, ``frontier_figure``): judge score against KL to
  the reference, one point per sweep setting, PPO and DPO apart (Rafailov et al. 2023, Fig. 2).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

#: Alpha of the raw (unsmoothed) training-curve points.
RAW_ALPHA = 0.25


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float, np.integer, np.floating)) and not isinstance(v, bool)


# ---- smoothing ----------------------------------------------------------------------------
def smoothing_span(n: int) -> int:
    """Default EMA span for a series of ``n`` points: ``clip(n // 10, 1, 50)``.

    About a tenth of the series, so a short series (< 20 points) is left nearly raw and a long
    one is smoothed over at most ~50 points (a fixed weight would over-smooth 6 points and
    barely touch 5,000).
    """
    return int(min(50, max(1, n // 10)))


def smooth_ema(values: Sequence[float], span: int | None = None) -> np.ndarray:
    """Bias-corrected exponential moving average over the index, skipping NaN gaps.

    ``s_t = sum_{j<=t, y_j finite} w^(c_t - c_j) y_j / sum_{j<=t, y_j finite} w^(c_t - c_j)``
    with ``w = 1 - a``, ``a = 2 / (span + 1)`` and ``c_t`` the number of finite values up to
    ``t``: an EMA started at zero and divided by its total weight ``1 - w^(c_t)`` (the bias
    correction of Adam, Kingma & Ba 2015, §3), so the first point is the first value, a
    constant series stays constant, and a short series needs no warm-up. Equals pandas
    ``Series.ewm(span=span, adjust=True, ignore_na=True).mean()`` at finite points.

    Args:
      values: the series, shape ``[n]`` (floats, in x order; the x spacing is ignored).
      span: the EMA span in points (``a = 2 / (span + 1)``; 1 means no smoothing). None:
        ``smoothing_span(n)`` over the finite values.

    Returns:
      float64 array ``[n]``; NaN where the input is not finite (a gap stays a gap; the
      average carries over it, decayed only by the finite points seen).

    Raises:
      ValueError: ``span < 1`` or ``values`` not one-dimensional.
    """
    y = np.asarray(values, np.float64)
    if y.ndim != 1:
        raise ValueError(f"smooth_ema expects a 1-D series, got shape {y.shape}")
    finite = np.isfinite(y)
    if span is None:
        span = smoothing_span(int(finite.sum()))
    if span < 1:
        raise ValueError(f"smooth_ema span must be >= 1, got {span}")
    w = 1.0 - 2.0 / (span + 1.0)
    out = np.full(y.shape, np.nan)
    num = den = 0.0
    for t in range(len(y)):
        if finite[t]:
            num = w * num + y[t]
            den = w * den + 1.0
            out[t] = num / den
    return out


# ---- training curves ----------------------------------------------------------------------
def curve_series(records: Sequence[Mapping[str, Any]], key: str, *, x: str = "step",
                 by_stage: bool = True) -> dict[Any, tuple[np.ndarray, np.ndarray]]:
    """The points of one metric: ``{stage (or None): (xs [n], ys [n])}`` sorted by x.

    A record without the key (or with a non-number) is not a point; a NaN/inf value is kept
    (NaN) so the plot shows the gap. A record without a numeric ``x`` uses its index.
    """
    groups: dict[Any, list[tuple[float, float]]] = {}
    for i, r in enumerate(records):
        v = r.get(key)
        if not _is_number(v):
            continue
        xv = r.get(x, i)
        stage = r.get("stage") if by_stage else None
        yv = float(v)
        groups.setdefault(stage, []).append((float(xv) if _is_number(xv) else float(i),
                                             yv if math.isfinite(yv) else math.nan))
    out = {}
    for stage, pts in groups.items():
        pts.sort(key=lambda p: p[0])
        out[stage] = (np.array([p[0] for p in pts]), np.array([p[1] for p in pts]))
    return out


def curve_figure(records: Sequence[Mapping[str, Any]], keys: Sequence[str], *, title: str = "",
                 x: str = "step", by_stage: bool = True, span: int | None = None):
    """The training-curve figure: one subplot per present key, per stage the raw points faint
    (alpha ``RAW_ALPHA``) and ``smooth_ema(ys, span)`` solid in the same colour.

    Returns:
      ``(figure, missing keys)``: a matplotlib ``Figure`` (no pyplot state) and the keys no
      record had; with none present the figure says "no data".
    """
    # A bare Figure renders with Agg and never touches pyplot's global backend or state.
    from matplotlib.figure import Figure

    series = {k: curve_series(records, k, x=x, by_stage=by_stage) for k in keys}
    present = [k for k in keys if series[k]]
    missing = [k for k in keys if k not in present]

    n = max(len(present), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    spans = set()
    for ax, key in zip(flat, present):
        for j, (stage, (xs, ys)) in enumerate(series[key].items()):
            color = f"C{j % 10}"
            ax.plot(xs, ys, "o-" if len(xs) < 50 else "-", color=color, alpha=RAW_ALPHA,
                    markersize=2.5, linewidth=0.8)
            s = span if span is not None else smoothing_span(int(np.isfinite(ys).sum()))
            spans.add(s)
            ax.plot(xs, smooth_ema(ys, s), "-", color=color, linewidth=1.6,
                    label=str(stage) if stage is not None else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if by_stage and any(s is not None for s in series[key]):
            ax.legend(fontsize=7)
    for ax in flat[len(present):]:
        ax.axis("off")
    if not present:
        flat[0].text(0.5, 0.5, "no data", ha="center", va="center", transform=flat[0].transAxes)
    full_title = title
    if missing:
        full_title = f"{title} (missing: {', '.join(missing)})" if title else \
            f"missing: {', '.join(missing)}"
    if spans:
        sp = ", ".join(str(s) for s in sorted(spans))
        full_title = f"{full_title}  [faint: raw; solid: EMA, span {sp}]".strip()
    if full_title:
        fig.suptitle(full_title, fontsize=10)
    fig.tight_layout()
    return fig, missing


def plot_curves(records: Sequence[Mapping[str, Any]], keys: Sequence[str], out_png, *,
                title: str = "", x: str = "step", by_stage: bool = True,
                span: int | None = None) -> list[str]:
    """One subplot per metric key, per stage raw points faint and an EMA solid, saved as a
    PNG (matplotlib Agg, without pyplot).

    Args:
      records: metric records (``{"step": ..., "stage": ..., name: value}``).
      keys: metric names to plot, one subplot each.
      out_png: output path (parent directories are created).
      title: figure title; missing keys are appended to it ("missing: ...").
      x: the record field on the x axis.
      by_stage: one series per ``stage`` value; False draws all records as one series.
      span: EMA span in points (``smooth_ema``); None: ``smoothing_span`` of each series.

    Returns:
      The keys that no record had (skipped). If none is present, the PNG still gets written
      with a "no data" note, so a report never links a missing file.
    """
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)
    fig, missing = curve_figure(records, keys, title=title, x=x, by_stage=by_stage, span=span)
    fig.savefig(out_png, dpi=100, format="png")
    return missing


# ---- judged comparison --------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class JudgedPlotData:
    """What the judged-comparison plots draw, in model order.

    Attributes:
      models: model names ``[M]`` (the order of ``judged``).
      judge_mean, judge_se: judge score mean and its standard error per model, ``[M]``
        (judge units); a missing s.e. is NaN (no error bar is drawn).
      kl_mean, kl_se: mean KL to the reference (nats per sequence) and its s.e. ``[M]``, or
        None when no model has ``kl_mean``.
      baseline: the baseline model's name, or None.
      delta_models: the non-baseline models ``[M-1]`` (empty without a baseline).
      delta_mean, delta_se: paired difference of judge scores to the baseline and its s.e.
    """
    models: tuple[str, ...]
    judge_mean: np.ndarray
    judge_se: np.ndarray
    kl_mean: np.ndarray | None
    kl_se: np.ndarray | None
    baseline: str | None
    delta_models: tuple[str, ...]
    delta_mean: np.ndarray
    delta_se: np.ndarray


def _field(model: str, stats: Mapping[str, Any], key: str, *, required: bool) -> float:
    v = stats.get(key)
    if v is None:
        if required:
            raise ValueError(f"judged[{model!r}] has no {key!r}; expected a number "
                             f"(got fields {sorted(stats)})")
        return math.nan
    try:
        f = float(v)
    except (TypeError, ValueError):
        raise ValueError(f"judged[{model!r}][{key!r}] must be a number, got {v!r}") from None
    if key.endswith("_se") and f < 0:
        raise ValueError(f"judged[{model!r}][{key!r}] is a standard error and must be >= 0, "
                         f"got {f}")
    if required and not math.isfinite(f):
        raise ValueError(f"judged[{model!r}][{key!r}] must be finite, got {f}")
    return f


def judged_plot_data(judged: Mapping[str, Mapping[str, Any]],
                     baseline: str | None = None) -> JudgedPlotData:
    """Validate ``judged`` and arrange what the judged plots draw (pure; no matplotlib).

    Args:
      judged: ``{model: {"judge_mean", "judge_se", "kl_mean", "kl_se", "delta_mean",
        "delta_se"}}``: judge score mean ± s.e. over the evaluation prompts, mean KL to the
        reference in nats per sequence ± s.e., and the paired difference of judge scores to
        ``baseline`` ± s.e. (absent or None for the baseline itself). s.e. fields may be
        absent (NaN: no error bar).
      baseline: the model the paired differences are taken against, or None (no delta
        panel; any ``delta_*`` fields are ignored).

    Raises:
      ValueError: empty ``judged``; a model without ``judge_mean``; a non-number or negative
        s.e.; ``baseline`` not in ``judged``; a non-baseline model without ``delta_mean``;
        ``kl_mean`` given for some models but not others.
    """
    if not judged:
        raise ValueError("judged is empty: expected {model: {'judge_mean': ..., ...}}")
    models = tuple(str(m) for m in judged)
    if baseline is not None and baseline not in judged:
        raise ValueError(f"baseline {baseline!r} is not a judged model (models: {list(models)})")
    jm = np.array([_field(m, judged[m], "judge_mean", required=True) for m in judged])
    js = np.array([_field(m, judged[m], "judge_se", required=False) for m in judged])
    has_kl = [judged[m].get("kl_mean") is not None for m in judged]
    if any(has_kl) and not all(has_kl):
        raise ValueError("kl_mean is given for " + str([m for m, h in zip(models, has_kl) if h])
                         + " but not for " + str([m for m, h in zip(models, has_kl) if not h]))
    km = ks = None
    if all(has_kl):
        km = np.array([_field(m, judged[m], "kl_mean", required=True) for m in judged])
        ks = np.array([_field(m, judged[m], "kl_se", required=False) for m in judged])
    dm_models = tuple(m for m in judged if baseline is not None and m != baseline)
    dm = np.array([_field(m, judged[m], "delta_mean", required=True) for m in dm_models])
    ds = np.array([_field(m, judged[m], "delta_se", required=False) for m in dm_models])
    return JudgedPlotData(models=models, judge_mean=jm, judge_se=js, kl_mean=km, kl_se=ks,
                          baseline=baseline, delta_models=tuple(str(m) for m in dm_models),
                          delta_mean=dm.reshape(-1), delta_se=ds.reshape(-1))


def _colors(models: Sequence[str], all_models: Sequence[str]) -> list[str]:
    return [f"C{list(all_models).index(m) % 10}" for m in models]


def _bars(ax, names, means, ses, colors, *, fmt: str = "{:+.3f}") -> None:
    pos = np.arange(len(names))
    yerr = np.where(np.isfinite(ses), ses, 0.0)
    ax.bar(pos, means, color=colors, alpha=0.85, width=0.6)
    ax.errorbar(pos, means, yerr=yerr, fmt="none", ecolor="black", capsize=5, linewidth=1.2)
    for p, m, s in zip(pos, means, ses):
        label = fmt.format(m) + (f"\n±{s:.3f}" if math.isfinite(s) else "")
        top = m + (s if math.isfinite(s) else 0.0) * (1 if m >= 0 else -1)
        ax.annotate(label, (p, top), xytext=(0, 3 if m >= 0 else -3), textcoords="offset points",
                    ha="center", va="bottom" if m >= 0 else "top", fontsize=7)
    ax.set_xticks(pos, names, rotation=30 if len(names) > 4 else 0, fontsize=8)
    ax.axhline(0.0, color="black", linewidth=0.6)
    ax.tick_params(axis="y", labelsize=7)
    ax.grid(axis="y", alpha=0.3)
    ax.margins(y=0.25)


def judge_figure(data: JudgedPlotData, *, judge_name: str = "judge score"):
    """Bars of the judge mean per model with ±1 s.e. error bars and, with a baseline, a second
    panel of the paired difference to the baseline ±1 s.e. Returns a matplotlib ``Figure``."""
    from matplotlib.figure import Figure

    panels = 2 if data.delta_models else 1
    width = max(3.2, 0.75 * len(data.models) + 1.6)
    fig = Figure(figsize=(width * panels, 3.6))
    axes = fig.subplots(1, panels, squeeze=False)[0]
    ax = axes[0]
    _bars(ax, data.models, data.judge_mean, data.judge_se, _colors(data.models, data.models))
    ax.set_ylabel(f"{judge_name} (mean, ±1 s.e.)", fontsize=8)
    ax.set_title(f"{judge_name} per model", fontsize=9)
    if panels == 2:
        ax = axes[1]
        _bars(ax, data.delta_models, data.delta_mean, data.delta_se,
              _colors(data.delta_models, data.models))
        ax.set_ylabel(f"Δ {judge_name} vs {data.baseline} (paired, ±1 s.e.)", fontsize=8)
        ax.set_title(f"paired difference to {data.baseline}", fontsize=9)
    fig.tight_layout()
    return fig


def judge_kl_figure(data: JudgedPlotData, *, judge_name: str = "judge score"):
    """One point per model at (mean KL to the reference, judge mean) with ±1 s.e. bars on
    both axes, labelled with the model name: the reward–KL plane (Rafailov et al. 2023,
    Figure 2). Returns a matplotlib ``Figure``.

    Raises:
      ValueError: ``data.kl_mean`` is None.
    """
    from matplotlib.figure import Figure

    if data.kl_mean is None:
        raise ValueError("judge_kl_figure needs kl_mean for every model; judged has none")
    fig = Figure(figsize=(5.2, 3.9))
    ax = fig.subplots()
    for i, m in enumerate(data.models):
        xe, ye = data.kl_se[i], data.judge_se[i]
        ax.errorbar([data.kl_mean[i]], [data.judge_mean[i]],
                    xerr=[xe] if math.isfinite(xe) else None,
                    yerr=[ye] if math.isfinite(ye) else None,
                    fmt="o", color=f"C{i % 10}", capsize=4, markersize=6, linewidth=1.2,
                    label=m)
        ax.annotate(m, (data.kl_mean[i], data.judge_mean[i]), xytext=(6, 6),
                    textcoords="offset points", fontsize=8, color=f"C{i % 10}")
    ax.set_xlabel("KL to the reference (nats / sequence, mean ±1 s.e.)", fontsize=8)
    ax.set_ylabel(f"{judge_name} (mean ±1 s.e.)", fontsize=8)
    ax.set_title(f"{judge_name} against KL to the reference", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.margins(x=0.15, y=0.15)
    fig.tight_layout()
    return fig


# ---- sweeps --------------------------------------------------------------------------------
def _numeric_axis(xs: Sequence[Any]) -> bool:
    return bool(xs) and all(_is_number(x) and math.isfinite(float(x)) for x in xs)


def sweep_metric_figure(series: Mapping[str, tuple[Sequence[Any], Sequence[float],
                                                   Sequence[float | None]]],
                        *, xlabel: str, ylabel: str, title: str = "",
                        xscale: str = "auto"):
    """One summary metric against one sweep axis: per series (e.g. one per value of the other
    grid axes) the mean over seeds at each axis value with ±1 s.e. error bars.

    Args:
      series: ``{label: (xs [n], means [n], ses [n])}``; ``xs`` are the axis values in grid
        order, ``ses`` the standard errors over seeds (``None`` or NaN: fewer than two seeds,
        no bar). One series is drawn without a legend.
      xlabel, ylabel, title: axis labels and title.
      xscale: ``"linear"``, ``"log"`` or ``"auto"`` (log when every x is a positive number
        and they span a factor of 10 or more). Non-numeric x values (strings, tuples,
        booleans) are drawn at evenly spaced categorical positions in first-seen order.

    Returns:
      A matplotlib ``Figure`` (no pyplot state).

    Raises:
      ValueError: a series whose three sequences differ in length, or ``xscale`` unknown.
    """
    from matplotlib.figure import Figure

    if xscale not in ("auto", "linear", "log"):
        raise ValueError(f"xscale must be 'auto', 'linear' or 'log', got {xscale!r}")
    for label, (xs, ms, ss) in series.items():
        if not len(xs) == len(ms) == len(ss):
            raise ValueError(f"series {label!r}: xs, means and ses differ in length "
                             f"({len(xs)}, {len(ms)}, {len(ss)})")
    all_x = [x for xs, _, _ in series.values() for x in xs]
    numeric = _numeric_axis(all_x)
    categories: list[str] = []
    if not numeric:
        categories = list(dict.fromkeys(str(x) for x in all_x))
    fig = Figure(figsize=(5.4, 3.9))
    ax = fig.subplots()
    for i, (label, (xs, ms, ss)) in enumerate(series.items()):
        pos = (np.asarray(xs, np.float64) if numeric
               else np.asarray([categories.index(str(x)) for x in xs], np.float64))
        means = np.asarray(ms, np.float64)
        ses = np.asarray([math.nan if s is None else float(s) for s in ss], np.float64)
        order = np.argsort(pos, kind="stable")
        pos, means, ses = pos[order], means[order], ses[order]
        ax.errorbar(pos, means, yerr=np.where(np.isfinite(ses), ses, 0.0), fmt="o-",
                    color=f"C{i % 10}", capsize=4, markersize=5, linewidth=1.3,
                    label=label if len(series) > 1 else None)
    if numeric:
        xs_all = np.asarray(all_x, np.float64)
        log = xscale == "log" or (xscale == "auto" and xs_all.min() > 0
                                  and xs_all.max() / xs_all.min() >= 10)
        if log:
            ax.set_xscale("log")
        ticks = sorted(set(xs_all.tolist()))
        ax.set_xticks(ticks, [f"{x:g}" for x in ticks])
    else:
        ax.set_xticks(range(len(categories)), categories, rotation=30 if len(categories) > 4 else 0)
        ax.margins(x=0.15)
    ax.set_xlabel(xlabel, fontsize=8)
    ax.set_ylabel(f"{ylabel} (mean ±1 s.e. over seeds)", fontsize=8)
    ax.set_title(title or f"{ylabel} against {xlabel}", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    if len(series) > 1:
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


# ---- overoptimization: gold and proxy against sqrt(KL) -------------------------------------
#: The probe's metric names (``rlhf_jax.pipeline.stages.gold_proxy_probe``).
PROBE_KEYS = {"kl": "probe/kl", "sqrt_kl": "probe/sqrt_kl", "gold": "gold/score",
              "proxy": "proxy/score"}


@dataclasses.dataclass(frozen=True)
class ProbeCurve:
    """One RL run's gold-vs-proxy probe, in step order.

    Attributes:
      seed: the run's seed (a label), or None.
      steps: ``[n]`` RL iterations of the probes (0: before the first update).
      kl: ``[n]`` KL to the starting policy, nats per sequence (mean over the probe set).
      sqrt_kl: ``[n]`` its square root, sqrt(nats) (the probe's own ``probe/sqrt_kl``).
      gold: ``[n]`` mean gold score (gold units); NaN where a record has none.
      proxy: ``[n]`` mean normalised proxy reward-model score; NaN where a record has none.
    """
    seed: int | None
    steps: np.ndarray
    kl: np.ndarray
    sqrt_kl: np.ndarray
    gold: np.ndarray
    proxy: np.ndarray


def probe_curve(records: Sequence[Mapping[str, Any]], *, stage: str = "ppo_eval",
                seed: int | None = None) -> ProbeCurve | None:
    """The probe records of one run (``stage`` records of its ``metrics.jsonl``) as a curve.

    A step logged twice (a resumed run) counts once: its last record. ``sqrt_kl`` is the
    record's ``probe/sqrt_kl``, or ``sqrt(max(kl, 0))`` when absent.

    Returns:
      The curve, or None when no ``stage`` record has a KL.

    Raises:
      ValueError: a probe record without ``step``.
    """
    by_step: dict[int, Mapping[str, Any]] = {}
    for r in records:
        if r.get("stage") != stage or not _is_number(r.get(PROBE_KEYS["kl"])):
            continue
        if not _is_number(r.get("step")):
            raise ValueError(f"a {stage} record has no step: {dict(r)}")
        by_step[int(r["step"])] = r
    if not by_step:
        return None
    steps = sorted(by_step)

    def col(key: str) -> np.ndarray:
        return np.asarray([float(by_step[t][key]) if _is_number(by_step[t].get(key)) else math.nan
                           for t in steps], np.float64)

    kl = col(PROBE_KEYS["kl"])
    sqrt_kl = col(PROBE_KEYS["sqrt_kl"])
    sqrt_kl = np.where(np.isfinite(sqrt_kl), sqrt_kl, np.sqrt(np.maximum(kl, 0.0)))
    return ProbeCurve(seed=seed, steps=np.asarray(steps, np.int64), kl=kl, sqrt_kl=sqrt_kl,
                      gold=col(PROBE_KEYS["gold"]), proxy=col(PROBE_KEYS["proxy"]))


@dataclasses.dataclass(frozen=True)
class GoldProxyArm:
    """One arm (grid point) of an overoptimization sweep: its seeds' curves and their mean.

    Attributes:
      label: the arm's name.
      runs: one ``ProbeCurve`` per seed.
      steps: ``[m]`` the probe steps every seed has (the mean is taken at equal steps).
      sqrt_kl, kl, gold, proxy: ``[m]`` means over the seeds at those steps (each of x and y
        averaged separately; NaN where a seed lacks the value).
      peak: index into ``steps`` of the maximum of the mean gold curve (the first one on ties).
    """
    label: str
    runs: tuple[ProbeCurve, ...]
    steps: np.ndarray
    sqrt_kl: np.ndarray
    kl: np.ndarray
    gold: np.ndarray
    proxy: np.ndarray
    peak: int


def gold_proxy_arm(label: str, runs: Sequence[ProbeCurve]) -> GoldProxyArm:
    """The mean curve of ``runs`` (one per seed) at the probe steps they all have, and the
    peak of its gold score.

    Raises:
      ValueError: no runs, no common step, or no finite mean gold score.
    """
    if not runs:
        raise ValueError(f"arm {label!r} has no probe curves")
    common = sorted(set.intersection(*(set(r.steps.tolist()) for r in runs)))
    if not common:
        raise ValueError(f"arm {label!r}: its seeds have no probe step in common")

    def mean(attr: str) -> np.ndarray:
        rows = [getattr(r, attr)[np.searchsorted(r.steps, common)] for r in runs]
        return np.mean(np.stack(rows), axis=0)

    gold = mean("gold")
    if not np.isfinite(gold).any():
        raise ValueError(f"arm {label!r}: no probe record has a gold score")
    return GoldProxyArm(label=label, runs=tuple(runs), steps=np.asarray(common, np.int64),
                        sqrt_kl=mean("sqrt_kl"), kl=mean("kl"), gold=gold, proxy=mean("proxy"),
                        peak=int(np.nanargmax(gold)))


def overoptimization_figure(arms: Sequence[GoldProxyArm], *, gold_name: str = "gold score",
                            proxy_name: str = "proxy score"):
    """Gold (left) and proxy (right) score against sqrt(KL to the starting policy), sharing
    the x axis: per arm one colour, each seed a thin line, the mean over seeds at each probe
    step a thick line with markers; a star marks the peak of each arm's mean gold curve,
    annotated with its gold score and KL (nats), and a dotted vertical line at that sqrt(KL)
    in both panels shows where the proxy stands when the gold score peaks (Gao et al. 2023,
    Fig. 1). Returns a matplotlib ``Figure``; the peak annotations have gid
    ``"peak:<label>"``.

    Raises:
      ValueError: no arms.
    """
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D

    if not arms:
        raise ValueError("overoptimization_figure needs at least one arm")
    fig = Figure(figsize=(10.5, 4.2))
    ax_gold, ax_proxy = fig.subplots(1, 2, sharex=True)
    for i, arm in enumerate(arms):
        color = f"C{i % 10}"
        for run in arm.runs:
            ax_gold.plot(run.sqrt_kl, run.gold, "-", color=color, alpha=0.35, linewidth=0.9)
            if np.isfinite(run.proxy).any():
                ax_proxy.plot(run.sqrt_kl, run.proxy, "-", color=color, alpha=0.35,
                              linewidth=0.9)
        ax_gold.plot(arm.sqrt_kl, arm.gold, "o-", color=color, linewidth=2.2, markersize=3.5,
                     label=f"{arm.label} (n={len(arm.runs)})")
        if np.isfinite(arm.proxy).any():
            ax_proxy.plot(arm.sqrt_kl, arm.proxy, "o-", color=color, linewidth=2.2,
                          markersize=3.5)
        x, y, kl = arm.sqrt_kl[arm.peak], arm.gold[arm.peak], arm.kl[arm.peak]
        ax_gold.plot([x], [y], "*", color=color, markersize=15, markeredgecolor="black",
                     zorder=5)
        ann = ax_gold.annotate(f"peak {y:+.3f}\nKL {kl:.2f} nats", (x, y),
                               xytext=(6, 8 + 14 * (i % 3)), textcoords="offset points",
                               fontsize=7, color=color,
                               arrowprops={"arrowstyle": "-", "color": color, "linewidth": 0.6})
        ann.set_gid(f"peak:{arm.label}")
        for ax in (ax_gold, ax_proxy):
            ax.axvline(x, color=color, linestyle=":", linewidth=1.0, alpha=0.8)
    ax_gold.margins(y=0.22)  # room for the peak annotations above the curves
    ax_gold.set_ylabel(f"{gold_name} (probe set mean)", fontsize=8)
    ax_gold.set_title(f"gold: {gold_name}", fontsize=9)
    ax_proxy.set_ylabel(f"{proxy_name} (probe set mean)", fontsize=8)
    ax_proxy.set_title(f"proxy: {proxy_name} (what RL optimises)", fontsize=9)
    for ax in (ax_gold, ax_proxy):
        ax.set_xlabel("sqrt(KL to the starting policy)  [sqrt(nats)]", fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
    handles, labels = ax_gold.get_legend_handles_labels()
    handles += [Line2D([], [], color="grey", alpha=0.35, linewidth=0.9),
                Line2D([], [], color="grey", linewidth=2.2),
                Line2D([], [], marker="*", color="grey", markeredgecolor="black", linestyle="",
                       markersize=10)]
    labels += ["one seed", "mean over seeds at each probe step", "peak of the mean gold"]
    ax_gold.legend(handles, labels, fontsize=7)
    fig.tight_layout()
    return fig


# ---- the reward-KL frontier ----------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FrontierPoint:
    """One setting in the reward–KL plane: mean over seeds and its s.e. (None or NaN: fewer
    than two seeds, no bar) of the KL to the reference (nats per sequence) and of the judge
    score; ``family`` groups points drawn alike (e.g. ``"PPO (fixed KL)"``, ``"DPO"``),
    ``label`` names the setting (e.g. ``"β=0.1"``), ``n`` the seeds."""
    family: str
    label: str
    kl_mean: float
    kl_se: float | None
    score_mean: float
    score_se: float | None
    n: int


#: Colour and marker of the frontier's standard families; others cycle through the rest.
FRONTIER_STYLES = {"PPO (fixed KL)": ("C0", "o"), "PPO (adaptive KL)": ("C2", "s"),
                   "PPO": ("C0", "o"), "DPO": ("C3", "^"), "SFT": ("black", "*")}


def _bar(se: float | None) -> list[float] | None:
    return None if se is None or not math.isfinite(se) else [se]


def frontier_figure(points: Sequence[FrontierPoint], *, score_name: str = "judge score"):
    """Judge score against KL to the reference, one point per setting (mean over seeds, ±1
    s.e. over seeds on both axes), one colour and marker per family, each point labelled: the
    reward–KL frontier (Rafailov et al. 2023, Figure 2). Returns a matplotlib ``Figure``; each
    point's label annotation has gid ``"point:<family>:<label>"``.

    Raises:
      ValueError: no points.
    """
    from matplotlib.figure import Figure

    if not points:
        raise ValueError("frontier_figure needs at least one point")
    families = list(dict.fromkeys(p.family for p in points))
    spare = iter(f"C{i}" for i in (1, 4, 5, 6, 7, 8, 9) * 4)
    markers = iter("DvP<>hX" * 4)
    styles = {f: FRONTIER_STYLES.get(f) or (next(spare), next(markers)) for f in families}
    fig = Figure(figsize=(6.2, 4.4))
    ax = fig.subplots()
    for fam in families:
        color, marker = styles[fam]
        first = True
        for p in (q for q in points if q.family == fam):
            ax.errorbar([p.kl_mean], [p.score_mean], xerr=_bar(p.kl_se), yerr=_bar(p.score_se),
                        fmt=marker, color=color, capsize=3, markersize=7 if marker != "*" else 12,
                        linewidth=1.1, label=fam if first else None)
            first = False
            ann = ax.annotate(p.label, (p.kl_mean, p.score_mean), xytext=(5, 5),
                              textcoords="offset points", fontsize=7, color=color)
            ann.set_gid(f"point:{fam}:{p.label}")
    ax.set_xlabel("KL to the reference (nats / sequence; mean over seeds ±1 s.e.)", fontsize=8)
    ax.set_ylabel(f"{score_name} (mean over seeds ±1 s.e.)", fontsize=8)
    ax.set_title(f"{score_name} against KL to the reference", fontsize=9)
    ax.tick_params(labelsize=7)
    ax.grid(alpha=0.3)
    ax.margins(x=0.12, y=0.15)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


__all__ = ["RAW_ALPHA", "plot_curves", "curve_figure", "curve_series", "smooth_ema",
           "smoothing_span", "judged_plot_data", "JudgedPlotData", "judge_figure",
           "judge_kl_figure", "sweep_metric_figure", "PROBE_KEYS", "ProbeCurve", "probe_curve",
           "GoldProxyArm", "gold_proxy_arm", "overoptimization_figure", "FrontierPoint",
           "FRONTIER_STYLES", "frontier_figure"]
