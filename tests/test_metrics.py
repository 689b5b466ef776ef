"""Metric reduction, deferred host reads, JSONL/TensorBoard writers, progress bars."""

import io
import json
import math
import sys

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.metrics import (DeferredMetrics, MetricsLogger, host_metrics, progress, read_jsonl,
                              reduce_metrics)


class _Recorder:
    """A fake device scalar that records when the host converts it."""

    log: list = []

    def __init__(self, tag, value):
        self.tag, self.value = tag, value

    def __array__(self, dtype=None, copy=None):
        _Recorder.log.append(self.tag)
        return np.asarray(self.value, dtype=dtype)


def test_host_metrics_reduces_pairs_like_reduce_metrics():
    m = {"objective/kl": (jnp.float32(3.0), jnp.float32(4.0)),
         "rm/accuracy": (jnp.float32(0.0), jnp.float32(0.0)),  # empty: 0 / max(0, 1)
         "already": jnp.float32(2.5)}
    out = host_metrics(m)
    assert out == {"objective/kl": 0.75, "rm/accuracy": 0.0, "already": 2.5}
    dev = reduce_metrics({k: v for k, v in m.items() if isinstance(v, tuple)})
    assert math.isclose(float(dev["objective/kl"]), out["objective/kl"])
    with pytest.raises(ValueError, match="'bad'.*scalar"):
        host_metrics({"bad": jnp.zeros(3)})


def test_deferred_metrics_reads_previous_step_only():
    _Recorder.log.clear()
    d = DeferredMetrics()
    assert d.push(0, {"loss": (_Recorder("s0", 2.0), _Recorder("c0", 1.0))}) is None
    assert _Recorder.log == []  # step 0 untouched while it is the newest
    prev = d.push(1, {"loss": (_Recorder("s1", 9.0), _Recorder("c1", 3.0))})
    assert prev == (0, {"loss": 2.0})
    assert sorted(_Recorder.log) == ["c0", "s0"]  # step 1 not converted at its push
    assert d.pending_step == 1
    assert d.flush() == (1, {"loss": 3.0})
    assert sorted(_Recorder.log) == ["c0", "c1", "s0", "s1"]
    assert d.flush() is None and d.pending_step is None


def test_deferred_metrics_with_device_arrays():
    d = DeferredMetrics()
    outs = [d.push(s, {"x": (jnp.float32(s), jnp.float32(2))}) for s in range(4)]
    assert outs[0] is None
    assert [o[0] for o in outs[1:]] == [0, 1, 2]
    assert [o[1]["x"] for o in outs[1:]] == [0.0, 0.5, 1.0]
    assert d.flush() == (3, {"x": 1.5})


def test_jsonl_and_tensorboard(tmp_path):
    with MetricsLogger(tmp_path, config={"lr": 1e-5, "shape": (1, 2)}) as log:
        log.log(0, {"sft/loss": 2.0, "tokens": np.int64(7)}, stage="sft")
        log.log(1, {"sft/loss": jnp.float32(1.5)}, stage="sft")
        log.log(0, {"objective/kl": float("nan")}, stage="ppo")
        with pytest.raises(ValueError, match="reserved"):
            log.log(2, {"step": 1.0})
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["stage"]) for r in recs] == [(0, "sft"), (1, "sft"), (0, "ppo")]
    assert recs[0]["sft/loss"] == 2.0
    assert recs[0]["tokens"] == 7 and isinstance(recs[0]["tokens"], int)
    assert recs[1]["sft/loss"] == 1.5 and math.isnan(recs[2]["objective/kl"])
    assert all(isinstance(r["time"], float) for r in recs)
    assert json.loads((tmp_path / "config.json").read_text()) == {"lr": 1e-5, "shape": [1, 2]}
    for stage in ("sft", "ppo"):
        events = list((tmp_path / "tb" / stage).glob("events.out.tfevents.*"))
        assert events and events[0].stat().st_size > 0

    # A line cut by a crash is skipped by the reader with a warning; a resumed run removes it
    # before appending (appending after it would leave a malformed line inside the file).
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 9, "sta')
    with pytest.warns(UserWarning, match="truncated"):
        assert len(read_jsonl(tmp_path / "metrics.jsonl")) == 3
    with pytest.warns(UserWarning, match=r"metrics.jsonl: removed 1 truncated final record"):
        log = MetricsLogger(tmp_path, tensorboard=False)
    with log:
        log.log(2, {"sft/loss": 1.0}, stage="sft")
    recs = read_jsonl(tmp_path / "metrics.jsonl")
    assert [(r["step"], r["stage"]) for r in recs] == [(0, "sft"), (1, "sft"), (0, "ppo"),
                                                       (2, "sft")]


def test_drop_after_rewrites_only_newer_rows_of_the_stages(tmp_path):
    """What a resumed loop does: rows of its stage past the restored step go, atomically."""
    path = tmp_path / "metrics.jsonl"
    with MetricsLogger(tmp_path, tensorboard=False) as log:
        for step in range(1, 5):
            log.log(step, {"sft/loss": float(step)}, stage="sft")
            log.log(step, {"x": 1.0}, stage="rm")
        log.log(2, {"e": 1.0}, stage="sft_eval")
        log.log(4, {"e": 2.0}, stage="sft_eval")
        before = path.stat().st_ino
        assert log.drop_after(2, ("sft", "sft_eval")) == 3
        assert path.stat().st_ino != before  # replaced, not edited in place
        assert not list(tmp_path.glob(".metrics.jsonl.*"))  # no temporary file left
        assert log.drop_after(2, "sft") == 0
        log.log(3, {"sft/loss": 30.0}, stage="sft")  # the handle appends to the new file
    recs = [(r["stage"], r["step"]) for r in read_jsonl(path)]
    assert recs == [("sft", 1), ("rm", 1), ("sft", 2), ("rm", 2), ("rm", 3), ("rm", 4),
                    ("sft_eval", 2), ("sft", 3)]
    assert log.drop_after(0, "rm") == 4  # also after close()
    assert [(r["stage"], r["step"]) for r in read_jsonl(path)] == [
        ("sft", 1), ("sft", 2), ("sft_eval", 2), ("sft", 3)]
    assert MetricsLogger(tmp_path / "off", enabled=False).drop_after(0, "sft") == 0


def test_read_jsonl_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        read_jsonl(tmp_path / "nope.jsonl")
    p = tmp_path / "m.jsonl"
    p.write_text('{"a": 1}\n\n[1, 2]\n')
    with pytest.raises(ValueError, match=r"m.jsonl:3: expected a JSON object"):
        read_jsonl(p)


def test_disabled_logger_writes_nothing(tmp_path):
    log = MetricsLogger(tmp_path / "off", enabled=False)
    assert log.log(0, {"a": 1.0})["a"] == 1.0
    log.close()
    assert not (tmp_path / "off").exists()


def test_wandb_missing_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # import wandb -> ImportError
    with pytest.raises(ImportError, match="wandb.*not installed"):
        MetricsLogger(tmp_path / "w", wandb_project="proj")
    assert not (tmp_path / "w").exists()


def test_progress_bar():
    buf = io.StringIO()
    bar = progress(range(5), "train", "step", file=buf)
    assert sum(1 for _ in bar) == 5
    assert bar.n == 5
    text = buf.getvalue()
    assert "train" in text and "5/5" in text and "step/s" in text
    buf = io.StringIO()
    with progress(10, "sample", "tok", file=buf) as bar:
        bar.update(4)
    assert bar.total == 10 and bar.n == 4
    assert "4/10" in buf.getvalue()
