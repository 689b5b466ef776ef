"""Plots of training curves and a Markdown report of a whole RLHF run.

``write_report`` turns the metric records of each stage (``rlhf_jax.metrics.read_jsonl``
output, or records kept in memory), a before/after summary table and sample completions of
the same prompts under each model into ``out_dir/report.md`` with PNG plots in
``out_dir/plots/``; every path in the report is relative, so the directory can be moved or
published as is.
"""

from __future__ import annotations

import fnmatch
import html
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

#: Default plot groups: (file stem, title, key patterns (fnmatch)). A group is drawn only if
#: some record has a matching key; its keys are the matching names in first-seen order.
DEFAULT_PLOTS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("reward", "Reward", ("objective/score", "objective/rlhf_reward",
                          "objective/non_score_reward")),
    ("kl", "KL to the reference policy", ("objective/kl", "objective/kl_coef")),
    ("judge", "Judge score", ("*judge*",)),
    ("rm", "Reward model", ("rm/accuracy", "rm/loss", "rm/margin", "eval/rm/*")),
    ("dpo", "DPO", ("dpo/rewards/margins", "dpo/rewards/accuracies", "dpo/loss")),
    ("sft", "SFT", ("sft/loss", "sft/accuracy")),
    ("ppo", "PPO", ("ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/val/error",
                    "objective/entropy")),
    ("rollout", "Rollouts", ("rollout/response_length", "rollout/no_eos_share")),
)

_NON_METRIC = ("step", "stage", "time")


def _is_number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _metric_keys(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """Numeric metric names in first-seen order."""
    seen: dict[str, None] = {}
    for r in records:
        for k, v in r.items():
            if k not in _NON_METRIC and _is_number(v):
                seen.setdefault(k, None)
    return list(seen)


def plot_curves(records: Sequence[Mapping[str, Any]], keys: Sequence[str], out_png, *,
                title: str = "", x: str = "step", by_stage: bool = True) -> list[str]:
    """One subplot per metric key, one line per stage, saved as a PNG (matplotlib Agg,
    without pyplot).

    Args:
      records: metric records (``{"step": ..., "stage": ..., name: value}``).
      keys: metric names to plot, one subplot each.
      out_png: output path (parent directories are created).
      title: figure title; missing keys are appended to it ("missing: ...").
      x: the record field on the x axis.
      by_stage: one line per ``stage`` value; False draws all records as one line.

    Returns:
      The keys that no record had (skipped). If none is present, the PNG still gets written
      with a "no data" note, so a report never links a missing file.
    """
    # A bare Figure renders with Agg and never touches pyplot's global backend or state.
    from matplotlib.figure import Figure

    present = [k for k in keys if any(_is_number(r.get(k)) for r in records)]
    missing = [k for k in keys if k not in present]
    out_png = Path(out_png)
    out_png.parent.mkdir(parents=True, exist_ok=True)

    n = max(len(present), 1)
    cols = min(n, 3)
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(4.2 * cols, 3.2 * rows))
    axes = fig.subplots(rows, cols, squeeze=False)
    flat = [ax for row in axes for ax in row]
    for ax, key in zip(flat, present):
        groups: dict[Any, list[tuple[float, float]]] = {}
        for i, r in enumerate(records):
            v = r.get(key)
            if not _is_number(v):
                continue
            xv = r.get(x, i)
            stage = r.get("stage") if by_stage else None
            groups.setdefault(stage, []).append((xv if _is_number(xv) else i, float(v)))
        for stage, pts in groups.items():
            pts.sort(key=lambda p: p[0])
            xs, ys = zip(*pts)
            style = "o-" if len(pts) < 20 else "-"
            ax.plot(xs, ys, style, markersize=3, linewidth=1.2,
                    label=str(stage) if stage is not None else None)
        ax.set_title(key, fontsize=9)
        ax.set_xlabel(x, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.grid(alpha=0.3)
        if by_stage and any(s is not None for s in groups):
            ax.legend(fontsize=7)
    for ax in flat[len(present):]:
        ax.axis("off")
    if not present:
        flat[0].text(0.5, 0.5, "no data", ha="center", va="center", transform=flat[0].transAxes)
    full_title = title
    if missing:
        full_title = f"{title} (missing: {', '.join(missing)})" if title else \
            f"missing: {', '.join(missing)}"
    if full_title:
        fig.suptitle(full_title, fontsize=10)
    fig.tight_layout()
    fig.savefig(out_png, dpi=100, format="png")
    return missing


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


def write_report(out_dir, *, title: str, stages: Mapping[str, Sequence[Mapping[str, Any]]],
                 summary_rows: Sequence[Mapping[str, Any]] = (),
                 samples: Mapping[str, Sequence[tuple[str, str]]] | None = None,
                 notes: str = "",
                 plots: Sequence[tuple[str, str, Sequence[str]]] = DEFAULT_PLOTS) -> Path:
    """Write ``out_dir/report.md`` with a summary table, training-curve plots and samples.

    Args:
      out_dir: report directory (created); plots go to ``out_dir/plots/``.
      title: the report's heading.
      stages: ``{stage name: metric records}``; a record's missing ``stage`` field is set to
        the stage name.
      summary_rows: before/after table, one dict per model, e.g.
        ``{"model": "SFT", "judge score": 0.12, "kl": 0.0}``.
      samples: ``{model name: [(prompt, completion), ...]}``; completions of the same prompt
        are shown side by side (grouped by prompt text, in first-seen order); a model with no
        completion for a prompt shows "-".
      notes: free Markdown appended under "Notes".
      plots: plot groups ``(file stem, title, key patterns)``; groups with no matching key
        are skipped.

    Returns:
      The path of ``report.md``.
    """
    out_dir = Path(out_dir)
    (out_dir / "plots").mkdir(parents=True, exist_ok=True)
    records = [dict(r, stage=r.get("stage") or name) for name, recs in stages.items()
               for r in recs]
    all_keys = _metric_keys(records)

    parts = [f"# {title}", ""]
    if stages:
        parts += ["Stages: " + ", ".join(f"**{md_escape(n)}** ({len(r)} records)"
                                        for n, r in stages.items()), ""]

    if summary_rows:
        parts += ["## Summary", "", markdown_table(summary_rows), ""]

    plotted = []
    for stem, plot_title, patterns in plots:
        keys = [k for k in all_keys if any(fnmatch.fnmatchcase(k, p) for p in patterns)]
        if not keys:
            continue
        png = out_dir / "plots" / f"{_slug(stem)}.png"
        plot_curves(records, keys, png, title=plot_title)
        plotted.append((plot_title, png.relative_to(out_dir).as_posix(), keys))
    if plotted:
        parts += ["## Training curves", ""]
        for plot_title, rel, keys in plotted:
            parts += [f"### {plot_title}", "", f"![{plot_title}]({rel})", "",
                      "Metrics: " + ", ".join(f"`{k}`" for k in keys), ""]

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


__all__ = ["plot_curves", "write_report", "markdown_table", "md_escape", "DEFAULT_PLOTS"]
