"""Device mesh, the logical-axis rule table, and shardings of states and batches.

Model code names *logical* axes (``batch, seq, embed, heads, kv_heads, kv, mlp, vocab,
layers, expert``); the tables below map them to the axes of a ``(data, fsdp, expert,
tensor)`` mesh:

* ``data``  - pure data parallelism (parameters replicated),
* ``fsdp``  - data parallelism with parameters, gradients and optimizer state sharded
  (ZeRO-3 / FSDP, Rajbhandari et al. 2020),
* ``expert`` - the experts of a mixture-of-experts model split across devices (GShard,
  Lepikhin et al. 2021): each device holds ``E / expert`` experts of every layer; it is also
  a data axis (batches are split over it), and it has size 1 for dense models,
* ``tensor`` - Megatron-style tensor parallelism over heads and MLP width (Shoeybi et al. 2019).

Parameters and activations use separate tables: a parameter's ``embed`` axis is sharded
over ``fsdp`` while an activation's ``batch`` axis is; both cannot use the same mesh axis.
Shardings are derived, never hand-placed: ``param_shardings`` reads the logical axes each
parameter carries (see ``rlhf_jax.models``) and a parameter without one, with a name the
table does not cover, or with a dimension its mesh axes do not divide, raises ``ValueError``
naming its path. Activations are only hinted (``constrain``): a dimension that does not divide
is left unconstrained with a ``ShardingWarning`` (an error when strict).
"""

from __future__ import annotations

import dataclasses
import os
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
DATA_AXES = ("data", "fsdp", "expert")  # the mesh axes a batch dimension is split over

LogicalRules = Mapping[str, str | tuple[str, ...] | None]

#: Logical axis -> mesh axis for parameters (and optimizer state, which mirrors them).
PARAM_RULES: LogicalRules = {
    "vocab": "tensor",
    "embed": "fsdp",
    "heads": "tensor",
    "kv_heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "layers": None,
    "norm": "fsdp",  # norm scales are split like the width they scale (FSDP shards every tensor)
    "positions": None,
    "scalar": None,
    "expert": "expert",
    "lora_rank": None,  # LoRA adapters' rank axis (small): replicated
}

#: Logical axis -> mesh axis for activations (``constrain``).
ACTIVATION_RULES: LogicalRules = {
    "batch": DATA_AXES,
    "seq": None,
    "embed": None,
    "heads": "tensor",
    "kv_heads": "tensor",
    "kv": None,
    "mlp": "tensor",
    "vocab": "tensor",
    "layers": None,
    "cache_seq": None,
    "candidates": None,
}


