"""The training loop: the only impure code between data, jitted steps, checkpoints and metrics.

``run_loop`` drives any step ``step_fn(state, batch, *frozen) -> (state, metrics)``:

* resume: with ``LoopConfig.resume`` the newest usable checkpoint in ``out_dir/checkpoints``
  is restored into the state's shardings (a checkpoint of another model fails with a message
  naming the leaf; a damaged newest step is skipped with a warning naming it and the step
  restored instead, and moved to ``checkpoints/unusable/``), and the data iterator continues
  from its saved position, so a resumed run produces the same metrics and parameters as an
  uninterrupted one. Rows of ``metrics.jsonl`` for this stage newer than the step the loop
  starts from (written by a killed run after its last checkpoint) are dropped first, so the
  file holds exactly one row per step and stage;
* metrics: the host reads step n-1's metrics after dispatching step n (``DeferredMetrics``),
  so there is no host sync in the hot loop;
* checkpoints every ``checkpoint_every`` steps and at the end; SIGTERM (preemption on TPU VMs)
  saves a checkpoint and returns ``LoopResult(preempted=True)``; the caller raises
  ``TrainingPreempted`` and the process exits with ``EXIT_PREEMPTED`` (see ``exit_code``);
* LoRA: a state whose ``TrainState`` s hold LoRA adapters (``rlhf_jax.models.lora``) is saved
  without its frozen base (``rlhf_jax.train.state.checkpoint_view``: the adapters, trained
  heads, optimizer state, step and key), with each base's ``frozen_digest`` and the
  caller's ``meta["lora_base"]`` (where the base came from) in ``meta``; on resume the base
  comes from the state the caller built, and a base whose digest differs from the saved one
  is refused (``ValueError`` naming both);
* health: a NaN/Inf loss or gradient norm stops the run with ``NonFiniteLossError`` naming
  the step and the metric. Before every save the metrics of the step that produced the state
  are read and checked, and ``Checkpointer.save`` checks every floating-point leaf of the state
  itself (one jitted reduction), so no checkpoint on disk ever holds NaN/Inf and the newest
  one is always a good one. With ``LoopConfig.stall_steps`` a run whose loss stops moving
  with a zero gradient norm stops with ``TrainingStalledError``.

Exit statuses for a command line that runs loops (``exit_code`` maps an exception to them):

==========================  ====  =========================================================
``EXIT_OK``                 0     finished.
``EXIT_FAILURE``            1     any other error (bad input, unusable checkpoint, bug).
``EXIT_PREEMPTED``          75    SIGTERM received, checkpoint saved: resubmit the same
                                  command (``EX_TEMPFAIL`` of ``sysexits.h``).
``EXIT_NON_FINITE``         76    a loss, gradient norm or the state became NaN/Inf; the
                                  newest checkpoint is finite. Resubmitting repeats it: change
                                  the configuration (learning rate, clipping) first.
``EXIT_STALLED``            77    the loss stopped moving with a zero gradient norm.
``EXIT_INTERRUPTED``        130   ``KeyboardInterrupt`` (128 + SIGINT).
==========================  ====  =========================================================
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax

from rlhf_jax.checkpoint import Checkpointer, NonFiniteStateError, abstract_like
from rlhf_jax.metrics import DeferredMetrics, MetricsLogger, progress
from rlhf_jax.train.guards import (NonFiniteLossError, PreemptionGuard, StallDetector,
                                   TrainingStalledError, check_finite)
from rlhf_jax.train.state import checkpoint_view, frozen_digests, restore_checkpoint_view

log = logging.getLogger(__name__)

#: The run finished.
EXIT_OK = 0
#: Any other error.
EXIT_FAILURE = 1
#: SIGTERM received and a checkpoint saved: resubmit the same command (EX_TEMPFAIL).
EXIT_PREEMPTED = 75
#: A loss, gradient norm or the state became NaN/Inf (``FloatingPointError``).
EXIT_NON_FINITE = 76
#: ``TrainingStalledError``: loss unchanged with a zero gradient norm.
EXIT_STALLED = 77
#: ``KeyboardInterrupt`` (128 + SIGINT).
EXIT_INTERRUPTED = 130


class TrainingPreempted(Exception):
    """A loop stopped on SIGTERM after saving its checkpoint; resubmitting the same command
    (with ``--resume``) continues it. ``run_loop`` itself returns ``preempted=True``; callers
    that stop the whole program (the pipeline) raise this, and ``exit_code`` maps it to
    ``EXIT_PREEMPTED``.

    Attributes:
      stage: the stage that was interrupted.
      step: the step saved.
    """

    def __init__(self, message: str, *, stage: str | None = None, step: int | None = None):
        super().__init__(message)
        self.stage, self.step = stage, step


def exit_code(exc: BaseException | None) -> int:
    """The process exit status for how a run ended.

    Args:
      exc: the exception that ended the run, or ``None`` for a normal end. Its explicit
        ``__cause__`` chain is searched too (a wrapper raised ``from`` one of the errors below
        keeps that error's status).

    Returns:
      ``EXIT_OK`` for ``None``; ``EXIT_PREEMPTED`` for ``TrainingPreempted``;
      ``EXIT_NON_FINITE`` for ``FloatingPointError`` (``NonFiniteLossError``,
      ``NonFiniteStateError``); ``EXIT_STALLED`` for ``TrainingStalledError``;
      ``EXIT_INTERRUPTED`` for ``KeyboardInterrupt``; a ``SystemExit``'s own code (``None``
      -> 0, a message -> 1); ``EXIT_FAILURE`` otherwise.
    """
    if exc is None:
        return EXIT_OK
    if isinstance(exc, SystemExit):
        code = exc.code
        return EXIT_OK if code is None else code if isinstance(code, int) else EXIT_FAILURE
    seen = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, TrainingPreempted):
            return EXIT_PREEMPTED
        if isinstance(e, FloatingPointError):
            return EXIT_NON_FINITE
        if isinstance(e, TrainingStalledError):
            return EXIT_STALLED
        if isinstance(e, KeyboardInterrupt):
            return EXIT_INTERRUPTED
        e = e.__cause__
    return EXIT_FAILURE


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Loop options.

    Attributes:
      total_steps: number of steps (optimizer updates, or PPO iterations) in the stage.
      checkpoint_every: save every this many steps (and always at the end); ``0`` = only at
        the end.
      max_to_keep: checkpoints kept on disk (>= 1).
      eval_every: call the evaluation hook every this many steps (``0`` = only at the end).
      resume: continue from the newest usable checkpoint in ``out_dir/checkpoints`` if there
        is one.
      stall_steps: stop with ``TrainingStalledError`` when the checked loss has not changed
        (up to float32 resolution: by at most 1e-6 relative or 1e-12 absolute) and every
        gradient norm (metrics ending in ``grad_norm``) was exactly 0 for this many
        consecutive steps; ``0`` disables the check. E.g. SFT with a learning rate of 1e6
        leaves the loss at ``ln V`` with a gradient norm of exactly 0 from its second step.
    """

    total_steps: int
    checkpoint_every: int = 0
    max_to_keep: int = 2
    eval_every: int = 0
    resume: bool = True
    stall_steps: int = 0

    def __post_init__(self):
        if self.total_steps < 0:
            raise ValueError(f"LoopConfig.total_steps must be >= 0, got {self.total_steps}")
        if self.max_to_keep < 1:
            raise ValueError(f"LoopConfig.max_to_keep must be >= 1, got {self.max_to_keep}")
        if self.stall_steps < 0:
            raise ValueError(f"LoopConfig.stall_steps must be >= 0, got {self.stall_steps}")


