"""Checkpoints of whole training states with orbax, restored straight into target shardings.

A checkpoint at step ``n`` is one orbax step directory with three items:

* ``state`` - the arrays of the state pytree (``TrainState``, ``PPOState``, a dict of them,
  optax states, ``None`` leaves ...), stored as a nested ``dict`` keyed by the pytree path
  (``{'policy': {'params': {'trunk': ...}}, 'opt_state': {'0': ...}}``), so any registered
  pytree node round-trips and the files are readable without this library. Typed PRNG keys
  are stored as their raw ``jax.random.key_data`` and re-wrapped with the target's key type
  on restore; callers never see the difference.
* ``meta`` - the caller's JSON ``dict``: config (``config_to_dict``), data-iterator
  position, controller scalars, a model fingerprint (``model_fingerprint``) ...
* ``layout`` - bookkeeping of this module (format version, which leaves were PRNG keys and
  their key type).

Typical use in a training loop::

    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=3, save_interval_steps=500)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_like(state), expected_fingerprint=fingerprint)
    with PreemptionGuard() as guard:
        for step in ...:
            state, metrics = train_step(state, batch)
            check_finite(prev_loss, step - 1)      # host value of step n-1 (DeferredMetrics)
            ckpt.save(step, state, meta)           # no-op between intervals
            if guard.should_stop(step):
                ckpt.save(step, state, meta, force=True)
                break
    ckpt.close()

Nothing already saved is lost: orbax writes each step into a temporary directory and renames
it into place only once every item is complete; steps beyond ``max_to_keep`` (which must be
``>= 1``) are deleted only after the new step has been finalised, so the last good
checkpoint survives a crash or preemption in the middle of a save. Temporary directories left
by a killed process are removed when a ``Checkpointer`` opens the directory.

Errors name what was expected: a missing directory or step raises ``FileNotFoundError``
naming the directory (and the steps that exist); a checkpoint of another model raises
``ValueError`` naming the directory, the step and the first mismatching leaf path with the
expected and found shapes, or the differing fingerprint fields.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import signal
import threading
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 1
_STATE, _META, _LAYOUT = "state", "meta", "layout"


# --------------------------------------------------------------------------------------------
# Exceptions and small checks
# --------------------------------------------------------------------------------------------


class NonFiniteLossError(FloatingPointError):
    """A loss (or other watched scalar) became NaN or infinite.

    Attributes:
      step: the training step whose value was non-finite.
      name: the name of the value (``"loss"``, ``"ppo/loss/total"`` ...).
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


# --------------------------------------------------------------------------------------------
# JSON helpers
# --------------------------------------------------------------------------------------------


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: dataclasses -> dicts, tuples -> lists, enums -> values,
    NumPy/JAX scalars -> Python numbers, paths -> strings.

    Raises:
      TypeError: a value with no JSON form (naming its type and where it was found).
    """
    def convert(x, where):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: convert(getattr(x, f.name), f"{where}.{f.name}")
                    for f in dataclasses.fields(x)}
        if isinstance(x, Mapping):
            return {str(k): convert(v, f"{where}[{k!r}]") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [convert(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, enum.Enum):
            return convert(x.value, where)
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        if isinstance(x, (np.generic, np.ndarray, jax.Array)) and np.ndim(x) == 0:
            return np.asarray(x).item()
        if isinstance(x, (np.ndarray, jax.Array)):
            return np.asarray(x).tolist()
        raise TypeError(f"{where or 'value'} of type {type(x).__name__} has no JSON form")
    return convert(obj, "")


def config_to_dict(cfg: Any) -> dict:
    """A frozen config dataclass (nested ones included) as a JSON ``dict`` for ``meta``."""
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return to_jsonable(cfg)


#: ``ModelConfig`` fields that change how a model runs, not what its parameters are.
_RUNTIME_ONLY_FIELDS = ("dtype", "remat", "frozen_layers", "scan_unroll")


def model_fingerprint(model_cfg: Any) -> dict:
    """A JSON ``dict`` that identifies a model architecture, for ``meta`` and
    ``Checkpointer.restore(expected_fingerprint=...)``.

    Args:
      model_cfg: a ``rlhf_jax.config.ModelConfig``, a ``rlhf_jax.models.model.Model`` (adds its
        ``kind``) or any config dataclass.

    Returns:
      Every field of the config except those that only change execution (compute ``dtype``,
      ``remat``, ``frozen_layers``, ``scan_unroll``), with derived sizes resolved
      (``n_kv_heads``, ``head_dim``) so equal architectures compare equal however they were
      written.
    """
    kind = None
    if hasattr(model_cfg, "cfg") and hasattr(model_cfg, "kind"):  # a Model
        kind, model_cfg = model_cfg.kind, model_cfg.cfg
    fp = config_to_dict(model_cfg)
    for name in _RUNTIME_ONLY_FIELDS:
        fp.pop(name, None)
    if hasattr(model_cfg, "num_kv_heads") and "n_kv_heads" in fp:
        fp["n_kv_heads"] = model_cfg.num_kv_heads
    if hasattr(model_cfg, "per_head_dim") and "head_dim" in fp:
        fp["head_dim"] = model_cfg.per_head_dim
    if kind is not None:
        fp["kind"] = kind
    return fp


def _fingerprint_diff(expected: Any, found: Any, where: str = "") -> list[str]:
    """Human-readable differences between two JSON values (first-level keys named)."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for k in list(expected) + [k for k in found if k not in expected]:
            sub = f"{where}.{k}" if where else str(k)
            if k not in found:
                out.append(f"{sub}: expected {expected[k]!r}, missing in checkpoint")
            elif k not in expected:
                out.append(f"{sub}: not expected, checkpoint has {found[k]!r}")
            else:
                out.extend(_fingerprint_diff(expected[k], found[k], sub))
        return out
    if expected != found:
        return [f"{where or 'fingerprint'}: expected {expected!r}, found {found!r}"]
    return []


