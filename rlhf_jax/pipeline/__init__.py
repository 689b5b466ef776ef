"""The RLHF pipeline: SFT -> reward model -> PPO, and DPO from the same SFT model, then a judged
evaluation and a report, on any task (``rlhf_jax.tasks``) and any device mesh.

Modules: ``config`` (the dataclasses), ``registry`` (the stages, by name), ``run`` (the run
context: lock, checks, sharded loading and jitting), ``artifacts`` (stage outputs, resume
checks), ``stages`` (SFT, RM, PPO, DPO), ``evaluate`` (judged evaluation and report),
``lock`` (the run-directory lock).

Each stage writes ``<out_dir>/<stage>/``: ``stage.json`` (what it ran with), ``checkpoints/``
(full state, for resuming), ``final/`` (the trained parameters + ``model.json``, what the next
stage reads, and ``COMPLETE.json`` last) and, for policies, ``hf/`` (an HF checkpoint
directory transformers can load). A finished stage is not run again, so a killed
``pipeline`` resumes where it stopped. ``<out_dir>/<stage>`` may be a symbolic link to a stage
output shared with other runs (``rlhf_jax.sweeps``); such a stage trains under its own lock.
"""

from __future__ import annotations

import logging
import time

from rlhf_jax.pipeline.artifacts import ConfigChangedError, load_final, save_final
from rlhf_jax.pipeline.config import (DataConfig, DPOStageConfig, EvalConfig, PipelineConfig,
                                      PolicyConfig, PPOStageConfig, RMStageConfig, SFTStageConfig)
from rlhf_jax.pipeline.registry import get_stage, register_stage, stage_names
from rlhf_jax.pipeline.run import Run, StagePreempted

log = logging.getLogger(__name__)


def run_pipeline(cfg: PipelineConfig) -> dict | None:
    """Run ``cfg.stages`` in order; finished stages are skipped when ``cfg.resume``.

    Returns:
      The last stage's result (the evaluation's summary), or ``None``.

    Raises:
      StagePreempted: SIGTERM stopped a stage after saving a checkpoint (rerun to continue).
      rlhf_jax.pipeline.lock.RunLockedError, ConfigChangedError, FileExistsError: see
        ``Run.create``.
      rlhf_jax.train.loop.NonFiniteLossError, TrainingStalledError: a stage's training
        diverged or stalled; its last checkpoint is the last good state.
    """
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s: %(message)s")
    logging.getLogger("rlhf_jax").setLevel(logging.INFO)
    logging.getLogger("absl").setLevel(logging.WARNING)
    t0 = time.perf_counter()
    run = Run.create(cfg)
    result = None
    try:
        for name in cfg.stages:
            stage = get_stage(name)
            if stage.writes_final and run.done(name):
                log.info("%s: already finished in %s, skipping", name, run.files(name).dir)
                continue
            with run.stage_lock(name):  # a shared stage directory: one trainer at a time
                if stage.writes_final and run.done(name):  # another run finished it meanwhile
                    log.info("%s: finished by another run in %s, skipping", name,
                             run.files(name).dir)
                    continue
                t = time.perf_counter()
                result = stage.run(run)
                log.info("%s: %.0f s", name, time.perf_counter() - t)
    finally:
        run.close()
    log.info("pipeline: %.0f s in all", time.perf_counter() - t0)
    return result


__all__ = ["PipelineConfig", "PolicyConfig", "DataConfig", "SFTStageConfig", "RMStageConfig",
           "PPOStageConfig", "DPOStageConfig", "EvalConfig", "run_pipeline", "Run",
           "StagePreempted", "ConfigChangedError", "load_final", "save_final", "stage_names",
           "get_stage", "register_stage"]