@dataclasses.dataclass
class LoopResult:
    """What ``run_loop`` returns.

    Attributes:
      state: the final state.
      step: steps completed.
      preempted: True if SIGTERM stopped the run early (a checkpoint was saved).
      records: the metric records logged in this call.
    """

    state: Any
    step: int
    preempted: bool
    records: list[dict]


def run_loop(*, stage: str, step_fn: Callable, state: Any, batches: Iterator,
             place: Callable[[Any], Any], out_dir: Path, cfg: LoopConfig, logger: MetricsLogger,
             frozen: tuple = (), loss_key: str | None = None,
             meta: Mapping[str, Any] | None = None, fingerprint: Mapping | None = None,
             eval_fn: Callable[[Any, int], Mapping[str, float]] | None = None) -> LoopResult:
    """Run ``cfg.total_steps`` steps of ``step_fn`` with resume, checkpoints and metrics.

    Args:
      stage: name used in metric records and progress bars (``"sft"``, ``"rm"`` ...).
      step_fn: jitted ``(state, batch, *frozen) -> (state, metrics)``; metrics are
        ``(sum, count)`` pairs.
      state: the initial state (its shardings are the restore target).
      batches: iterator of host batches; if it has ``state_dict`` / ``load_state_dict`` its
        position is saved in and restored from checkpoints.
      place: host batch -> device batch (e.g. ``rlhf_jax.sharding.shard_batch``).
      out_dir: stage directory; checkpoints go to ``out_dir/checkpoints``.
      cfg: ``LoopConfig``.
      logger: ``MetricsLogger``. Its rows of ``stage`` (and ``f"{stage}_eval"``) after the
        step the loop starts from are dropped before the first step (``drop_after``).
      frozen: frozen parameter pytrees passed to every step (reference, reward).
      loss_key: metric checked for NaN/Inf and watched for stalls (``None``: every metric
        whose name ends in "loss"). Metrics ending in "grad_norm" are always checked.
      meta: extra JSON saved in every checkpoint (config, ...).
      fingerprint: model fingerprint checked on restore.
      eval_fn: ``(state, step) -> metrics`` on the host, every ``cfg.eval_every`` steps and at
        the end.

    Returns:
      ``LoopResult``; ``preempted=True`` after a SIGTERM (the caller should stop and exit with
      ``EXIT_PREEMPTED``).

    Raises:
      NonFiniteLossError: a checked metric is NaN/Inf, or the state to be saved is (its
        ``name`` is then ``"state/<leaf path>"``); names the step. Nothing non-finite is saved.
      TrainingStalledError: ``cfg.stall_steps`` consecutive stalled steps.
      CheckpointError: resuming found no usable checkpoint (each step's problem is named).
      ValueError: the checkpoint is of another model (a leaf or fingerprint field named), or
        its LoRA adapters were trained on another frozen base (both digests named).
    """
    ckpt = Checkpointer(Path(out_dir) / "checkpoints", max_to_keep=cfg.max_to_keep)
    digests = frozen_digests(state)  # the frozen LoRA bases never change: hashed once
    base_meta = {"frozen_base": {"digests": digests,
                                 "source": (meta or {}).get("lora_base")}} if digests else {}
    start = 0
    if cfg.resume and ckpt.latest_step() is not None:
        live = state
        stored, saved = ckpt.restore(abstract_like(checkpoint_view(live)),
                                     expected_fingerprint=fingerprint)
        if digests:
            _check_frozen_base(saved, digests, ckpt.directory)
        state = restore_checkpoint_view(stored, live)
        start = int(saved["step"])
        ckpt.set_aside_after(start)  # unusable newer steps: the run saves them again
        if hasattr(batches, "load_state_dict") and "data" in saved:
            batches.load_state_dict(saved["data"])
        log.info("%s: resumed from step %d", stage, start)
    # Rows a killed run wrote after its last checkpoint are about to be written again. The
    # final evaluation is redone when the loop starts at the end, so its row goes too.
    logger.drop_after(start, stage)
    redo_final_eval = eval_fn is not None and start >= cfg.total_steps
    logger.drop_after(start - 1 if redo_final_eval else start, f"{stage}_eval")

    deferred = DeferredMetrics()
    stall = StallDetector(stage, cfg.stall_steps)
    records: list[dict] = []

    def emit(item):
        if item is None:
            return
        step, values = item
        losses, grad_norms = {}, {}
        for name, value in values.items():
            if (name == loss_key) or (loss_key is None and name.endswith("loss")):
                losses[name] = check_finite(value, step, name)
            elif name.endswith("grad_norm"):
                grad_norms[name] = check_finite(value, step, name)
        records.append(logger.log(step, values, stage=stage))
        stall.update(step, losses, grad_norms)

    def save(step):
        emit(deferred.flush())  # never save a state whose step's metrics were not checked
        data = batches.state_dict() if hasattr(batches, "state_dict") else None
        try:
            ckpt.save(step, checkpoint_view(state),
                      {"step": step, "stage": stage, "data": data, **(meta or {}), **base_meta,
                       **({"fingerprint": dict(fingerprint)} if fingerprint else {})},
                      force=True)
        except NonFiniteStateError as e:
            raise NonFiniteLossError(step, f"state/{e.path}", e.value) from e

    def evaluate(step):
        if eval_fn is not None:
            emit(deferred.flush())
            records.append(logger.log(step, dict(eval_fn(state, step)), stage=f"{stage}_eval"))

    preempted = False
    step = start
    try:
        # Several hosts must stop at the same step, or the next collective hangs.
        with PreemptionGuard(multihost=jax.process_count() > 1) as guard:
            bar = progress(range(start, cfg.total_steps), desc=stage, unit="step",
                           total=cfg.total_steps, initial=start)
            for step in bar:
                batch = place(next(batches))
                state, metrics = step_fn(state, batch, *frozen)
                emit(deferred.push(step + 1, metrics))
                done = step + 1
                if cfg.eval_every and done % cfg.eval_every == 0 and done < cfg.total_steps:
                    evaluate(done)
                if cfg.checkpoint_every and done % cfg.checkpoint_every == 0:
                    save(done)
                if guard.should_stop(done):
                    save(done)
                    preempted = True
                    log.warning("%s: preemption signal: saved step %d and stopping", stage, done)
                    break
            else:
                done = cfg.total_steps
            bar.close()
        emit(deferred.flush())
        if not preempted:
            if ckpt.latest_step() != done:
                save(done)
            evaluate(done)
        step = done
    finally:
        ckpt.close()
        logger.flush()
    return LoopResult(state=state, step=step, preempted=preempted, records=records)


def _check_frozen_base(saved: Mapping, digests: dict, where: str) -> None:
    """Refuse a checkpoint whose LoRA adapters were trained on another frozen base."""
    found = (saved.get("frozen_base") or {}).get("digests")
    if found != digests:
        source = (saved.get("frozen_base") or {}).get("source")
        raise ValueError(
            f"checkpoint {where}: its LoRA adapters were trained on another frozen base "
            f"(saved base digests {found}, this run's {digests}; the saved base came from "
            f"{source!r}): restore it with the base it was trained on, or start the stage "
            "again")


__all__ = [
    "LoopConfig", "LoopResult", "run_loop", "TrainingPreempted",
    "exit_code", "EXIT_OK", "EXIT_FAILURE", "EXIT_PREEMPTED", "EXIT_NON_FINITE", "EXIT_STALLED",
    "EXIT_INTERRUPTED",
    # raised by run_loop (defined in rlhf_jax.train.guards)
    "NonFiniteLossError", "TrainingStalledError",
]
