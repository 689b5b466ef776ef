"""LoRA and QLoRA over plain parameter trees: adapters, the trainable split, merging,
quantising the frozen base, and the base's digest.

**What a LoRA model is.** With ``ModelConfig.lora`` set (``rlhf_jax.config.LoraConfig``), every
targeted projection (``Dense`` named ``q, k, v, o`` in the attention, ``gate, up, down`` in the
MLP) computes

    ``y = x W + (alpha / r) (drop(x) A) B``      (Hu et al. 2021, "LoRA", eq. 3 and §4.1)

with ``A = lora_a [*in, r]`` (random, ``N(0, 1 / fan_in)``) and ``B = lora_b [r, *out]``
(zeros), so a fresh adapter adds exactly ``+0.0`` and the model computes what its base
computes. Inside the stacked blocks both carry the leading ``[L]`` axis; their logical axes
are the kernel's input (``A``) or output (``B``) axes plus ``"lora_rank"`` (unsharded).
``Model.apply(..., adapters=False)`` skips every adapter: the base model, from the same
parameters, with no copy. ``drop`` is dropout on the adapter's input, only when a training
step passes a key (``Model.apply(..., dropout_rng=)``).

**QLoRA.** With ``LoraConfig.quantize_base`` the *targeted* projections' frozen kernels are
stored quantised (Dettmers et al. 2023, "QLoRA", §3): ``kernel_q`` (``int8`` or ``int4``, the
kernel's shape and logical axes) and ``kernel_scale`` (float32; symmetric absmax, one scale per
output channel, or per block of ``LoraConfig.block_size`` entries of the last input axis), and
dequantised in the forward (``qwix.dequantize``). Everything else (embeddings, norms, heads,
untargeted projections) stays in ``param_dtype``. QLoRA's NF4 data type and double
quantisation are not implemented: qwix's ``int4`` with float32 scales is used instead.

**What trains.** ``trainable_filter``: the adapters and the scalar ``value_head`` (the head a
reward or value model starts fresh); everything else is the frozen base. Train steps take
gradients only with respect to the trainable leaves and the optimizer holds state only for
them (``rlhf_jax.train.state``); checkpoints and final artefacts store them and refer to the
frozen base by its origin and ``frozen_digest``.

**Merging.** ``merge_adapters`` folds ``W + (alpha / r) A B`` into each kernel (dequantising a
quantised one) and returns the plain model's tree, which the HF converter writes as an
ordinary checkpoint, and which a later stage uses as its new frozen base.

**Why the adapters are ours and the quantisation is qwix's.** qwix (the JAX quantisation
library; ``qwix.apply_lora_to_model``) adds LoRA to a Flax NNX model by rewriting the module's
class and creating the adapter parameters as attributes while the model *runs* once. Our
blocks are stacked with ``nnx.vmap`` and run under one ``jax.lax.scan`` over modules merged
inside the scan body, and our parameters are plain ``dict`` s merged into the graph inside pure
functions: qwix's parameter creation inside the scanned body fails (tried with qwix 0.1.8:
``flax.errors.TraceContextError``, its RNG stream is mutated from inside the scan's trace)
and, were it to succeed, would create per-iteration parameters that never reach the stacked
tree, the optimizer, orbax or the sharding rules. So ``A`` and ``B`` are ordinary leaves of
``Dense`` (created at ``__init__``, stacked like every block parameter), and qwix serves the
part it is built for: ``qwix.quantize`` / ``qwix.QArray`` / ``qwix.dequantize`` for the frozen
base.
"""

from __future__ import annotations

import hashlib
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.config import LORA_PROJECTIONS

Params = Any

#: Leaf names of the adapters of one ``Dense``.
ADAPTER_KEYS = ("lora_a", "lora_b")
#: Leaf names of a quantised kernel.
QUANTIZED_KEYS = ("kernel_q", "kernel_scale")
#: Top-level parameter subtrees that train with LoRA besides the adapters: the scalar head a
#: reward / value model starts fresh.
TRAINABLE_HEADS = ("value_head",)
#: Logical name of the adapters' rank axis (replicated: ``rlhf_jax.sharding.PARAM_RULES``).
RANK_AXIS = "lora_rank"

_QTYPES = {"int8": jnp.int8, "int4": jnp.int4}

#: A fixed number per projection name: its adapter's dropout stream within a layer.
LORA_PROJECTION_IDS = {name: i for i, name in enumerate(LORA_PROJECTIONS)}