@dataclasses.dataclass(frozen=True, kw_only=True)
class MeshConfig:
    """Shape of the ``(data, fsdp, expert, tensor)`` device mesh.

    Attributes:
      data: size of the data-parallel axis; ``-1`` takes every device not used by the others.
      fsdp: size of the fully-sharded data-parallel axis.
      expert: size of the expert-parallel axis (must divide a mixture-of-experts model's
        ``num_experts``; batches are split over it too).
      tensor: size of the tensor-parallel axis (must divide heads, kv heads and MLP width).
    """

    data: int = -1
    fsdp: int = 1
    tensor: int = 1
    expert: int = 1

    def __post_init__(self):
        for name in ("fsdp", "tensor", "expert"):
            if getattr(self, name) < 1:
                raise ValueError(f"MeshConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.data == 0 or self.data < -1:
            raise ValueError(f"MeshConfig.data must be -1 or >= 1, got {self.data}")

    def shape(self, num_devices: int) -> tuple[int, int, int, int]:
        """Resolved ``(data, fsdp, expert, tensor)`` for ``num_devices``; raises if they do
        not multiply."""
        inner = self.fsdp * self.expert * self.tensor
        data = num_devices // inner if self.data == -1 else self.data
        if data * inner != num_devices:
            raise ValueError(
                f"mesh data={self.data} x fsdp={self.fsdp} x expert={self.expert} x "
                f"tensor={self.tensor} does not match the {num_devices} available devices")
        return data, self.fsdp, self.expert, self.tensor


def make_mesh(cfg: MeshConfig = MeshConfig(), devices: Sequence[Any] | None = None) -> Mesh:
    """A ``(data, fsdp, expert, tensor)`` mesh over ``devices`` (default: all, across processes).

    Axis types are ``Auto`` (GSPMD propagation; ``with_sharding_constraint`` is a hint).
    """
    devices = jax.devices() if devices is None else list(devices)
    shape = cfg.shape(len(devices))
    if devices == jax.devices():
        return jax.make_mesh(shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    return Mesh(np.asarray(devices).reshape(shape), MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def _mesh_axis_size(mesh: Mesh | jax.sharding.AbstractMesh, axes) -> int:
    if axes is None:
        return 1
    axes = (axes,) if isinstance(axes, str) else axes
    return int(np.prod([mesh.shape[a] for a in axes]))


def logical_to_spec(logical_axes: Sequence[str | None], rules: LogicalRules, *,
                    shape: Sequence[int] | None = None, mesh=None, where: str = "array") -> P:
    """``PartitionSpec`` for an array whose dimensions carry ``logical_axes``.

    Args:
      logical_axes: one logical name (or ``None`` = replicated) per dimension.
      rules: ``PARAM_RULES`` or ``ACTIVATION_RULES`` (or a user table).
      shape: if given with ``mesh``, each sharded dimension must divide its mesh axes.
      mesh: the mesh, for the divisibility check.
      where: a name for error messages (the parameter path).

    Raises:
      ValueError: unknown logical name, a mesh axis used twice, or a dimension that the mesh
        axis size does not divide.
    """
    spec, used = [], set()
    for dim, name in enumerate(logical_axes):
        if name is None:
            spec.append(None)
            continue
        if name not in rules:
            raise ValueError(f"{where}: logical axis {name!r} has no sharding rule "
                             f"(known: {sorted(rules)})")
        mesh_axes = rules[name]
        flat = () if mesh_axes is None else ((mesh_axes,) if isinstance(mesh_axes, str) else tuple(mesh_axes))
        if mesh is not None:
            # A mesh axis of size 1 shards nothing; dropping it keeps specs readable.
            flat = tuple(a for a in flat if mesh.shape[a] > 1)
        if used.intersection(flat):
            raise ValueError(f"{where}: mesh axes {flat} used twice in {tuple(logical_axes)}")
        used.update(flat)
        if shape is not None and mesh is not None and flat:
            size = _mesh_axis_size(mesh, flat)
            if shape[dim] % size:
                raise ValueError(
                    f"{where}: dimension {dim} ({name!r}) has size {shape[dim]}, not divisible by "
                    f"mesh axes {flat} of size {size}")
        spec.append(None if not flat else (flat[0] if len(flat) == 1 else flat))
    return P(*spec)


def tree_shardings(abstract_tree, logical_tree, mesh: Mesh, rules: LogicalRules = PARAM_RULES):
    """``NamedSharding`` for every leaf of ``abstract_tree`` from a matching tree of logical axes.

    Raises:
      ValueError: a leaf has no logical axes, or their count differs from its rank.
    """
    flat_shapes = jax.tree_util.tree_flatten_with_path(abstract_tree)[0]
    flat_axes, treedef = jax.tree_util.tree_flatten(
        logical_tree, is_leaf=lambda x: isinstance(x, tuple) or x is None)
    if len(flat_axes) != len(flat_shapes):
        raise ValueError(f"logical-axes tree has {len(flat_axes)} leaves, the state has "
                         f"{len(flat_shapes)}")
    out = []
    for (path, leaf), axes in zip(flat_shapes, flat_axes):
        where = jax.tree_util.keystr(path)
        if axes is None:
            raise ValueError(f"parameter {where} carries no logical axes: no sharding rule covers it")
        if len(axes) != len(leaf.shape):
            raise ValueError(f"parameter {where}: {len(axes)} logical axes {axes} for shape "
                             f"{tuple(leaf.shape)}")
        out.append(NamedSharding(mesh, logical_to_spec(axes, rules, shape=leaf.shape, mesh=mesh,
                                                       where=where)))
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(abstract_tree), out)


def replicated(mesh: Mesh) -> NamedSharding:
    """Fully replicated sharding (scalars, RNG keys, step counters)."""
    return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh, ndim: int, batch_dim: int = 0) -> NamedSharding:
    """Sharding of a batch array: ``batch_dim`` split over ``(data, fsdp)``, the rest replicated."""
    spec = [None] * ndim
    spec[batch_dim] = DATA_AXES
    return NamedSharding(mesh, P(*spec))


def data_parallel_size(mesh: Mesh) -> int:
    """Number of batch shards (``data x fsdp``)."""
    return _mesh_axis_size(mesh, DATA_AXES)


def local_batch_shards(mesh: Mesh) -> int:
    """Number of distinct batch shards (of ``data x fsdp``) held by this process's devices.

    ``data_parallel_size(mesh)`` with one process; with several, a process feeds
    ``local_batch_shards(mesh) / data_parallel_size(mesh)`` of the global batch.
    """
    dp = data_parallel_size(mesh)
    if jax.process_count() == 1:
        return dp
    index_map = batch_sharding(mesh, 1).addressable_devices_indices_map((dp,))
    return len({idx[0].indices(dp) for idx in index_map.values()})


def shard_batch(batch, mesh: Mesh):
    """Place a host batch (pytree of arrays with leading batch dim) on the mesh.

    With one process ``batch`` is the global batch. With several (``jax.process_count() > 1``)
    it is this process's rows: the contiguous rows of the global batch that its devices hold
    (``jax.make_array_from_process_local_data``), so the global batch is
    ``rows x data_parallel_size / local_batch_shards``. Scalars are replicated (every process
    must pass the same value).

    Raises:
      ValueError: the batch size is not divisible by ``data x fsdp`` (one process) or by this
        process's number of batch shards (several), naming both numbers.
    """
    dp = data_parallel_size(mesh)
    local = local_batch_shards(mesh)

    def put(path, x):
        x = np.asarray(x)
        if x.ndim == 0:
            if jax.process_count() > 1:
                return jax.make_array_from_process_local_data(replicated(mesh), x, x.shape)
            return jax.device_put(x, replicated(mesh))
        if jax.process_count() == 1:
            if x.shape[0] % dp:
                raise ValueError(f"batch field {jax.tree_util.keystr(path)} has batch size "
                                 f"{x.shape[0]}, not divisible by the mesh's data x fsdp = {dp}")
            return jax.device_put(x, batch_sharding(mesh, x.ndim))
        if x.shape[0] % local:
            raise ValueError(
                f"batch field {jax.tree_util.keystr(path)} has {x.shape[0]} rows on process "
                f"{jax.process_index()}, not divisible by the {local} batch shards (of data x "
                f"fsdp = {dp}) that its devices hold")
        return jax.make_array_from_process_local_data(batch_sharding(mesh, x.ndim), x)

    return jax.tree_util.tree_map_with_path(put, batch)


class ShardingWarning(UserWarning):
    """An activation sharding that could not be applied as the rule table asks (see
    :func:`constrain`). Turn it into an error with ``warnings.simplefilter("error",
    ShardingWarning)`` or ``constrain(..., strict=True)``."""


#: (logical axes, shape, mesh axis sizes) already warned about by :func:`constrain`.
_WARNED: set[tuple] = set()

#: Environment variable that makes :func:`constrain` strict by default (``1``: raise).
STRICT_ENV = "RLHF_JAX_STRICT_SHARDING"


def constrain(x: jax.Array, logical_axes: Sequence[str | None],
              rules: LogicalRules = ACTIVATION_RULES, *, strict: bool | None = None) -> jax.Array:
    """``with_sharding_constraint`` by logical axes under the current mesh; no-op without one.

    Call inside jitted code run under ``jax.set_mesh(mesh)`` (the trainers do this).

    A dimension whose size its mesh axes do not divide (a vocabulary of 50,257 over
    ``tensor=2``, a batch of 6 over ``data x fsdp = 4``) would need padding; that dimension is
    left ``PartitionSpec.UNCONSTRAINED`` (GSPMD chooses) while every other dimension keeps its
    constraint, and a :class:`ShardingWarning` names the dimension, its logical axis, its size
    and the mesh axes with their size - once per (logical axes, shape, mesh).

    Args:
      x: the array (traced or concrete), ``len(logical_axes)`` dimensions.
      logical_axes: one logical name (or ``None``) per dimension of ``x``.
      rules: logical -> mesh axis table (default ``ACTIVATION_RULES``).
      strict: raise instead of warning; ``None`` reads ``RLHF_JAX_STRICT_SHARDING`` (``1`` is
        strict).

    Raises:
      ValueError: a dimension does not divide and ``strict``; an unknown logical name or a mesh
        axis used twice (from :func:`logical_to_spec`); a rank mismatch.
    """
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return x
    if len(logical_axes) != x.ndim:
        raise ValueError(f"constrain: {len(logical_axes)} logical axes {tuple(logical_axes)} for "
                         f"an array of shape {tuple(x.shape)}")
    spec = list(logical_to_spec(logical_axes, rules, mesh=mesh))
    bad = []
    for dim, axes in enumerate(spec):
        size = _mesh_axis_size(mesh, axes)
        if axes is not None and x.shape[dim] % size:
            flat = (axes,) if isinstance(axes, str) else tuple(axes)
            bad.append(f"dimension {dim} ({logical_axes[dim]!r}) has size {x.shape[dim]}, not "
                       f"divisible by mesh axes {flat} of size {size}")
            spec[dim] = P.UNCONSTRAINED
    if bad:
        if strict is None:
            strict = os.environ.get(STRICT_ENV, "") == "1"
        what = f"constrain{tuple(logical_axes)} on shape {tuple(x.shape)}: " + "; ".join(bad)
        if strict:
            raise ValueError(what)
        key = (tuple(logical_axes), tuple(x.shape), tuple(mesh.shape.items()))
        if key not in _WARNED:
            _WARNED.add(key)
            warnings.warn(f"{what}; left unconstrained there (the other dimensions keep their "
                          f"sharding)", ShardingWarning, stacklevel=2)
    return jax.lax.with_sharding_constraint(x, P(*spec))


def initialize_distributed(coordinator_address: str | None = None, num_processes: int | None = None,
                           process_id: int | None = None, local_device_ids=None) -> None:
    """Wire up several processes (``jax.distributed.initialize``) before any other JAX call.

    With no arguments, reads ``RLHF_JAX_COORDINATOR``, ``RLHF_JAX_NUM_PROCESSES`` and
    ``RLHF_JAX_PROCESS_ID`` from the environment if set, else lets JAX auto-detect (Cloud TPU,
    SLURM). A single process with nothing set is a no-op.
    """
    coordinator_address = coordinator_address or os.environ.get("RLHF_JAX_COORDINATOR")
    if num_processes is None and "RLHF_JAX_NUM_PROCESSES" in os.environ:
        num_processes = int(os.environ["RLHF_JAX_NUM_PROCESSES"])
    if process_id is None and "RLHF_JAX_PROCESS_ID" in os.environ:
        process_id = int(os.environ["RLHF_JAX_PROCESS_ID"])
    if coordinator_address is None and num_processes is None:
        if os.environ.get("TPU_WORKER_HOSTNAMES") or os.environ.get("SLURM_JOB_ID"):
            jax.distributed.initialize()
        return
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id,
                               local_device_ids=local_device_ids)
