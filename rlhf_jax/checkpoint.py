"""Checkpoints of whole training states with orbax, restored straight into target shardings.

A checkpoint at step ``n`` is one orbax step directory with three items:

* ``state`` - the arrays of the state pytree (``TrainState``, ``PPOState``, a dict of them,
  optax states, ``None`` leaves ...), stored as a nested ``dict`` keyed by the pytree path
  (``{'policy': {'params': {'trunk': ...}}, 'opt_state': {'0': ...}}``), so any registered
  pytree node round-trips and the files are readable without this library. Typed PRNG keys
  are stored as their raw ``jax.random.key_data`` and re-wrapped with the target's key type
  on restore; callers never see the difference.
* ``meta`` - the caller's JSON ``dict``: config (``rlhf_jax.config.config_to_dict``),
  data-iterator position, controller scalars, a model fingerprint (``model_fingerprint``) ...
* ``layout`` - bookkeeping of this module: format version, which leaves were PRNG keys and
  their key type, and one checksum per array (below).

Typical use (``rlhf_jax.train.loop.run_loop`` adds SIGTERM handling and NaN stops)::

    ckpt = Checkpointer(out_dir / "checkpoints", max_to_keep=3, save_interval_steps=500)
    if ckpt.latest_step() is not None:
        state, meta = ckpt.restore(abstract_like(state), expected_fingerprint=fingerprint)
    for step in ...:
        state, metrics = train_step(state, batch)
        ckpt.save(step, state, meta)               # no-op between intervals
    ckpt.close()

Good by construction:

* **Never a non-finite state.** ``save`` first checks every floating-point leaf (parameters,
  optimizer moments ...) for NaN/Inf and raises ``NonFiniteStateError`` naming the first bad
  leaf instead of writing anything.
* **Checksums.** ``save`` stores, per array, two 32-bit checksums of its raw bits: the sum of
  its 32-bit words, and the sum over words of MurmurHash3's ``fmix32(word + position *
  0x9E3779B9)`` (position = 1 + row-major index), both modulo 2**32 (2- and 1-byte dtypes are
  widened word by word, 8-byte ones split in two).
  They are computed on the device by one jitted reduction over the whole state (one per set
  of devices the leaves live on, normally one; host NumPy leaves form their own), which also
  yields the finiteness flags, so a save pulls one small array to the host; sharded arrays
  are reduced where they live (modular sums do not depend on the order or the sharding), and
  nothing is gathered on one host. ``restore`` recomputes them on the restored arrays, in
  their target shardings, and compares (leaves restored into another dtype are not compared).
  Any single flipped bit changes the first sum; other damage (zero-filled or misplaced
  blocks, several flips) changes the second with probability ``1 - 2**-32``. They detect
  damage, not tampering (they are not cryptographic).
* **Fallback.** ``restore()`` of the latest step tries the steps from newest to oldest: a
  step whose files are missing, truncated or corrupt, whose ``meta``/``layout`` JSON is empty
  or invalid, whose checksums do not match or whose values are not finite is skipped with one
  log line naming the bad and the restored step. If no step is usable it raises
  ``CheckpointError`` with a one-line message naming the directory and what is wrong with each
  step (library tracebacks go to ``logging.debug``). ``set_aside_after(step)`` then moves the
  unusable newer steps into ``<directory>/unusable/`` so the resumed run can save them again.

Nothing already saved is lost: orbax writes each step into a temporary directory and renames
it into place only once every item is complete; steps beyond ``max_to_keep`` (which must be
``>= 1``) are deleted only after the new step has been finalised, so the last good
checkpoint survives a crash or preemption in the middle of a save. Temporary directories left
by a killed process are removed when a ``Checkpointer`` opens the directory.

Errors name what was expected: a missing directory or step raises ``FileNotFoundError``
naming the directory (and the steps that exist); a checkpoint of another model raises
``ValueError`` naming the directory, the step and the first mismatching leaf path with the
expected and found shapes, or the differing fingerprint fields (no fallback: an older step of
the same directory would be of the same other model).
"""

from __future__ import annotations

import contextlib
import functools
import gc
import json
import logging
import math
import os
import sys
import time
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import config_to_dict as _config_to_dict
from rlhf_jax.config import to_jsonable as _to_jsonable

logger = logging.getLogger(__name__)

_FORMAT_VERSION = 2  # 2: layout holds "checksums"; format-1 checkpoints restore unverified
_STATE, _META, _LAYOUT = "state", "meta", "layout"
_UNUSABLE_DIR = "unusable"


# --------------------------------------------------------------------------------------------
# Exceptions
# --------------------------------------------------------------------------------------------


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


# --------------------------------------------------------------------------------------------
# Fingerprints
# --------------------------------------------------------------------------------------------


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
    fp = _config_to_dict(model_cfg)
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


def _to_storable(state) -> tuple[dict, dict, list[tuple[str, Any]]]:
    """(nested dict of arrays, {path: key dtype} of PRNG-key leaves, [(path, stored array)])."""
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
    return _nest(items), keys, [(_path_str(n), x) for n, x in items]


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
# Integrity: per-array checksums and finiteness flags in one jitted reduction
# --------------------------------------------------------------------------------------------

