"""Integrity of saved and restored states: per-array checksums and finiteness flags.

Per array, two 32-bit checksums of its raw bits: the sum of its 32-bit words, and the sum over
words of MurmurHash3's ``fmix32(word + position * 0x9E3779B9)`` (position = 1 + row-major
index), both modulo 2**32 (2- and 1-byte dtypes are widened word by word, 8-byte ones split in
two), plus a NaN/Inf flag for floating-point arrays. ``_integrity`` computes them on the device
in one jitted reduction per set of devices the leaves live on; sharded arrays are reduced where
they live (modular sums do not depend on the order or the sharding) and only the small
``[n, 3]`` result reaches the host. ``_all_processes`` makes every process agree on whether a
step is usable.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np


_CHECKSUM_ALGORITHM = "u32sum+fmix32sum"
_FLAG_NAN, _FLAG_INF = 1, 2


def _words_u32(x):
    """The raw bits of ``x`` as uint32 words (traced; 8-byte items give a trailing dim of 2)."""
    if jnp.issubdtype(x.dtype, jnp.complexfloating):
        x = jnp.stack([jnp.real(x), jnp.imag(x)], axis=-1)
    if x.dtype == jnp.bool_:
        return x.astype(jnp.uint32)
    if x.dtype in (jnp.int4, jnp.uint4):  # sub-byte: one value per word
        return x.astype(jnp.int32 if x.dtype == jnp.int4 else jnp.uint32).astype(jnp.uint32)
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
    leaves = list(leaves)
    for i, x in enumerate(leaves):
        if isinstance(x, jax.Array) and isinstance(x.sharding, jax.sharding.NamedSharding):
            key = tuple(sorted(d.id for d in x.sharding.device_set))
        else:  # host NumPy, or a single-device array (e.g. a host leaf restored by orbax)
            key = "host"
            if isinstance(x, jax.Array):
                leaves[i] = np.asarray(x)
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
