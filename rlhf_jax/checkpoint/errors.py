"""Errors of ``rlhf_jax.checkpoint``, and how library failures become one-line reasons.

``CheckpointError`` (no usable step) and ``NonFiniteStateError`` (a save refused) are public;
``_Unusable`` marks one unusable step inside ``Checkpointer.restore``, ``_reason`` cuts a
(chained, TensorStore-sized) library exception down to one line, and
``_library_noise_to_debug`` routes exceptions that asyncio/TensorStore report as "ignored" to
``logging.debug``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import sys
from collections.abc import Mapping

# One logger for the whole package, named after it, so callers filter on "rlhf_jax.checkpoint".
logger = logging.getLogger("rlhf_jax.checkpoint")


class CheckpointError(ValueError):
    """No usable checkpoint: files missing, truncated or corrupt, ``meta``/``layout`` JSON
    empty or invalid, a checksum mismatch, or non-finite values.

    Attributes:
      directory: the checkpoint directory.
      problems: ``{step: what is wrong}`` for every step that was tried.
    """

    def __init__(self, message: str, directory: str, problems: Mapping[int, str]):
        super().__init__(message)
        self.directory, self.problems = directory, dict(problems)


class NonFiniteStateError(FloatingPointError):
    """``Checkpointer.save`` refused a state holding NaN or Inf; nothing was written.

    Attributes:
      step: the step that was to be saved.
      path: the first non-finite leaf (``"params/trunk/embed"``).
      value: ``nan`` or ``inf``.
      directory: the checkpoint directory.
    """

    def __init__(self, step: int, path: str, value: float, directory: str):
        self.step, self.path, self.value, self.directory = int(step), path, value, directory
        super().__init__(f"refusing to checkpoint step {self.step} in {directory}: state leaf "
                         f"{path} holds {value} values")


class _Unusable(Exception):
    """One step of a checkpoint directory cannot be restored (internal; ``reason`` is one line)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


def _reason(exc: BaseException, limit: int = 240) -> str:
    """One line out of a (possibly huge, chained) library exception: the innermost message
    with a text, cut before TensorStore spec dumps."""
    chain, seen = [], set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        chain.append(e)
        e = e.__cause__ or e.__context__
    for e in reversed(chain):
        if isinstance(e, (StopIteration, StopAsyncIteration, GeneratorExit)):
            continue  # control flow inside a parser, not the error
        text = str(e).strip()
        if isinstance(e, KeyError) and len(e.args) == 1:
            text = str(e.args[0])
        if text:
            break
    else:
        e, text = exc, ""
    text = text.split("See full TensorStore details")[0].strip().splitlines()[0] if text else ""
    text = f"{type(e).__name__}: {text}" if text else type(e).__name__
    return text if len(text) <= limit else text[:limit - 3] + "..."


@contextlib.contextmanager
def _library_noise_to_debug():
    """Route exceptions that asyncio/TensorStore report as 'ignored' (failed reads cancelled
    after a first error) to ``logging.debug`` instead of stderr."""
    previous = sys.unraisablehook

    def hook(unraisable):
        logger.debug("ignored library exception in %r: %s", unraisable.object,
                     _reason(unraisable.exc_value) if unraisable.exc_value else "")

    sys.unraisablehook = hook
    try:
        yield
    finally:
        gc.collect()
        sys.unraisablehook = previous


__all__ = ["CheckpointError", "NonFiniteStateError"]
