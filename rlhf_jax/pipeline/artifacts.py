"""What a stage leaves on disk, and the checks that keep a resumed run honest.

``<out_dir>/<stage>/`` holds:

* ``stage.json`` - the configuration the stage runs with (only the ``PipelineConfig``
  sections its result depends on) and the fingerprints of its inputs (upstream stages),
  written before it trains. A resumed run whose values differ is refused, listing the
  differing fields (``ConfigChangedError``), for a finished stage as for an interrupted one.
* ``checkpoints/`` - full training states (``rlhf_jax.train.loop``).
* ``final/params`` (orbax, saved from the sharded arrays: no host gathers them), then
  ``hf/`` for policies (written to ``hf.partial/`` and moved into place when complete), then
  ``final/model.json``, and last ``final/COMPLETE.json`` with the stage's fingerprint. Only ``COMPLETE.json`` means
  "finished": a stage killed before it redoes its outputs from its last checkpoint.

With LoRA (``PolicyConfig.lora``) ``final/params`` holds the trained leaves only (adapters and
a trained ``value_head``); ``model.json``'s ``lora_base`` names the frozen base (``"from"``:
``"initial"`` or the stage whose merged output it is, ``"n_layers"`` when truncated) with
its ``digest`` (``rlhf_jax.models.lora.frozen_digest``). ``load_final`` needs that base
(``base=``; ``rlhf_jax.pipeline.run.Run.load_final`` rebuilds it) and refuses one whose
digest differs. ``hf/`` is the merged model (``W + (alpha / r) A B``), an ordinary checkpoint.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import jax

from rlhf_jax.checkpoint import Checkpointer, model_fingerprint
from rlhf_jax.config import ModelConfig, RopeScaling, config_to_dict
from rlhf_jax.models.model import Model, Params
from rlhf_jax.pipeline.config import TASK_SECTIONS, PipelineConfig
from rlhf_jax.pipeline.registry import Stage, get_stage

log = logging.getLogger(__name__)

STAGE_FILE = "stage.json"
COMPLETE_FILE = "COMPLETE.json"


class ConfigChangedError(ValueError):
    """A resumed run's configuration (or an upstream stage's output) differs from what a stage
    already ran with."""


def barrier(name: str) -> None:
    """Wait for every process (a no-op with one): after process 0 changed files that the
    others read next."""
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def write_json_atomic(path: Path, obj: Any) -> None:
    """Write ``obj`` as JSON to ``path`` through a temporary file and ``os.replace`` (process 0
    only: every process computes the same content)."""
    if jax.process_index() != 0:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    os.replace(tmp, path)


# ---- final parameters -------------------------------------------------------------------
def save_params(directory: Path, model: Model, params: Params) -> None:
    """Write a stage's trained parameters to ``directory/params`` (orbax; each process writes
    its own shards, nothing is gathered on one host)."""
    params_dir = Path(directory) / "params"
    if jax.process_index() == 0:
        if params_dir.exists():
            shutil.rmtree(params_dir)  # a partial write of an interrupted earlier attempt
        params_dir.mkdir(parents=True)
    # Every process must see the directory before opening it, or their checkpoint managers
    # take different (create vs open) paths and their barriers no longer match.
    barrier("save_params")
    with Checkpointer(params_dir, max_to_keep=1) as ckpt:
        ckpt.save(0, params, {"fingerprint": model_fingerprint(model)}, force=True)


def write_model_json(directory: Path, model: Model, extra: dict | None = None) -> None:
    """Write ``directory/model.json``: the model config, its kind and ``extra``."""
    write_json_atomic(Path(directory) / "model.json",
                      {"config": config_to_dict(model.cfg), "kind": model.kind, **(extra or {})})


def save_final(directory: Path, model: Model, params: Params, extra: dict | None = None) -> None:
    """``save_params`` then ``write_model_json``: what ``load_final`` reads."""
    save_params(directory, model, params)
    write_model_json(directory, model, extra)


def _model_config_from_dict(d: dict) -> ModelConfig:
    d = dict(d)
    if d.get("rope_scaling"):
        d["rope_scaling"] = RopeScaling(**d["rope_scaling"])
    return ModelConfig(**d)


def load_final(directory: Path, *, frozen_layers: int | None = None, mesh=None,
               base: Params | None = None) -> tuple[Model, Params, dict]:
    """Read what ``save_final`` wrote: ``(model, params, extras)``.

    A reward-model ensemble (``model.json`` with ``"ensemble": K``, written by the ``rm``
    stage with ``rm.ensemble``) comes back as its stacked parameters: with
    ``"ensemble_trunk": "separate"`` every leaf is ``[K, ...]`` (member k at index k); with
    ``"shared"`` the tree is ``{"trunk": the one frozen trunk, "value_head": [K, ...]}``.
    ``model`` is then one member's scalar model.

    Args:
      directory: a stage's ``final/``.
      frozen_layers: override ``ModelConfig.frozen_layers`` (it changes execution only).
      mesh: restore each parameter straight into its shards on this mesh (the model's rule
        table; stacked members: ``ensemble_param_shardings``, the member axis replicated);
        ``None``: the default device.
      base: for a LoRA stage (``model.json`` has ``lora_base``): the plain parameter tree of
        its frozen base (the upstream output with its adapters merged, truncated as
        recorded), on which the saved adapters are put back (quantised again for QLoRA).

    Raises:
      FileNotFoundError: the stage has not finished (names the directory).
      ValueError: ``model.json`` declares an ensemble of a non-scalar model, a member count
        below 1 or an unknown ``ensemble_trunk`` (names the file); a LoRA stage without
        ``base``, or with a base whose digest differs from the recorded one.
    """
    directory = Path(directory)
    meta_path = directory / "model.json"
    if not meta_path.exists():
        raise FileNotFoundError(f"{meta_path} not found: run the stage that writes {directory} first")
    meta = json.loads(meta_path.read_text())
    cfg = _model_config_from_dict(meta["config"])
    if frozen_layers is not None:
        cfg = dataclasses.replace(cfg, frozen_layers=frozen_layers)
    model = Model(cfg, kind=meta["kind"])
    lora_ref = meta.get("lora_base")
    if lora_ref is not None and base is None:
        raise ValueError(f"{meta_path}: the stage saved LoRA adapters over a frozen base from "
                         f"{lora_ref.get('from')!r}; pass base= (its plain parameters), load it "
                         "through rlhf_jax.pipeline.run.Run.load_final, or read the merged "
                         f"model from {directory.parent / 'hf'}")
    abstract = _abstract_final_params(model, meta, mesh, meta_path)
    if lora_ref is not None:
        from rlhf_jax.models.lora import partition
        abstract = partition(abstract)[0]
    with Checkpointer(directory / "params", max_to_keep=1) as ckpt:
        params, _ = ckpt.restore(abstract, expected_fingerprint=model_fingerprint(model))
    if lora_ref is not None:
        params = _put_on_base(model, params, base, lora_ref, mesh, meta_path)
    return model, params, meta


def _put_on_base(model: Model, trained: Params, base: Params, lora_ref: dict, mesh,
                 where: Path) -> Params:
    """The full LoRA tree: ``trained`` (adapters, heads) on ``base`` (quantised as the model
    says), after checking the base's digest against ``lora_ref["digest"]``."""
    from rlhf_jax.models import lora

    heads = {k: trained[k] for k in lora.TRAINABLE_HEADS if k in trained}
    shardings = model.param_shardings(mesh) if mesh is not None else None
    full = lora.attach(model, {**base, **heads}, jax.random.key(0), shardings=shardings)
    params = lora.combine(trained, lora.partition(full)[1])
    digest = lora.frozen_digest(params)
    if digest != lora_ref.get("digest"):
        raise ValueError(f"{where}: the frozen base given has digest {digest[:16]}..., the "
                         f"adapters were trained on {str(lora_ref.get('digest'))[:16]}... (from "
                         f"{lora_ref.get('from')!r}): not the same base")
    return params


