"""A Markdown report of a whole RLHF run, with the plots of ``rlhf_jax.plots``.

``write_report`` turns the judged comparison of the trained models (judge score and KL to the
reference, each with its standard error), the metric records of each stage
(``rlhf_jax.metrics.read_jsonl`` output, or records kept in memory), a summary table, the data
accounting and sample completions of the same prompts under each model into
``out_dir/report.md`` with PNG plots in ``out_dir/plots/``. Every path in the report is
relative, so the directory can be moved or published as is. Each plot has a one-line caption
saying which question it answers:

- ``plots/judge.png``: which model does the judge prefer, and is the gap larger than the noise?
  One bar per model (mean judge score, ±1 s.e.) and, when a baseline is named, the paired
  difference to the baseline with its s.e.
- ``plots/judge_vs_kl.png``: how much judge score did each model buy per nat of KL from the
  reference? One point per model in the reward–KL plane (Rafailov et al. 2023, Figure 2), with
  s.e. bars on both axes.
- ``plots/<group>.png``: how did the training metrics move? Raw values faint, a bias-corrected
  exponential moving average (``rlhf_jax.plots.smooth_ema``) solid on top.

Sweeps (``rlhf_jax.sweeps``): ``build_sweep_table`` turns the finished runs' ``summary.json``
files into mean ± s.e. over seeds per grid point (``SE_DEFINITION``), and
``write_sweep_report`` writes it as ``results.json`` and ``results.md`` with the plots of
registered kinds (``register_sweep_plot``). Built in:

- ``metric_vs_axis``: a summary number against a grid axis.
- ``overoptimization``: gold and proxy score against sqrt(KL) from every run's RL probe
  records (``ppo.probe_every``), per arm, with the peak of the gold score; its table
  (``overoptimization.json`` / ``.md`` in the sweep directory) gives per arm the peak gold
  score and the KL at the peak, the final proxy score, and in how many seeds the proxy still
  rose after the gold score peaked (Gao et al. 2023).
- ``frontier``: judge score against KL to the reference, one point per grid point, PPO and
  DPO apart (Rafailov et al. 2023, Figure 2); its table is ``frontier.json`` / ``.md``.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import html
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from rlhf_jax.plots import _is_number, judge_figure, judge_kl_figure, judged_plot_data, plot_curves
from rlhf_jax.registry import add_to

#: The pseudo-axis of a sweep with arms (``rlhf_jax.sweeps.SweepArm``): a row's
#: ``values[ARM_AXIS]`` is its arm's name, shown bare in labels.
ARM_AXIS = "arm"

#: Default plot groups: (file stem, title, key patterns (fnmatch)). A group is drawn only if
#: some record has a matching key; its keys are the matching names in first-seen order.
#: Evaluation scores (the judge) are not training curves: they are drawn from ``judged`` as
#: bars and in the judge–KL plane, never as a line through one point per model.
DEFAULT_PLOTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("reward", "Reward", ("objective/score", "objective/rlhf_reward",
                          "objective/non_score_reward")),
    ("reward_sources", "Reward sources", ("reward/*/mean",)),
    ("kl", "KL to the reference policy", ("objective/kl", "objective/kl_coef")),
    ("rm", "Reward model", ("rm/accuracy", "rm/loss", "rm/margin", "eval/rm/*")),
    ("dpo", "DPO", ("dpo/rewards/margins", "dpo/rewards/accuracies", "dpo/loss")),
    ("sft", "SFT", ("sft/loss", "sft/accuracy")),
    ("ppo", "PPO", ("ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/val/error",
                    "objective/entropy")),
    ("rollout", "Rollouts", ("rollout/response_length", "rollout/no_eos_share",
                             "rollout/equal_reward_groups", "rollout/overlong_penalty")),
)

#: The question each default curve group answers (its caption).
CURVE_QUESTIONS: dict[str, str] = {
    "reward": "Did the policy's reward rise during RL, net of the KL penalty?",
    "reward_sources": "Did each reward source (reward model, functions, verifiers) rise?",
    "kl": "How far did the policy drift from the reference, and how did the KL coefficient react?",
    "rm": "Did the reward model learn to rank the preferred completion higher?",
    "dpo": "Did DPO widen the implicit-reward margin between chosen and rejected completions?",
    "sft": "Did supervised fine-tuning converge?",
    "ppo": "Were the PPO updates stable (clipping, approximate KL, value error, entropy)?",
    "rollout": ("Did the responses change length or stop ending with EOS, and how many "
                "prompts' samples all got the same reward (no signal for group estimators)?"),
}

#: File stems of the judged-comparison plots; a curve group may not reuse them.
JUDGE_PLOT = "judge"
JUDGE_KL_PLOT = "judge_vs_kl"

_NON_METRIC = ("step", "stage", "time")


def _metric_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric metric names in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in _NON_METRIC and _is_number(v):
                seen.setdefault(k, None)
    return list(seen)


# ---- Markdown -----------------------------------------------------------------------------
def md_escape(text: Any) -> str:
    """Text safe inside a Markdown table cell: ``|`` escaped, newlines as ``<br>``, and
    ``<``, ``>``, ``&`` as HTML entities (special tokens like ``<|im_end|>`` stay visible)."""
    s = html.escape(str(text), quote=False)
    s = s.replace("\\", "\\\\").replace("|", "\\|")
    s = s.replace("\r\n", "\n").replace("\r", "\n").replace("\n", "<br>")
    return s


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        if math.isnan(v) or math.isinf(v):
            return str(v)
        return f"{v:.4g}"
    return "" if v is None else str(v)


def markdown_table(rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> str:
    """A Markdown table of ``rows`` (dicts); columns default to the union of keys in
    first-seen order; floats with 4 significant digits; cells escaped (``md_escape``)."""
    if columns is None:
        columns = list(dict.fromkeys(k for r in rows for k in r))
    lines = ["| " + " | ".join(md_escape(c) for c in columns) + " |",
             "|" + "|".join("---" for _ in columns) + "|"]
    for r in rows:
        lines.append("| " + " | ".join(md_escape(_fmt(r.get(c))) for c in columns) + " |")
    return "\n".join(lines)


def _slug(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_") or "plot"


def _figure_md(alt: str, rel: str, caption: str) -> list[str]:
    return [f"![{alt}]({rel})", "", f"*{caption}*", ""]


def write_report(out_dir, *, title: str, stages: Mapping[str, Sequence[Mapping[str, Any]]],
                 summary_rows: Sequence[Mapping[str, Any]] = (),
                 samples: Mapping[str, Sequence[tuple[str, str]]] | None = None,
                 notes: str = "",
                 judged: Mapping[str, Mapping[str, float]] | None = None,
                 baseline: str | None = None,
                 data_rows: Sequence[Mapping[str, Any]] | None = None,
                 plots: Sequence[tuple[str, str, Sequence[str]]] = DEFAULT_PLOTS) -> Path:
    """Write ``out_dir/report.md``: summary, judged comparison, training curves, data, samples.

    Sections, each only when it has content: "Summary" (``summary_rows``), "Judged
    comparison" (``plots/judge.png``: judge mean ±1 s.e. per model and the paired difference
    to ``baseline``; ``plots/judge_vs_kl.png``: judge against KL to the reference), "Training
    curves" (``plots/<stem>.png`` per plot group: raw faint, EMA solid), "Data"
    (``data_rows``), "Samples", "Notes". Each plot is linked relatively with a one-line
    caption saying what it answers.

    Args:
      out_dir: report directory (created); plots go to ``out_dir/plots/``.
      title: the report's heading.
      stages: ``{stage name: metric records}``; a record's missing ``stage`` field is set to
        the stage name.
      summary_rows: table, one dict per model, e.g. ``{"model": "SFT", "judge": "0.12 ± 0.01"}``.
      samples: ``{model name: [(prompt, completion), ...]}``; completions of the same prompt
        are shown side by side (grouped by prompt text, in first-seen order); a model with no
        completion for a prompt shows "-".
      notes: free Markdown appended under "Notes".
      judged: ``{model: {"judge_mean", "judge_se", "kl_mean", "kl_se", "delta_mean",
        "delta_se"}}`` (see ``judged_plot_data``): judge score and KL to the reference (nats
        per sequence) per model with standard errors over the evaluation prompts, and the
        paired judge difference to ``baseline``. Without ``kl_mean`` there is no judge–KL plot.
      baseline: the model the paired differences refer to (must be in ``judged``); None: no
        difference panel.
      data_rows: the "Data" table, one dict per data source, e.g. ``{"source": "movie
        reviews", "kept": 9800, "skipped: too long": 12, "skipped: empty": 3}``.
      plots: training-curve groups ``(file stem, title, key patterns)``; groups with no
        matching key are skipped.

    Returns:
      The path of ``report.md``.

    Raises:
      ValueError: bad ``judged`` (see ``judged_plot_data``), or a curve group's stem is one of
        the judged plots' (``judge``, ``judge_vs_kl``) while ``judged`` is given.
    """
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    records = [dict(r, stage=r.get("stage") or name) for name, recs in stages.items()
               for r in recs]
    all_keys = _metric_keys(records)
    jdata = judged_plot_data(judged, baseline) if judged else None
    if jdata is not None:
        clash = [s for s, _, _ in plots if _slug(s) in (JUDGE_PLOT, JUDGE_KL_PLOT)]
        if clash:
            raise ValueError(f"plot group stems {clash} clash with the judged plots "
                             f"{JUDGE_PLOT}.png / {JUDGE_KL_PLOT}.png; rename the group")

    parts = [f"# {title}", ""]
    if stages:
        parts += ["Stages: " + ", ".join(f"**{md_escape(n)}** ({len(r)} records)"
                                        for n, r in stages.items()), ""]

    if summary_rows:
        parts += ["## Summary", "", markdown_table(summary_rows), ""]

    if jdata is not None:
        parts += ["## Judged comparison", ""]
        png = out_dir / "plots" / f"{JUDGE_PLOT}.png"
        judge_figure(jdata).savefig(png, dpi=100, format="png")
        q = "Which model does the judge prefer, and is the gap larger than the noise? " \
            "Bars: mean judge score per model, ±1 s.e. over prompts"
        if jdata.delta_models:
            q += f"; right: paired difference to {jdata.baseline}, ±1 s.e."
        parts += _figure_md("Judge score per model (±1 s.e.)",
                            png.relative_to(out_dir).as_posix(), q)
        if jdata.kl_mean is not None:
            png = out_dir / "plots" / f"{JUDGE_KL_PLOT}.png"
            judge_kl_figure(jdata).savefig(png, dpi=100, format="png")
            parts += _figure_md(
                "Judge score against KL to the reference (±1 s.e.)",
                png.relative_to(out_dir).as_posix(),
                "How much judge score did each model buy per nat of KL from the reference? "
                "One point per model, ±1 s.e. on both axes (the reward–KL plane of Rafailov "
                "et al. 2023, Figure 2): up and to the left is better.")

    plotted = []
    for stem, plot_title, patterns in plots:
        keys = [k for k in all_keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
        if not keys:
            continue
        png = out_dir / "plots" / f"{_slug(stem)}.png"
        plot_curves(records, keys, png, title=plot_title)
        plotted.append((stem, plot_title, png.relative_to(out_dir).as_posix(), keys))
    if plotted:
        parts += ["## Training curves", "",
                  "Faint: raw values; solid: bias-corrected exponential moving average "
                  "(span ≈ a tenth of each series, 1–50 points).", ""]
        for stem, plot_title, rel, keys in plotted:
            question = CURVE_QUESTIONS.get(stem, f"How did {plot_title} move during training?")
            parts += [f"### {plot_title}", ""]
            parts += _figure_md(plot_title, rel, question)
            parts += ["Metrics: " + ", ".join(f"`{k}`" for k in keys), ""]

    if data_rows:
        parts += ["## Data", "", "Records kept and skipped per data source, by reason.", "",
                  markdown_table(data_rows), ""]

    if samples:
        parts += ["## Samples", ""]
        prompts: dict[str, dict[str, list[str]]] = {}
        for model, pairs in samples.items():
            for prompt, completion in pairs:
                prompts.setdefault(prompt, {}).setdefault(model, []).append(completion)
        models = list(samples)
        for i, (prompt, by_model) in enumerate(prompts.items(), start=1):
            parts += [f"### Prompt {i}", "", markdown_table([{"prompt": prompt}]), ""]
            rows = [{"model": m, "completion": "<br>---<br>".join(md_escape(c) for c in
                                                                by_model[m])
                     if m in by_model else "-"} for m in models]
            # Completions are escaped above (multi-sample join keeps its <br>).
            lines = ["| model | completion |", "|---|---|"]
            lines += [f"| {md_escape(r['model'])} | {r['completion']} |" for r in rows]
            parts += ["\n".join(lines), ""]

    if notes:
        parts += ["## Notes", "", notes.strip(), ""]

    path = out_dir / "report.md"
    path.write_text("\n".join(parts), encoding="utf-8")
    return path


# ---- sweeps: mean ± s.e. over seeds per grid point -----------------------------------------
#: How the sweep tables define the standard error (written into their JSON and Markdown).
SE_DEFINITION = ("s.e. = sample standard deviation over seeds (ddof=1) / sqrt(n), n = the "
                 "number of seeds finished at that grid point; no s.e. when n < 2")

#: Summary numbers shown in a sweep's Markdown table when none are chosen (fnmatch patterns
#: over the flattened names, in the summaries' order); the JSON and the "All summary numbers"
#: table hold every number.
DEFAULT_SWEEP_METRICS = ("*.judge_mean", "*.judge_mean_at_k", "*.kl", "*.rm_score",
                         "rm_heldout_accuracy")


def summary_numbers(summary: Mapping[str, Any], prefix: str = "") -> dict[str, float]:
    """Every number of a run's ``summary.json`` flattened to dotted names
    (``{"ppo": {"kl": 1.2}}`` -> ``{"ppo.kl": 1.2}``), in order; strings, ``None`` and
    booleans are not numbers and are left out."""
    out: dict[str, float] = {}
    for k, v in summary.items():
        name = f"{prefix}.{k}" if prefix else str(k)
        if isinstance(v, Mapping):
            out.update(summary_numbers(v, name))
        elif _is_number(v):
            out[name] = float(v)
    return out


def mean_se_over_seeds(values: Sequence[float]) -> tuple[float, float | None]:
    """``(mean, s.e.)`` of one number over seeds: s.e. = sample standard deviation
    (``ddof=1``) / sqrt(n); ``None`` when ``n < 2`` (one seed says nothing about the spread).

    Raises:
      ValueError: no values.
    """
    if not len(values):
        raise ValueError("mean_se_over_seeds needs at least one value")
    n = len(values)
    mean = math.fsum(values) / n
    if n < 2:
        return mean, None
    var = math.fsum((v - mean) ** 2 for v in values) / (n - 1)
    return mean, math.sqrt(var / n)


@dataclasses.dataclass(frozen=True)
class MetricStat:
    """One summary number at one grid point over seeds: ``mean``, ``se`` (``None`` when
    ``n < 2``, see ``SE_DEFINITION``), ``n`` seeds and their ``values`` in seed order."""
    mean: float
    se: float | None
    n: int
    values: tuple[float, ...]


@dataclasses.dataclass(frozen=True)
class SweepRow:
    """One grid point.

    Attributes:
      values: ``{axis (dotted field path): value}`` in axis order.
      seeds: the seeds finished at this point (those that count in ``metrics``).
      runs: their run directories, relative to the sweep directory.
      metrics: ``{summary number: MetricStat}`` over the finished seeds that have it.
      numbers: each finished run's summary numbers (``summary_numbers``), in seed order: for
        plots of one point per run (e.g. a score against KL).
    """
    values: Mapping[str, Any]
    seeds: tuple[int, ...]
    runs: tuple[str, ...]
    metrics: Mapping[str, MetricStat]
    numbers: tuple[Mapping[str, float], ...] = ()

    @property
    def label(self) -> str:
        """``axis=value, ...`` with each axis's last path component (an arm: its name)."""
        return ", ".join(format_value(v) if a == ARM_AXIS else
                         f"{a.rsplit('.', 1)[-1]}={format_value(v)}"
                         for a, v in self.values.items()) or "(base)"


@dataclasses.dataclass(frozen=True)
class SweepTable:
    """Mean ± s.e. over seeds of every summary number, per grid point (``build_sweep_table``).

    Attributes:
      name: the sweep's name.
      axes: grid axes (dotted ``PipelineConfig`` field paths), in product order.
      seed_field: the field the seeds set.
      seeds: every seed of the sweep.
      rows: one per grid point, in grid order (also those with no finished seed).
      missing: the runs not finished: ``{"index", "values", "seed", "dir"}``.
    """
    name: str
    axes: tuple[str, ...]
    seed_field: str
    seeds: tuple[int, ...]
    rows: tuple[SweepRow, ...]
    missing: tuple[Mapping[str, Any], ...] = ()

    def metric_names(self) -> list[str]:
        """Every summary number of any row, in first-seen order."""
        return list(dict.fromkeys(m for r in self.rows for m in r.metrics))

    def to_json(self) -> dict:
        """The table as JSON-able data (what ``results.json`` holds)."""
        return {"sweep": self.name, "axes": list(self.axes), "seed_field": self.seed_field,
                "seeds": list(self.seeds), "se": SE_DEFINITION,
                "rows": [{"values": {a: _jsonable(v) for a, v in r.values.items()},
                          "label": r.label, "n": len(r.seeds), "seeds": list(r.seeds),
                          "runs": list(r.runs),
                          "metrics": {k: dataclasses.asdict(m) | {"values": list(m.values)}
                                      for k, m in r.metrics.items()}}
                         for r in self.rows],
                "missing": [{k: _jsonable(v) for k, v in m.items()} for m in self.missing]}


def _jsonable(v: Any) -> Any:
    if isinstance(v, tuple):
        return [_jsonable(x) for x in v]
    if isinstance(v, Path):
        return str(v)
    return v


def format_value(v: Any) -> str:
    """A grid value as short text: floats with ``%g``, tuples as ``(a,b)``."""
    if isinstance(v, tuple):
        return "(" + ",".join(format_value(x) for x in v) + ")"
    if isinstance(v, float):
        return f"{v:g}"
    return str(v)


def build_sweep_table(name: str, axes: Sequence[str], grid: Sequence[Mapping[str, Any]],
                      runs: Sequence[Mapping[str, Any]], *, seed_field: str = "seed",
                      seeds: Sequence[int] = (), missing: Sequence[Mapping[str, Any]] = ()
                      ) -> SweepTable:
    """Aggregate finished runs into mean ± s.e. over seeds per grid point.

    Args:
      name: the sweep's name.
      axes: grid axes in product order.
      grid: every grid point's ``{axis: value}``, in grid order (rows follow it; a point with
        no finished run gets a row with no metrics).
      runs: finished runs: ``{"values": {axis: value}, "seed": int, "dir": str, "summary":
        the run's summary.json}``; each summary number is averaged over the runs of its grid
        point that have it (``n`` per number).
      seed_field, seeds, missing: recorded in the table.

    Raises:
      ValueError: a run whose values are not a grid point, or two runs of one point with
        the same seed.
    """
    keys = [tuple(_freeze(g[a]) for a in axes) for g in grid]
    by_point: dict[tuple, list[Mapping[str, Any]]] = {k: [] for k in keys}
    for r in runs:
        k = tuple(_freeze(r["values"][a]) for a in axes)
        if k not in by_point:
            raise ValueError(f"run {r.get('dir')} has grid values {dict(r['values'])}, which are "
                             f"not a point of the grid over {list(axes)}")
        if any(o["seed"] == r["seed"] for o in by_point[k]):
            raise ValueError(f"two runs of grid point {dict(r['values'])} have seed {r['seed']}")
        by_point[k].append(r)
    rows = []
    for g, k in zip(grid, keys):
        point_runs = sorted(by_point[k], key=lambda r: r["seed"])
        numbers = [summary_numbers(r["summary"]) for r in point_runs]
        metrics = {}
        for m in dict.fromkeys(n for nums in numbers for n in nums):
            vals = tuple(nums[m] for nums in numbers if m in nums)
            mean, se = mean_se_over_seeds(vals)
            metrics[m] = MetricStat(mean=mean, se=se, n=len(vals), values=vals)
        rows.append(SweepRow(values={a: g[a] for a in axes},
                             seeds=tuple(int(r["seed"]) for r in point_runs),
                             runs=tuple(str(r["dir"]) for r in point_runs), metrics=metrics,
                             numbers=tuple(numbers)))
    return SweepTable(name=name, axes=tuple(axes), seed_field=seed_field, seeds=tuple(seeds),
                      rows=tuple(rows), missing=tuple(missing))


def _freeze(v: Any) -> Any:
    return tuple(_freeze(x) for x in v) if isinstance(v, (list, tuple)) else v


def format_mean_se(stat: MetricStat | None) -> str:
    """``"mean ± se"`` (4 and 2 significant digits), ``"mean (n=1)"`` without an s.e., ``"-"``
    for no value."""
    if stat is None:
        return "-"
    if stat.se is None:
        return f"{stat.mean:.4g} (n={stat.n})"
    return f"{stat.mean:.4g} ± {stat.se:.2g}"


def select_metrics(names: Sequence[str], patterns: Sequence[str]) -> list[str]:
    """The ``names`` matching any fnmatch pattern, in ``names``' order."""
    return [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]


# ---- sweep plots: a registry of figure kinds ----------------------------------------------
@dataclasses.dataclass(frozen=True)
class SweepFigure:
    """A figure a sweep plot wrote: its PNG, the one-line question it answers, and Markdown
    shown under it in ``results.md`` (e.g. the table the figure is read with; may be empty)."""
    path: Path
    caption: str
    markdown: str = ""


#: kind -> ``fn(table, plots_dir, **params) -> list[SweepFigure]``
_SWEEP_PLOTS: dict[str, Callable[..., list[SweepFigure]]] = {}


def register_sweep_plot(kind: str):
    """Decorator: register ``fn(table: SweepTable, plots_dir: Path, **params) ->
    list[SweepFigure]`` as sweep plot ``kind`` (sweep presets name plots by kind and
    parameters, ``rlhf_jax.sweeps.SweepPlot``). ``fn`` writes its PNGs into ``plots_dir``
    (``<sweep>/plots``; the rows' ``runs`` are relative to ``plots_dir.parent``, so a plot
    can also read each run's ``metrics.jsonl`` or ``summary.json``), builds its figures with
    ``rlhf_jax.plots`` conventions (a bare ``Figure``, ±1 s.e. bars), and raises
    ``ValueError`` for parameters that do not fit the table (the report then notes it).

    Raises:
      ValueError: ``kind`` is already registered.
    """
    return add_to(_SWEEP_PLOTS, "sweep plot", kind)


def sweep_plot_kinds() -> tuple[str, ...]:
    """The registered sweep plot kinds."""
    return tuple(_SWEEP_PLOTS)


def get_sweep_plot(kind: str) -> Callable[..., list[SweepFigure]]:
    """The sweep plot called ``kind``.

    Raises:
      KeyError: unknown kind (lists the known ones).
    """
    if kind not in _SWEEP_PLOTS:
        raise KeyError(f"unknown sweep plot {kind!r}; known: {list(_SWEEP_PLOTS)}")
    return _SWEEP_PLOTS[kind]


@register_sweep_plot("metric_vs_axis")
def metric_vs_axis_plot(table: SweepTable, plots_dir: Path, *, metric: str,
                        axis: str | None = None) -> list[SweepFigure]:
    """``metric`` (a summary number, e.g. ``ppo.judge_mean``) against grid ``axis`` (default:
    the first), mean ±1 s.e. over seeds, one line per combination of the other axes; written
    to ``plots_dir/<metric>_vs_<axis>.png``.

    Raises:
      ValueError: ``axis`` is not a grid axis, or no grid point has ``metric`` (lists the
        summary numbers there are).
    """
    if not table.axes:
        raise ValueError("metric_vs_axis needs a grid axis; the sweep has none")
    axis = axis or table.axes[0]
    if axis not in table.axes:
        raise ValueError(f"plot axis {axis!r} is not a grid axis; axes: {list(table.axes)}")
    if not any(metric in r.metrics for r in table.rows):
        raise ValueError(f"no finished grid point has summary number {metric!r}; there are "
                         f"{table.metric_names()}")
    others = [a for a in table.axes if a != axis]
    series: dict[str, tuple[list, list, list]] = {}
    for r in table.rows:
        if metric not in r.metrics:
            continue
        label = ", ".join(f"{a.rsplit('.', 1)[-1]}={format_value(r.values[a])}"
                          for a in others) or metric
        xs, ms, ss = series.setdefault(label, ([], [], []))
        xs.append(r.values[axis])
        ms.append(r.metrics[metric].mean)
        ss.append(r.metrics[metric].se)
    from rlhf_jax.plots import sweep_metric_figure
    png = Path(plots_dir) / f"{_slug(metric)}_vs_{_slug(axis)}.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    sweep_metric_figure(series, xlabel=axis, ylabel=metric).savefig(png, dpi=100, format="png")
    n = sorted({s.n for r in table.rows for k, s in r.metrics.items() if k == metric})
    return [SweepFigure(png, f"How does {metric} change with {axis}? Mean over seeds at each "
                             f"grid point (n = {', '.join(map(str, n))}), ±1 s.e." +
                             (f"; one line per {', '.join(others)}" if others else ""))]


# ---- overoptimization: gold vs proxy against sqrt(KL) --------------------------------------
def _finite_or_none(v: Any) -> float | None:
    return float(v) if _is_number(v) and math.isfinite(float(v)) else None


def _stat(values: Sequence[float]) -> MetricStat | None:
    """Mean ± s.e. over seeds of the finite ``values`` (None: none is finite)."""
    vals = tuple(float(v) for v in values if _is_number(v) and math.isfinite(float(v)))
    if not vals:
        return None
    mean, se = mean_se_over_seeds(vals)
    return MetricStat(mean=mean, se=se, n=len(vals), values=vals)


def _stat_json(stat: MetricStat | None) -> dict | None:
    return None if stat is None else {"mean": stat.mean, "se": stat.se, "n": stat.n,
                                      "values": list(stat.values)}


#: What the overoptimization table's columns mean (written into its JSON and Markdown).
OVEROPTIMIZATION_DEFINITION = (
    "Per seed: the probe step where its gold score is highest (the first on ties), the gold "
    "score and the KL to the starting policy (nats per sequence) there, and its last probe's "
    "proxy and gold scores; then mean ± s.e. over seeds (" + SE_DEFINITION + "). 'proxy "
    "still rising' counts the seeds whose proxy score at the last probe is above the proxy "
    "score at their gold peak; 'gold peak at the last probe' counts the seeds whose gold "
    "score had not yet turned down. The star in the figure marks the peak of the mean curve "
    "(mean over seeds at equal steps), which can differ from the mean of the per-seed peaks.")


def overoptimization_summary(arms: Sequence[Any]) -> list[dict[str, Any]]:
    """Per arm (``rlhf_jax.plots.GoldProxyArm``): per-seed gold peaks and final scores, their
    mean ± s.e. over seeds (``OVEROPTIMIZATION_DEFINITION``), the count of seeds whose proxy
    still rose after the gold peak, and the peak of the mean curve. JSON-able: a missing
    number is None."""
    out = []
    for arm in arms:
        seeds = []
        for run in arm.runs:
            if not np.isfinite(run.gold).any():
                continue
            i = int(np.nanargmax(run.gold))
            final_proxy, proxy_at_peak = run.proxy[-1], run.proxy[i]
            seeds.append({
                "seed": run.seed, "peak_step": int(run.steps[i]),
                "peak_gold": float(run.gold[i]), "peak_kl": _finite_or_none(run.kl[i]),
                "peak_sqrt_kl": _finite_or_none(run.sqrt_kl[i]),
                "proxy_at_peak": _finite_or_none(proxy_at_peak),
                "final_step": int(run.steps[-1]), "final_gold": _finite_or_none(run.gold[-1]),
                "final_proxy": _finite_or_none(final_proxy),
                "final_kl": _finite_or_none(run.kl[-1]),
                "peak_at_last_probe": i == len(run.steps) - 1,
                "proxy_rising_after_peak": bool(final_proxy > proxy_at_peak)})
        j = arm.peak
        out.append({
            "arm": arm.label, "n": len(seeds),
            "peak_gold": _stat_json(_stat([x["peak_gold"] for x in seeds])),
            "peak_kl": _stat_json(_stat([x["peak_kl"] for x in seeds])),
            "final_gold": _stat_json(_stat([x["final_gold"] for x in seeds])),
            "final_proxy": _stat_json(_stat([x["final_proxy"] for x in seeds])),
            "final_kl": _stat_json(_stat([x["final_kl"] for x in seeds])),
            "proxy_rising_after_peak": sum(x["proxy_rising_after_peak"] for x in seeds),
            "peak_at_last_probe": sum(x["peak_at_last_probe"] for x in seeds),
            "mean_curve_peak": {"step": int(arm.steps[j]), "gold": float(arm.gold[j]),
                                "kl": _finite_or_none(arm.kl[j]),
                                "sqrt_kl": _finite_or_none(arm.sqrt_kl[j]),
                                "proxy": _finite_or_none(arm.proxy[j])},
            "seeds": seeds})
    return out


def _fmt_stat(d: Mapping[str, Any] | None) -> str:
    if d is None:
        return "-"
    return format_mean_se(MetricStat(mean=d["mean"], se=d["se"], n=d["n"],
                                     values=tuple(d["values"])))


def overoptimization_markdown(rows: Sequence[Mapping[str, Any]]) -> str:
    """The overoptimization table (``overoptimization_summary`` rows) as Markdown."""
    table = [{"arm": r["arm"], "n": r["n"],
              "peak gold (mean ± s.e.)": _fmt_stat(r["peak_gold"]),
              "KL at the gold peak, nats": _fmt_stat(r["peak_kl"]),
              "final gold": _fmt_stat(r["final_gold"]),
              "final proxy": _fmt_stat(r["final_proxy"]),
              "final KL, nats": _fmt_stat(r["final_kl"]),
              "proxy still rising after the gold peak": f"{r['proxy_rising_after_peak']} of "
                                                        f"{r['n']} seeds",
              "gold peak at the last probe": f"{r['peak_at_last_probe']} of {r['n']} seeds"}
             for r in rows]
    return markdown_table(table) + "\n\n" + OVEROPTIMIZATION_DEFINITION


def _sweep_dir(plots_dir: Path) -> Path:
    return Path(plots_dir).parent


def _write_tables(sweep_dir: Path, stem: str, payload: dict, markdown: str, title: str) -> None:
    write = _atomic_writer(sweep_dir)
    write(f"{stem}.json", json.dumps(payload, indent=1, default=str))
    write(f"{stem}.md", f"# {title}\n\n{markdown}\n")


@register_sweep_plot("overoptimization")
def overoptimization_plot(table: SweepTable, plots_dir: Path, *, stage: str = "ppo_eval",
                          gold_name: str = "gold score",
                          proxy_name: str = "proxy score") -> list[SweepFigure]:
    """Gold and proxy score against sqrt(KL) per arm, from the ``stage`` records (the RL
    stage's probe, ``ppo.probe_every``) of every finished run's ``metrics.jsonl``
    (``rlhf_jax.plots.overoptimization_figure``), written to ``plots_dir/overoptimization.png``;
    and its table (``overoptimization_summary``) as ``overoptimization.json`` and
    ``overoptimization.md`` in the sweep directory, also shown under the figure.

    Raises:
      ValueError: no finished run has probe records (runs without them are listed in the
        table's JSON under ``"without_probe"``).
    """
    from rlhf_jax.metrics import read_jsonl
    from rlhf_jax.plots import gold_proxy_arm, overoptimization_figure, probe_curve
    sweep_dir = _sweep_dir(plots_dir)
    arms, without = [], []
    for row in table.rows:
        curves = []
        for seed, rel in zip(row.seeds, row.runs):
            path = sweep_dir / rel / "metrics.jsonl"
            curve = probe_curve(read_jsonl(path), stage=stage, seed=seed) if path.exists() \
                else None
            if curve is None or not np.isfinite(curve.gold).any():
                without.append(rel)
            else:
                curves.append(curve)
        if curves:
            arms.append(gold_proxy_arm(row.label, curves))
    if not arms:
        raise ValueError(f"no finished run has {stage!r} records with a gold score (set "
                         "ppo.probe_every)" + (f"; runs without: {without}" if without else ""))
    png = Path(plots_dir) / "overoptimization.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    overoptimization_figure(arms, gold_name=gold_name, proxy_name=proxy_name).savefig(
        png, dpi=100, format="png")
    rows = overoptimization_summary(arms)
    md = overoptimization_markdown(rows)
    _write_tables(sweep_dir, "overoptimization",
                  {"sweep": table.name, "stage": stage, "gold": gold_name, "proxy": proxy_name,
                   "definition": OVEROPTIMIZATION_DEFINITION, "arms": rows,
                   "without_probe": without}, md, f"Overoptimization: {table.name}")
    n = sorted({len(a.runs) for a in arms})
    caption = (f"Does the gold score ({gold_name}) peak and then fall while the proxy "
               f"({proxy_name}) keeps rising as the policy moves away from its start (Gao et "
               "al. 2023, Fig. 1)? Probe-set means against sqrt(KL to the starting policy); "
               "one colour per arm, thin: one seed, thick: mean over seeds (n = "
               f"{', '.join(map(str, n))}) at each probe step; star: peak of the mean gold "
               "curve, with its KL; dotted: its sqrt(KL) in both panels.")
    return [SweepFigure(png, caption, markdown=md)]


