"""The run context: what every stage shares, and the sharded plumbing between the library's
pieces.

``Run.create`` takes the run directory's lock, checks the configuration against what finished
or interrupted stages ran with (before ``config.json`` is written), builds the mesh, the
tokenizer and the task, and opens and validates every data source the requested stages need,
before any stage trains.

Sharding, end to end: weights load straight into their mesh shardings (``initial_policy``,
``load_final(mesh=)``); train states are born sharded (``train_state``); every jitted step gets
explicit ``in_shardings`` / ``out_shardings`` and donates its state (``step_shardings``);
orbax saves and restores the sharded arrays without gathering them on a host.

LoRA (``PolicyConfig.lora``): ``start_lora`` turns a stage's starting weights (an upstream
LoRA model is merged first) into the frozen base of a LoRA model with fresh adapters, and
records where that base came from; ``finish`` saves only the trained leaves with that record
(and the merged HF export), and ``load_final`` rebuilds the base from the record, recursively.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import shutil
from pathlib import Path
from typing import Any

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec

from rlhf_jax import sharding
from rlhf_jax.checkpoint import model_fingerprint
from rlhf_jax.config import config_to_dict
from rlhf_jax.data.config import BatchConfig
from rlhf_jax.data.datasets import load_preferences, load_prompts, load_sft, load_unpaired
from rlhf_jax.metrics import MetricsLogger
from rlhf_jax.models.model import Model, Params
from rlhf_jax.pipeline import artifacts
from rlhf_jax.pipeline.config import PipelineConfig
from rlhf_jax.pipeline.lock import RunLock
from rlhf_jax.pipeline.registry import Stage, downstream, get_stage
from rlhf_jax.tasks import Task, load_task
from rlhf_jax.train.loop import LoopConfig, TrainingPreempted, run_loop
from rlhf_jax.train.state import (OptimizerConfig, create_sharded_train_state, make_optimizer,
                                  train_state_shardings)

log = logging.getLogger(__name__)


class StagePreempted(TrainingPreempted):
    """A stage stopped on SIGTERM after saving a checkpoint; the same command continues it
    (exit code ``EXIT_PREEMPTED`` = 75)."""


#: data role -> the stages that read it
_ROLE_STAGES = {"sft": ("sft",), "preferences": ("rm", "dpo"), "eval_preferences": ("rm", "dpo"),
                "prompts": ("rm", "ppo"), "eval_prompts": ("eval",), "unpaired": ("dpo",)}


@dataclasses.dataclass
class Run:
    """Everything the stages share (built once by ``Run.create``; close it when done)."""

    cfg: PipelineConfig
    out: Path
    mesh: Any
    tokenizer: Any
    task: Task
    logger: MetricsLogger
    lock: RunLock
    data_stats: dict = dataclasses.field(default_factory=dict)  # source name -> DataStats
    records: dict = dataclasses.field(default_factory=dict)  # stage -> its record
    lora_bases: dict = dataclasses.field(default_factory=dict)  # stage -> its LoRA base record
    _datasets: dict = dataclasses.field(default_factory=dict, repr=False)  # loaded once

    @classmethod
    def create(cls, cfg: PipelineConfig) -> "Run":
        """Lock, check, then build the context (see the module docstring).

        Raises:
          rlhf_jax.pipeline.lock.RunLockedError: another run holds ``cfg.out_dir``.
          FileExistsError: ``resume=False`` over a directory with outputs of these stages.
          ConfigChangedError: a stage ran with another configuration (lists the fields).
          rlhf_jax.data.records.RecordError, FileNotFoundError, KeyError: a data source the
            requested stages need is missing, unreadable or invalid.
        """
        out = Path(cfg.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        lock = RunLock(out)
        lock.acquire()
        try:
            cls._prepare_dir(cfg, out)
            mesh = sharding.make_mesh(cfg.mesh)
            tokenizer = _load_tokenizer(cfg)
            task = load_task(cfg.task_spec, cfg)
            logger = MetricsLogger(out, tensorboard=cfg.tensorboard, config=config_to_dict(cfg))
            run = cls(cfg=cfg, out=out, mesh=mesh, tokenizer=tokenizer, task=task, logger=logger,
                      lock=lock)
            run._validate_sources()
        except BaseException:
            lock.release()
            raise
        return run

    @staticmethod
    def _prepare_dir(cfg: PipelineConfig, out: Path) -> None:
        if cfg.force_restart:
            artifacts.move_aside(out, downstream(cfg.force_restart))
            artifacts.barrier("force_restart")
        trained = [s for s in cfg.stages if get_stage(s).writes_final]
        if not cfg.resume:
            earlier = [out / s for s in trained if (out / s).exists()]
            if earlier:
                raise FileExistsError(
                    f"{out} already holds outputs of an earlier run ({', '.join(map(str, earlier))});"
                    " nothing saved is overwritten: resume it (the default), pass --force-restart "
                    "STAGE, or choose another --out-dir")
        for s in trained:  # finished or interrupted stages of this run, then what they read
            if artifacts.StageFiles(out, s).recorded() is not None:
                try:
                    artifacts.check_stage(cfg, get_stage(s), out)
                except FileNotFoundError:
                    pass  # an input is missing: reported when the stage starts
        artifacts.check_upstream(cfg, cfg.stages, out)
        artifacts.write_json_atomic(out / "config.json", config_to_dict(cfg))

    def _validate_sources(self) -> None:
        """Open and tokenise every source the requested stages read, before any training."""
        needed = [role for role, readers in _ROLE_STAGES.items()
                  if any(s in self.cfg.stages and not self.done(s) for s in readers)]
        for role in needed:
            if role == "eval_preferences" and not self.task.has(role):
                continue  # optional: no held-out accuracy then
            if role == "unpaired":
                if self.cfg.dpo.dpo.unpaired:  # only an unpaired loss (KTO) reads it
                    self.unpaired_dataset(role)
                continue
            if role == "preferences" and self.cfg.dpo.dpo.unpaired and not (
                    "rm" in self.cfg.stages and not self.done("rm")):
                continue  # KTO alone reads no comparisons
            if role.endswith("prompts"):
                self.prompt_dataset(role)
            elif role == "sft":
                self.sft_dataset()
            else:
                self.preference_dataset(role, 2)

    def close(self) -> None:
        """Close the metrics writers and release the run directory's lock."""
        self.logger.close()
        self.lock.release()

    # ---- data ------------------------------------------------------------------------
    def batch_config(self, batch_size: int, *, seed_offset: int = 0,
                     num_candidates: int | None = None) -> BatchConfig:
        """Training streams wrap into the next epoch: no filler rows, which pairwise and DPO
        losses (defined per pair, not per token) would otherwise count."""
        d = self.cfg.data
        return BatchConfig(batch_size=batch_size, buckets=d.buckets, prompt_buckets=d.prompt_buckets,
                           skip_invalid=d.skip_invalid, seed=d.seed + seed_offset,
                           remainder="wrap", num_candidates=num_candidates)

    def _loaded(self, key, load):
        cache = self._datasets
        if key not in cache:
            cache[key] = load()  # the loader logs skipped records
            self.data_stats[key[0]] = cache[key].stats
        return cache[key]

    def sft_dataset(self):
        return self._loaded(("sft",), lambda: load_sft(
            self.task.source("sft"), self.tokenizer, self.batch_config(1), name="sft"))

    def preference_dataset(self, role: str, num_candidates: int | None):
        bcfg = self.batch_config(1, num_candidates=num_candidates)
        return self._loaded((role, num_candidates), lambda: load_preferences(
            self.task.source(role), self.tokenizer, bcfg, name=role))

    def unpaired_dataset(self, role: str = "unpaired"):
        """The task's unpaired (KTO) examples of ``role``, loaded once."""
        return self._loaded((role,), lambda: load_unpaired(
            self.task.source(role), self.tokenizer, self.batch_config(1), name=role))

    def prompt_dataset(self, role: str):
        return self._loaded((role,), lambda: load_prompts(
            self.task.source(role), self.tokenizer, self.batch_config(1), name=role))

    def batches(self, dataset, bcfg: BatchConfig):
        """This process's rows of the training stream (all processes agree on the order)."""
        return dataset.batches(bcfg, process_index=jax.process_index(),
                               process_count=jax.process_count())

    def place(self, batch):
        """A host batch (this process's rows) as a global array sharded over ``(data, fsdp)``."""
        return sharding.shard_batch(batch, self.mesh)

    def data_metrics(self) -> dict[str, float]:
        """Kept / skipped record counts of every source loaded so far."""
        out: dict[str, float] = {}
        for name, stats in self.data_stats.items():
            out.update({k: float(v) for k, v in stats.as_metrics(f"data/{name}").items()})
        return out

    # ---- stages ----------------------------------------------------------------------
    def files(self, stage: str) -> artifacts.StageFiles:
        """The paths of ``stage``'s outputs under the run directory."""
        return artifacts.StageFiles(self.out, stage)

    def done(self, stage: str) -> bool:
        """Whether ``stage`` finished (``COMPLETE.json``) and ``resume`` lets it be skipped."""
        return self.cfg.resume and self.files(stage).complete

    @contextlib.contextmanager
    def stage_lock(self, stage: str):
        """Context manager held while ``stage`` runs. A stage directory that is a symbolic link
        is shared with other runs (``rlhf_jax.sweeps`` stores each stage output once under its
        content address): its own lock (``<target>/.lock``) is taken, waiting as long as another
        run trains it, so two processes never train the same output; otherwise a no-op (the
        run directory's lock covers it)."""
        path = self.files(stage).dir
        if not path.is_symlink():
            yield
            return
        lock = RunLock(path.resolve(), timeout=None)
        lock.acquire()  # process 0 waits; the others wait for it at the barrier
        try:
            artifacts.barrier(f"{stage}_stage_lock")
            yield
        finally:
            lock.release()

    def begin(self, stage: Stage) -> dict:
        """Check and record the stage's configuration and inputs; returns the record."""
        record = artifacts.check_stage(self.cfg, stage, self.out)
        artifacts.write_json_atomic(self.files(stage.name).dir / artifacts.STAGE_FILE, record)
        self.records[stage.name] = record
        return record

    # ---- models ----------------------------------------------------------------------
    def load_final(self, stage: str, *, frozen_layers: int | None = None):
        """``(model, params, meta)`` of a finished stage, restored into the mesh shardings.

        A LoRA stage's frozen base is rebuilt from its ``lora_base`` record: the initial
        policy, or the named stage's output (loaded the same way) with its adapters merged,
        truncated to ``n_layers`` blocks when recorded."""
        final = self.files(stage).final
        meta_path = final / "model.json"
        ref = None
        if meta_path.exists():
            import json
            ref = json.loads(meta_path.read_text()).get("lora_base")
        base = None
        if ref is not None:
            if ref.get("from") == "initial":
                _, base = self.initial_policy()
            else:
                up_model, up_params, _ = self.load_final(ref["from"])
                base = self.merged(up_model, up_params)[1]
            if ref.get("n_layers"):
                base = truncate_trunk(base, int(ref["n_layers"]))
        return artifacts.load_final(final, frozen_layers=frozen_layers, mesh=self.mesh,
                                    base=base)

    @property
    def lora(self):
        """The run's ``LoraConfig`` when LoRA is on (``policy.lora.rank``), else ``None``."""
        lora = self.cfg.policy.lora
        return lora if lora.enabled else None

    def merged(self, model: Model, params: Params) -> tuple[Model, Params]:
        """``(plain model, params)`` with every LoRA adapter folded into its kernel
        (``rlhf_jax.models.lora.merge_adapters``, jitted into the plain model's shardings); a
        model without LoRA comes back as it is."""
        from rlhf_jax.models.lora import merged_params, plain_model
        if model.cfg.lora is None:
            return model, params
        plain = plain_model(model)
        with jax.set_mesh(self.mesh):
            merged = jax.jit(lambda p: merged_params(model, p),
                             out_shardings=plain.param_shardings(self.mesh))(params)
        return plain, merged

    def start_lora(self, stage: str | None, model: Model, params: Params, seed_offset: int, *,
                   base_from: str, n_layers: int | None = None) -> tuple[Model, Params]:
        """A stage's model and starting params with LoRA when ``policy.lora`` is on: the frozen
        base is ``params`` (an upstream LoRA model merged first), quantised for QLoRA, with
        fresh adapters drawn from ``seed + seed_offset`` (``rlhf_jax.models.lora.attach``);
        ``model`` and ``params`` unchanged when LoRA is off.

        Args:
          stage: the stage whose final output this model becomes (its base is recorded for
            ``finish`` and the checkpoints), or ``None`` (a model that is not saved as a
            stage output, e.g. PPO's value model).
          base_from: where the base came from: ``"initial"`` or the input stage's name.
          n_layers: the base's trunk was truncated to this many blocks (the reward model).
        """
        from rlhf_jax.models.lora import attach
        if self.lora is None:
            return model, params
        model, params = self.merged(model, params)
        lora_model = Model(dataclasses.replace(model.cfg, lora=self.lora), kind=model.kind)
        with jax.set_mesh(self.mesh):
            params = attach(lora_model, params, jax.random.key(self.cfg.seed + seed_offset),
                            shardings=lora_model.param_shardings(self.mesh))
        if stage is not None:
            self.lora_bases[stage] = {"from": base_from,
                                      **({"n_layers": n_layers} if n_layers else {})}
        return lora_model, params

    def initial_policy(self) -> tuple[Model, Params]:
        """The configured initial policy, built or loaded straight into its mesh shardings."""
        p = self.cfg.policy
        if p.source == "random":
            model = Model(dataclasses.replace(p.random_model, frozen_layers=p.frozen_layers,
                                              dtype=p.dtype, remat=p.remat))
            return model, model.init_sharded(jax.random.key(self.cfg.seed), self.mesh)
        from rlhf_jax.models.convert.hf import load_hf_checkpoint
        path = _smollm2(self.cfg) if p.source == "smollm2" else p.path
        return load_hf_checkpoint(path, shardings=self.mesh, config_overrides={
            "frozen_layers": p.frozen_layers, "dtype": p.dtype, "remat": p.remat})

    def with_head(self, params: Params, model: Model, rng: jax.Array) -> Params:
        """``params``' trunk (and LM head) in ``model``'s tree, with any missing head
        initialised straight into its shardings (only the head is computed)."""
        shardings = model.param_shardings(self.mesh)
        abstract = model.abstract_params()
        out = {}
        for key in abstract:
            if key in params:
                out[key] = params[key]
            else:
                with jax.set_mesh(self.mesh):
                    out[key] = jax.jit(lambda r, k=key: model.init(r)[k],
                                       out_shardings=shardings[key])(rng)
        return out

    def train_state(self, model: Model, params: Params, opt: OptimizerConfig, total_steps: int,
                    seed_offset: int):
        """``(tx, state, state_shardings)``: the optimizer and a train state born sharded."""
        opt = fit_schedule(opt, total_steps)
        tx = make_optimizer(opt, params, frozen_layers=model.cfg.frozen_layers)
        shardings = model.param_shardings(self.mesh)
        params = jax.device_put(params, shardings)
        state = create_sharded_train_state(params, tx, jax.random.key(self.cfg.seed + seed_offset),
                                           self.mesh, shardings)
        abstract = jax.eval_shape(lambda: params)
        return tx, state, train_state_shardings(shardings, tx, abstract, self.mesh)

    def batch_sharding(self) -> NamedSharding:
        """One sharding for every leaf of a batch: rows over ``(data, fsdp)``."""
        return NamedSharding(self.mesh, PartitionSpec(sharding.DATA_AXES))

    def loop(self, stage: str, step_fn, state, batches, steps: int, model: Model, *, frozen=(),
             loss_key=None, eval_fn=None, eval_every: int = 0):
        """``run_loop`` on the mesh with the run's checkpoint cadence and health checks;
        ``eval_fn(state, step)`` every ``eval_every`` steps (0: at the end only).

        Raises:
          StagePreempted: SIGTERM; a checkpoint was saved.
        """
        loop_cfg = LoopConfig(total_steps=steps, checkpoint_every=self.cfg.checkpoint_every,
                              resume=self.cfg.resume, stall_steps=self.cfg.stall_steps,
                              eval_every=eval_every)
        with jax.set_mesh(self.mesh):
            result = run_loop(stage=stage, step_fn=step_fn, state=state, batches=batches,
                              place=self.place, out_dir=self.files(stage).dir, cfg=loop_cfg,
                              logger=self.logger, frozen=frozen, loss_key=loss_key,
                              fingerprint=model_fingerprint(model), eval_fn=eval_fn,
                              meta={"stage_record": self.records.get(stage),
                                    **({"lora_base": self.lora_bases[stage]}
                                       if stage in self.lora_bases else {})})
        if result.preempted:  # never write final/: the stage is unfinished
            raise StagePreempted(f"{stage}: stopped by SIGTERM at step {result.step} "
                                 f"(checkpoint saved in {self.files(stage).checkpoints})")
        return result

    def finish(self, stage: str, model: Model, params: Params, extra: dict | None = None, *,
               export_hf: bool = False) -> None:
        """Write the stage's outputs in order - parameters, the HF export (``hf/``, moved into
        place once complete), ``model.json`` - and mark it complete last, so a kill at any
        point leaves the stage unfinished and the next run redoes its outputs."""
        files = self.files(stage)
        if jax.process_index() == 0:
            for stale in (files.final / artifacts.COMPLETE_FILE, files.final / "model.json"):
                stale.unlink(missing_ok=True)
        saved = params
        if model.cfg.lora is not None:  # the trained leaves, and where the frozen base is from
            from rlhf_jax.models.lora import frozen_digest, partition
            saved = partition(params)[0]
            extra = {**(extra or {}), "lora_base": {**self.lora_bases.get(stage, {}),
                                                    "digest": frozen_digest(params)}}
        artifacts.save_params(files.final, model, saved)
        if export_hf:
            from rlhf_jax.models.convert.hf import save_hf_checkpoint
            partial = files.dir / "hf.partial"
            save_hf_checkpoint(*self.merged(model, params), partial, tokenizer=self.tokenizer)
            if jax.process_index() == 0:
                if files.hf.exists():
                    shutil.rmtree(files.hf)
                os.replace(partial, files.hf)
        artifacts.write_model_json(files.final, model, extra)
        artifacts.barrier(f"{stage}_outputs")
        files.mark_complete(self.records[stage])
        artifacts.barrier(f"{stage}_complete")

    def finish_policy(self, stage: str, model: Model, params: Params, extra=None) -> None:
        """``finish`` for a policy: the LM part only (a value head is dropped), with an HF
        export (LoRA: the merged model)."""
        lm = Model(model.cfg, kind="lm")
        lm_params = {k: v for k, v in params.items() if k in ("trunk", "lm_head")}
        self.finish(stage, lm, lm_params, extra, export_hf=True)

    def sampling(self, sampling):
        """``sampling`` with unset EOS / pad ids taken from the tokenizer."""
        return sampling.with_token_ids(self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)