def _abstract_final_params(model: Model, meta: dict, mesh, where: Path):
    """``ShapeDtypeStruct`` tree (with shardings on ``mesh``) of what ``save_final`` wrote for
    ``model`` and ``meta``: the model's parameters, or an ensemble's stacked ones (the leading
    ``[K]`` on every leaf, or on the heads only for ``ensemble_trunk="shared"``)."""
    abstract = model.abstract_params()
    shardings = model.param_shardings(mesh) if mesh is not None else None
    k = meta.get("ensemble")
    if k:
        trunk = meta.get("ensemble_trunk") or "separate"
        if model.kind != "scalar" or not isinstance(k, int) or k < 1 or trunk not in (
                "separate", "shared"):
            raise ValueError(f"{where}: an ensemble needs kind 'scalar', ensemble >= 1 and "
                             f"ensemble_trunk 'separate' or 'shared'; got kind {model.kind!r}, "
                             f"ensemble {k!r}, ensemble_trunk {trunk!r}")
        stacked = tuple(abstract) if trunk == "separate" else ("value_head",)
        abstract = {key: (jax.tree.map(lambda a: jax.ShapeDtypeStruct((k, *a.shape), a.dtype), v)
                          if key in stacked else v) for key, v in abstract.items()}
        if mesh is not None:
            from rlhf_jax.train.reward_ensemble import ensemble_param_shardings
            members = ensemble_param_shardings(model, mesh)
            shardings = {key: members[key] if key in stacked else v
                         for key, v in shardings.items()}
    if mesh is not None:
        abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                                abstract, shardings)
    return abstract