# ---- the reward-KL frontier ----------------------------------------------------------------
def _run_config(sweep_dir: Path, rel: str) -> dict | None:
    path = sweep_dir / rel / "config.json"
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def frontier_family(method: str, cfg: Mapping[str, Any] | None, fallback: str) -> tuple[str, str]:
    """``(family, label)`` of a frontier point of ``method`` (a summary section: ``ppo``,
    ``dpo``, ...) from its run's configuration (``config.json`` as a dict): PPO with a fixed
    KL coefficient ``("PPO (fixed KL)", "KL coef 0.05")``, with the adaptive controller
    ``("PPO (adaptive KL)", "target 6")``, DPO ``("DPO", "β=0.1")``; otherwise (or without a
    configuration) ``(METHOD, fallback)``."""
    try:
        if method == "ppo":
            kl = cfg["ppo"]["ppo"]["kl"]
            if kl["kind"] == "adaptive":
                return "PPO (adaptive KL)", f"target {format_value(float(kl['target']))}"
            return "PPO (fixed KL)", f"KL coef {format_value(float(kl['init_kl_coef']))}"
        if method == "dpo":
            return "DPO", f"β={format_value(float(cfg['dpo']['dpo']['beta']))}"
    except (KeyError, TypeError, ValueError):
        pass
    return method.upper(), fallback


