"""Accelerator peaks: the data-sheet dense bfloat16 matmul rate and HBM bandwidth of the chips
users have, and the rates this process measures on the chip it runs on.

The table (``PEAKS``) holds one entry per chip, matched against ``jax.devices()[0].device_kind``
(case-insensitive regular expressions, first match wins). Each number is the vendor's
data-sheet figure for **one chip**, **dense** (NVIDIA lists its Tensor Core rates "with
sparsity"; the dense rate is half of that) bfloat16 matrix math with float32 accumulation,
and the peak bandwidth of the chip's own memory (HBM; GDDR6 on the L4):

| chip (``device_kind``) | dense bf16 TFLOP/s | memory GB/s | source |
|---|---|---|---|
| H100 SXM5 80 GB (``NVIDIA H100 80GB HBM3``) | 989.4 | 3350 | NVIDIA H100 Tensor Core GPU data sheet (1979 with sparsity) |
| H100 PCIe 80 GB (``NVIDIA H100 PCIe``) | 756 | 2000 | same data sheet (1513 with sparsity), HBM2e |
| H100 NVL 94 GB (``NVIDIA H100 NVL``) | 835 | 3900 | same data sheet (1671 with sparsity) |
| H200 SXM 141 GB (``NVIDIA H200``) | 989.4 | 4800 | NVIDIA H200 Tensor Core GPU data sheet (1979 with sparsity), HBM3e |
| H200 NVL 141 GB (``NVIDIA H200 NVL``) | 835 | 4800 | same data sheet (1671 with sparsity) |
| A100 SXM4 / PCIe 40 GB | 312 | 1555 | NVIDIA A100 Tensor Core GPU data sheet (624 with sparsity) |
| A100 SXM4 80 GB | 312 | 2039 | same data sheet, HBM2e |
| A100 PCIe 80 GB | 312 | 1935 | same data sheet, HBM2e |
| L4 (``NVIDIA L4``) | 121 | 300 | NVIDIA L4 Tensor Core GPU data sheet (242 with sparsity), GDDR6 |
| TPU v4 (``TPU v4``) | 275 | 1200 | Google Cloud TPU docs, "TPU v4" (per chip, bf16; HBM2 32 GiB) |
| TPU v5e (``TPU v5 lite``) | 197 | 819 | Google Cloud TPU docs, "TPU v5e" (per chip, bf16; HBM2 16 GB) |
| TPU v5p (``TPU v5``, ``TPU v5p``) | 459 | 2765 | Google Cloud TPU docs, "TPU v5p" (per chip, bf16; HBM2e 95 GB) |
| TPU v6e (``TPU v6 lite``, ``TPU v6e``) | 918 | 1640 | Google Cloud TPU docs, "TPU v6e" (per chip, bf16; HBM 32 GB) |

These are leads, not ceilings you will reach: the measured rates below are the achievable
ones (a bf16 matmul on an H100/H200 reaches roughly 75-80 % of 989 TFLOP/s, a large copy
roughly 85-90 % of the memory bandwidth). MFU (``bench.train_steps``) is defined against the
data-sheet figure, as is usual (Chowdhery et al. 2022, PaLM, App. B).

``device_peak()`` returns ``(device_kind, peak FLOP/s, memory bytes/s)`` for the chip this
process runs on, or ``None`` for unknown kinds (CPU); the benchmarks' ``--peak-tflops`` and
``--hbm-gbs`` replace the table's numbers (and make an unknown kind known).

``python -m bench.devices`` prints three JSON lines (``bench.common.emit``):

* ``bench: "device_peak"``: the matched table entry (``peak_name``, ``peak_bf16_tflops``,
  ``peak_hbm_gb_s``, ``peak_source``; ``peak_overridden``), or ``peak_name: null``;
* ``bench: "device_matmul"``: a jitted ``n x n`` by ``n x n`` ``jnp.dot`` in ``--dtype``
  (bfloat16 by default; ``n = 8192`` on an accelerator, 1024 on CPU; default precision, fp32
  accumulation inside the MXU / Tensor Cores), ``2 n^3`` FLOPs: ``matmul_s`` (median of
  single calls, each waited for), ``matmul_tflops``, ``matmul_tflops_best`` (fastest call),
  ``matmul_tflops_pipelined`` (``iters`` calls dispatched back to back, one wait: no host gap
  between calls) and ``frac_of_peak`` (pipelined rate / data-sheet peak);
* ``bench: "device_copy"``: a jitted ``x + 1`` over a float32 buffer of ``--copy-mib`` MiB
  (2048 on an accelerator, 64 on CPU): every byte read once and written once, as a
  device-to-device copy does, counted as ``2 x nbytes`` (the STREAM convention):
  ``copy_s``, ``copy_gb_s``, ``copy_gb_s_best``, ``copy_gb_s_pipelined``, ``frac_of_peak``.

Run: ``.venv/bin/python -m bench.devices`` (see ``bench/README.md``, "On an accelerator").
"""

