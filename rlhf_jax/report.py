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
"""

from __future__ import annotations

import fnmatch
import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from rlhf_jax.plots import _is_number, judge_figure, judge_kl_figure, judged_plot_data, plot_curves

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


__all__ = ["write_report", "markdown_table", "md_escape", "DEFAULT_PLOTS", "CURVE_QUESTIONS",
           "JUDGE_PLOT", "JUDGE_KL_PLOT"]
