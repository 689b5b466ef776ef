"""``Checkpointer``: save and restore whole training states with orbax (the format and its
guarantees are described in the ``rlhf_jax.checkpoint`` package docstring).

A step directory holds three orbax items: ``state`` (the arrays, as ``tree._to_storable``
lays them out), ``meta`` (the caller's JSON ``dict``) and ``layout`` (format version, PRNG-key
leaves and the per-array checksums of ``integrity``).
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Mapping
from typing import Any

import jax
import numpy as np

from rlhf_jax.checkpoint.errors import (CheckpointError, NonFiniteStateError,
                                        _library_noise_to_debug, _reason, _Unusable)
from rlhf_jax.checkpoint.fingerprint import _fingerprint_diff
from rlhf_jax.checkpoint.integrity import (_CHECKSUM_ALGORITHM, _all_processes, _flag_value,
                                           _integrity)
from rlhf_jax.checkpoint.tree import (_abstract_storable, _is_prng_key, _key_name, _lookup,
                                      _path_str, _to_storable)
from rlhf_jax.config import to_jsonable as _to_jsonable

# One logger for the whole package, named after it, so callers filter on "rlhf_jax.checkpoint".
logger = logging.getLogger("rlhf_jax.checkpoint")

_FORMAT_VERSION = 2  # 2: layout holds "checksums"; format-1 checkpoints restore unverified
_STATE, _META, _LAYOUT = "state", "meta", "layout"
_UNUSABLE_DIR = "unusable"


def _resolve_dir(directory) -> str:
    d = os.fspath(directory)
    return d if "://" in d else os.path.abspath(os.path.expanduser(d))


class Checkpointer:
    """Save and restore full training states with an orbax ``CheckpointManager``.

    Args:
      directory: where step directories go (local path or a ``gs://`` URL). It is created at
        the first ``save``, not before, so a mistyped path given only for restoring is not
        silently created.
      max_to_keep: number of most recent steps kept (``>= 1``; ``None`` keeps all). Old steps
        are deleted only after the new one is complete.
      save_interval_steps: ``save`` is a no-op unless ``step % save_interval_steps == 0``
        (or ``force=True``).
      async_save: write in a background thread. ``save`` still returns only after the
        device-to-host copy, so the caller may donate the state to the next step at once;
        call ``wait()`` (or ``close()``) before reading the files or exiting.

    Raises:
      ValueError: ``max_to_keep < 1`` or ``save_interval_steps < 1``.
    """

    def __init__(self, directory, *, max_to_keep: int | None = 3, save_interval_steps: int = 1,
                 async_save: bool = False):
        if max_to_keep is not None and max_to_keep < 1:
            raise ValueError(f"Checkpointer.max_to_keep must be >= 1 (or None = keep all), got "
                             f"{max_to_keep}: keeping 0 would delete the last good checkpoint")
        if save_interval_steps < 1:
            raise ValueError(f"Checkpointer.save_interval_steps must be >= 1, got "
                             f"{save_interval_steps}")
        self.directory = _resolve_dir(directory)
        self.max_to_keep = max_to_keep
        self.save_interval_steps = save_interval_steps
        self.async_save = async_save
        self._manager = None
        if self._dir_exists():
            self._open(create=False)

    # ---- orbax plumbing -------------------------------------------------------------------
    def _dir_exists(self) -> bool:
        from etils import epath
        return epath.Path(self.directory).is_dir()

    def _open(self, create: bool):
        import orbax.checkpoint as ocp
        options = ocp.CheckpointManagerOptions(
            max_to_keep=self.max_to_keep,
            save_interval_steps=self.save_interval_steps,
            create=create,
            cleanup_tmp_directories=True,
            enable_async_checkpointing=self.async_save,
        )
        handlers = {
            _STATE: ocp.StandardCheckpointHandler(),
            _META: ocp.JsonCheckpointHandler(),
            _LAYOUT: ocp.JsonCheckpointHandler(),
        }
        self._manager = ocp.CheckpointManager(self.directory, options=options,
                                              item_handlers=handlers)

    # ---- public API ------------------------------------------------------------------------
    def latest_step(self) -> int | None:
        """The newest complete step in the directory, or ``None``."""
        if self._manager is None:
            return None
        return self._manager.latest_step()

    def all_steps(self) -> list[int]:
        """Every complete step in the directory, ascending."""
        if self._manager is None:
            return []
        return sorted(self._manager.all_steps())

    def save(self, step: int, state: Any, meta: Mapping[str, Any] | None = None, *,
             force: bool = False, require_finite: bool = True) -> bool:
        """Save ``state`` and ``meta`` as step ``step``, with a checksum per array.

        Args:
          step: the step number (the state's ``step`` usually).
          state: any pytree of arrays (typed PRNG keys allowed, ``None`` leaves allowed).
          meta: JSON-serialisable ``dict`` (use ``rlhf_jax.config.config_to_dict`` and
            ``model_fingerprint``).
          force: save even if ``step`` is not on the save interval.
          require_finite: refuse a state with a NaN/Inf in any floating-point leaf.

        Returns:
          True if a checkpoint was written (or started, with ``async_save``); False if the
          step is off-interval or already saved (e.g. a preemption save right after a periodic
          one).

        Raises:
          TypeError: ``meta`` is not JSON-serialisable (naming the offending entry).
          NonFiniteStateError: ``require_finite`` and a leaf holds NaN/Inf (nothing written).
        """
        import orbax.checkpoint as ocp
        step = int(step)
        meta_json = _to_jsonable(dict(meta or {}))
        json.dumps(meta_json)  # fail here, before anything is written
        if self._manager is None:
            self._open(create=True)
        if step in self._manager.all_steps():
            logger.info("checkpoint step %d already exists in %s; not saving again", step,
                        self.directory)
            return False
        latest = self._manager.latest_step()
        if latest is not None and step < latest:
            logger.warning("saving step %d below the latest checkpoint %d in %s%s; restore() "
                           "without a step still picks %d", step, latest, self.directory,
                           "" if force else " skipped (pass force=True)", latest)
        if not force and not self._manager.should_save(step):
            return False
        tree, keys, flat = _to_storable(state)
        rows = _integrity([x for _, x in flat]) if flat else np.zeros((0, 3), np.uint32)
        if require_finite:
            for (path, _), row in zip(flat, rows):
                if row[2]:
                    raise NonFiniteStateError(step, path, _flag_value(int(row[2])),
                                              self.directory)
        checksums = {path: [str(x.dtype), int(r[0]), int(r[1])] for (path, x), r in zip(flat, rows)}
        layout = {"format": _FORMAT_VERSION, "prng_keys": keys,
                  "checksum_algorithm": _CHECKSUM_ALGORITHM, "checksums": checksums}
        saved = self._manager.save(step, args=ocp.args.Composite(**{
            _STATE: ocp.args.StandardSave(tree),
            _META: ocp.args.JsonSave(meta_json),
            _LAYOUT: ocp.args.JsonSave(layout),
        }), force=force)
        return bool(saved)

    def _check_step(self, step: int | None) -> int:
        if self._manager is None:
            raise FileNotFoundError(f"checkpoint directory {self.directory} does not exist")
        steps = sorted(self._manager.all_steps())
        if not steps:
            raise FileNotFoundError(f"no checkpoint in {self.directory}")
        if step is None:
            return steps[-1]
        if int(step) not in steps:
            raise FileNotFoundError(f"no checkpoint for step {step} in {self.directory}; "
                                    f"available steps: {steps}")
        return int(step)

    def _read_json_item(self, step: int, item: str) -> dict:
        """The ``meta`` or ``layout`` dict of ``step``; ``_Unusable`` if missing or invalid."""
        import orbax.checkpoint as ocp
        try:
            out = self._manager.restore(step, args=ocp.args.Composite(
                **{item: ocp.args.JsonRestore()}))[item]
        except Exception as e:  # orbax/json raise many types
            logger.debug("%s step %d: reading %r failed", self.directory, step, item, exc_info=True)
            raise _Unusable(f"its {item!r} item is missing or invalid JSON ({_reason(e)})") from e
        if not isinstance(out, dict):
            raise _Unusable(f"its {item!r} item is {type(out).__name__}, not a JSON object")
        return dict(out)

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the ``meta`` dict of a step (``None`` = latest); reads no arrays.

        Raises:
          FileNotFoundError: no such directory or step.
          CheckpointError: the step's ``meta`` is missing or not valid JSON (no fallback here).
        """
        step = self._check_step(step)
        try:
            return self._read_json_item(step, _META)
        except _Unusable as e:
            raise CheckpointError(f"checkpoint {self.directory} step {step} is unusable: "
                                  f"{e.reason}", self.directory, {step: e.reason}) from None

    def restore(self, abstract_state: Any, step: int | None = None, *,
                expected_fingerprint: Any = None, fingerprint_key: str = "fingerprint",
                verify: bool = True) -> tuple[Any, dict]:
        """Restore step ``step`` (``None`` = the newest usable one) into the structure and
        shardings of ``abstract_state``.

        With ``step=None`` the steps are tried from the newest down: an unusable step (missing,
        truncated or corrupt files, ``meta``/``layout`` missing or not JSON, checksum
        mismatch, non-finite values) is skipped with one warning naming it and the step
        restored instead.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set (see
            ``abstract_like``, or ``jax.eval_shape`` of the init + ``with_shardings``); live
            arrays are accepted too. Restored arrays are placed directly with these shardings
            (no host copy of the whole state). A dtype that differs from the saved one is cast
            (its checksum is then not compared).
          step: which step; ``None`` = the newest usable one.
          expected_fingerprint: if given, compared with ``meta[fingerprint_key]`` before any
            array is read.
          fingerprint_key: where the fingerprint lives in ``meta``.
          verify: compare the stored checksums and check that every floating-point value is
            finite (one jitted reduction over the restored state).

        Returns:
          ``(state, meta)``.

        Raises:
          FileNotFoundError: the directory does not exist, holds no checkpoint, or lacks
            ``step`` (the available steps are listed).
          CheckpointError: no usable step (``step=None``) or ``step`` is unusable; the message
            names the directory and what is wrong with each step tried.
          ValueError: fingerprint mismatch (differing fields listed), or the saved tree does
            not match ``abstract_state`` (the first mismatching leaf path with the expected
            and found shapes, or the missing/unexpected leaves). No fallback: older steps in
            the same directory are of the same other model.
        """
        newest = self._check_step(step)
        candidates = [newest] if step is not None else sorted(self._manager.all_steps(),
                                                                reverse=True)
        problems: dict[int, str] = {}
        for s in candidates:
            try:
                with _library_noise_to_debug():
                    state, meta = self._restore_step(s, abstract_state, expected_fingerprint,
                                                     fingerprint_key, verify)
            except _Unusable as e:
                problems[s] = e.reason
                continue
            if problems:
                if len(problems) == 1:
                    (b, r), = problems.items()
                    what = f"step {b} is unusable ({r})"
                else:
                    what = (f"steps {', '.join(map(str, problems))} are unusable ("
                            + "; ".join(f"step {b}: {r}" for b, r in problems.items()) + ")")
                logger.warning("checkpoint %s: %s; restored step %d instead", self.directory,
                               what, s)
            return state, meta
        if step is not None:
            message = f"checkpoint {self.directory} step {newest} is unusable: {problems[newest]}"
        else:
            message = (f"no usable checkpoint in {self.directory}: "
                       + "; ".join(f"step {b}: {r}" for b, r in problems.items()))
        raise CheckpointError(message, self.directory, problems)

    def _restore_step(self, step: int, abstract_state: Any, expected_fingerprint: Any,
                      fingerprint_key: str, verify: bool) -> tuple[Any, dict]:
        """Restore one step; ``_Unusable`` for damage, ``ValueError`` for another model."""
        import orbax.checkpoint as ocp
        where = f"checkpoint {self.directory} step {step}"
        problem = None
        try:
            meta = self._read_json_item(step, _META)
            layout = self._read_json_item(step, _LAYOUT)
        except _Unusable as e:
            problem = e
        if not _all_processes(problem is None):
            raise problem or _Unusable("another process could not read its meta/layout")

        if expected_fingerprint is not None:
            expected = _to_jsonable(expected_fingerprint)
            if fingerprint_key not in meta:
                raise ValueError(f"{where} has no {fingerprint_key!r} in its meta (keys: "
                                 f"{sorted(meta)}); cannot check it is the expected model")
            diff = _fingerprint_diff(expected, meta[fingerprint_key])
            if diff:
                raise ValueError(f"{where} was saved for a different model/config: "
                                 + "; ".join(diff))

        leaves, treedef, abstract_nested = _abstract_storable(abstract_state)
        self._check_structure(step, where, leaves, layout)
        try:
            restored = self._manager.restore(step, args=ocp.args.Composite(**{
                _STATE: ocp.args.StandardRestore(abstract_nested)}))[_STATE]
        except Exception as e:  # orbax/TensorStore raise many types, with long dumps
            logger.debug("%s: reading the arrays failed", where, exc_info=True)
            problem = _Unusable(f"its arrays cannot be read ({_reason(e)})")
        if not _all_processes(problem is None):
            raise problem or _Unusable("another process could not read its arrays")

        stored = [_lookup(restored, names) for names, _, _ in leaves]
        if verify and stored:
            self._verify(step, [_path_str(n) for n, _, _ in leaves], stored, layout)
        out = []
        for (names, _, target), value in zip(leaves, stored):
            if _is_prng_key(target):
                value = jax.random.wrap_key_data(value, dtype=target.dtype)
            out.append(value)
        return jax.tree_util.tree_unflatten(treedef, out), meta

    def _verify(self, step: int, paths: list[str], stored: list, layout: dict) -> None:
        """Compare checksums with ``layout`` and check finiteness; ``_Unusable`` on failure."""
        rows = _integrity(stored)
        sums = layout.get("checksums")
        if sums is None:
            logger.debug("%s step %d: format %s layout has no checksums; only finiteness is "
                         "checked", self.directory, step, layout.get("format"))
            sums = {}
        elif layout.get("checksum_algorithm") != _CHECKSUM_ALGORITHM:
            raise _Unusable(f"unknown checksum algorithm {layout.get('checksum_algorithm')!r}")
        for path, value, row in zip(paths, stored, rows):
            saved = sums.get(path)
            if saved is not None and saved[0] == str(value.dtype):
                if [int(row[0]), int(row[1])] != [int(saved[1]), int(saved[2])]:
                    raise _Unusable(f"checksum mismatch in leaf {path} (saved {saved[1]:08x}/"
                                    f"{saved[2]:08x}, read {int(row[0]):08x}/{int(row[1]):08x}):"
                                    " the array data is corrupt")
            if row[2]:
                raise _Unusable(f"leaf {path} holds {_flag_value(int(row[2]))} values")

    def set_aside_after(self, step: int) -> list[int]:
        """Move every step newer than ``step`` to ``<directory>/unusable/<n>.<unix time>``.

        A run that ``restore`` had to resume from an older step (the newer ones were unusable)
        calls this so that it can save those step numbers again; the moved directories are
        kept for inspection, not deleted. In a multi-process run every process calls it;
        process 0 moves the files.

        Returns:
          The steps moved, ascending.
        """
        from etils import epath
        newer = [s for s in self.all_steps() if s > int(step)]
        if not newer:
            return []
        if jax.process_index() == 0:
            root = epath.Path(self.directory)
            dest = root / _UNUSABLE_DIR
            dest.mkdir(parents=True, exist_ok=True)
            stamp = int(time.time())
            for s in newer:  # step directories are named by the bare step number
                (root / str(s)).rename(dest / f"{s}.{stamp}")
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils
            multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
        self._manager.reload()
        logger.warning("checkpoint %s: moved unusable step%s %s to %s/ (resuming from step %d)",
                       self.directory, "s" if len(newer) > 1 else "", ", ".join(map(str, newer)),
                       os.path.join(self.directory, _UNUSABLE_DIR), step)
        return newer

    def _check_structure(self, step: int, where: str, leaves, layout: dict) -> None:
        """Compare saved tree metadata with the target; raise a ValueError naming a leaf."""
        try:
            saved = self._manager.item_metadata(step)[_STATE]
        except Exception:  # metadata unreadable: leave it to orbax's own errors
            return
        if saved is None:
            return
        saved_flat = {}
        for path, m in jax.tree_util.tree_flatten_with_path(
                saved, is_leaf=lambda x: hasattr(x, "shape") and hasattr(x, "dtype"))[0]:
            saved_flat[tuple(_key_name(k) for k in path)] = m
        saved_keys = layout.get("prng_keys", {})
        target_names = set()
        for names, store, target in leaves:
            target_names.add(names)
            path = _path_str(names)
            if names not in saved_flat:
                raise ValueError(f"{where}: leaf {path} (shape {tuple(target.shape)}) is missing "
                                 f"from the checkpoint; it holds {len(saved_flat)} leaves, e.g. "
                                 f"{', '.join(_path_str(n) for n in list(saved_flat)[:3])}")
            found = tuple(saved_flat[names].shape)
            if _is_prng_key(target) != (path in saved_keys):
                kind = "a PRNG key" if _is_prng_key(target) else "an array"
                raise ValueError(f"{where}: leaf {path}: expected {kind}, the checkpoint has "
                                 f"{'a PRNG key' if path in saved_keys else 'a plain array'}")
            if path in saved_keys and saved_keys[path]["dtype"] != str(target.dtype):
                raise ValueError(f"{where}: leaf {path}: expected PRNG key type {target.dtype}, "
                                 f"found {saved_keys[path]['dtype']}")
            if found != tuple(store.shape):
                shown_exp = tuple(target.shape)
                shown_found = found[:len(found) - (len(store.shape) - len(target.shape))]
                raise ValueError(f"{where}: leaf {path}: expected shape {shown_exp}, found "
                                 f"{shown_found} (a checkpoint of another model or config?)")
        extra = [n for n in saved_flat if n not in target_names]
        if extra:
            raise ValueError(f"{where}: the checkpoint has {len(extra)} leaves the target state "
                             f"lacks, first: {_path_str(extra[0])} (shape "
                             f"{tuple(saved_flat[extra[0]].shape)})")

    def wait(self) -> None:
        """Block until every pending (async) save is complete on disk."""
        if self._manager is not None:
            self._manager.wait_until_finished()

    def close(self) -> None:
        """Wait for pending saves and release the manager."""
        if self._manager is not None:
            self._manager.wait_until_finished()
            self._manager.close()
            self._manager = None

    def __enter__(self) -> "Checkpointer":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Checkpointer({self.directory!r}, max_to_keep={self.max_to_keep}, "
                f"save_interval_steps={self.save_interval_steps}, async_save={self.async_save})")


__all__ = ["Checkpointer"]