from __future__ import annotations

import argparse
import dataclasses
import re
import statistics
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp

from bench.common import emit, timeit_all


@dataclasses.dataclass(frozen=True)
class Peak:
    """One chip of the table: ``pattern`` (a regular expression, case-insensitive, searched
    in ``device_kind``), dense bf16 TFLOP/s, memory GB/s (1e9 bytes/s), and the source."""

    name: str
    pattern: str
    bf16_tflops: float
    hbm_gb_s: float
    source: str


_H100_DS = "NVIDIA H100 Tensor Core GPU data sheet"
_H200_DS = "NVIDIA H200 Tensor Core GPU data sheet"
_A100_DS = "NVIDIA A100 Tensor Core GPU data sheet"
_TPU_DOC = "Google Cloud TPU documentation, system architecture page"

#: The table; order matters (the first match wins: "H200 NVL" before "H200").
PEAKS: tuple[Peak, ...] = (
    Peak("H100 NVL", r"h100.*nvl", 835.0, 3900.0, f"{_H100_DS} (NVL: 1671 with sparsity)"),
    Peak("H100 PCIe", r"h100.*pcie", 756.0, 2000.0, f"{_H100_DS} (PCIe: 1513 with sparsity)"),
    Peak("H100 SXM", r"(?<!g)h100", 989.4, 3350.0, f"{_H100_DS} (SXM: 1979 with sparsity)"),
    Peak("H200 NVL", r"(?<!g)h200.*nvl", 835.0, 4800.0, f"{_H200_DS} (NVL: 1671 with sparsity)"),
    Peak("H200 SXM", r"(?<!g)h200", 989.4, 4800.0, f"{_H200_DS} (SXM: 1979 with sparsity)"),
    Peak("A100 80GB PCIe", r"a100.*80.*pcie|a100.*pcie.*80", 312.0, 1935.0,
         f"{_A100_DS} (624 with sparsity)"),
    Peak("A100 80GB SXM", r"a100.*80", 312.0, 2039.0, f"{_A100_DS} (624 with sparsity)"),
    Peak("A100 40GB", r"a100", 312.0, 1555.0, f"{_A100_DS} (624 with sparsity)"),
    Peak("L4", r"\bl4\b", 121.0, 300.0, "NVIDIA L4 Tensor Core GPU data sheet (242 with sparsity)"),
    Peak("TPU v4", r"tpu v4", 275.0, 1200.0, f"{_TPU_DOC} 'TPU v4'"),
    Peak("TPU v5e", r"tpu v5 ?(lite|e)", 197.0, 819.0, f"{_TPU_DOC} 'TPU v5e'"),
    Peak("TPU v5p", r"tpu v5 ?p?$", 459.0, 2765.0, f"{_TPU_DOC} 'TPU v5p'"),
    Peak("TPU v6e", r"tpu v6 ?(lite|e)", 918.0, 1640.0, f"{_TPU_DOC} 'TPU v6e'"),
)


def match_peak(device_kind: str) -> Peak | None:
    """The first ``PEAKS`` entry whose pattern occurs in ``device_kind``, else ``None``."""
    kind = device_kind.strip().lower()
    for p in PEAKS:
        if re.search(p.pattern, kind):
            return p
    return None


