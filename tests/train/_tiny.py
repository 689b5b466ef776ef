"""Shared tiny models, batches and comparison helpers of the train-step tests.

Everything here builds *inputs*; no code under test is re-implemented.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from rlhf_jax.config import ModelConfig
from rlhf_jax.types import PreferenceBatch, SFTBatch, positions_from_mask

# Heads (4), KV heads (2), MLP width (64) and vocab (64) divide tensor=2; d_model divides fsdp=4.
TINY = ModelConfig(arch="llama", vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2,
                   mlp_dim=64, max_positions=64)
EOS, PAD = 2, 0


def _positions(mask: np.ndarray) -> np.ndarray:
    return np.asarray(positions_from_mask(mask)).astype(np.int32)


def sft_batch(b: int = 8, t: int = 12, seed: int = 0, *, vocab: int = TINY.vocab_size) -> SFTBatch:
    """Host ``SFTBatch``: left padding of varying length, targets on a varying response tail;
    row 1 has no target at all (a filler row)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(b, t), dtype=np.int32)
    pad = rng.integers(0, t // 3, size=(b,))
    pad[0] = 0
    attn = np.arange(t)[None, :] >= pad[:, None]
    start = rng.integers(t // 2, t - 1, size=(b,))
    loss = (np.arange(t)[None, :] >= start[:, None]) & attn
    loss[1] = False
    tokens = np.where(attn, tokens, PAD).astype(np.int32)
    return SFTBatch(tokens=tokens, attn_mask=attn, positions=_positions(attn), loss_mask=loss)


def pref_batch(b: int = 8, n: int = 2, t: int = 12, seed: int = 0, *, valid=None,
               vocab: int = TINY.vocab_size) -> PreferenceBatch:
    """Host ``PreferenceBatch [B, N, T]``: a shared prompt per row (right padding, as the data
    pipeline collates), responses of varying lengths; invalid slots hold real tokens with
    ``loss_mask`` False, as ``collate_preferences`` fills them."""
    rng = np.random.default_rng(seed)
    valid = np.ones((b, n), bool) if valid is None else np.asarray(valid, bool)
    p = t // 3
    tokens = rng.integers(3, vocab, size=(b, n, t), dtype=np.int32)
    tokens[:, :, :p] = tokens[:, :1, :p]                     # same prompt for every candidate
    length = rng.integers(p + 2, t + 1, size=(b, n))
    attn = np.arange(t)[None, None, :] < length[..., None]
    loss = attn & (np.arange(t) >= p) & valid[..., None]
    tokens = np.where(attn, tokens, PAD).astype(np.int32)
    return PreferenceBatch(tokens=tokens, attn_mask=attn, positions=_positions(attn),
                           loss_mask=loss, valid=valid)


def prompts(b: int = 8, p: int = 6, seed: int = 0, *, vocab: int = TINY.vocab_size):
    """Left-padded prompts ``([B, P] int32, [B, P] bool)`` (row 0 unpadded)."""
    rng = np.random.default_rng(seed)
    tokens = rng.integers(3, vocab, size=(b, p), dtype=np.int32)
    pad = rng.integers(0, p // 2, size=(b,))
    pad[0] = 0
    mask = np.arange(p)[None, :] >= pad[:, None]
    return np.where(mask, tokens, PAD).astype(np.int32), mask


def sgd(lr: float = 1.0) -> optax.GradientTransformation:
    """Plain SGD: the update is linear in the gradient, so equal gradients give equal params."""
    return optax.sgd(lr)


def assert_tree_close(actual, expected, atol: float = 1e-5, rtol: float = 0.0):
    """Leaf-wise ``assert_allclose`` naming the path of the first mismatch."""
    flat_a, tree_a = jax.tree_util.tree_flatten_with_path(actual)
    flat_e, tree_e = jax.tree_util.tree_flatten(expected)
    assert tree_a == tree_e, f"tree structures differ:\n{tree_a}\n{tree_e}"
    for (path, a), e in zip(flat_a, flat_e):
        np.testing.assert_allclose(np.asarray(a), np.asarray(e), atol=atol, rtol=rtol,
                                   err_msg=jax.tree_util.keystr(path))


def host(tree):
    """Copy a pytree of (possibly sharded) arrays to NumPy (typed keys as their key data)."""
    def copy(x):
        if jnp.issubdtype(jnp.asarray(x).dtype, jax.dtypes.prng_key):
            x = jax.random.key_data(x)
        return np.asarray(x)
    return jax.tree.map(copy, tree)


def reduced(metrics) -> dict[str, float]:
    """``reduce_metrics`` as Python floats."""
    from rlhf_jax.losses.logprobs import reduce_metrics
    return {k: float(v) for k, v in reduce_metrics(metrics).items()}


# ---- parameters -------------------------------------------------------------------------
# One jitted (sharded) init for the whole test package: compiling an init costs seconds on
# CPU. The "lm_value" tree holds the trunk, the LM head and a scalar head; the "lm" and
# "scalar" trees are its sub-dicts (exactly what those kinds' ``init`` would build).
KIND_KEYS = {"lm": ("trunk", "lm_head"), "scalar": ("trunk", "value_head"),
             "lm_value": ("trunk", "lm_head", "value_head")}


@functools.cache
def _mesh_and_sharded_params(seed: int = 0):
    from rlhf_jax.models.model import Model
    from rlhf_jax.sharding import MeshConfig, make_mesh
    mesh = make_mesh(MeshConfig(fsdp=4, tensor=2))
    return mesh, Model(TINY, kind="lm_value").init_sharded(jax.random.key(seed), mesh)


def fsdp_tensor_mesh():
    """The ``(data=1, fsdp=4, tensor=2)`` mesh over the 8 fake CPU devices."""
    return _mesh_and_sharded_params()[0]


def sharded_params(kind: str):
    """Parameters of ``Model(TINY, kind)`` from ``Model.init_sharded`` on ``fsdp_tensor_mesh()``."""
    params = _mesh_and_sharded_params()[1]
    return {k: params[k] for k in KIND_KEYS[kind]}


@functools.cache
def host_params(kind: str):
    """The same parameters as NumPy arrays (place them on one device with ``on_device``).
    Cached: treat as read-only."""
    return host(sharded_params(kind))


def perturbed(params, scale: float = 0.05, seed: int = 1):
    """``params + scale * N(0, 1)`` leaf-wise (a reference policy different from the policy)."""
    rng = np.random.default_rng(seed)
    return jax.tree.map(lambda x: (np.asarray(x) + scale * rng.standard_normal(np.shape(x)))
                        .astype(np.asarray(x).dtype), params)


def on_device(tree):
    """Host pytree -> arrays on the default (single) device."""
    return jax.tree.map(jnp.asarray, tree)


class TraceCounter:
    """Wraps a pure step function and counts how often ``jax.jit`` traces it."""

    def __init__(self, fn):
        self.fn = fn
        self.count = 0
        functools.update_wrapper(self, fn)

    def __call__(self, *args, **kwargs):
        self.count += 1
        return self.fn(*args, **kwargs)
