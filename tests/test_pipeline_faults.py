"""Faults of a real ``rlhf-jax`` process on the tiny preset (real subprocesses and signals):

* SIGTERM mid-stage: exit code 75 (``EXIT_PREEMPTED``), a checkpoint at the step reached, no
  ``COMPLETE.json``; the same command continues and finishes;
* SIGKILL in the middle of the HF export (after the parameters are saved): the stage is not
  finished; the same command redoes the export and marks it complete;
* a data source that a requested stage needs is missing: the run fails before SFT trains.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rlhf_jax.metrics import read_jsonl
from rlhf_jax.pipeline import run_pipeline
from rlhf_jax.presets import tiny
from rlhf_jax.train.loop import EXIT_PREEMPTED

REPO_ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def compile_cache(tmp_path_factory) -> Path:
    """A persistent XLA compilation cache shared by this module's processes: they compile the
    same tiny SFT programs, so only the first one pays for it."""
    return tmp_path_factory.mktemp("xla_cache")


def _env(cache: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env.update(JAX_PLATFORMS="cpu", HF_HUB_OFFLINE="1", PYTHONPATH=str(REPO_ROOT),
               JAX_COMPILATION_CACHE_DIR=str(cache), JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
               JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0")
    return env


def _cli(out: Path, *args: str) -> list[str]:
    return [sys.executable, "-m", "rlhf_jax.cli", "sft", "--preset", "tiny", "--out-dir", str(out),
            "--no-tensorboard", *args]


def _wait_for(predicate, proc, timeout=300):
    deadline = time.monotonic() + timeout
    while not predicate():
        assert proc.poll() is None, f"exited early with {proc.returncode}"
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.2)


def test_sigterm_exits_75_and_the_same_command_continues(tmp_path, compile_cache):
    out = tmp_path / "run"
    args = ("--sft.steps", "60", "--checkpoint-every", "1000")
    log = open(tmp_path / "first.log", "w")
    proc = subprocess.Popen(_cli(out, *args), cwd=REPO_ROOT, env=_env(compile_cache), stdout=log,
                            stderr=subprocess.STDOUT)
    metrics = out / "metrics.jsonl"
    _wait_for(lambda: metrics.exists() and metrics.read_text().count("\n") >= 2, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=300) == EXIT_PREEMPTED, (tmp_path / "first.log").read_text()[-3000:]
    steps = sorted(int(p.name) for p in (out / "sft" / "checkpoints").iterdir() if p.name.isdigit())
    assert steps and 2 <= steps[-1] < 60
    assert not (out / "sft" / "final" / "COMPLETE.json").exists()
    # the same command, fewer steps left: continues from the checkpoint and finishes
    done = subprocess.run(_cli(out, *args),
                          cwd=REPO_ROOT, env=_env(compile_cache), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"sft: resumed from step {steps[-1]}" in done.stderr
    rows = [r["step"] for r in read_jsonl(metrics) if r["stage"] == "sft"]
    assert rows == list(range(1, 61))  # one row per step across the two processes
    assert (out / "sft" / "final" / "COMPLETE.json").exists()


_KILL_DURING_EXPORT = """
import os, signal, sys
import rlhf_jax.models.convert.hf as hf
real = hf.save_hf_checkpoint
def save_then_die(model, params, path, **kw):
    real(model, params, path, **kw)
    os.kill(os.getpid(), signal.SIGKILL)  # the export is written, not yet moved into place
hf.save_hf_checkpoint = save_then_die
from rlhf_jax.cli import main
main(sys.argv[1:])
"""


def test_sigkill_during_the_hf_export_then_the_export_is_redone(tmp_path, compile_cache):
    out = tmp_path / "run"
    args = ["sft", "--preset", "tiny", "--out-dir", str(out), "--no-tensorboard"]
    killed = subprocess.run([sys.executable, "-c", _KILL_DURING_EXPORT, *args], cwd=REPO_ROOT,
                            env=_env(compile_cache), capture_output=True, text=True, timeout=900)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    assert not (out / "sft" / "final" / "COMPLETE.json").exists()
    assert not (out / "sft" / "hf").exists()
    done = subprocess.run(_cli(out), cwd=REPO_ROOT, env=_env(compile_cache), capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "already finished" not in done.stderr
    assert (out / "sft" / "hf" / "model.safetensors").exists()
    assert (out / "sft" / "final" / "COMPLETE.json").exists()
    assert not (out / "sft" / "hf.partial").exists()
    rows = [r["step"] for r in read_jsonl(out / "metrics.jsonl") if r["stage"] == "sft"]
    assert rows == list(range(1, tiny().sft.steps + 1))  # restored from the last checkpoint


def test_a_missing_source_fails_before_sft_trains(tmp_path):
    sft = tmp_path / "sft.jsonl"
    sft.write_text(json.dumps({"prompt": "Say hi.", "completion": "Hi."}) + "\n")
    cfg = tiny()
    cfg = dataclasses.replace(cfg, out_dir=tmp_path / "run", task="files",
                              data=dataclasses.replace(cfg.data, kind="files", sft=str(sft),
                                                       prompts=str(tmp_path / "missing.jsonl")))
    with pytest.raises(KeyError, match="has no 'preferences' source"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "sft").exists()  # nothing trained
    cfg = dataclasses.replace(cfg, stages=("sft", "ppo"))
    with pytest.raises(FileNotFoundError, match="missing.jsonl"):
        run_pipeline(cfg)
    assert not (tmp_path / "run" / "sft").exists()
