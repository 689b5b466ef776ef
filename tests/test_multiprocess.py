"""Two processes on this machine (CPU collectives over loopback) give the 1-process logits.

Launches ``tests/_multiprocess_worker.py`` twice (2 CPU devices each, 4 global devices),
compares the gathered sharded logits of each mesh with a single-process forward of the same
model and batch. A hang fails the test after ``TIMEOUT_S`` instead of blocking the suite.
"""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import _multiprocess_worker as worker
from rlhf_jax.models.model import Model

NUM_PROCESSES = 2
#: About 17 s on an idle 2-core machine, ~70-95 s when other jobs load it 4-5x over; a hang
#: (e.g. a collective waiting for a peer) fails instead of blocking the suite.
TIMEOUT_S = 240
REPO_ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_workers(out_dir: Path) -> list[tuple[subprocess.Popen, Path]]:
    """Launch the workers (output to log files in ``out_dir``, read when they end)."""
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("JAX_", "XLA_"))}
    env["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(REPO_ROOT), env.get("PYTHONPATH")) if p)
    env["JAX_PLATFORMS"] = "cpu"
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={worker.NUM_LOCAL_DEVICES}"
    procs = []
    for i in range(NUM_PROCESSES):
        log = out_dir / f"worker{i}.log"
        with open(log, "w") as f:
            procs.append((subprocess.Popen(
                [sys.executable, str(Path(worker.__file__).resolve()), str(port), str(i),
                 str(NUM_PROCESSES), str(out_dir)],
                cwd=REPO_ROOT, env=env, stdout=f, stderr=subprocess.STDOUT), log))
    return procs


def _wait_workers(procs: list[tuple[subprocess.Popen, Path]], deadline: float) -> list[str]:
    """Outputs of all workers. Fails at once (killing the others) when one exits non-zero,
    since its peers would otherwise wait for it until the coordination timeout, and fails
    when ``deadline`` passes (a hang)."""
    def logs() -> str:
        return "\n".join(f"--- worker {i} ---\n{log.read_text()[-3000:]}"
                         for i, (_, log) in enumerate(procs))
    try:
        while True:
            codes = [p.poll() for p, _ in procs]
            failed = [i for i, c in enumerate(codes) if c not in (None, 0)]
            if failed:
                pytest.fail(f"worker {failed[0]} exited with {codes[failed[0]]}:\n{logs()}")
            if all(c == 0 for c in codes):
                return [log.read_text() for _, log in procs]
            if time.monotonic() > deadline:
                pytest.fail(f"workers did not finish within {TIMEOUT_S} s (hang?):\n{logs()}")
            time.sleep(0.2)
    finally:
        for p, _ in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def _single_process_logits() -> np.ndarray:
    model = Model(worker.model_config())
    params = jax.jit(model.init)(jax.random.key(0))
    batch = {k: jnp.asarray(v) for k, v in worker.global_batch().items()}
    fwd = jax.jit(lambda p, b: model.apply(p, b["tokens"], b["positions"], b["attn_mask"]).logits)
    return np.asarray(fwd(params, batch))


def test_two_processes_match_single_process(tmp_path):
    deadline = time.monotonic() + TIMEOUT_S
    procs = _start_workers(tmp_path)  # they write tmp_path/<mesh>.npy and worker<i>.log
    try:
        expected = _single_process_logits()  # overlaps with the workers' start-up
    except BaseException:
        for p, _ in procs:
            p.kill()
            p.wait()
        raise
    outputs = _wait_workers(procs, deadline)

    for name in worker.MESHES:
        path = tmp_path / f"{name}.npy"
        assert path.exists(), f"process 0 wrote no {path.name}:\n{outputs[0][-2000:]}"
        got = np.load(path)
        rows = worker.MESHES[name][1]
        assert got.shape == expected[:rows].shape
        np.testing.assert_allclose(got, expected[:rows], atol=1e-5, rtol=0, err_msg=name)
    # Each process fed only its own rows of the global batch: disjoint halves covering it.
    for name in worker.MESHES:
        rows = []
        for i, out in enumerate(outputs):
            m = re.search(rf"process {i}: {name} rows (\d+):(\d+) ok", out)
            assert m, out[-2000:]
            rows.append(range(int(m.group(1)), int(m.group(2))))
        assert sorted(r for rng in rows for r in rng) == list(range(worker.MESHES[name][1])), \
            (name, rows)
