"""Shared helpers of the benchmarks: JSON-line output, timing, the machine's matmul peak,
and the fixed workloads of ``workload.json``.

Every benchmark prints one JSON object per measurement on its own line (``emit``), so a run
can be appended to a file and compared across machines and commits. Timings are medians over
repeats after warm-up, with ``block_until_ready`` so asynchronous dispatch is not mistaken for
speed. Nothing here is a test: benchmarks never assert on timings.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import json
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp

REPO_ROOT = Path(__file__).resolve().parents[1]
#: The shared copy (beside the repository: ``<repo>/../shared/bench/workload.json``) is the
#: source of truth; ``bench/workload.json`` is a copy for clones without it.
WORKLOAD_CANDIDATES = (REPO_ROOT.parent / "shared" / "bench" / "workload.json",
                       REPO_ROOT / "bench" / "workload.json")


def resolve_workload_file(path: str | os.PathLike | None = None) -> Path:
    """``path`` if given (relative paths are taken from the current directory, then from the
    repository root), else the first existing of ``WORKLOAD_CANDIDATES``.

    Raises:
      FileNotFoundError: naming every place looked at.
    """
    if path is not None:
        tried = [Path(path), REPO_ROOT / path]
    else:
        tried = list(WORKLOAD_CANDIDATES)
    for p in tried:
        if p.is_file():
            return p.resolve()
    raise FileNotFoundError("workload file not found; looked at: " + ", ".join(map(str, tried)))


def load_workload(path: str | os.PathLike | None = None) -> tuple[dict[str, Any], Path]:
    """``(workload dict, the file it came from)``; see ``resolve_workload_file``."""
    p = resolve_workload_file(path)
    with open(p) as f:
        return json.load(f), p


@functools.cache
def add_workload_args(ap: argparse.ArgumentParser) -> None:
    """The options every workload benchmark shares: which workloads, from which file, and the
    matmul reference (precision and size)."""
    ap.add_argument("--workload", default="all", help="small | medium | all (comma-separated ok)")
    ap.add_argument("--workload-file", default=None,
                    help="default: <repo>/../shared/bench/workload.json, else bench/workload.json")
    ap.add_argument("--matmul-precision", default="highest",
                    help="jax_default_matmul_precision (highest = true fp32, as the peak uses)")
    ap.add_argument("--matmul-n", type=int, default=2048)


def environment() -> dict[str, Any]:
    """Fields identifying the machine and software, attached to every emitted line."""
    dev = jax.devices()[0]
    return {
        "backend": jax.default_backend(),
        "device_kind": dev.device_kind,
        "device_count": jax.device_count(),
        "cpu_count": os.cpu_count(),
        "jax_version": jax.__version__,
        "python": platform.python_version(),
        "host": platform.node(),
    }


def emit(**fields: Any) -> dict[str, Any]:
    """Print one JSON line: ``fields`` plus a UTC timestamp, ``environment()`` and the 1-minute
    load average (a busy machine makes CPU timings meaningless; check it). Returns the dict."""
    rec = dict(fields)
    rec["time_utc"] = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    try:
        rec["loadavg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:  # pragma: no cover - not on every OS
        pass
    rec.update(environment())
    print(json.dumps(rec, default=_json_default), flush=True)
    return rec


def _json_default(x):
    if hasattr(x, "item"):
        return x.item()
    return str(x)


def timeit(fn: Callable[[], Any], warmup: int = 2, iters: int = 10) -> float:
    """Median wall-clock seconds of ``fn()`` over ``iters`` calls after ``warmup`` calls.

    Each call's result is ``jax.block_until_ready``-ed inside the timed region, so the time
    covers the device work, not just the dispatch. Compile in the warm-up calls.
    """
    return statistics.median(timeit_all(fn, warmup, iters))


def timeit_all(fn: Callable[[], Any], warmup: int = 2, iters: int = 10) -> list[float]:
    """Every timed call's seconds (see ``timeit``)."""
    for _ in range(warmup):
        jax.block_until_ready(fn())
    times = []
    for _ in range(iters):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return times


def timeit_interleaved(fns: dict[str, Callable[[], Any]], warmup: int = 2, iters: int = 10,
                       cpu_out: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Seconds of every timed call of each ``fns[name]()``, calling them in turn each round.

    On a shared machine the load changes from second to second; interleaving a model step
    with the matmul reference exposes both to the same conditions, so their ratio is steadier
    than the absolute numbers.

    Args:
      fns: name -> zero-argument callable returning arrays.
      warmup, iters: untimed then timed rounds.
      cpu_out: if given, filled with name -> this process's CPU seconds (all threads) per
        timed call. Other processes do not add to them, so CPU-second ratios are steadier
        still on a busy machine (an idle-spinning thread pool does count).
    """
    for _ in range(warmup):
        for fn in fns.values():
            jax.block_until_ready(fn())
    wall: dict[str, list[float]] = {k: [] for k in fns}
    cpu: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(iters):
        for name, fn in fns.items():
            c0, t0 = time.process_time(), time.perf_counter()
            jax.block_until_ready(fn())
            wall[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    if cpu_out is not None:
        cpu_out.update(cpu)
    return wall


def make_matmul(n: int = 2048, dtype: str = "float32",
                precision: jax.lax.Precision = jax.lax.Precision.HIGHEST, repeat: int = 1
                ) -> tuple[Callable[[], jax.Array], int]:
    """``(fn, flops)``: ``fn()`` runs a jitted ``n x n`` by ``n x n`` ``jnp.dot`` (``2 n^3``
    FLOPs) in ``dtype`` at ``precision`` (default ``HIGHEST``: true float32 on every backend;
    on GPU/TPU the default may use TF32/bf16 passes, on CPU it makes no difference; the
    bfloat16 reference of ``bench.train_steps --dtype bfloat16`` uses ``DEFAULT``).

    ``repeat``: ``fn()`` dispatches that many products back to back and returns the last
    (``flops`` counts them all): on an accelerator one ~1 ms product timed alone also times
    the host's dispatch and wait, which ``repeat`` spreads out."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(functools.partial(jnp.dot, precision=precision))
    if repeat == 1:
        return (lambda: f(a, b)), 2 * n ** 3
    return (lambda: [f(a, b) for _ in range(repeat)][-1]), 2 * n ** 3 * repeat


def matmul_gflops(n: int = 2048, dtype: str = "float32", warmup: int = 3, iters: int = 10
                  ) -> dict[str, Any]:
    """The machine's achievable matmul throughput: a jitted ``jnp.dot`` of two ``n x n``
    matrices (``2 n^3`` FLOPs), median over ``iters`` after ``warmup``.

    See ``make_matmul``.

    Returns:
      ``{"matmul_n", "matmul_dtype", "matmul_s", "matmul_gflops", "matmul_gflops_best"}``
      (``_best`` from the fastest call: the least disturbed by other processes).
    """
    fn, flops = make_matmul(n, dtype)
    times = timeit_all(fn, warmup, iters)
    sec = statistics.median(times)
    return {"matmul_n": n, "matmul_dtype": dtype, "matmul_s": sec,
            "matmul_gflops": flops / sec / 1e9, "matmul_gflops_best": flops / min(times) / 1e9}


def main() -> None:
    """``python -m bench.common``: print the matmul peak line."""
    import argparse
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=2048)
    ap.add_argument("--iters", type=int, default=10)
    args = ap.parse_args()
    emit(bench="matmul", **matmul_gflops(args.n, iters=args.iters))


if __name__ == "__main__":
    sys.exit(main())
