"""The training loop: the only impure code between data, jitted steps, checkpoints and metrics.

``run_loop`` drives any step ``step_fn(state, batch, *frozen) -> (state, metrics)``:

* resume: with ``LoopConfig.resume`` the latest checkpoint in ``out_dir/checkpoints`` is
  restored into the state's shardings (a checkpoint of another model fails with a message
  naming the leaf), and the data iterator continues from its saved position, so a resumed
  run produces the same metrics and parameters as an uninterrupted one;
* metrics: the host reads step n-1's metrics after dispatching step n (``DeferredMetrics``),
  so there is no host sync in the hot loop;
* checkpoints every ``checkpoint_every`` steps and at the end; SIGTERM (preemption on TPU VMs)
  saves a checkpoint and returns cleanly;
* a NaN/Inf loss stops the run with ``NonFiniteLossError`` naming the step; metrics are
  checked before every save, so the last checkpoint on disk is always a good one.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import jax

from rlhf_jax.checkpoint import Checkpointer, PreemptionGuard, abstract_like, check_finite
from rlhf_jax.metrics import DeferredMetrics, MetricsLogger, progress

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoopConfig:
    """Loop options.

    Attributes:
      total_steps: number of steps (optimizer updates, or PPO iterations) in the stage.
      checkpoint_every: save every this many steps (and always at the end); ``0`` = only at
        the end.
      max_to_keep: checkpoints kept on disk (>= 1).
      eval_every: call the evaluation hook every this many steps (``0`` = only at the end).
      resume: continue from the latest checkpoint in ``out_dir/checkpoints`` if there is one.
    """

    total_steps: int
    checkpoint_every: int = 0
    max_to_keep: int = 2
    eval_every: int = 0
    resume: bool = True

    def __post_init__(self):
        if self.total_steps < 0:
            raise ValueError(f"LoopConfig.total_steps must be >= 0, got {self.total_steps}")
        if self.max_to_keep < 1:
            raise ValueError(f"LoopConfig.max_to_keep must be >= 1, got {self.max_to_keep}")


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
      logger: ``MetricsLogger``.
      frozen: frozen parameter pytrees passed to every step (reference, reward).
      loss_key: metric checked for NaN/Inf (``None``: every metric whose name ends in "loss").
      meta: extra JSON saved in every checkpoint (config, ...).
      fingerprint: model fingerprint checked on restore.
      eval_fn: ``(state, step) -> metrics`` on the host, every ``cfg.eval_every`` steps and at
        the end.

    Raises:
      NonFiniteLossError: a checked metric is NaN or Inf (names the step).
    """
    ckpt = Checkpointer(Path(out_dir) / "checkpoints", max_to_keep=cfg.max_to_keep)
    start = 0
    if cfg.resume and ckpt.latest_step() is not None:
        state, saved = ckpt.restore(abstract_like(state), expected_fingerprint=fingerprint)
        start = int(saved["step"])
        if hasattr(batches, "load_state_dict") and "data" in saved:
            batches.load_state_dict(saved["data"])
        log.info("%s: resumed from step %d", stage, start)

    deferred = DeferredMetrics()
    records: list[dict] = []

    def emit(item):
        if item is None:
            return
        step, values = item
        for name, value in values.items():
            if (name == loss_key) or (loss_key is None and name.endswith("loss")):
                check_finite(value, step, name)
        records.append(logger.log(step, values, stage=stage))

    def save(step):
        emit(deferred.flush())  # never save a state whose loss was not checked
        data = batches.state_dict() if hasattr(batches, "state_dict") else None
        ckpt.save(step, state, {"step": step, "stage": stage, "data": data, **(meta or {}),
                                **({"fingerprint": dict(fingerprint)} if fingerprint else {})},
                  force=True)

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


def cycle(iterator_factory: Callable[[], Iterator]) -> Iterator:
    """Restart ``iterator_factory()`` whenever it is exhausted (endless data)."""
    while True:
        yield from iterator_factory()


def tree_size_bytes(tree) -> int:
    """Bytes held by the arrays of a pytree."""
    return sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