# ---- stage records ----------------------------------------------------------------------
def _section(cfg_dict: dict, dotted: str) -> Any:
    node: Any = cfg_dict
    for part in dotted.split("."):
        node = node[part]
    return node


def _flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(obj, dict):
        out: dict[str, Any] = {}
        for k, v in obj.items():
            out.update(_flatten(v, f"{prefix}.{k}" if prefix else str(k)))
        return out or {prefix: {}}
    return {prefix: obj}


def without_off(x: Any) -> Any:
    """``x`` with every mapping entry whose value is ``None`` or ``False`` removed (recursively),
    and every non-empty mapping all of whose entries were removed (a section of options that
    are all off, e.g. ``policy.lora`` without a rank).

    Options added to the library later default to off (``None`` / ``False``): a record
    written before they existed then compares equal to one that has them switched off, while
    any option that is on (or a value that changed) still differs.
    """
    if isinstance(x, dict):
        out = {}
        for k, v in x.items():
            if v is None or v is False:
                continue
            v2 = without_off(v)
            if isinstance(v, dict) and v and not v2:
                continue
            out[k] = v2
        return out
    return x


def config_diff(old: dict, new: dict) -> list[str]:
    """Dotted fields whose values differ, as ``"field: old -> new"`` lines (sorted); options
    that are off on one side and absent on the other do not count (``without_off``)."""
    a, b = _flatten(without_off(old)), _flatten(without_off(new))
    return [f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
            for k in sorted(set(a) | set(b)) if a.get(k, "<absent>") != b.get(k, "<absent>")]


def fingerprint(record: dict) -> str:
    """SHA-256 of a stage record's canonical JSON."""
    return hashlib.sha256(json.dumps(record, sort_keys=True, default=str).encode()).hexdigest()


class StageFiles:
    """The files of one stage under ``out_dir``."""

    def __init__(self, out_dir: Path, stage: str):
        self.stage = stage
        self.dir = Path(out_dir) / stage
        self.final = self.dir / "final"
        self.hf = self.dir / "hf"
        self.checkpoints = self.dir / "checkpoints"

    @property
    def complete(self) -> bool:
        """Every artefact of the stage exists (the completion marker is written last)."""
        return (self.final / COMPLETE_FILE).exists()

    def recorded(self) -> dict | None:
        """The stage record written when the stage started, or ``None``."""
        path = self.dir / STAGE_FILE
        return json.loads(path.read_text()) if path.exists() else None

    def completed_fingerprint(self) -> str:
        """The fingerprint in ``COMPLETE.json``.

        Raises:
          FileNotFoundError: the stage has not finished (names the path).
        """
        path = self.final / COMPLETE_FILE
        if not path.exists():
            raise FileNotFoundError(f"{path} not found: stage {self.stage!r} has not finished in "
                                    f"{self.dir}; run it first")
        return json.loads(path.read_text())["fingerprint"]

    def mark_complete(self, record: dict) -> None:
        write_json_atomic(self.final / COMPLETE_FILE,
                          {"fingerprint": fingerprint(record), "time": time.time()})


def _stage_config(cfg: PipelineConfig, stage: Stage, full: dict | None = None) -> dict:
    """The ``PipelineConfig`` sections ``stage``'s result depends on, as a dict."""
    full = config_to_dict(cfg) if full is None else full
    # a task's own section (e.g. ``arithmetic``) counts only in runs of that task
    sections = stage.sections + tuple(sec for task, sec in TASK_SECTIONS.items()
                                      if cfg.task_spec == task)
    return {s: _section(full, s) for s in sections}


def stage_record(cfg: PipelineConfig, stage: Stage, out_dir: Path) -> dict:
    """What ``stage`` depends on: its config sections, the task and its inputs' fingerprints.

    Raises:
      FileNotFoundError: an input stage has not finished.
    """
    config = _stage_config(cfg, stage)
    inputs = {s: StageFiles(out_dir, s).completed_fingerprint() for s in stage.inputs_for(cfg)}
    return {"stage": stage.name, "task": cfg.task_spec, "config": config, "inputs": inputs}


