"""Run-directory lock (``rlhf_jax.pipeline.lock.RunLock``) against a real second process: a
live holder is named in the error at once, a SIGKILLed holder's lock is free and taken over."""

from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import pytest

from rlhf_jax.pipeline.lock import LOCK_NAME, RunLock, RunLockedError

_HOLDER = textwrap.dedent("""
    import sys, time
    from rlhf_jax.pipeline.lock import RunLock
    with RunLock(sys.argv[1], process_index=0):
        print("LOCKED", flush=True)
        time.sleep(120)
""")


@pytest.fixture
def holder(tmp_path):
    """A subprocess that holds the lock of ``tmp_path / 'run'``; killed at the end."""
    out = tmp_path / "run"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(out)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stdout.readline()
        assert line.strip() == "LOCKED", proc.stderr.read() if proc.poll() is not None else line
        yield out, proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_second_run_fails_at_once_naming_the_holder(holder):
    out, proc = holder
    t0 = time.perf_counter()
    with pytest.raises(RunLockedError) as info:
        with RunLock(out, process_index=0):
            pytest.fail("the lock is held by another process")
    assert time.perf_counter() - t0 < 2.0  # no waiting
    msg = str(info.value)
    assert str(out) in msg and f"pid {proc.pid}" in msg and f"host {socket.gethostname()}" in msg
    assert info.value.holder["pid"] == proc.pid
    assert info.value.path == out / LOCK_NAME
    # the holder's record is untouched by the failed attempt
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid


def test_lock_of_a_killed_holder_is_taken_over(holder, caplog):
    out, proc = holder
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid  # the file stays
    with caplog.at_level(logging.WARNING, logger="rlhf_jax.pipeline.lock"):
        with RunLock(out, process_index=0) as lock:
            assert lock.locked
            record = json.loads((out / LOCK_NAME).read_text())
            assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
            assert "started" in record
    stale = [r.getMessage() for r in caplog.records if "stale" in r.getMessage()]
    assert len(stale) == 1 and f"pid {proc.pid}" in stale[0]
    assert (out / LOCK_NAME).read_text() == ""  # released cleanly: no holder recorded


def test_clean_release_then_relock_in_another_process(tmp_path, caplog):
    out = tmp_path / "run"
    with RunLock(out, process_index=0):
        # a second lock in the same process is refused too (flock is per open file)
        with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
            RunLock(out, process_index=0).acquire()
    code = ("import sys; from rlhf_jax.pipeline.lock import RunLock\n"
            "with RunLock(sys.argv[1], process_index=0) as l: print(l.locked)")
    res = subprocess.run([sys.executable, "-c", code, str(out)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "True" and "stale" not in res.stderr


def test_only_process_zero_locks(holder):
    out, _ = holder
    with RunLock(out, process_index=1) as lock:  # shares the directory with process 0
        assert not lock.locked
    other = out.parent / "other"
    with RunLock(other, process_index=3):
        pass
    assert not other.exists()