@register_sweep_plot("frontier")
def frontier_plot(table: SweepTable, plots_dir: Path, *, methods: Sequence[str] = ("ppo", "dpo"),
                  score: str = "judge_mean", kl: str = "kl", baseline: str | None = "sft",
                  score_name: str = "judge score") -> list[SweepFigure]:
    """Judge score against KL to the reference: for every grid point and every ``method``
    whose summary has ``<method>.<score>`` and ``<method>.<kl>``, one point at the mean over
    seeds with ±1 s.e. over seeds on both axes, grouped and labelled by the run's setting
    (``frontier_family``: KL coefficient, KL target or β), plus the ``baseline`` policy (mean
    over the distinct seeds); written to ``plots_dir/frontier.png`` with ``frontier.json`` /
    ``frontier.md`` in the sweep directory (the Rafailov et al. 2023, Figure 2 plane).

    Raises:
      ValueError: no grid point has a method's score and KL (lists the summary numbers).
    """
    from rlhf_jax.plots import FrontierPoint, frontier_figure
    sweep_dir = _sweep_dir(plots_dir)
    points, rows = [], []
    for row in table.rows:
        cfg = _run_config(sweep_dir, row.runs[0]) if row.runs else None
        for m in methods:
            sx, sy = row.metrics.get(f"{m}.{kl}"), row.metrics.get(f"{m}.{score}")
            if sx is None or sy is None:
                continue
            family, label = frontier_family(m, cfg, row.label)
            points.append(FrontierPoint(family=family, label=label, kl_mean=sx.mean,
                                        kl_se=sx.se, score_mean=sy.mean, score_se=sy.se,
                                        n=min(sx.n, sy.n)))
            rows.append({"grid point": row.label, "family": family, "setting": label,
                         "n": min(sx.n, sy.n), "KL to the reference, nats": format_mean_se(sx),
                         score_name: format_mean_se(sy)})
    if not points:
        raise ValueError(f"no finished grid point has {[f'{m}.{score}' for m in methods]} with "
                         f"{[f'{m}.{kl}' for m in methods]}; there are {table.metric_names()}")
    if baseline:
        by_seed: dict[int, tuple[float, float]] = {}
        for row in table.rows:
            for seed, nums in zip(row.seeds, row.numbers):
                if f"{baseline}.{score}" in nums and f"{baseline}.{kl}" in nums:
                    by_seed.setdefault(seed, (nums[f"{baseline}.{kl}"],
                                              nums[f"{baseline}.{score}"]))
        if by_seed:
            sx = _stat([v[0] for v in by_seed.values()])
            sy = _stat([v[1] for v in by_seed.values()])
            name = baseline.upper()
            points.append(FrontierPoint(family=name, label=name, kl_mean=sx.mean, kl_se=sx.se,
                                        score_mean=sy.mean, score_se=sy.se, n=sy.n))
            rows.append({"grid point": "(every point's reference)", "family": name,
                         "setting": name, "n": sy.n,
                         "KL to the reference, nats": format_mean_se(sx),
                         score_name: format_mean_se(sy)})
    png = Path(plots_dir) / "frontier.png"
    png.parent.mkdir(parents=True, exist_ok=True)
    frontier_figure(points, score_name=score_name).savefig(png, dpi=100, format="png")
    md = markdown_table(rows) + f"\n\nMean ± s.e. over seeds; {SE_DEFINITION}."
    _write_tables(sweep_dir, "frontier",
                  {"sweep": table.name, "score": score, "kl": kl, "se": SE_DEFINITION,
                   "points": [dataclasses.asdict(p) for p in points]}, md,
                  f"Reward–KL frontier: {table.name}")
    n = sorted({p.n for p in points})
    caption = (f"Which setting buys the most {score_name} per nat of KL from the reference, and "
               "do PPO and DPO trace the same frontier? One point per setting: mean over seeds "
               f"(n = {', '.join(map(str, n))}), ±1 s.e. over seeds on both axes (Rafailov et "
               "al. 2023, Figure 2): up and to the left is better.")
    return [SweepFigure(png, caption, markdown=md)]


