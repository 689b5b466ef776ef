"""Run-health guards of the training loop: non-finite values, stalled training, preemption.

* ``check_finite`` raises ``NonFiniteLossError`` for a NaN/Inf scalar (a loss, a gradient norm);
* ``StallDetector`` raises ``TrainingStalledError`` when the loss stops moving and the gradient
  norm is exactly zero for a number of consecutive steps (a diverged run whose parameters
  saturated: every later step is wasted compute that ends with exit status 0);
* ``PreemptionGuard`` turns SIGTERM into a flag that the loop polls after each step.

``rlhf_jax.train.loop.run_loop`` uses all three; ``rlhf_jax.train.loop.exit_code`` maps the
errors to process exit statuses.
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """A loss (or other watched value: a gradient norm, a leaf of the state) became NaN or
    infinite.

    Attributes:
      step: the training step whose value was non-finite.
      name: the name of the value (``"loss"``, ``"ppo/loss/total"``, ``"train/grad_norm"``,
        ``"state/params/w"`` ...).
      value: the offending value.
    """

    def __init__(self, step: int, name: str = "loss", value: float = float("nan")):
        self.step, self.name, self.value = int(step), name, value
        super().__init__(f"non-finite {name} ({value}) at step {self.step}; stop and resume from "
                         f"the last good checkpoint (it was not overwritten)")


def check_finite(loss_value: Any, step: int, name: str = "loss") -> float:
    """Raise ``NonFiniteLossError`` if ``loss_value`` is NaN or infinite.

    Pass a *host* value where possible (e.g. step ``n-1``'s loss from ``DeferredMetrics``):
    a device array forces a synchronisation with the step that produced it.

    Args:
      loss_value: a scalar (Python/NumPy float or a 0-d/size-1 array).
      step: the step that produced it (goes into the error message).
      name: what the value is, for the message.

    Returns:
      The value as a Python float.

    Raises:
      NonFiniteLossError: the value is NaN or +-inf.
      ValueError: the value is not a scalar.
    """
    arr = np.asarray(jax.device_get(loss_value))
    if arr.size != 1:
        raise ValueError(f"check_finite({name!r}) expects a scalar, got shape {arr.shape}")
    value = float(arr.reshape(()))
    if not np.isfinite(value):
        raise NonFiniteLossError(step, name, value)
    return value


class TrainingStalledError(RuntimeError):
    """The loss did not change and the gradient norm was 0 for many consecutive steps.

    ``StallDetector`` raises it with a message naming the stage, the steps, the loss and what
    to change; the keyword attributes are ``None`` when another caller raises it with only a
    message.

    Attributes:
      stage: the stage name (``"sft"`` ...).
      step: the step at which the run was stopped.
      steps: the number of consecutive stalled steps.
      loss: the loss value the run is stuck at.
    """

    def __init__(self, message: str, *, stage: str | None = None, step: int | None = None,
                 steps: int | None = None, loss: float | None = None):
        super().__init__(message)
        self.stage, self.step, self.steps, self.loss = stage, step, steps, loss


class StallDetector:
    """Count consecutive steps whose loss is unchanged and whose gradient norm is 0.

    A step is *stalled* when every watched loss equals the previous step's, exactly or within
    float32 resolution (``|change| <= max(abs_tol, rel_tol * |previous|)``: a loss stuck at
    ``ln V`` still moves by ~1e-8 between batches through the ``(sum, count)`` reduction), and
    every gradient norm is exactly ``0``. Steps without any gradient-norm metric never count
    as stalled (there is no evidence the gradient vanished).

    Args:
      stage: stage name, for the error.
      steps: raise after this many consecutive stalled steps; ``0`` disables the detector.
      rel_tol: relative tolerance on loss changes.
      abs_tol: absolute tolerance on loss changes.
    """

    def __init__(self, stage: str, steps: int, *, rel_tol: float = 1e-6, abs_tol: float = 1e-12):
        if steps < 0:
            raise ValueError(f"StallDetector steps must be >= 0, got {steps}")
        self.stage, self.steps, self.rel_tol, self.abs_tol = stage, steps, rel_tol, abs_tol
        self._prev: dict[str, float] | None = None
        self.count = 0

    def _same(self, new: float, old: float) -> bool:
        return new == old or abs(new - old) <= max(self.abs_tol, self.rel_tol * abs(old))

    def update(self, step: int, losses: Mapping[str, float],
               grad_norms: Mapping[str, float]) -> None:
        """Feed one step's host metrics.

        Args:
          step: the step that produced them.
          losses: ``{name: value}`` of the watched losses.
          grad_norms: ``{name: value}`` of the gradient norms.

        Raises:
          TrainingStalledError: ``steps`` consecutive stalled steps ending at ``step``.
        """
        if not self.steps:
            return
        losses = {k: float(v) for k, v in losses.items()}
        unchanged = (self._prev is not None and bool(losses) and losses.keys() == self._prev.keys()
                     and all(self._same(v, self._prev[k]) for k, v in losses.items()))
        zero_grad = bool(grad_norms) and all(float(v) == 0.0 for v in grad_norms.values())
        self.count = self.count + 1 if unchanged and zero_grad else 0
        self._prev = losses
        if self.count >= self.steps:
            loss = losses[sorted(losses)[0]]
            first = int(step) - self.count + 1
            raise TrainingStalledError(
                f"{self.stage}: training stalled: the loss stayed at {loss!r} and the gradient "
                f"norm was 0 for {self.count} consecutive steps ({first}..{step}); the "
                f"parameters have probably saturated (learning rate too large?). Lower the "
                f"learning rate and start again from a checkpoint before step {first}",
                stage=self.stage, step=int(step), steps=self.count, loss=loss)


class PreemptionGuard:
    """Turn SIGTERM (and optionally SIGINT) into a flag the training loop polls.

    Cloud schedulers (TPU/GPU preemption, SLURM, Kubernetes) send SIGTERM some seconds before
    killing a job. Inside the guard the signal only sets ``requested``; the loop checks
    ``should_stop(step)`` after each step, saves a checkpoint (``force=True``) and exits
    cleanly. The previous handlers are restored on exit. A second SIGINT while a stop is
    already requested raises ``KeyboardInterrupt`` (an impatient Ctrl-C still works).

    Args:
      sigint: also catch SIGINT (Ctrl-C).
      multihost: additionally use ``jax.experimental.multihost_utils
        .reached_preemption_sync_point(step)`` in ``should_stop`` so every process of a pod
        stops at the same step (needs ``jax.distributed.initialize``; on a single process
        it is skipped). A local signal alone would let processes disagree and deadlock in
        the next collective.

    Raises:
      RuntimeError: entered outside the main thread (Python only installs signal handlers
        there).
    """

    def __init__(self, *, sigint: bool = False, multihost: bool = False):
        self.signals = (signal.SIGTERM,) + ((signal.SIGINT,) if sigint else ())
        self.multihost = multihost
        self._requested = threading.Event()
        self._previous: dict[int, Any] = {}
        self.received: int | None = None

    @property
    def requested(self) -> bool:
        """True once a watched signal arrived (or ``request()`` was called)."""
        return self._requested.is_set()

    def request(self) -> None:
        """Ask for a stop programmatically (tests, a wall-clock budget)."""
        self._requested.set()

    def _handler(self, signum, frame):
        del frame
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt
        self.received = signum
        self._requested.set()
        logger.warning("received %s: will checkpoint and stop after the current step",
                       signal.Signals(signum).name)

    def should_stop(self, step: int) -> bool:
        """Whether the loop should save and exit after ``step``.

        With ``multihost=True`` and several processes this is a collective: every process
        must call it at every step.
        """
        if self.multihost and jax.process_count() > 1:
            from jax.experimental import multihost_utils
            if multihost_utils.reached_preemption_sync_point(int(step)):
                self._requested.set()
        return self.requested

    def __enter__(self) -> "PreemptionGuard":
        if threading.current_thread() is not threading.main_thread():
            raise RuntimeError("PreemptionGuard must be entered in the main thread (Python "
                               "installs signal handlers only there)")
        for s in self.signals:
            self._previous[s] = signal.signal(s, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for s, h in self._previous.items():
            signal.signal(s, h if h is not None else signal.SIG_DFL)
        self._previous.clear()


__all__ = ["NonFiniteLossError", "check_finite", "TrainingStalledError", "StallDetector",
           "PreemptionGuard"]
