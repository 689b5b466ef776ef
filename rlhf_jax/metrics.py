"""Metrics: reduction of ``(sum, count)`` pairs, deferred host reads, writers, progress bars.

Metrics travel from jitted steps as ``{name: (sum, count)}`` pairs, summed over microbatches
and devices, and are reduced once (``reduce_metrics`` / ``host_metrics``), so values do not
depend on how the batch was split. The host reads step ``n-1``'s metrics after dispatching
step ``n`` (``DeferredMetrics``), so logging never stalls the device pipeline.

Writers (``MetricsLogger``): one JSON line per record in ``out_dir/metrics.jsonl``
(``{"step": ..., "stage": ..., "time": ..., name: value, ...}``), TensorBoard scalars
(tensorboardX, one run directory per stage under ``out_dir/tb/``), and optionally Weights &
Biases. Only process 0 writes in a multi-process run.

Standard names (namespaced ``group/name``; per-token quantities are token means over the
response mask, per-sequence quantities sequence means, unless stated):

==============================  =========================================================
``objective/score``             reward-model (or judge) score of the sampled responses,
                                sequence mean, before KL shaping.
``objective/kl``                KL(pi || pi_ref) per sequence, nats (sum over response
                                tokens of the per-token estimator), sequence mean.
``objective/kl_coef``           current KL coefficient (adaptive controller).
``objective/entropy``           policy entropy per sequence, nats: ``-sum_t log pi(y_t)`` over
                                the sampled response tokens (a one-sample estimate, as in
                                TRL), sequence mean.
``objective/rlhf_reward``       ``score - kl_coef * kl``, sequence mean.
``ppo/policy/clipfrac``         fraction of tokens whose ratio was clipped.
``ppo/policy/approxkl``         ``0.5 (log ratio)^2`` between rollout and current policy.
``ppo/policy/loss``             clipped surrogate loss, token mean.
``ppo/val/loss``                clipped value loss; ``ppo/loss/total`` the weighted sum.
``ppo/val/error``               mean squared error of values vs returns, token mean.
``ppo/val/clipfrac``            fraction of clipped value updates.
``rm/accuracy``                 fraction of pairs with ``r(chosen) > r(rejected)``.
``rm/loss``                     Bradley-Terry loss, nats per pair; ``rm/margin`` the mean
                                ``r(chosen) - r(rejected)``.
``dpo/rewards/margins``         ``beta * (chosen - rejected)`` implicit-reward margin, pair mean.
``dpo/rewards/accuracies``      fraction of pairs with a positive margin.
``dpo/loss``                    DPO (or variant) loss, nats per pair.
``sft/loss``                    next-token cross-entropy, nats per token; ``sft/accuracy``
                                next-token top-1 accuracy.
``train/grad_norm``             global gradient norm before clipping.
``rollout/response_length``     response tokens up to and including EOS, sequence mean.
``rollout/no_eos_share``        fraction of responses that never emitted EOS.
``eval/judge_score``            an independent judge's score on held-out prompts.
``perf/tokens_per_sec``         throughput; ``perf/step_time`` seconds per step.
==============================  =========================================================

``reduce_metrics`` is defined in ``rlhf_jax.losses.logprobs`` (the device-side reduction,
usable inside jit) and re-exported here.
"""

from __future__ import annotations

import json
import os
import sys
import time
import warnings
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import jax
import numpy as np

from rlhf_jax.config import to_jsonable
from rlhf_jax.losses.logprobs import reduce_metrics  # noqa: F401  (re-exported)

#: Keys every JSONL record carries; metric names may not use them.
RESERVED_KEYS = ("step", "stage", "time")

STANDARD_NAMES = (
    "objective/score", "objective/kl", "objective/kl_coef", "objective/entropy",
    "objective/rlhf_reward", "ppo/policy/clipfrac", "ppo/policy/approxkl", "ppo/policy/loss",
    "ppo/val/loss", "ppo/loss/total", "ppo/val/error", "ppo/val/clipfrac", "rm/accuracy",
    "rm/loss", "rm/margin", "dpo/rewards/margins", "dpo/rewards/accuracies", "dpo/loss",
    "sft/loss", "sft/accuracy", "train/grad_norm", "rollout/response_length",
    "rollout/no_eos_share", "eval/judge_score", "perf/tokens_per_sec", "perf/step_time",
)


def _is_main_process() -> bool:
    try:
        return jax.process_index() == 0
    except Exception:  # pragma: no cover - backend not initialised
        return True