# ---- array-level pieces (used by ``Dense``) ------------------------------------------------
def init_lora_a(key: jax.Array, in_shape: tuple[int, ...], rank: int, dtype) -> jax.Array:
    """``A [*in, r]`` ``~ N(0, 1 / fan_in)``, ``fan_in = prod(in_shape)`` (Hu et al. 2021 §4.1:
    a random Gaussian ``A``, ``B = 0``)."""
    fan_in = math.prod(in_shape)
    return jax.random.normal(key, (*in_shape, rank), dtype) / math.sqrt(fan_in)


def quantize_kernel(w: jax.Array, n_lead: int, n_in: int, qtype: str,
                    block_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Symmetric absmax quantisation of a kernel ``[*lead, *in, *out]`` with ``qwix.quantize``.

    One scale per output channel (and per leading index: the stacked layers), reduced over the
    input axes; with ``block_size`` the last input axis is split into blocks of that many
    entries, each with its own scale (Dettmers et al. 2023 §2, block-wise quantisation).

    Args:
      w: float kernel.
      n_lead: leading axes (1 for stacked block parameters, else 0).
      n_in: input axes.
      qtype: ``"int8"`` or ``"int4"``.
      block_size: entries per block of the last input axis, or ``None``.

    Returns:
      ``(qvalue, scale)``: ``qvalue`` of ``w``'s shape in ``int8`` / ``int4``; ``scale`` float32
      of ``w``'s rank, 1 on the reduced input axes (``in_last / block_size`` on the last one
      with blocks). ``dequantize_kernel(qvalue, scale)`` approximates ``w``.

    Raises:
      ValueError: an unknown ``qtype``; a ``block_size`` that does not divide the last input
        axis.
    """
    import qwix

    if qtype not in _QTYPES:
        raise ValueError(f"quantize_kernel: qtype must be one of {sorted(_QTYPES)}, got {qtype!r}")
    ndim = w.ndim
    channels = tuple(range(n_lead)) + tuple(range(n_lead + n_in, ndim))
    tiled = {}
    if block_size is not None:
        last_in = n_lead + n_in - 1
        if w.shape[last_in] % block_size:
            raise ValueError(f"quantize_kernel: block_size={block_size} does not divide the last "
                             f"input axis of size {w.shape[last_in]} (kernel {w.shape})")
        tiled = {last_in: block_size}
    q = qwix.quantize(w.astype(jnp.float32), _QTYPES[qtype], channelwise_axes=channels,
                      tiled_axes=tiled)
    return q.qvalue, q.scale


def dequantize_kernel(qvalue: jax.Array, scale: jax.Array) -> jax.Array:
    """``qvalue * scale`` (the scale broadcast over its blocks) as float32 (``qwix.dequantize``
    of the ``qwix.QArray``). In the forward this runs inside the layer scan: one layer's float
    kernel exists at a time, transiently."""
    import qwix

    return qwix.dequantize(qwix.QArray(qvalue=qvalue, scale=scale, qtype=qvalue.dtype))


def _letters(n: int, start: str) -> str:
    return "".join(chr(ord(start) + i) for i in range(n))


def adapter_delta(lora_a: jax.Array, lora_b: jax.Array, n_lead: int) -> jax.Array:
    """``A B`` over the rank: ``[*lead, *in, r] x [*lead, r, *out] -> [*lead, *in, *out]``
    float32 (unscaled; multiply by ``LoraConfig.scale``)."""
    n_in = lora_a.ndim - n_lead - 1
    n_out = lora_b.ndim - n_lead - 1
    lead, i, o = _letters(n_lead, "a"), _letters(n_in, "i"), _letters(n_out, "o")
    return jnp.einsum(f"{lead}{i}r,{lead}r{o}->{lead}{i}{o}", lora_a.astype(jnp.float32),
                      lora_b.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST)


# ---- trees --------------------------------------------------------------------------------
def _names(path) -> list[str]:
    return [str(getattr(k, "key", getattr(k, "name", k))) for k in path]


def has_adapters(params: Params) -> bool:
    """Whether ``params`` holds any LoRA adapter leaf (``lora_a`` / ``lora_b``)."""
    for path, _ in jax.tree_util.tree_flatten_with_path(params)[0]:
        if _names(path)[-1:] and _names(path)[-1] in ADAPTER_KEYS:
            return True
    return False


def is_trainable_path(names: list[str]) -> bool:
    """Whether a leaf at ``names`` trains under LoRA: an adapter, or inside a fresh scalar head
    (``TRAINABLE_HEADS``)."""
    return bool(names) and (names[-1] in ADAPTER_KEYS or names[0] in TRAINABLE_HEADS)


def trainable_filter(params: Params) -> Params:
    """``bool`` tree matching ``params``: True for the leaves that train under LoRA (the
    adapters and the ``value_head``), False for the frozen base."""
    return jax.tree_util.tree_map_with_path(lambda p, _: is_trainable_path(_names(p)), params)


def select(tree: Params, filt: Params, keep: bool = True) -> Params:
    """``tree`` with ``None`` wherever ``filt`` is not ``keep`` (``None`` placeholders stay
    ``None``): the trainable (``keep=True``) or frozen (``keep=False``) part, no copies."""
    return jax.tree.map(lambda f, x: x if f == keep else None, filt, tree)


def partition(params: Params) -> tuple[Params, Params]:
    """``(trainable, frozen)``: ``params`` split by ``trainable_filter``, each with ``None`` at
    the other's leaves; ``combine`` undoes it. No array is copied."""
    filt = trainable_filter(params)
    return select(params, filt, True), select(params, filt, False)


