"""Report: plots (valid PNGs), summary table, escaped cells, side-by-side samples."""

import re

from rlhf_jax.metrics import MetricsLogger, read_jsonl
from rlhf_jax.report import markdown_table, md_escape, plot_curves, write_report

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _is_png(path):
    data = path.read_bytes()
    return len(data) > 100 and data[:8] == PNG_MAGIC


def _records(stage, n, **series):
    return [{"step": i, "stage": stage, **{k.replace("__", "/"): f(i) for k, f in series.items()}}
            for i in range(n)]


def test_plot_curves_reports_missing(tmp_path):
    recs = _records("ppo", 5, objective__kl=lambda i: 0.1 * i) + \
        _records("ppo2", 3, objective__kl=lambda i: 0.2 * i)
    missing = plot_curves(recs, ["objective/kl", "nope/metric"], tmp_path / "a" / "kl.png",
                          title="KL")
    assert missing == ["nope/metric"]
    assert _is_png(tmp_path / "a" / "kl.png")
    assert plot_curves([], ["x"], tmp_path / "empty.png", title="t") == ["x"]
    assert _is_png(tmp_path / "empty.png")


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
            log.log(i, {"objective/score": 0.1 * i, "objective/kl": 0.02 * i,
                        "eval/judge_score": 0.05 * i}, stage="ppo")
            log.log(i, {"dpo/rewards/margins": 0.2 * i, "eval/judge_score": 0.04 * i},
                    stage="dpo")
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
    out = tmp_path / "report"
    path = write_report(out, title="Tiny RLHF run", stages=stages, summary_rows=rows,
                        samples=samples, notes="Trained on *fake* data.")
    assert path == out / "report.md"
    text = path.read_text()
    assert text.startswith("# Tiny RLHF run")

    # Summary table with one row per model.
    table = text.split("## Summary")[1].split("##")[0]
    body = [ln for ln in table.splitlines() if ln.startswith("|")]
    assert body[0] == "| model | judge score | kl |"
    assert [ln.split("|")[1].strip() for ln in body[2:]] == ["SFT", "PPO", "DPO"]

    # Plots exist, are PNGs, and are linked relatively.
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    stems = {l.split("/")[-1] for l in links}
    assert {"reward.png", "kl.png", "judge.png", "rm.png", "dpo.png", "sft.png"} <= stems
    assert "ppo.png" not in stems and "rollout.png" not in stems  # no such keys logged
    for link in links:
        assert not link.startswith("/")
        assert _is_png(out / link)

    # Samples: each prompt once, each model's completion under it, escaped.
    samples_sec = text.split("## Samples")[1].split("## Notes")[0]
    assert samples_sec.count("### Prompt") == 2
    assert "Describe the \\| weather<br>today." in samples_sec
    for m in ("SFT", "PPO", "DPO"):
        for j in range(2):
            assert f"| {m} | {m} says {j} &lt;\\|im_end\\|&gt; |" in samples_sec
    assert "Trained on *fake* data." in text.split("## Notes")[1]


def test_write_report_uneven_samples(tmp_path):
    samples = {"SFT": [("p1", "a"), ("p2", "b")], "PPO": [("p1", "c")]}
    path = write_report(tmp_path, title="t", stages={}, summary_rows=[], samples=samples)
    text = path.read_text()
    assert "| PPO | - |" in text  # PPO has nothing for p2: shown, not dropped
    assert "## Training curves" not in text