def truncate_trunk(params: Params, n_layers: int) -> Params:
    """``params`` with only the lowest ``n_layers`` stacked blocks of the trunk."""
    trunk = dict(params["trunk"])
    trunk["blocks"] = jax.tree.map(lambda x: x[:n_layers], trunk["blocks"])
    return {**params, "trunk": trunk}


def _smollm2(cfg: PipelineConfig) -> Path:
    from rlhf_jax.models.convert.smollm2 import fetch_smollm2
    return fetch_smollm2(cfg.cache_dir)


def fit_schedule(opt: OptimizerConfig, total_steps: int) -> OptimizerConfig:
    """``opt`` with its schedule spanning a stage's ``total_steps`` optimizer updates (a run
    shorter than its warm-up still gets a one-step decay, which optax needs)."""
    return dataclasses.replace(opt, total_steps=max(total_steps, opt.warmup_steps + 1))


def _load_tokenizer(cfg: PipelineConfig):
    """The run's tokenizer.

    Raises:
      FileNotFoundError: ``policy.source == "hf"`` and ``policy.path`` (a local checkpoint
        directory: the weights are read from it) does not exist, naming it; without this
        check a relative path such as ``checkpoints/x`` would be read as a hub repository id.
    """
    from rlhf_jax.models.tokenizer import load_tokenizer
    p = cfg.policy
    if p.source == "hf" and p.path is not None and not Path(p.path).expanduser().is_dir():
        raise FileNotFoundError(
            f"policy.path {p.path} is not a directory: --policy.source hf reads an HF checkpoint "
            "directory (config.json, safetensors, tokenizer); download it there first")
    path = p.tokenizer_path or (p.path if p.source == "hf" else None) or _smollm2(cfg)
    return load_tokenizer(path)


def local_rows(x: jax.Array) -> np.ndarray:
    """The rows of a batch-sharded global array held by this process, in global order (each
    row once, whatever the replication over the other mesh axes)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    shards = {}
    for sh in x.addressable_shards:
        start = sh.index[0].start or 0
        shards.setdefault(start, sh.data)
    return np.concatenate([np.asarray(shards[k]) for k in sorted(shards)])


def gather_rows(x: np.ndarray) -> np.ndarray:
    """Every process's rows of ``x`` concatenated in process order (a host all-gather)."""
    if jax.process_count() == 1:
        return np.asarray(x)
    from jax.experimental import multihost_utils
    return np.asarray(multihost_utils.process_allgather(np.asarray(x), tiled=True))


__all__ = ["Run", "StagePreempted", "local_rows", "gather_rows"]