def _scalar(name: str, value: Any) -> float | int:
    """A host scalar as a Python number (ints and bools stay ints)."""
    arr = np.asarray(value)
    if arr.size != 1:
        raise ValueError(f"metric {name!r} must be a scalar, got shape {arr.shape}")
    item = arr.reshape(()).item()
    if isinstance(item, bool):
        return int(item)
    if isinstance(item, int):
        return item
    return float(item)


def host_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Device metrics to host floats with ONE transfer, reducing ``(sum, count)`` pairs.

    Args:
      metrics: ``{name: (sum, count)}`` pairs (reduced as ``sum / max(count, 1)`` in float64,
        the formula of ``reduce_metrics``) or ``{name: scalar}`` values (already reduced);
        device or host arrays.

    Returns:
      ``{name: float}``.

    Raises:
      ValueError: a value is not a scalar or pair of scalars (naming it).
    """
    host = jax.device_get(dict(metrics))
    out = {}
    for name, v in host.items():
        if isinstance(v, (tuple, list)):
            if len(v) != 2:
                raise ValueError(f"metric {name!r}: expected a (sum, count) pair, got "
                                 f"{len(v)} items")
            s, c = (float(_scalar(name, x)) for x in v)
            out[name] = s / max(c, 1.0)
        else:
            out[name] = float(_scalar(name, v))
    return out


class DeferredMetrics:
    """Read step ``n-1``'s metrics on the host after step ``n`` has been dispatched.

    ``push`` keeps the device arrays of the newest step untouched (only starting their
    asynchronous device-to-host copy) and converts the *previous* step's, which has finished
    or is about to, so the host never waits on the step it just launched::

        deferred = DeferredMetrics()
        for step in range(n):
            state, metrics = train_step(state, batch)      # dispatched, not finished
            if (done := deferred.push(step, metrics)) is not None:
                prev_step, values = done
                check_finite(values["loss"], prev_step)   # rlhf_jax.train.guards
                logger.log(prev_step, values, stage="ppo")
        if (done := deferred.flush()) is not None: logger.log(*done, stage="ppo")

    Pass ``step`` as a Python int (a device scalar is converted only when read).
    """

    def __init__(self):
        self._pending: tuple[Any, Any] | None = None

    @staticmethod
    def _start_copy(device_metrics) -> None:
        for leaf in jax.tree.leaves(device_metrics):
            copy = getattr(leaf, "copy_to_host_async", None)
            if copy is not None:
                try:
                    copy()
                except Exception:  # deleted/donated buffers: the read will raise properly
                    pass

    @staticmethod
    def _convert(pending) -> tuple[int, dict[str, float]]:
        step, metrics = pending
        return int(np.asarray(jax.device_get(step))), host_metrics(metrics)

    def push(self, step: Any,
             device_metrics: Mapping[str, Any]) -> tuple[int, dict[str, float]] | None:
        """Hold ``device_metrics`` of ``step``; return the previous step's as host floats.

        Returns:
          ``(prev_step, {name: float})`` or ``None`` on the first push.
        """
        self._start_copy(device_metrics)
        prev, self._pending = self._pending, (step, device_metrics)
        return None if prev is None else self._convert(prev)

    def flush(self) -> tuple[int, dict[str, float]] | None:
        """The held step's metrics as host floats (blocks on it), or ``None``; empties the
        buffer."""
        prev, self._pending = self._pending, None
        return None if prev is None else self._convert(prev)

    @property
    def pending_step(self) -> Any:
        """The step whose metrics are held on device, or ``None``."""
        return None if self._pending is None else self._pending[0]


class MetricsLogger:
    """Write metric records to JSONL, TensorBoard and (optionally) Weights & Biases.

    Args:
      out_dir: run directory; ``metrics.jsonl`` and ``tb/`` go here. Created if missing. An
        existing ``metrics.jsonl`` is appended to (a resumed run keeps its history; a last
        line cut by a killed writer is removed first, with a warning). ``drop_after`` removes
        the rows a resumed run is about to write again.
      tensorboard: write TensorBoard scalars with tensorboardX under ``out_dir/tb/<stage>``.
      wandb_project: if set, also log to this W&B project (``wandb`` imported lazily).
      config: run configuration (JSON-able ``dict`` or dataclass) for W&B and
        ``out_dir/config.json``.
      run_name: W&B run name.
      enabled: write anything at all; default: only on process 0.

    Raises:
      ImportError: ``wandb_project`` given but ``wandb`` is not installed.
    """

    def __init__(self, out_dir, *, tensorboard: bool = True, wandb_project: str | None = None,
                 config: Any = None, run_name: str | None = None, enabled: bool | None = None):
        self.out_dir = Path(out_dir)
        self.enabled = _is_main_process() if enabled is None else enabled
        self.tensorboard = tensorboard
        self._tb: dict[str, Any] = {}
        self._wandb_run = None
        self._wandb_stages: set[str] = set()
        self._file = None
        if not self.enabled:
            return
        wandb = None
        if wandb_project is not None:  # fail before creating any file
            try:
                import wandb
            except ImportError as e:
                raise ImportError(f"MetricsLogger(wandb_project={wandb_project!r}) needs the "
                                  "'wandb' package, which is not installed: pip install "
                                  "'rlhf_jax[wandb]' or pass wandb_project=None") from e
        config_json = None
        if config is not None:
            config_json = to_jsonable(config)
        self.out_dir.mkdir(parents=True, exist_ok=True)
        if config_json is not None:
            (self.out_dir / "config.json").write_text(json.dumps(config_json, indent=2) + "\n")
        self.path = self.out_dir / "metrics.jsonl"
        self._drop_cut_line()
        self._file = open(self.path, "a", encoding="utf-8")
        if wandb_project is not None:
            self._wandb_run = wandb.init(project=wandb_project, config=config_json, name=run_name,
                                         dir=str(self.out_dir))

    def _tb_writer(self, stage: str | None):
        name = stage or "train"
        if name not in self._tb:
            from tensorboardX import SummaryWriter
            self._tb[name] = SummaryWriter(logdir=str(self.out_dir / "tb" / name), flush_secs=30)
        return self._tb[name]

    def log(self, step: int, metrics: Mapping[str, Any], stage: str | None = None) -> dict:
        """Write one record.

        Args:
          step: the x value (optimizer step / PPO iteration) within ``stage``.
          metrics: ``{name: host scalar}`` (use ``DeferredMetrics`` / ``host_metrics`` for
            device values; a device array here blocks until it is computed).
          stage: ``"sft"``, ``"rm"``, ``"ppo"``, ``"dpo"``, ``"eval"`` ... (``None`` allowed).

        Returns:
          The record as written.

        Raises:
          ValueError: a metric uses a reserved key (``step``/``stage``/``time``) or is not a
            scalar.
        """
        record: dict[str, Any] = {"step": int(step), "stage": stage, "time": time.time()}
        for name, value in metrics.items():
            if name in RESERVED_KEYS:
                raise ValueError(f"metric name {name!r} is reserved ({RESERVED_KEYS})")
            record[name] = _scalar(name, value)
        if not self.enabled:
            return record
        # NaN/inf are written as the JSON extensions NaN/Infinity (read back by read_jsonl).
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        values = {k: v for k, v in record.items() if k not in RESERVED_KEYS}
        if self.tensorboard:
            writer = self._tb_writer(stage)
            for name, value in values.items():
                writer.add_scalar(name, value, global_step=record["step"])
        if self._wandb_run is not None:
            prefix = f"{stage}/" if stage else ""
            if stage not in self._wandb_stages:
                self._wandb_run.define_metric(f"{prefix}step")
                self._wandb_run.define_metric(f"{prefix}*", step_metric=f"{prefix}step")
                self._wandb_stages.add(stage)
            self._wandb_run.log({f"{prefix}step": record["step"],
                                 **{f"{prefix}{k}": v for k, v in values.items()}})
        return record

    def _drop_cut_line(self) -> None:
        """Remove a final line without its newline (a writer killed mid-line): appending after
        it would leave a malformed line inside the file."""
        if not self.path.exists():
            return
        with open(self.path, "r+b") as f:
            size = f.seek(0, os.SEEK_END)
            if size == 0:
                return
            f.seek(size - 1)
            if f.read(1) == b"\n":
                return
            keep = size
            while keep > 0:  # back to the last newline, in blocks
                block = min(keep, 1 << 16)
                f.seek(keep - block)
                nl = f.read(block).rfind(b"\n")
                if nl >= 0:
                    keep = keep - block + nl + 1
                    break
                keep -= block
            f.truncate(keep)
        warnings.warn(f"{self.path}: removed 1 truncated final record ({size - keep} bytes) "
                      "left by an interrupted writer")

    def drop_after(self, step: int, stages: str | Iterable[str]) -> int:
        """Remove the records of ``stages`` with a step greater than ``step`` from
        ``metrics.jsonl``: a run resumed from the checkpoint at ``step`` writes them again.

        The file is rewritten atomically (a temporary file in the same directory, then
        ``os.replace``); records of other stages and unparsable lines are kept as they are.
        Only the writing process (process 0) touches the file. TensorBoard and W&B keep what
        they received (TensorBoard shows the later value of a repeated step).

        Args:
          step: the last step to keep.
          stages: one stage name or several (e.g. ``("sft", "sft_eval")``).

        Returns:
          The number of records removed.
        """
        if not self.enabled or not self.path.exists():
            return 0
        stages = {stages} if isinstance(stages, str) else set(stages)

        def newer(line: str) -> bool:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                return False
            return (isinstance(rec, dict) and rec.get("stage") in stages
                    and isinstance(rec.get("step"), int) and rec["step"] > step)

        reopen = self._file is not None  # not after close()
        if reopen:
            self._file.flush()
        lines = self.path.read_text(encoding="utf-8").splitlines(keepends=True)
        kept = [line for line in lines if not newer(line)]
        dropped = len(lines) - len(kept)
        if not dropped:
            return 0
        if reopen:
            self._file.close()
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.writelines(kept)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self.path)
        if reopen:
            self._file = open(self.path, "a", encoding="utf-8")
        return dropped

    def flush(self) -> None:
        """Flush every writer."""
        if self._file is not None:
            self._file.flush()
        for w in self._tb.values():
            w.flush()

    def close(self) -> None:
        """Flush and close every writer (idempotent)."""
        if self._file is not None:
            self._file.close()
            self._file = None
        for w in self._tb.values():
            w.close()
        self._tb.clear()
        if self._wandb_run is not None:
            self._wandb_run.finish()
            self._wandb_run = None

    def __enter__(self) -> "MetricsLogger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def read_jsonl(path) -> list[dict]:
    """Records of a JSONL file (``MetricsLogger`` output or any JSON-lines file).

    Blank lines are ignored. A final line without its newline that does not parse (a writer
    killed mid-line) is skipped with a warning naming the file and line.

    Raises:
      FileNotFoundError: no such file.
      ValueError: a malformed line (file and line number named).
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"no metrics file {path}")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    out = []
    for i, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines):  # last line, not newline-terminated: a cut-off write
                warnings.warn(f"{path}:{i}: skipped 1 truncated final record ({e.msg})")
                continue
            raise ValueError(f"{path}:{i}: not a JSON record ({e.msg}): {line[:80]!r}") from e
        if not isinstance(rec, dict):
            raise ValueError(f"{path}:{i}: expected a JSON object, got {type(rec).__name__}")
        out.append(rec)
    return out