def device_peak(peak_tflops: float | None = None, hbm_gbs: float | None = None,
                device: Any = None) -> tuple[str, float | None, float | None] | None:
    """``(device_kind, peak FLOP/s, memory bytes/s)`` of ``device`` (default: the first
    device), from ``PEAKS`` or the overrides; ``None`` when the kind is unknown (CPU) and no
    override is given. With one override on an unknown kind the other number is ``None``.

    Args:
      peak_tflops: replaces the table's dense bf16 TFLOP/s.
      hbm_gbs: replaces the table's memory bandwidth, GB/s (1e9 bytes/s).
    """
    dev = device if device is not None else jax.devices()[0]
    kind = dev.device_kind
    p = match_peak(kind) if dev.platform != "cpu" else None
    flops = peak_tflops if peak_tflops is not None else (p.bf16_tflops if p else None)
    hbm = hbm_gbs if hbm_gbs is not None else (p.hbm_gb_s if p else None)
    if flops is None and hbm is None:
        return None
    return kind, (None if flops is None else flops * 1e12), (None if hbm is None else hbm * 1e9)


def peak_fields(peak_tflops: float | None = None, hbm_gbs: float | None = None) -> dict[str, Any]:
    """The fields describing the peak in use (``{}`` when none is known): ``peak_name`` (the
    table entry, or ``"override"``), ``peak_bf16_tflops``, ``peak_hbm_gb_s``, ``peak_source``."""
    got = device_peak(peak_tflops, hbm_gbs)
    if got is None:
        return {}
    kind, flops, hbm = got
    dev = jax.devices()[0]
    p = match_peak(kind) if dev.platform != "cpu" else None
    overridden = peak_tflops is not None or hbm_gbs is not None
    return {"peak_name": p.name if p else "override",
            "peak_bf16_tflops": None if flops is None else flops / 1e12,
            "peak_hbm_gb_s": None if hbm is None else hbm / 1e9,
            "peak_source": (p.source if p else "command line")
            + (" (overridden on the command line)" if overridden and p else ""),
            "peak_overridden": overridden}


def describe_peak(fields: dict) -> str:
    """One human-readable line: the ``device_kind``, the table entry matched and its numbers
    (``fields``: ``peak_fields()``), or that none is known."""
    kind = jax.devices()[0].device_kind
    if not fields:
        return (f"device_kind {kind!r}: no data-sheet peak known (CPU or an unlisted chip; "
                "--peak-tflops / --hbm-gbs give one)")
    return (f"device_kind {kind!r} -> {fields['peak_name']}: {fields['peak_bf16_tflops']} "
            f"TFLOP/s dense bf16, {fields['peak_hbm_gb_s']} GB/s memory ({fields['peak_source']})")


def add_peak_args(ap: argparse.ArgumentParser) -> None:
    """``--peak-tflops`` and ``--hbm-gbs``: replace the data-sheet numbers of ``PEAKS``."""
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak dense bf16 TFLOP/s per chip (default: bench.devices.PEAKS by "
                         "device_kind; none on CPU, so no mfu field)")
    ap.add_argument("--hbm-gbs", type=float, default=None,
                    help="memory bandwidth GB/s per chip (default: bench.devices.PEAKS)")


def on_accelerator() -> bool:
    """Whether the default backend is not the CPU."""
    return jax.devices()[0].platform != "cpu"


def memory_peak_gb() -> float | None:
    """This process's peak accelerator memory in use so far, GB (``memory_stats()``'s
    ``peak_bytes_in_use``), or ``None`` on CPU or where the backend reports none."""
    if not on_accelerator():
        return None
    try:
        stats = jax.devices()[0].memory_stats()
    except Exception:  # noqa: BLE001 - not every backend implements it
        return None
    if not stats or "peak_bytes_in_use" not in stats:
        return None
    return stats["peak_bytes_in_use"] / 1e9