def combine(trainable: Params, frozen: Params) -> Params:
    """The tree whose leaves come from ``trainable`` where it has one, else from ``frozen``
    (the inverse of ``partition``)."""
    return jax.tree.map(lambda t, f: f if t is None else t, trainable, frozen,
                        is_leaf=lambda x: x is None)


def _dense_dicts(tree, path=()):
    """``(path, dict)`` of every ``Dense`` with adapters in a nested-dict tree."""
    if isinstance(tree, dict):
        if "lora_a" in tree:
            yield path, tree
            return
        for k, v in tree.items():
            yield from _dense_dicts(v, (*path, k))


def _n_lead(d: dict) -> int:
    kernel = d["kernel"] if d.get("kernel") is not None else d["kernel_q"]
    return d["lora_a"].ndim + d["lora_b"].ndim - 2 - kernel.ndim


def _replace_at(tree: dict, path: tuple, value) -> dict:
    if not path:
        return value
    return {**tree, path[0]: _replace_at(tree[path[0]], path[1:], value)}


def plain_model(model):
    """``model``'s architecture and kind without LoRA (``cfg.lora = None``). Build it outside
    any trace: a ``Model`` is built eagerly."""
    import dataclasses

    from rlhf_jax.models.model import Model

    if model.cfg.lora is None:
        return model
    return Model(dataclasses.replace(model.cfg, lora=None), kind=model.kind)


def merge_adapters(model, params: Params):
    """Fold every adapter into its kernel: ``W' = W + (alpha / r) A B`` (Hu et al. 2021 §4.1,
    "no additional inference latency"), a quantised ``W`` dequantised first.

    Args:
      model: the LoRA ``rlhf_jax.models.model.Model`` whose tree ``params`` is (a model without
        LoRA comes back unchanged, with ``params``).
      params: its parameters.

    Returns:
      ``(plain_model(model), merged)``: the same architecture without ``cfg.lora`` and its
      tree, every kernel in ``cfg.param_dtype`` (``merged_params``; jit that one, with
      ``out_shardings``, for large models).
    """
    return plain_model(model), merged_params(model, params)


def merged_params(model, params: Params) -> Params:
    """The ``merged`` tree of ``merge_adapters`` alone (pure: builds no ``Model``, so it can be
    jitted under a mesh)."""
    if model.cfg.lora is None:
        return params
    scale = model.cfg.lora.scale
    pdt = jnp.dtype(model.cfg.param_dtype)
    out = params
    for path, d in list(_dense_dicts(params)):
        n_lead = _n_lead(d)
        if d.get("kernel_q") is not None:
            w = dequantize_kernel(d["kernel_q"], d["kernel_scale"])
        else:
            w = d["kernel"].astype(jnp.float32)
        merged = (w + scale * adapter_delta(d["lora_a"], d["lora_b"], n_lead)).astype(pdt)
        new = {k: v for k, v in d.items() if k not in (*ADAPTER_KEYS, *QUANTIZED_KEYS)}
        new["kernel"] = merged
        out = _replace_at(out, path, new)
    return out