def stage_identity_record(cfg: PipelineConfig, stage: str, *,
                          _memo: dict | None = None) -> dict:
    """The content address of ``stage``'s output under ``cfg``, from the configuration alone.

    The record is ``stage_record``'s with the off options dropped (``without_off``: an
    option added to the library later, off by default, keeps every address) and each input's
    fingerprint replaced by the input's own address, recursively; nothing on disk is read.
    Runs with the same address train the same output, so they can share one directory.

    Returns:
      ``{"identity": hex SHA-256 of the record's canonical JSON, "record": {"stage",
      "task", "config", "inputs": {input stage: its identity}}}``.

    Raises:
      KeyError: ``stage`` is not registered.
    """
    memo = {} if _memo is None else _memo
    if stage not in memo:
        st = get_stage(stage)
        full = memo.setdefault(None, config_to_dict(cfg))
        inputs = {s: stage_identity_record(cfg, s, _memo=memo)["identity"]
                  for s in st.inputs_for(cfg)}
        record = without_off({"stage": st.name, "task": cfg.task_spec,
                              "config": _stage_config(cfg, st, full), "inputs": inputs})
        memo[stage] = {"identity": fingerprint(record), "record": record}
    return memo[stage]


def stage_identity(cfg: PipelineConfig, stage: str) -> str:
    """``stage_identity_record(cfg, stage)["identity"]``: 64 hex digits."""
    return stage_identity_record(cfg, stage)["identity"]


def check_stage(cfg: PipelineConfig, stage: Stage, out_dir: Path) -> dict:
    """The stage's record after checking it against what the stage ran with before.

    Raises:
      ConfigChangedError: the recorded config or inputs differ (lists the fields).
      FileNotFoundError: an input stage has not finished.
    """
    record = stage_record(cfg, stage, out_dir)
    files = StageFiles(out_dir, stage.name)
    old = files.recorded()
    if old is not None and (without_off(old.get("config")), old.get("inputs"), old.get("task")) != (
            without_off(record["config"]), record["inputs"], record["task"]):
        lines = config_diff({"config": old.get("config"), "task": old.get("task")},
                            {"config": record["config"], "task": record["task"]})
        changed_inputs = [s for s in record["inputs"] if old.get("inputs", {}).get(s) != record["inputs"][s]]
        if changed_inputs:
            lines.append(f"inputs changed: {', '.join(changed_inputs)} (their configuration differs)")
        raise ConfigChangedError(
            f"stage {stage.name!r} in {files.dir} ran with a different configuration:\n  "
            + "\n  ".join(lines)
            + f"\nnothing was changed; pass --force-restart {stage.name} to run it (and what "
              "depends on it) again, or choose another --out-dir")
    return record


def check_upstream(cfg: PipelineConfig, stage_names: tuple[str, ...], out_dir: Path) -> None:
    """Check every finished stage that ``stage_names`` read (directly or not) against ``cfg``,
    so that e.g. ``rlhf-jax ppo`` with a different model width refuses instead of training
    on an SFT model of the old width.

    Raises:
      ConfigChangedError: as ``check_stage``.
    """
    seen: set[str] = set()
    todo = [i for s in stage_names
            for i in (*get_stage(s).inputs_for(cfg), *get_stage(s).optional_inputs)]
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        st = get_stage(name)
        if StageFiles(out_dir, name).recorded() is not None:
            try:
                check_stage(cfg, st, out_dir)
            except FileNotFoundError:
                pass  # its own inputs are gone: reported when it is needed
        todo.extend((*st.inputs_for(cfg), *st.optional_inputs))


def move_aside(out_dir: Path, stages: list[str]) -> list[Path]:
    """Move the directories of ``stages`` to ``<out_dir>/replaced/<stage>-<UTC time>/`` (for
    ``--force-restart``: nothing saved is deleted), with a copy of their rows of
    ``metrics.jsonl`` (the rerun replaces them there). Process 0 moves; returns the new
    paths."""
    moved = []
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    for s in stages:
        src = Path(out_dir) / s
        if not src.exists():
            continue
        dst = Path(out_dir) / "replaced" / f"{s}-{stamp}"
        if jax.process_index() == 0:
            dst.parent.mkdir(parents=True, exist_ok=True)
            os.replace(src, dst)
            metrics = Path(out_dir) / "metrics.jsonl"
            if metrics.exists():
                mine = (f'"stage": "{s}"', f'"stage": "{s}_eval"')
                rows = [line for line in metrics.read_text().splitlines(keepends=True)
                        if any(m in line for m in mine)]
                (dst / "metrics.jsonl").write_text("".join(rows))
            log.warning("%s: --force-restart moved its earlier outputs to %s", s, dst)
        moved.append(dst)
    return moved