def write_sweep_report(out_dir, table: SweepTable, *, title: str, metrics: Sequence[str] = (),
                       plots: Sequence[tuple[str, Mapping[str, Any]]] = (),
                       notes: str = "") -> Path:
    """Write ``out_dir/results.json`` (``table.to_json()``, every summary number) and
    ``out_dir/results.md``: the table of the chosen summary numbers (mean ± s.e. over seeds,
    one row per grid point), the plots (each with its question), every summary number (one
    row each, a column per grid point), and the runs not finished yet.

    Args:
      out_dir: the sweep directory; plots go to ``out_dir/plots/``.
      table: ``build_sweep_table``'s result.
      title: the Markdown heading.
      metrics: fnmatch patterns of the summary numbers in the main table (default
        ``DEFAULT_SWEEP_METRICS``); a pattern that matches nothing is noted.
      plots: ``(kind, params)`` of registered sweep plots (``register_sweep_plot``). A plot
        that cannot be drawn yet (e.g. no finished point has its metric) is noted under the
        table instead of failing the report.
      notes: free Markdown appended under "Notes".

    Returns:
      The path of ``results.md``.

    Raises:
      KeyError: an unknown plot kind.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write = _atomic_writer(out_dir)
    write("results.json", json.dumps(table.to_json(), indent=1, default=str))
    names = table.metric_names()
    patterns = tuple(metrics) or DEFAULT_SWEEP_METRICS
    shown = select_metrics(names, patterns)
    unmatched = [p for p in patterns if not select_metrics(names, [p])] if metrics else []
    done = sum(len(r.seeds) for r in table.rows)
    parts = [f"# {title}", "",
             f"Grid: {', '.join(f'`{a}`' for a in table.axes) or '(none)'}; seeds "
             f"({table.seed_field}): {', '.join(map(str, table.seeds))}; "
             f"{done} of {done + len(table.missing)} runs finished.", "",
             f"Each cell: mean ± s.e. over seeds; {SE_DEFINITION}.", ""]
    rows = []
    for r in table.rows:
        row = {a: format_value(v) for a, v in r.values.items()}
        row["n"] = len(r.seeds)
        row.update({m: format_mean_se(r.metrics.get(m)) for m in shown})
        rows.append(row)
    parts += ["## Summary", "", markdown_table(rows), ""]
    if unmatched:
        parts += [f"No summary number matches {', '.join(f'`{p}`' for p in unmatched)}.", ""]
    figures, failed = [], []
    for kind, params in plots:
        fn = get_sweep_plot(kind)
        try:
            figures += fn(table, out_dir / "plots", **dict(params))
        except ValueError as e:
            failed.append(f"{kind} {dict(params)}: {e}")
    if figures or failed:
        parts += ["## Plots", ""]
        for f in figures:
            parts += _figure_md(f.caption, Path(f.path).relative_to(out_dir).as_posix(), f.caption)
            if f.markdown:
                parts += [f.markdown.strip(), ""]
        parts += [f"Not drawn: {md_escape(m)}" for m in failed] + ([""] if failed else [])
    if names:  # every number: one row each, one column per grid point
        labels = [r.label for r in table.rows]
        if len(set(labels)) < len(labels):
            labels = [f"{i}: {lab}" for i, lab in enumerate(labels)]
        all_rows = [{"summary number": m, **{lab: format_mean_se(r.metrics.get(m))
                                             for lab, r in zip(labels, table.rows)}}
                    for m in names]
        parts += ["## All summary numbers", "",
                  "Mean ± s.e. over seeds (n=1: a single seed, no s.e.; -: not in any "
                  "finished run of that point).", "",
                  markdown_table(all_rows, ["summary number", *labels]), ""]
    if table.missing:
        parts += ["## Not finished", "", markdown_table(
            [{"index": m.get("index"), **{a: format_value(v) for a, v in m["values"].items()},
              "seed": m.get("seed"), "run": m.get("dir")} for m in table.missing]), ""]
    if notes:
        parts += ["## Notes", "", notes.strip(), ""]
    write("results.md", "\n".join(parts))
    return out_dir / "results.md"


def _atomic_writer(out_dir: Path):
    """``write(name, text)``: through a temporary file and ``os.replace`` (concurrent sweep
    jobs may rebuild the same table)."""
    import os

    def write(name: str, text: str) -> None:
        tmp = out_dir / f".{name}.tmp{os.getpid()}"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, out_dir / name)
    return write


__all__ = ["write_report", "markdown_table", "md_escape", "DEFAULT_PLOTS", "CURVE_QUESTIONS",
           "JUDGE_PLOT", "JUDGE_KL_PLOT", "SE_DEFINITION", "DEFAULT_SWEEP_METRICS",
           "summary_numbers", "mean_se_over_seeds", "MetricStat", "SweepRow", "SweepTable",
           "build_sweep_table", "format_mean_se", "format_value", "select_metrics", "SweepFigure",
           "register_sweep_plot", "sweep_plot_kinds", "get_sweep_plot", "metric_vs_axis_plot",
           "ARM_AXIS", "OVEROPTIMIZATION_DEFINITION", "overoptimization_summary",
           "overoptimization_markdown", "overoptimization_plot", "frontier_family",
           "frontier_plot", "write_sweep_report"]
