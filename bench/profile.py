"""Where a benchmark's device time goes: run another ``bench`` module under ``jax.profiler`` and
print the device ops that took the most time, as JSON lines.

    .venv/bin/python -m bench.profile --top 40 -- bench.train_steps --steps sft \
        --workload-file bench/workload_device.json --dtype bfloat16 --warmup-steps 1 --timed-steps 3

The module after ``--`` runs in this process inside ``jax.profiler.trace(out,
create_perfetto_trace=True)``; its own JSON lines print as usual. Then the Perfetto trace
(``out/**/perfetto_trace.json.gz``) is read back and every complete event (``"ph": "X"``) on a
device track (a process whose name has ``/device:``, e.g. ``/device:GPU:0``, ``/device:TPU:0``)
is summed by name, compiles and warm-up included: the track's ``XLA Ops`` line (HLO ops, one
level) when it has one, else its kernel lines. On XLA:CPU there is no device track; the
host threads' events (thread names with ``XLA`` / ``TFRT`` / ``Eigen``) are summed instead,
nested runtime events included, so there only the op lines' order means something.

Lines: ``bench: "profile_total"`` (``trace``, ``tracks`` the names summed over, ``busy_s`` the
sum of their op time, ``n_events``), then ``top`` lines ``bench: "profile_op"`` (``name``,
``total_ms``, ``count``, ``mean_us``, ``share`` of ``busy_s``), largest first, and
``bench: "profile_class"`` lines: the same time grouped by a coarse class of the op name
(``gemm`` for cuBLAS / cuDNN / Triton GEMM kernels and ``dot`` / ``convolution`` ops,
``fusion`` for other XLA fusions, ``copy`` / ``transpose`` / ``memcpy``, ``collective``,
``other``).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import runpy
import sys
import tempfile
from pathlib import Path

import jax

from bench.common import emit

_CLASSES = (
    ("gemm", ("gemm", "cublas", "cudnn", "cutlass", "matmul", "dot", "convolution", "triton_gemm",
              "sm90_xmma", "sm80_xmma", "ampere_", "hopper_")),
    ("collective", ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "nccl",
                    "collective")),
    ("copy", ("copy", "transpose", "memcpy", "memset", "dynamic-update-slice",
              "dynamic_update_slice")),
    ("fusion", ("fusion", "loop_", "input_", "reduce", "scatter", "gather")),
)


def op_class(name: str) -> str:
    """A coarse class of a device op's name (see the module docstring)."""
    low = name.lower()
    for cls, needles in _CLASSES:
        if any(n in low for n in needles):
            return cls
    return "other"


def summarize(trace_path: Path) -> tuple[dict, list[str], int]:
    """``({name: [total_us, count]}, track names summed, number of events)`` of one trace."""
    with gzip.open(trace_path, "rt") as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    proc_names, thread_names = {}, {}
    for e in events:
        if e.get("ph") == "M" and e.get("name") == "process_name":
            proc_names[e["pid"]] = e.get("args", {}).get("name", "")
        elif e.get("ph") == "M" and e.get("name") == "thread_name":
            thread_names[(e["pid"], e.get("tid"))] = e.get("args", {}).get("name", "")
    device_pids = {pid for pid, n in proc_names.items() if "/device:" in n}
    if device_pids:
        # A device track has nested lines: "XLA Modules" (whole programs), "XLA Ops" (HLO ops)
        # and the streams' kernels. Sum the HLO-op line when present (one level, no double
        # counting), else every line but the modules and steps.
        lines = {k: n for k, n in thread_names.items() if k[0] in device_pids}
        chosen = {k for k, n in lines.items() if n == "XLA Ops"} or {
            k for k, n in lines.items() if n not in ("XLA Modules", "Steps", "Framework Ops",
                                                     "Source code")}

        def keep(e):
            return (e["pid"], e.get("tid")) in chosen
        tracks = sorted({f"{proc_names[k[0]]}/{lines[k]}" for k in chosen})
    else:  # XLA:CPU: the host threads that run XLA's ops
        host = {k for k, n in thread_names.items()
                if any(s in n for s in ("XLA", "TFRT", "Eigen", "xla"))}

        def keep(e):
            return (e["pid"], e.get("tid")) in host
        tracks = sorted({thread_names[k] for k in host})
    ops: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0])
    n = 0
    for e in events:
        if e.get("ph") == "X" and "dur" in e and keep(e):
            acc = ops[e.get("name", "?")]
            acc[0] += float(e["dur"])
            acc[1] += 1
            n += 1
    return dict(ops), tracks, n


def main(argv=None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--" not in argv:
        raise SystemExit("usage: python -m bench.profile [--out DIR] [--top N] -- MODULE [ARGS...]")
    split = argv.index("--")
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=None, help="trace folder (default: a new temporary one)")
    ap.add_argument("--top", type=int, default=30, help="how many op lines to print")
    args = ap.parse_args(argv[:split])
    target = argv[split + 1:]
    if not target:
        raise SystemExit("bench.profile: name the module to run after --")
    out = Path(args.out or tempfile.mkdtemp(prefix="bench_profile_"))
    old_argv = sys.argv
    sys.argv = target[:]
    try:
        with jax.profiler.trace(str(out), create_perfetto_trace=True):
            try:
                runpy.run_module(target[0], run_name="__main__")
            except SystemExit as e:
                if e.code not in (None, 0):
                    raise
    finally:
        sys.argv = old_argv
    traces = sorted(out.rglob("perfetto_trace.json.gz"))
    if not traces:
        raise SystemExit(f"bench.profile: no perfetto_trace.json.gz under {out}")
    ops, tracks, n = summarize(traces[-1])
    busy = sum(v[0] for v in ops.values())
    emit(bench="profile_total", module=target[0], trace=str(traces[-1]), tracks=tracks,
         busy_s=busy / 1e6, n_events=n, backend=jax.default_backend())
    for name, (us, count) in sorted(ops.items(), key=lambda kv: -kv[1][0])[:args.top]:
        emit(bench="profile_op", name=name[:200], total_ms=us / 1e3, count=count,
             mean_us=us / count, share=us / busy if busy else 0.0, op_class=op_class(name))
    by_class: dict[str, float] = collections.defaultdict(float)
    for name, (us, _) in ops.items():
        by_class[op_class(name)] += us
    for cls, us in sorted(by_class.items(), key=lambda kv: -kv[1]):
        emit(bench="profile_class", op_class=cls, total_ms=us / 1e3,
             share=us / busy if busy else 0.0)


if __name__ == "__main__":
    sys.exit(main())