def make_device_copy(nbytes: int):
    """``(fn, bytes moved per call)``: a jitted ``x + 1`` over a float32 device buffer of
    ``nbytes`` (read + write, ``2 x nbytes``); the result is a fresh buffer each call."""
    x = jnp.zeros((nbytes // 4,), jnp.float32) + jax.random.normal(jax.random.key(1), (1,))
    f = jax.jit(lambda a: a + 1.0)
    return (lambda: f(x)), 2 * (nbytes // 4) * 4


def _pipelined(fn, iters: int) -> float:
    """Mean seconds per call of ``iters`` calls dispatched back to back, one wait at the end."""
    jax.block_until_ready(fn())
    t0 = time.perf_counter()
    outs = [fn() for _ in range(iters)]
    jax.block_until_ready(outs)
    return (time.perf_counter() - t0) / iters


def measure_matmul(n: int, dtype: str = "bfloat16", warmup: int = 3, iters: int = 20
                   ) -> dict[str, Any]:
    """The achieved matmul rate: ``n x n`` by ``n x n`` in ``dtype``, ``2 n^3`` FLOPs (see the
    module docstring)."""
    k1, k2 = jax.random.split(jax.random.key(0))
    a = jax.random.normal(k1, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(k2, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(_dot)
    fn = lambda: f(a, b)  # noqa: E731
    flops = 2 * n ** 3
    times = timeit_all(fn, warmup, iters)
    sec = statistics.median(times)
    pipe = _pipelined(fn, iters)
    return {"matmul_n": n, "matmul_dtype": dtype, "matmul_s": sec,
            "matmul_tflops": flops / sec / 1e12, "matmul_tflops_best": flops / min(times) / 1e12,
            "matmul_tflops_pipelined": flops / pipe / 1e12, "iters": iters}


def _dot(a, b):
    """``jnp.dot`` at default precision (bf16 inputs: one pass, fp32 accumulation)."""
    return jnp.dot(a, b, precision=jax.lax.Precision.DEFAULT)


def measure_copy(nbytes: int, warmup: int = 3, iters: int = 20) -> dict[str, Any]:
    """The achieved memory bandwidth of a streaming read + write (``make_device_copy``)."""
    fn, moved = make_device_copy(nbytes)
    times = timeit_all(fn, warmup, iters)
    sec = statistics.median(times)
    pipe = _pipelined(fn, iters)
    return {"copy_mib": nbytes / 2**20, "copy_bytes_moved": moved, "copy_s": sec,
            "copy_gb_s": moved / sec / 1e9, "copy_gb_s_best": moved / min(times) / 1e9,
            "copy_gb_s_pipelined": moved / pipe / 1e9, "iters": iters}


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_peak_args(ap)
    ap.add_argument("--matmul-n", type=int, default=None,
                    help="matmul size (default 8192 on an accelerator, 1024 on CPU)")
    ap.add_argument("--dtype", default="bfloat16", help="matmul dtype (default bfloat16)")
    ap.add_argument("--copy-mib", type=int, default=None,
                    help="copy buffer MiB (default 2048 on an accelerator, 64 on CPU)")
    ap.add_argument("--iters", type=int, default=20)
    ap.add_argument("--no-measure", action="store_true", help="print the peak line only")
    args = ap.parse_args(argv)

    accel = on_accelerator()
    fields = peak_fields(args.peak_tflops, args.hbm_gbs)
    print(f"bench.devices: {describe_peak(fields)}", file=sys.stderr, flush=True)
    emit(bench="device_peak", **(fields or {"peak_name": None}))
    if args.no_measure:
        return
    n = args.matmul_n or (8192 if accel else 1024)
    mm = measure_matmul(n, args.dtype, iters=args.iters)
    peak = fields.get("peak_bf16_tflops")
    emit(bench="device_matmul", **mm,
         **({"frac_of_peak": mm["matmul_tflops_pipelined"] / peak} if peak else {}))
    mib = args.copy_mib or (2048 if accel else 64)
    cp = measure_copy(mib * 2**20, iters=args.iters)
    hbm = fields.get("peak_hbm_gb_s")
    emit(bench="device_copy", **cp,
         **({"frac_of_peak": cp["copy_gb_s_pipelined"] / hbm} if hbm else {}))


if __name__ == "__main__":
    sys.exit(main())