def attach(model, base: Params, rng: jax.Array, *, shardings=None) -> Params:
    """``model``'s LoRA tree from a plain ``base`` tree: each targeted kernel quantised when
    ``cfg.lora.quantize_base`` is set (``quantize_kernel``), fresh adapters (``A`` random from
    ``rng`` exactly as ``model.init(rng)`` draws it, ``B = 0``), every other leaf ``base``'s.

    Args:
      model: a ``Model`` with ``cfg.lora``.
      base: the plain (``cfg.lora = None``) tree of the same architecture and kind, e.g. an
        upstream stage's ``merge_adapters`` output or a loaded HF checkpoint.
      rng: typed key of the adapters.
      shardings: ``NamedSharding`` tree of ``model``'s params (``Model.param_shardings``): the
        result is computed under jit straight into them. ``None``: default placement.

    Returns:
      The parameter tree of ``model`` (``Model.abstract_params`` structure).

    Raises:
      ValueError: ``model`` has no LoRA, or ``base`` lacks a leaf of the model / has another
        shape (naming the path).
    """
    if model.cfg.lora is None:
        raise ValueError("lora.attach: the model has no LoRA (ModelConfig.lora is None)")
    abstract = model.abstract_params()
    cfg = model.cfg.lora

    def check(path, a):
        names = _names(path)
        if names[-1] in (*ADAPTER_KEYS, "kernel_scale"):
            return
        if names[-1] in QUANTIZED_KEYS:
            names = names[:-1] + ["kernel"]
        node = base
        for n in names:
            if not isinstance(node, dict) or n not in node:
                raise ValueError(f"lora.attach: the base parameters lack {'/'.join(names)} of the "
                                 f"{model.kind!r} model")
            node = node[n]
        if tuple(node.shape) != tuple(a.shape):
            raise ValueError(f"lora.attach: base {'/'.join(names)} has shape {tuple(node.shape)}; "
                             f"the model expects {tuple(a.shape)}")

    jax.tree_util.tree_map_with_path(check, abstract)

    def build(base, rng):
        fresh = model.init(rng)  # only the adapters are used: the rest is dead code under jit

        def leaf(path, _):
            names = _names(path)
            if names[-1] in ADAPTER_KEYS:
                return _get(fresh, names)
            if names[-1] in QUANTIZED_KEYS:
                dense = _get(base, names[:-1])
                fresh_d = _get(fresh, names[:-1])
                n_lead = fresh_d["lora_a"].ndim + fresh_d["lora_b"].ndim - 2 - dense["kernel"].ndim
                n_in = fresh_d["lora_a"].ndim - n_lead - 1
                q, s = quantize_kernel(dense["kernel"], n_lead, n_in, cfg.quantize_base,
                                       cfg.block_size)
                return q if names[-1] == "kernel_q" else s
            return _get(base, names)
        return jax.tree_util.tree_map_with_path(leaf, abstract)

    base = {k: base[k] for k in abstract}  # drop subtrees the model does not have
    if shardings is None:
        return jax.jit(build)(base, rng)
    return jax.jit(build, out_shardings=shardings)(base, rng)


def _get(tree, names):
    for n in names:
        tree = tree[n]
    return tree


def frozen_digest(params: Params) -> str:
    """SHA-256 (hex) of the frozen base of a LoRA tree: every non-trainable leaf's path,
    shape, dtype and two 32-bit checksums of its bits (``rlhf_jax.checkpoint.integrity``,
    computed on the device where the arrays live; nothing is gathered). A checkpoint or final
    artefact records it, so restoring its adapters onto another base is refused."""
    from rlhf_jax.checkpoint.integrity import _integrity

    frozen = partition(params)[1]
    flat = jax.tree_util.tree_flatten_with_path(frozen)[0]
    rows = _integrity([x for _, x in flat]) if flat else np.zeros((0, 3), np.uint32)
    h = hashlib.sha256()
    for (path, x), row in zip(flat, rows):
        h.update(f"{'/'.join(_names(path))}:{tuple(x.shape)}:{x.dtype}:{int(row[0])}:"
                 f"{int(row[1])};".encode())
    return h.hexdigest()


def nbytes(params: Params) -> int:
    """Bytes of the arrays in ``params`` (``int4`` counted as JAX stores it on the host: one
    byte per value; packed on TPU)."""
    return sum(int(x.nbytes) for x in jax.tree.leaves(params))


__all__ = [
    "ADAPTER_KEYS", "QUANTIZED_KEYS", "RANK_AXIS", "TRAINABLE_HEADS", "adapter_delta", "attach",
    "combine", "dequantize_kernel", "frozen_digest", "has_adapters", "init_lora_a",
    "is_trainable_path", "merge_adapters", "merged_params", "nbytes", "partition",
    "plain_model", "quantize_kernel", "select", "trainable_filter",
]
