"""An exclusive lock on a run directory, so two runs never write the same checkpoints.

``RunLock(out_dir)`` holds ``fcntl.flock(LOCK_EX)`` on ``<out_dir>/.lock`` for as long as the
``with`` block lasts. The kernel releases the lock when its holder dies (even by SIGKILL), so a
crashed run never blocks the next one; the file itself stays, holding the last holder's host,
pid and start time as JSON. A second run on the same directory fails at once with
``RunLockedError`` naming the holder. Finding the file left by a dead holder (the lock is free
but the file names a holder) is logged as a takeover.

In a multi-process (multi-host) run only process 0 takes the lock; the others share the
directory with it.

``RunLock(dir, timeout=T)`` waits up to ``T`` seconds (``None``: as long as it takes) for a
live holder to let go instead of failing at once: the pipeline holds such a lock on a stage
directory shared by several runs (content-addressed sweep stages) while the stage trains, so a
second run waits and then finds the stage finished.

Limits: ``flock`` is enforced on local file systems and on NFS (Linux maps it to NFS byte-range
locks). Cloud Storage FUSE mounts (gcsfuse) do not support it; there the lock is skipped
with a warning and only the holder file is written.
"""

from __future__ import annotations

import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

log = logging.getLogger(__name__)

LOCK_NAME = ".lock"


class RunLockedError(RuntimeError):
    """Another live process holds the run directory's lock.

    Attributes:
      path: the lock file.
      holder: what the holder wrote (``{"host", "pid", "started"}``; empty if unreadable).
    """

    def __init__(self, path: Path, holder: dict):
        self.path, self.holder = Path(path), dict(holder)
        who = (f"host {holder.get('host', '?')}, pid {holder.get('pid', '?')}, started "
               f"{holder.get('started', '?')}") if holder else "a process that left no details"
        super().__init__(f"{self.path.parent} is in use by another run ({who}); stop it first "
                         f"or choose another output directory")


def _read_holder(fd: int) -> dict:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        text = os.read(fd, 1 << 16).decode("utf-8", "replace").strip()
        holder = json.loads(text) if text else {}
        return holder if isinstance(holder, dict) else {}
    except (OSError, ValueError):
        return {}


class RunLock:
    """Context manager holding an exclusive lock on ``<out_dir>/.lock``.

    Args:
      out_dir: the run directory (created if missing).
      process_index: this process's index; only index 0 locks. ``None``: ask
        ``jax.process_index()`` when entering (after ``jax.distributed.initialize``).
      timeout: seconds to wait for a live holder to release the lock (polled every ``poll``
        seconds; the wait is logged once, naming the holder); ``0`` fails at once (the
        default), ``None`` waits as long as it takes.
      poll: seconds between attempts while waiting.

    Raises:
      RunLockedError: on entering, another live process holds the lock (names its host and
        pid) and still held it after ``timeout`` seconds.
    """

    def __init__(self, out_dir, *, process_index: int | None = None,
                 timeout: float | None = 0.0, poll: float = 1.0):
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / LOCK_NAME
        self.process_index = process_index
        self.timeout = timeout
        self.poll = poll
        self._fd: int | None = None
        self.locked = False

    def acquire(self) -> "RunLock":
        """Take the lock (what entering the ``with`` block does)."""
        if self._fd is not None:
            raise RuntimeError(f"RunLock({self.out_dir}) is already held by this object")
        index = self.process_index
        if index is None:
            import jax
            index = jax.process_index()
        if index != 0:
            return self
        self.out_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        start, waiting = time.monotonic(), False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError as e:
                if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    holder = _read_holder(fd)
                    if self.timeout is not None and time.monotonic() - start >= self.timeout:
                        os.close(fd)
                        raise RunLockedError(self.path, holder) from None
                    if not waiting:
                        waiting = True
                        log.info("%s is in use by host %s, pid %s; waiting for it to finish",
                                 self.out_dir, holder.get("host", "?"), holder.get("pid", "?"))
                    time.sleep(self.poll if self.timeout is None else max(0.0, min(
                        self.poll, self.timeout - (time.monotonic() - start))))
                    continue
                log.warning("cannot lock %s (%s: the file system does not support flock); "
                            "continuing without a lock: make sure no other run uses %s",
                            self.path, e.strerror, self.out_dir)
            else:
                self.locked = True
            break
        previous = _read_holder(fd)
        if previous:
            log.warning("taking over the stale lock %s of host %s, pid %s (started %s), "
                        "which is no longer running", self.path, previous.get("host", "?"),
                        previous.get("pid", "?"), previous.get("started", "?"))
        holder = {"host": socket.gethostname(), "pid": os.getpid(),
                  "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
                      timespec="seconds")}
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        os.write(fd, (json.dumps(holder) + "\n").encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        """Empty the holder file and release the lock (the file stays; removing it would let
        a process that opened it just before take a lock on a deleted file)."""
        if self._fd is None:
            return
        fd, self._fd = self._fd, None
        try:
            os.ftruncate(fd, 0)
        finally:
            self.locked = False
            os.close(fd)  # closing the descriptor releases the flock

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()

    def __repr__(self) -> str:
        return f"RunLock({str(self.out_dir)!r}, locked={self.locked})"


__all__ = ["RunLock", "RunLockedError", "LOCK_NAME"]
