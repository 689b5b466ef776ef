"""State pytrees <-> the nested ``dict`` that a checkpoint stores, and abstract targets.

A state is stored as a nested ``dict`` keyed by the pytree path (``_flatten``, ``_nest``), with
typed PRNG keys replaced by their raw ``jax.random.key_data`` (``_to_storable``). On restore,
``_abstract_storable`` turns the target's abstract tree (``abstract_like`` of a live state, or
``jax.eval_shape`` of the init + ``with_shardings``) into the matching storable tree with
shardings, so arrays are read straight into their target shardings.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import jax
import numpy as np


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


__all__ = ["abstract_like", "with_shardings"]