def progress(iterable_or_total: Iterable | int | None = None, desc: str | None = None,
             unit: str = "it", *, total: int | None = None, mininterval: float | None = None,
             disable: bool | None = None, file=None, **kwargs):
    """A tqdm bar with rate and ETA for a long phase (training, sampling, evaluation).

    Args:
      iterable_or_total: an iterable to wrap, or an ``int`` total for manual ``update(n)``.
      desc: label shown before the bar.
      unit: what one step counts (``"step"``, ``"batch"``, ``"tok"``; ``unit_scale`` via
        kwargs).
      total: total when wrapping an iterable without ``len``.
      mininterval: seconds between refreshes; default 0.1 on a terminal and 30 otherwise, so
        logs of batch jobs get a line every 30 s instead of thousands.
      disable: default: shown only on process 0.
      file: stream (default ``sys.stderr``).
      **kwargs: passed to ``tqdm.tqdm``.

    Returns:
      A ``tqdm.tqdm`` instance (iterate it, or call ``update``/``set_postfix``/``close``).
    """
    from tqdm import tqdm

    stream = sys.stderr if file is None else file
    if mininterval is None:
        mininterval = 0.1 if getattr(stream, "isatty", lambda: False)() else 30.0
    if disable is None:
        disable = not _is_main_process()
    common = dict(desc=desc, unit=unit, mininterval=mininterval, disable=disable, file=stream,
                  dynamic_ncols=True, **kwargs)
    if isinstance(iterable_or_total, (int, np.integer)):
        return tqdm(total=int(iterable_or_total), **common)
    return tqdm(iterable_or_total, total=total, **common)


__all__ = [
    "reduce_metrics", "host_metrics", "DeferredMetrics", "MetricsLogger", "read_jsonl",
    "progress", "STANDARD_NAMES", "RESERVED_KEYS",
]