_CHECKSUM_ALGORITHM = "u32sum+fmix32sum"
_FLAG_NAN, _FLAG_INF = 1, 2


def _words_u32(x):
    """The raw bits of ``x`` as uint32 words (traced; 8-byte items give a trailing dim of 2)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    size = jnp.dtype(x.dtype).itemsize
    if size == 4:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    if size in (1, 2):
        return jax.lax.bitcast_convert_type(x, jnp.uint8 if size == 1 else jnp.uint16
                                            ).astype(jnp.uint32)
    if size == 8:
        return jax.lax.bitcast_convert_type(x, jnp.uint32)
    raise TypeError(f"no checksum for dtype {x.dtype}")


def _fmix32(h):
    """MurmurHash3's 32-bit finaliser (Appleby 2011): a bijective avalanche mix of uint32."""
    h = h ^ (h >> 16)
    h = h * jnp.uint32(0x85EBCA6B)
    h = h ^ (h >> 13)
    h = h * jnp.uint32(0xC2B2AE35)
    return h ^ (h >> 16)


def _leaf_row(x):
    """``[sum of words, sum of fmix32(word + position * golden), flag]`` as uint32 (sums
    modulo 2**32; position = 1 + row-major index); flag is ``_FLAG_NAN`` / ``_FLAG_INF`` / 0
    for floating-point leaves, 0 otherwise."""
    w = _words_u32(x)
    pos = jnp.ones(w.shape, jnp.uint32)
    stride = 1
    for axis in reversed(range(w.ndim)):  # computed per axis: no reshape of a sharded array
        pos = pos + jax.lax.broadcasted_iota(jnp.uint32, w.shape, axis) * jnp.uint32(stride)
        stride = (stride * w.shape[axis]) % 2**32
    s1 = jnp.sum(w, dtype=jnp.uint32)
    s2 = jnp.sum(_fmix32(w + pos * jnp.uint32(0x9E3779B9)), dtype=jnp.uint32)
    if jnp.issubdtype(x.dtype, jnp.inexact):
        flag = jnp.where(jnp.isnan(x).any(), jnp.uint32(_FLAG_NAN),
                         jnp.where(jnp.isinf(x).any(), jnp.uint32(_FLAG_INF), jnp.uint32(0)))
    else:
        flag = jnp.uint32(0)
    return jnp.stack([s1, s2, flag])


def _stack_rows(leaves: list) -> jax.Array:
    return jnp.stack([_leaf_row(x) for x in leaves])


@functools.lru_cache(maxsize=None)
def _integrity_fn(out_sharding):
    """The jitted reduction; with a mesh its small result is replicated on the mesh, so every
    process holds all of it."""
    return jax.jit(_stack_rows, out_shardings=out_sharding)


def _host_small(x) -> np.ndarray:
    """A small replicated jit output on the host, also when other processes share it."""
    if getattr(x, "is_fully_addressable", True):
        return np.asarray(x)
    return np.asarray(x.addressable_data(0))


def _integrity(leaves: Sequence[Any]) -> np.ndarray:
    """``[n, 3]`` uint32 rows ``(sum, positional sum, flag)`` for ``leaves`` (stored arrays).

    One jitted reduction per set of devices the leaves live on (one in a normal state; host
    NumPy leaves form their own), and one transfer of the small result.
    """
    groups: dict[Any, list[int]] = {}
    for i, x in enumerate(leaves):
        if isinstance(x, jax.Array):
            key = tuple(sorted(d.id for d in x.sharding.device_set))
        else:
            key = "host"
        groups.setdefault(key, []).append(i)
    rows = np.zeros((len(leaves), 3), np.uint32)
    outs = []
    for idx in groups.values():
        first = leaves[idx[0]]
        mesh_sharding = getattr(first, "sharding", None)
        out_sharding = None
        if isinstance(mesh_sharding, jax.sharding.NamedSharding):
            out_sharding = jax.sharding.NamedSharding(mesh_sharding.mesh,
                                                      jax.sharding.PartitionSpec())
        outs.append((idx, _integrity_fn(out_sharding)([leaves[i] for i in idx])))
    for idx, out in outs:
        rows[idx] = _host_small(out)
    return rows


def _all_processes(ok: bool) -> bool:
    """Whether ``ok`` holds on every process (a collective when there are several), so that
    all processes skip or restore the same checkpoint step."""
    if jax.process_count() == 1:
        return ok
    from jax.experimental import multihost_utils
    return bool(np.all(multihost_utils.process_allgather(np.asarray([int(ok)], np.int32))))


def _flag_value(flag: int) -> float:
    return math.nan if flag == _FLAG_NAN else math.inf


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


__all__ = [
    "Checkpointer", "CheckpointError", "NonFiniteStateError", "abstract_like", "with_shardings",
    "model_fingerprint",
]