# --------------------------------------------------------------------------------------------
# State pytree <-> storable nested dict
# --------------------------------------------------------------------------------------------


def _key_name(k) -> str:
    if isinstance(k, jax.tree_util.DictKey):
        return str(k.key)
    if isinstance(k, jax.tree_util.GetAttrKey):
        return k.name
    if isinstance(k, jax.tree_util.SequenceKey):
        return str(k.idx)
    if isinstance(k, jax.tree_util.FlattenedIndexKey):
        return str(k.key)
    return str(k)


def _is_prng_key(x) -> bool:
    dtype = getattr(x, "dtype", None)
    return dtype is not None and jax.dtypes.issubdtype(dtype, jax.dtypes.prng_key)


def _flatten(tree) -> tuple[list[tuple[tuple[str, ...], Any]], Any]:
    """Leaves with their path as a tuple of strings, and the treedef."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    out, seen = [], set()
    for path, leaf in leaves:
        names = tuple(_key_name(k) for k in path) or ("value",)
        if names in seen:
            raise ValueError(f"two leaves of the state share the path {'/'.join(names)}; "
                             "use distinct keys (e.g. not both 1 and '1' in one dict)")
        seen.add(names)
        out.append((names, leaf))
    return out, treedef


def _nest(items: Sequence[tuple[tuple[str, ...], Any]]) -> dict:
    root: dict = {}
    for names, value in items:
        node = root
        for n in names[:-1]:
            node = node.setdefault(n, {})
        node[names[-1]] = value
    return root


def _lookup(nested: Mapping, names: tuple[str, ...]):
    node = nested
    for n in names:
        node = node[n]
    return node


def _path_str(names: tuple[str, ...]) -> str:
    return "/".join(names)


def _key_data_sharding(sharding, extra_dims: int):
    """Sharding of ``key_data(keys)`` given the sharding of ``keys`` (trailing dims replicated)."""
    if isinstance(sharding, jax.sharding.NamedSharding):
        spec = tuple(sharding.spec) + (None,) * extra_dims
        return jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec(*spec))
    return sharding  # single-device / fully replicated shardings carry over unchanged


def abstract_like(state: Any) -> Any:
    """``jax.ShapeDtypeStruct`` tree (shape, dtype, sharding) of a live state, as the
    ``abstract_state`` of ``Checkpointer.restore``.

    Leaves that are already ``ShapeDtypeStruct`` pass through; NumPy arrays and Python
    scalars get no sharding (they restore to the default device).
    """
    def leaf(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return x
        if isinstance(x, jax.Array):
            return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding)
        arr = np.asarray(x)
        return jax.ShapeDtypeStruct(arr.shape, arr.dtype)
    return jax.tree.map(leaf, state)


def with_shardings(abstract_tree: Any, shardings: Any) -> Any:
    """Attach a matching tree of shardings to a ``jax.eval_shape`` result."""
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sh),
                        abstract_tree, shardings)


def _to_storable(state) -> tuple[dict, dict]:
    """(nested dict of arrays, {path: key dtype} of PRNG-key leaves)."""
    items, keys = [], {}
    for names, leaf in _flatten(state)[0]:
        if isinstance(leaf, jax.ShapeDtypeStruct):
            raise TypeError(f"state leaf {_path_str(names)} is a ShapeDtypeStruct; save needs "
                            "concrete arrays")
        if _is_prng_key(leaf):
            keys[_path_str(names)] = {"dtype": str(leaf.dtype),
                                      "impl": str(jax.random.key_impl(leaf))}
            leaf = jax.random.key_data(leaf)
        elif not isinstance(leaf, jax.Array):
            leaf = np.asarray(leaf)
        items.append((names, leaf))
    return _nest(items), keys


def _abstract_storable(abstract_state) -> tuple[list, Any, dict]:
    """For each target leaf: (names, storable abstract leaf, target abstract leaf)."""
    flat, treedef = _flatten(abstract_state)
    out = []
    for names, leaf in flat:
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            leaf = abstract_like(leaf)
        if leaf.sharding is None:
            default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
            leaf = jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=default)
        if _is_prng_key(leaf):
            data = jax.eval_shape(jax.random.key_data, jax.ShapeDtypeStruct(leaf.shape, leaf.dtype))
            store = jax.ShapeDtypeStruct(
                data.shape, data.dtype,
                sharding=_key_data_sharding(leaf.sharding, len(data.shape) - len(leaf.shape)))
        else:
            store = leaf
        out.append((names, store, leaf))
    return out, treedef, _nest([(n, s) for n, s, _ in out])


# --------------------------------------------------------------------------------------------
# Checkpointer
# --------------------------------------------------------------------------------------------


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
             force: bool = False) -> bool:
        """Save ``state`` and ``meta`` as step ``step``.

        Args:
          step: the step number (the state's ``step`` usually).
          state: any pytree of arrays (typed PRNG keys allowed, ``None`` leaves allowed).
          meta: JSON-serialisable ``dict`` (use ``config_to_dict`` / ``model_fingerprint``).
          force: save even if ``step`` is not on the save interval.

        Returns:
          True if a checkpoint was written (or started, with ``async_save``); False if the
          step is off-interval or already saved (e.g. a preemption save right after a periodic
          one).

        Raises:
          TypeError: ``meta`` is not JSON-serialisable (naming the offending entry).
        """
        import orbax.checkpoint as ocp
        step = int(step)
        meta_json = to_jsonable(dict(meta or {}))
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
        tree, keys = _to_storable(state)
        layout = {"format": _FORMAT_VERSION, "prng_keys": keys}
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

    def restore_meta(self, step: int | None = None) -> dict:
        """Only the ``meta`` dict of a step (``None`` = latest); reads no arrays."""
        import orbax.checkpoint as ocp
        step = self._check_step(step)
        args = ocp.args.Composite(**{_META: ocp.args.JsonRestore()})
        out = self._manager.restore(step, args=args)
        return dict(out[_META] or {})

    def restore(self, abstract_state: Any, step: int | None = None, *,
                expected_fingerprint: Any = None, fingerprint_key: str = "fingerprint"
                ) -> tuple[Any, dict]:
        """Restore step ``step`` (``None`` = latest) into the structure and shardings of
        ``abstract_state``.

        Args:
          abstract_state: pytree of ``jax.ShapeDtypeStruct`` with ``.sharding`` set (see
            ``abstract_like``, or ``jax.eval_shape`` of the init + ``with_shardings``); live
            arrays are accepted too. Restored arrays are placed directly with these shardings
            (no host copy of the whole state). A dtype that differs from the saved one is cast.
          step: which step; ``None`` = the latest.
          expected_fingerprint: if given, compared with ``meta[fingerprint_key]`` before any
            array is read.
          fingerprint_key: where the fingerprint lives in ``meta``.

        Returns:
          ``(state, meta)``.

        Raises:
          FileNotFoundError: the directory does not exist, holds no checkpoint, or lacks
            ``step`` (the available steps are listed).
          ValueError: fingerprint mismatch (differing fields listed), or the saved tree does
            not match ``abstract_state`` (the first mismatching leaf path with the expected
            and found shapes, or the missing/unexpected leaves).
        """
        import orbax.checkpoint as ocp
        step = self._check_step(step)
        where = f"checkpoint {self.directory} step {step}"
        meta_layout = self._manager.restore(step, args=ocp.args.Composite(**{
            _META: ocp.args.JsonRestore(), _LAYOUT: ocp.args.JsonRestore()}))
        meta = dict(meta_layout[_META] or {})
        layout = dict(meta_layout[_LAYOUT] or {})

        if expected_fingerprint is not None:
            expected = to_jsonable(expected_fingerprint)
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
        except Exception as e:  # orbax raises many types; name the checkpoint and re-raise
            raise ValueError(f"{where} could not be restored into the target state: "
                             f"{type(e).__name__}: {e}") from e

        out = []
        for names, _, target in leaves:
            value = _lookup(restored, names)
            if _is_prng_key(target):
                value = jax.random.wrap_key_data(value, dtype=target.dtype)
            out.append(value)
        return jax.tree_util.tree_unflatten(treedef, out), meta

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


# --------------------------------------------------------------------------------------------
# Preemption
# --------------------------------------------------------------------------------------------


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


__all__ = [
    "Checkpointer", "PreemptionGuard", "NonFiniteLossError", "check_finite", "abstract_like",
    "with_shardings", "model_fingerprint", "config_to_dict", "to_jsonable",
]
