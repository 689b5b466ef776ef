"""A task defined outside the package (``tests/_arith_task.py``: its own records and a Python
judge) runs through the command line's ``--task module:factory``; task loading errors name
the spec."""

from __future__ import annotations

import json

import pytest

from rlhf_jax import cli
from rlhf_jax.tasks import Task, load_task


def test_external_task_runs_through_the_cli(tmp_path):
    out = tmp_path / "run"
    cli.main(["pipeline", "--preset", "tiny", "--task", "_arith_task:make", "--out-dir", str(out),
              "--stages", "sft", "eval", "--sft.steps", "2",
              "--no-tensorboard"])
    summary = json.loads((out / "summary.json").read_text())
    assert "sft" in summary
    for name in ("sft",):
        assert 0.0 <= summary[name]["judge_mean"] <= 1.0  # the task's own exact-sum judge
    assert summary["rm_heldout_accuracy"] is None  # no reward model in this run
    record = json.loads((out / "sft" / "stage.json").read_text())
    assert record["task"] == "_arith_task:make"
    assert "exact sum" in (out / "report.md").read_text()


def test_task_errors_name_the_spec():
    with pytest.raises(ValueError, match="unknown task 'nope'"):
        load_task("nope", None)
    with pytest.raises(ValueError, match="cannot import module 'no_such_module_xyz'"):
        load_task("no_such_module_xyz:make", None)
    with pytest.raises(ValueError, match="has no callable 'missing'"):
        load_task("_arith_task:missing", None)
    with pytest.raises(ValueError, match="returned dict"):
        load_task("json:loads", "{}")


def test_task_judge_output_is_checked():
    task = Task(name="t", sources={}, judge=lambda p, r: [1.0])
    with pytest.raises(ValueError, match=r"judge returned shape \(1,\) for 2 responses"):
        task.score(["a", "b"], ["x", "y"])
    task = Task(name="t", sources={}, judge=lambda p, r: [1.0, float("nan")])
    with pytest.raises(ValueError, match="for sample 1"):
        task.score(["a", "b"], ["x", "y"])
    with pytest.raises(KeyError, match="has no 'sft' source"):
        task.source("sft")
