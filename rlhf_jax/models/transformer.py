"""Decoder-only transformer trunk (Flax NNX): the shared core of every architecture family.

A family (``rlhf_jax.models.families``, named by ``ModelConfig.arch``) declares a
``BlockSpec``; this module implements every variant it can ask for:

* norms: RMSNorm (Zhang & Sennrich 2019), Gemma's ``(1 + w)`` RMSNorm, LayerNorm with bias
  (Ba et al. 2016), always computed in float32; optional q/k norms per head (Qwen3, Gemma 3)
  or over the projected width (OLMo 2);
* positions: rotary embeddings (Su et al. 2021) in the rotate-half convention of HF
  transformers, full or partial (``rotary_dim``, GPT-NeoX/Phi), with linear / llama3 /
  yarn / dynamic NTK scaling (``rlhf_jax.models.rope``), a separate base for sliding
  layers (Gemma 3) and NoPE layers (SmolLM3); or a learned table (GPT-2);
* attention: multi-head / grouped-query (Ainslie et al. 2023), a score scale, tanh
  soft-capping of the scores (Gemma 2), a sliding window per layer with local/global
  interleaving (``layer_types``);
* MLP: gated (SwiGLU / GeGLU, Shazeer 2020) or plain, with SiLU, tanh-GELU or erf-GELU; or
  a dropless top-k mixture of gated experts (Mixtral, Qwen3-MoE) whose routers' summed
  statistics ride in the layer scan's carry and give the load-balancing loss;
* residual layouts: pre-norm, parallel (GPT-NeoX), sandwich (pre- and post-norms, Gemma
  2/3) and post-norm (OLMo 2); embedding scaling by ``sqrt(D)`` (Gemma) or by
  ``embedding_multiplier``, residual branches scaled by ``residual_multiplier`` (Granite).

The ``L`` blocks are *stacked* (each block parameter has a leading ``layers`` axis, created
with ``nnx.vmap``) and run with one ``jax.lax.scan``: one block is traced and compiled, never
a Python loop over layers. Per-layer settings (window, RoPE base) are looked up by the layer
index inside the scan. Optional ``jax.checkpoint`` per block (``ModelConfig.remat``).

Attention masks are built from *cache slots*: token ``t`` of a call sits in slot
``cache_index + t`` and attends to every valid slot ``<=`` its own (and, on a sliding layer,
``> slot - W``: the window counts slots, as transformers' mask does, which for the contiguous
real tokens of a left-padded batch is the window over positions). Without a cache the slots
are the tokens themselves, so the training forward and the sampler's cached forward are the
same function (rollout log-probs equal training log-probs by construction). Padding may be
on either side: positions are explicit and padded slots are never attended to.

The KV cache is a *masked full cache*: every layer keeps all ``S`` slots, sliding layers
included, and the window is a mask. Memory is ``2 L B S H_kv K`` values whatever the window
(a ring buffer of ``W`` slots would bound sliding layers by ``W``; at RLHF lengths the full
cache is simpler and the same computation as training).

LoRA (``ModelConfig.lora``): the projections it targets carry low-rank adapters inside
``Dense`` (stacked like every block parameter), optionally over a quantised frozen kernel;
``adapters=False`` runs the frozen base from the same parameters (``rlhf_jax.models.lora``).

Every parameter carries logical axis names (``out_sharding`` metadata) that
``rlhf_jax.sharding`` maps to the mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.rope import rope_qk
from rlhf_jax.sharding import constrain


def _dtype(name: str):
    return jnp.dtype(name)


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter tagged with its logical axes (consumed by ``rlhf_jax.sharding``)."""
    return nnx.Param(value, sharding_names=axes, eager_sharding=False)


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)`` with a multi-dimensional kernel ``[*in, *out]``, plus a
    low-rank adapter on the projections ``ModelConfig.lora`` targets.

    Computes in ``dtype`` (the config's compute dtype), stores in ``param_dtype``. ``name`` is
    the projection's name (``q, k, v, o, gate, up, down``); a targeted one holds ``lora_a
    [*in, r]`` and ``lora_b [r, *out]`` and adds ``(alpha / r) (drop(x) A) B`` (Hu et al.
    2021; ``rlhf_jax.models.lora``), and with ``LoraConfig.quantize_base`` stores its frozen
    kernel as ``kernel_q`` (int8 / int4) and ``kernel_scale`` (float32) instead of ``kernel``
    (Dettmers et al. 2023), dequantised in the forward.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 axes: tuple[str | None, ...], *, bias: bool, cfg: ModelConfig, rngs: nnx.Rngs,
                 std: float = 0.02, name: str | None = None):
        from rlhf_jax.models import lora as lora_lib

        pdt = _dtype(cfg.param_dtype)
        n_in = len(in_shape)
        shape = tuple(in_shape) + tuple(out_shape)
        lora = cfg.lora
        targeted = lora is not None and name in lora.target_names
        w = std * jax.random.normal(rngs.params(), shape, pdt)
        self.kernel = self.kernel_q = self.kernel_scale = nnx.data(None)
        if targeted and lora.quantize_base:
            q, scale = lora_lib.quantize_kernel(w, 0, n_in, lora.quantize_base, lora.block_size)
            self.kernel_q = _param(q, axes)
            self.kernel_scale = _param(scale, (None,) * n_in + tuple(axes[n_in:]))
        else:
            self.kernel = _param(w, axes)
        self.bias = nnx.data(_param(jnp.zeros(out_shape, pdt), axes[n_in:]) if bias else None)
        self.lora_a = self.lora_b = nnx.data(None)
        self.lora_scale, self.lora_dropout, self.lora_id = 0.0, 0.0, 0
        if targeted:
            self.lora_a = _param(lora_lib.init_lora_a(rngs.params(), tuple(in_shape), lora.rank, pdt),
                                 tuple(axes[:n_in]) + (lora_lib.RANK_AXIS,))
            self.lora_b = _param(jnp.zeros((lora.rank, *out_shape), pdt),
                                 (lora_lib.RANK_AXIS,) + tuple(axes[n_in:]))
            self.lora_scale, self.lora_dropout = lora.scale, lora.dropout_rate
            self.lora_id = 1 + lora_lib.LORA_PROJECTION_IDS[name]
        self.n_in = n_in
        self.dtype = _dtype(cfg.dtype)

    def _einsum(self, x: jax.Array, k: jax.Array, n_in: int) -> jax.Array:
        lhs = "abcdefgh"[: x.ndim - n_in] + "ijkl"[:n_in]
        rhs = "ijkl"[:n_in] + "mnop"[: k.ndim - n_in]
        out = "abcdefgh"[: x.ndim - n_in] + "mnop"[: k.ndim - n_in]
        return jnp.einsum(f"{lhs},{rhs}->{out}", x.astype(self.dtype), k.astype(self.dtype))

    def __call__(self, x: jax.Array, *, adapters: bool = True,
                 dropout_key: jax.Array | None = None) -> jax.Array:
        """``x [..., *in] -> y [..., *out]`` in the compute dtype.

        Args:
          adapters: add the adapter's term (``False``: the frozen base alone, as if the
            adapter did not exist; a Python bool).
          dropout_key: a typed key: drop the adapter's input with ``LoraConfig.dropout``
            (training); ``None``: no dropout.
        """
        if self.kernel is not None:
            k = self.kernel[...]
        else:
            from rlhf_jax.models.lora import dequantize_kernel
            k = dequantize_kernel(self.kernel_q[...], self.kernel_scale[...])
        y = self._einsum(x, k, self.n_in)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        if adapters and self.lora_a is not None:
            xa = x
            if dropout_key is not None and self.lora_dropout > 0:
                keep = 1.0 - self.lora_dropout
                on = jax.random.bernoulli(jax.random.fold_in(dropout_key, self.lora_id), keep,
                                          x.shape)
                xa = jnp.where(on, x / keep, jnp.zeros_like(x)).astype(x.dtype)
            h = self._einsum(xa, self.lora_a[...], self.n_in)  # [..., r]
            y = y + self._einsum(h, self.lora_b[...], 1) * jnp.asarray(self.lora_scale, self.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm, Gemma's ``(1 + w)`` RMSNorm or LayerNorm over the trailing ``len(shape)`` axes.

    ``rms``: ``x / sqrt(mean(x^2) + eps) * w`` (Zhang & Sennrich 2019); ``rms1p``: the same
    times ``(1 + w)`` with ``w`` initialised to 0 (Gemma); ``layer``: ``(x - mean) /
    sqrt(var + eps) * w + b`` (Ba et al. 2016). Always computed in float32, result cast to the
    compute dtype.
    """

    def __init__(self, cfg: ModelConfig, kind: str, shape: tuple[int, ...] | None = None,
                 axes: tuple[str | None, ...] = ("norm",)):
        pdt = _dtype(cfg.param_dtype)
        shape = (cfg.d_model,) if shape is None else tuple(shape)
        self.kind = kind
        self.eps = cfg.norm_eps
        self.n_axes = len(shape)
        init = jnp.zeros if kind == "rms1p" else jnp.ones
        self.scale = _param(init(shape, pdt), axes)
        self.bias = nnx.data(_param(jnp.zeros(shape, pdt), axes) if kind == "layer" else None)
        self.dtype = _dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        red = tuple(range(-self.n_axes, 0))
        w = self.scale[...].astype(jnp.float32)
        if self.kind == "layer":
            mean = jnp.mean(x32, axis=red, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=red, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
            y = y * w + self.bias[...].astype(jnp.float32)
        else:
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=red, keepdims=True) + self.eps)
            y = y * (1.0 + w if self.kind == "rms1p" else w)
        return y.astype(self.dtype)


#: Window of a full-attention layer in the per-layer window table (larger than any cache).
_NO_WINDOW = 2**30


def layer_windows(cfg: ModelConfig):
    """``[L] int32`` attention window of each layer (``_NO_WINDOW`` on full layers), or
    ``None`` when no layer has a window."""
    if cfg.sliding_window is None:
        return None
    return jnp.asarray([cfg.sliding_window if t == "sliding" else _NO_WINDOW
                        for t in cfg.layer_kinds], jnp.int32)


def softcap(x: jax.Array, cap: float | None) -> jax.Array:
    """``cap * tanh(x / cap)`` (Gemma 2's logit soft-capping), identity for ``cap=None``."""
    return x if cap is None else cap * jnp.tanh(x / cap)


@struct.dataclass
class KVCache:
    """Key/value cache for all layers, stacked or one buffer per layer.

    Each layer's keys (values) are ``[B, H_kv, S, K]``: heads before slots, so the attention
    contractions read a layer's cache in place as a batched ``(B, H_kv)`` matmul (a
    ``[B, S, H_kv, K]`` layout needs a transposed copy of the layer's cache per call).

    Two forms:

    * stacked: ``k``, ``v`` are ``[L, B, H_kv, S, K]`` arrays, the carry of the layer
      ``lax.scan`` (each block writes its ``T`` new slots in place);
    * per layer (``per_layer=True``): ``k``, ``v`` are tuples of ``L`` arrays
      ``[B, H_kv, S, K]``, for the unrolled layer loop that runs with per-layer parameters
      (``Model.apply`` with ``params["trunk"]["blocks"]`` a tuple): inside a decode
      ``while_loop`` every buffer is then updated in place and read without a copy
      (slicing a layer out of a stacked array inside the loop copies it at every step).

    Attributes:
      k: keys in the compute dtype, in one of the two forms.
      v: values, same form and shape as ``k``.
      valid: ``[B, S] bool`` True for slots holding a real (non-padding) token.
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int, *,
              per_layer: bool = False) -> "KVCache":
        """An empty cache of ``length`` slots, stacked or ``per_layer`` (see the class)."""
        shape = (batch, cfg.num_kv_heads, length, cfg.per_head_dim)
        dt = _dtype(cfg.dtype)
        if per_layer:
            k = tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers))
            v = tuple(jnp.zeros(shape, dt) for _ in range(cfg.n_layers))
        else:
            k = jnp.zeros((cfg.n_layers, *shape), dt)
            v = jnp.zeros((cfg.n_layers, *shape), dt)
        return cls(k=k, v=v, valid=jnp.zeros((batch, length), bool))

    @property
    def per_layer(self) -> bool:
        """Whether ``k`` / ``v`` are tuples of per-layer buffers."""
        return isinstance(self.k, (tuple, list))

    def unstacked(self) -> "KVCache":
        """The same cache in the per-layer form (one copy of ``k`` and ``v``)."""
        if self.per_layer:
            return self
        return self.replace(k=tuple(self.k[i] for i in range(self.k.shape[0])),
                            v=tuple(self.v[i] for i in range(self.v.shape[0])))


class Attention(nnx.Module):
    """Multi-head / grouped-query causal self-attention in the family's variant (q/k norms,
    RoPE or none, score scale and soft-cap, per-layer sliding window)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        spec = cfg.family.block
        d, h, hkv, k = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.per_head_dim
        qkv_bias = spec.bias or cfg.qkv_bias
        self.q = Dense((d,), (h, k), ("embed", "heads", "kv"), bias=qkv_bias, cfg=cfg, rngs=rngs,
                       name="q")
        self.k = Dense((d,), (hkv, k), ("embed", "kv_heads", "kv"), bias=qkv_bias, cfg=cfg,
                       rngs=rngs, name="k")
        self.v = Dense((d,), (hkv, k), ("embed", "kv_heads", "kv"), bias=qkv_bias, cfg=cfg,
                       rngs=rngs, name="v")
        self.o = Dense((h, k), (d,), ("heads", "kv", "embed"), bias=spec.bias, cfg=cfg, rngs=rngs,
                       name="o")
        self.q_norm = self.k_norm = nnx.data(None)
        if spec.qk_norm == "head":
            self.q_norm = Norm(cfg, spec.norm, (k,), ("kv",))
            self.k_norm = Norm(cfg, spec.norm, (k,), ("kv",))
        elif spec.qk_norm == "width":
            self.q_norm = Norm(cfg, spec.norm, (h, k), ("heads", "kv"))
            self.k_norm = Norm(cfg, spec.norm, (hkv, k), ("kv_heads", "kv"))
        self.use_rope = spec.positions == "rope"
        self.n_rep = h // hkv
        self.cfg = cfg

    def __call__(self, x, positions, q_slots, k_cache, v_cache, valid, cache_index, layer, *,
                 adapters: bool = True, lora_key: jax.Array | None = None):
        """Attend from ``x [B, T, D]`` over the cache after writing this call's keys into it.

        Args:
          x: ``[B, T, D]`` normalised hidden states.
          positions: ``[B, T] int32`` RoPE positions.
          q_slots: ``[T] int32`` cache slots of the queries (``cache_index + arange(T)``).
          k_cache, v_cache: ``[L, B, H_kv, S, K]`` the stacked cache of *all* layers, or
            ``[B, H_kv, S, K]`` this layer's own buffer (``KVCache`` per layer), or ``None``
            (then S = T). Only this call's ``T`` slots of layer ``layer`` are written (an
            in-place update of the layer scan's carry or of the buffer), never a whole layer.
          valid: ``[B, S] bool`` valid slots, already including this call's tokens.
          cache_index: scalar int32, the slot of ``x[:, 0]``.
          layer: scalar int32, this block's index into the cache and per-layer tables.
          adapters, lora_key: the LoRA adapters on or off, and this layer's adapter-dropout
            key (``Dense.__call__``).

        Returns:
          ``(y [B, T, D], k_cache, v_cache)`` with the cache updated (``None`` if not given).
        """
        cfg = self.cfg
        lora = dict(adapters=adapters, dropout_key=lora_key)
        q, k, v = self.q(x, **lora), self.k(x, **lora), self.v(x, **lora)  # [B, T, H(kv), K]
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        windows = layer_windows(cfg)
        if self.use_rope:  # per-layer base / NoPE tables, dynamic NTK from these positions
            q, k = rope_qk(cfg, q, k, positions, layer)
        kv_axes = "bsgk"  # k, v: [B, S, H_kv, K] (no cache: S = T)
        if k_cache is not None:  # cache layout [(L,) B, H_kv, S, K] (see KVCache)
            kv_axes = "bgsk"
            k_new = jnp.swapaxes(k, 1, 2).astype(k_cache.dtype)  # [B, H_kv, T, K]
            v_new = jnp.swapaxes(v, 1, 2).astype(v_cache.dtype)
            if k_cache.ndim == 5:  # stacked over layers: write this layer's T slots in place
                at = (layer, 0, 0, cache_index, 0)
                k_cache = jax.lax.dynamic_update_slice(k_cache, k_new[None], at)
                v_cache = jax.lax.dynamic_update_slice(v_cache, v_new[None], at)
                k = jax.lax.dynamic_index_in_dim(k_cache, layer, axis=0, keepdims=False)
                v = jax.lax.dynamic_index_in_dim(v_cache, layer, axis=0, keepdims=False)
            else:  # this layer's own buffer (KVCache per_layer): updated and read in place
                at = (0, 0, cache_index, 0)
                k = k_cache = jax.lax.dynamic_update_slice(k_cache, k_new, at)
                v = v_cache = jax.lax.dynamic_update_slice(v_cache, v_new, at)
        b, t, h, kd = q.shape
        s, hkv = k.shape[kv_axes.index("s")], k.shape[kv_axes.index("g")]
        q = q.reshape(b, t, hkv, self.n_rep, kd)
        scale = cfg.attn_scale if cfg.attn_scale is not None else 1.0 / math.sqrt(kd)
        scores = jnp.einsum(f"btgrk,{kv_axes}->bgrts", q, k).astype(jnp.float32) * scale
        scores = softcap(scores, cfg.attn_softcap)
        k_slots = jnp.arange(s)[None, :]
        allowed = k_slots <= q_slots[:, None]  # [T, S]
        if windows is not None:
            allowed &= k_slots > q_slots[:, None] - windows[layer]
        allowed = allowed[None] & valid[:, None, :]  # [B, T, S]
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum(f"bgrts,{kv_axes}->btgrk", probs, v).reshape(b, t, h, kd)
        return self.o(out, **lora), k_cache, v_cache


_ACTIVATIONS = {
    "silu": jax.nn.silu,
    "gelu_tanh": lambda x: jax.nn.gelu(x, approximate=True),
    "gelu": lambda x: jax.nn.gelu(x, approximate=False),
}


class MLP(nnx.Module):
    """Gated ``down(act(gate x) * up x)`` (SwiGLU / GeGLU) or plain ``down(act(up x))``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        spec = cfg.family.block
        d, f = cfg.d_model, cfg.mlp_dim
        self.gate = nnx.data(Dense((d,), (f,), ("embed", "mlp"), bias=spec.bias, cfg=cfg,
                                   rngs=rngs, name="gate") if spec.mlp == "gated" else None)
        self.up = Dense((d,), (f,), ("embed", "mlp"), bias=spec.bias, cfg=cfg, rngs=rngs,
                        name="up")
        self.down = Dense((f,), (d,), ("mlp", "embed"), bias=spec.bias, cfg=cfg, rngs=rngs,
                          name="down")
        self.act = cfg.activation or spec.activation

    def __call__(self, x, *, adapters: bool = True, lora_key: jax.Array | None = None):
        act = _ACTIVATIONS[self.act]
        lora = dict(adapters=adapters, dropout_key=lora_key)
        if self.gate is None:
            h = act(self.up(x, **lora))
        else:
            h = act(self.gate(x, **lora)) * self.up(x, **lora)
        h = constrain(h, ("batch", "seq", "mlp"))
        return self.down(h, **lora)


class MoE(nnx.Module):
    """Top-k routed mixture of gated experts (Shazeer et al. 2017; Mixtral, Jiang et al. 2024;
    Qwen3-MoE), dropless.

    The router's softmax over ``E`` experts (float32) picks each token's top ``k``; their
    probabilities (renormalised to sum to 1 with ``norm_topk_prob``) weight the experts'
    outputs ``down_e(act(gate_e x) * up_e x)``. Every token reaches its ``k`` experts (no
    capacity limit, no dropped tokens, as in transformers): the ``N k`` (token, expert) pairs
    are sorted by expert and each expert's contiguous group goes through one grouped matmul
    (``jax.lax.ragged_dot``, the MegaBlocks formulation of Gale et al. 2023) — static shapes,
    no loop over experts. On GPU/TPU that is a grouped GEMM; XLA:CPU runs it as a masked
    matmul per expert (``E`` times the FLOPs), which only the tests see.

    Parameters: ``router [D, E]`` (logical ``embed, expert``), ``gate``/``up`` ``[E, D, F]``
    and ``down [E, F, D]`` (``expert, embed, mlp``): the ``expert`` axis is what expert
    parallelism shards (``rlhf_jax.sharding``).
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f, e = cfg.d_model, cfg.mlp_dim, cfg.num_experts
        pdt = _dtype(cfg.param_dtype)
        self.router = Dense((d,), (e,), ("embed", "expert"), bias=False, cfg=cfg, rngs=rngs)

        def w(shape, axes):
            return _param(0.02 * jax.random.normal(rngs.params(), shape, pdt), axes)

        self.gate = w((e, d, f), ("expert", "embed", "mlp"))
        self.up = w((e, d, f), ("expert", "embed", "mlp"))
        self.down = w((e, f, d), ("expert", "mlp", "embed"))
        self.act = cfg.activation or cfg.family.block.activation
        self.k = cfg.num_experts_per_tok
        self.renormalise = cfg.norm_topk_prob is not False
        self.dtype = _dtype(cfg.dtype)

    def __call__(self, x, token_mask):
        """``x [B, T, D]``, ``token_mask [B, T] bool`` (real tokens) ->
        ``(y [B, T, D], stats)``.

        ``stats = (selected [E], prob_sum [E], rows [])`` float32 over the real tokens: how
        many of the top-k slots chose each expert, the summed router probability of each
        expert, and the number of tokens; ``router_load_balancing_loss`` turns sums over
        layers into the auxiliary loss.
        """
        b, t, d = x.shape
        e, k = self.gate.shape[0], self.k
        xf = x.reshape(b * t, d)
        probs = jax.nn.softmax(self.router(xf).astype(jnp.float32), axis=-1)  # [N, E]
        top_p, top_e = jax.lax.top_k(probs, k)  # [N, k]
        if self.renormalise:
            top_p = top_p / jnp.sum(top_p, axis=-1, keepdims=True)
        flat_e = top_e.reshape(-1)  # [N k], token-major
        order = jnp.argsort(flat_e, stable=True)
        group_sizes = jnp.bincount(flat_e, length=e).astype(jnp.int32)
        xs = jnp.take(xf, order // k, axis=0)  # [N k, D] grouped by expert
        dt = self.dtype

        def grouped(lhs, rhs):
            return jax.lax.ragged_dot(lhs.astype(dt), rhs[...].astype(dt), group_sizes,
                                      preferred_element_type=jnp.float32)

        act = _ACTIVATIONS[self.act]
        h = (act(grouped(xs, self.gate)) * grouped(xs, self.up)).astype(dt)
        ys = grouped(h, self.down)  # [N k, D] float32
        y = jnp.zeros_like(ys).at[order].set(ys).reshape(b * t, k, d)
        y = jnp.einsum("nkd,nk->nd", y, top_p).astype(x.dtype).reshape(b, t, d)
        m = token_mask.reshape(-1).astype(jnp.float32)
        selected = jnp.zeros((e,), jnp.float32).at[flat_e].add(jnp.repeat(m, k))
        stats = (selected, jnp.sum(probs * m[:, None], axis=0), jnp.sum(m))
        return y, stats


def router_load_balancing_loss(selected: jax.Array, prob_sum: jax.Array, rows: jax.Array,
                               ) -> jax.Array:
    """Switch Transformer's auxiliary load-balancing loss (Fedus et al. 2022 eq. 4-6), the
    form transformers' Mixtral / Qwen3-MoE train with.

    ``E * sum_e f_e P_e`` with ``f_e = selected_e / rows`` (the fraction of top-k slots
    routed to expert ``e``; it sums to ``k``) and ``P_e = prob_sum_e / rows`` (the mean router
    probability of ``e``); the counts are summed over layers and real tokens first, so
    ``rows`` is layers x tokens. Minimal (``k``) when routing is uniform.

    Args:
      selected, prob_sum: ``[E]`` float32 sums over layers of ``MoE``'s stats.
      rows: scalar float32, layers x real tokens.

    Returns:
      Scalar float32. Gradients flow through ``prob_sum`` only (the top-k choice is discrete).
    """
    rows = jnp.maximum(rows, 1.0)
    return selected.shape[-1] * jnp.sum((selected / rows) * (prob_sum / rows))


class Block(nnx.Module):
    """One residual block in the family's layout.

    * ``pre``: ``x + attn(attn_norm x)`` then ``x + mlp(mlp_norm x)``; with
      ``parallel_residual`` ``x + attn(attn_norm x) + mlp(mlp_norm x)``;
    * ``sandwich``: ``x + post_attn_norm(attn(attn_norm x))`` then
      ``x + post_mlp_norm(mlp(mlp_norm x))``;
    * ``post``: ``x + post_attn_norm(attn x)`` then ``x + post_mlp_norm(mlp x)``.
    """

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        spec = cfg.family.block
        self.layout = spec.residual
        self.parallel = cfg.parallel_residual
        pre = spec.residual in ("pre", "sandwich")
        post = spec.residual in ("sandwich", "post")
        self.attn_norm = nnx.data(Norm(cfg, spec.norm) if pre else None)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = nnx.data(Norm(cfg, spec.norm) if pre else None)
        self.mlp = MoE(cfg, rngs) if spec.mlp == "moe" else MLP(cfg, rngs)
        self.post_attn_norm = nnx.data(Norm(cfg, spec.norm) if post else None)
        self.post_mlp_norm = nnx.data(Norm(cfg, spec.norm) if post else None)

    def __call__(self, x, positions, q_slots, k_cache, v_cache, valid, cache_index, layer,
                 token_mask, *, adapters: bool = True, lora_key: jax.Array | None = None):
        """Returns ``(x, k_cache, v_cache, router_stats)``; ``router_stats`` is ``MoE``'s
        ``(selected, prob_sum, rows)`` or ``()`` for a dense MLP. ``token_mask [B, T]``:
        this call's real tokens; ``adapters`` / ``lora_key``: see ``Dense.__call__``."""
        def norm(n, y):
            return y if n is None else n(y)

        stats = ()

        def mlp(y):
            nonlocal stats
            if isinstance(self.mlp, MoE):
                y, stats = self.mlp(y, token_mask)
                return y
            return self.mlp(y, adapters=adapters, lora_key=lora_key)

        y, k_cache, v_cache = self.attn(norm(self.attn_norm, x), positions, q_slots, k_cache,
                                        v_cache, valid, cache_index, layer, adapters=adapters,
                                        lora_key=lora_key)
        res = self.attn.cfg.residual_multiplier  # Granite: x + m f(x); None: m = 1

        def scaled(y):
            return y if res is None else y * res

        if self.parallel:
            x = x + scaled(y) + scaled(mlp(norm(self.mlp_norm, x)))
        else:
            x = x + scaled(norm(self.post_attn_norm, y))
            x = x + scaled(norm(self.post_mlp_norm, mlp(norm(self.mlp_norm, x))))
        return constrain(x, ("batch", "seq", "embed")), k_cache, v_cache, stats


class Transformer(nnx.Module):
    """Embeddings, ``L`` stacked blocks under one ``lax.scan``, final norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = _dtype(cfg.param_dtype)
        self.embed = _param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt),
                            ("vocab", "embed"))
        spec = cfg.family.block
        self.embed_scale = spec.embed_scale
        self.pos_embed = nnx.data(None)
        if spec.positions == "learned":
            self.pos_embed = _param(
                0.01 * jax.random.normal(rngs.params(), (cfg.max_positions, cfg.d_model), pdt),
                ("positions", "embed"))

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(cfg, spec.norm)

    def __call__(self, tokens: jax.Array, positions: jax.Array, attn_mask: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | int = 0, *,
                 frozen_hidden: jax.Array | None = None, stop_after_frozen: bool = False,
                 adapters: bool = True, lora_key: jax.Array | None = None,
                 layer_params: tuple | None = None):
        """Hidden states of the last layer after the final norm.

        Args:
          tokens: ``[B, T] int32``.
          positions: ``[B, T] int32`` (``rlhf_jax.types.positions_from_mask``).
          attn_mask: ``[B, T] bool`` True for real tokens.
          cache: ``KVCache`` with ``S >= cache_index + T`` slots, or ``None`` for a plain forward.
          cache_index: scalar int32, the slot of ``tokens[:, 0]`` in the cache.
          frozen_hidden: ``[B, T, D]`` output of the embeddings and the lowest
            ``cfg.frozen_layers`` blocks (from ``stop_after_frozen=True``): only the upper blocks
            run. Needs ``cache=None``.
          stop_after_frozen: return ``(x [B, T, D], None, None)`` right after the frozen blocks (no
            final norm), under ``stop_gradient``.
          adapters: ``False`` runs the frozen base without its LoRA adapters (a Python bool).
          lora_key: typed key of the adapters' input dropout (folded with the layer index and
            the projection); ``None``: no dropout.
          layer_params: ``None`` (the blocks' stacked parameters run under one ``lax.scan``)
            or a tuple of ``L`` per-layer parameter trees (pure dicts, the stacked tree
            sliced at each layer; ``Model.apply`` passes them when
            ``params["trunk"]["blocks"]`` is such a tuple): the blocks then run as an unrolled
            Python loop, each on its own buffers. Inside a decode ``while_loop`` that avoids
            copying every layer's weights out of the stack at every step (a dynamic or static
            slice of a loop-invariant stacked array is materialised per iteration on
            XLA:CPU). Needed for a per-layer ``KVCache``.

        Returns:
          ``(hidden [B, T, D], cache, router_aux_loss)``; ``cache`` has this call's
          keys/values written; ``router_aux_loss`` is the load-balancing loss
          (``router_load_balancing_loss``) over this call's real tokens and the *trainable*
          blocks (those above ``cfg.frozen_layers``, whose routers can learn) for a
          mixture-of-experts model, else ``None``.

        Raises:
          ValueError: ``frozen_hidden`` / ``stop_after_frozen`` with ``cfg.frozen_layers == 0``
            or with a cache; a per-layer cache without ``layer_params``; ``layer_params`` of
            another length than ``L``.
        """
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        t = tokens.shape[1]
        f = cfg.frozen_layers
        if (frozen_hidden is not None or stop_after_frozen) and (f == 0 or cache is not None):
            raise ValueError("frozen_hidden / stop_after_frozen need ModelConfig.frozen_layers > 0 "
                             f"(got {f}) and no KV cache")
        if frozen_hidden is None:
            x = jnp.take(self.embed[...], tokens, axis=0)
            if self.embed_scale:  # Gemma: sqrt(D), rounded to the parameter dtype as in HF
                x = x * jnp.asarray(math.sqrt(cfg.d_model), x.dtype)
            if cfg.embedding_multiplier is not None:  # Granite
                x = x * cfg.embedding_multiplier
            x = x.astype(dt)
            if self.pos_embed is not None:
                x = x + jnp.take(self.pos_embed[...], positions, axis=0).astype(dt)
            if f:
                x = jax.lax.stop_gradient(x)
        else:
            x = jax.lax.stop_gradient(frozen_hidden).astype(dt)
        x = constrain(x, ("batch", "seq", "embed"))
        attn_mask = attn_mask.astype(bool)
        cache_index = jnp.asarray(cache_index, jnp.int32)
        q_slots = cache_index + jnp.arange(t, dtype=jnp.int32)
        if cache is None:
            valid, kv = attn_mask, (None, None)
        else:
            valid = jax.lax.dynamic_update_slice(cache.valid, attn_mask, (0, cache_index))
            kv = (cache.k, cache.v)

        graphdef, block_state = nnx.split(self.blocks)

        # The whole cache rides in the scan's carry: each block writes its T new slots in
        # place. (Scanning over per-layer cache slices and stacking them as outputs would
        # rewrite the entire cache at every decode step.)
        def body(carry, layer):
            x, k_all, v_all, router = carry
            params, index = layer
            block = nnx.merge(graphdef, params)
            key = None if lora_key is None else jax.random.fold_in(lora_key, index)
            x, k_all, v_all, stats = block(x, positions, q_slots, k_all, v_all, valid,
                                           cache_index, index, attn_mask, adapters=adapters,
                                           lora_key=key)
            router = jax.tree.map(jnp.add, router, stats)  # summed over layers
            return (x, k_all, v_all, router), None

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False,
                                  policy=jax.checkpoint_policies.nothing_saveable)
        xs = (block_state, jnp.arange(cfg.n_layers, dtype=jnp.int32))
        n = cfg.n_layers

        per_layer_cache = cache is not None and cache.per_layer
        if layer_params is not None and len(layer_params) != n:
            raise ValueError(f"layer_params has {len(layer_params)} layers; the model has {n}")
        if per_layer_cache and layer_params is None:
            raise ValueError("a per-layer KVCache needs per-layer parameters (Model.apply with "
                             "params['trunk']['blocks'] a tuple of L layer trees)")

        def layer_state(tree):
            """One layer's ``nnx.State`` from its pure-dict parameters."""
            state = jax.tree.map(lambda a: a, block_state)
            nnx.replace_by_pure_dict(state, tree)
            return state

        def run(carry, lo, hi):
            """Blocks ``lo..hi-1`` under one scan, or unrolled over ``layer_params``."""
            if lo == hi:
                return carry
            if layer_params is None:
                part = xs if (lo, hi) == (0, n) else jax.tree.map(lambda a: a[lo:hi], xs)
                return jax.lax.scan(body, carry, part, unroll=cfg.scan_unroll)[0]
            x, k_all, v_all, router = carry
            x = jax.lax.optimization_barrier(x)  # see below
            k_all = list(k_all) if per_layer_cache else k_all
            v_all = list(v_all) if per_layer_cache else v_all
            for i in range(lo, hi):
                layer = (layer_state(layer_params[i]), jnp.int32(i))
                if per_layer_cache:
                    (x, k_all[i], v_all[i], router), _ = body((x, k_all[i], v_all[i], router),
                                                              layer)
                else:
                    (x, k_all, v_all, router), _ = body((x, k_all, v_all, router), layer)
                # Materialise the residual stream before, between and after the blocks, as
                # the scan's carry is: XLA may otherwise fuse across blocks and skip the
                # rounding to a bfloat16 compute dtype there (excess precision), and the
                # unrolled and scanned forwards (the sampler's and the training forward)
                # would round differently.
                x = jax.lax.optimization_barrier(x)
            if per_layer_cache:
                k_all, v_all = tuple(k_all), tuple(v_all)
            return x, k_all, v_all, router

        e = cfg.num_experts
        router0 = () if e is None else (jnp.zeros((e,), jnp.float32),
                                        jnp.zeros((e,), jnp.float32), jnp.zeros((), jnp.float32))
        carry = (x, *kv, router0)
        if f:
            # Frozen lower blocks: their own scan, no backward pass through them.
            if frozen_hidden is None:
                x, *kv, _ = run(carry, 0, f)
                x = jax.lax.stop_gradient(x)
                if stop_after_frozen:
                    return x, None, None
            carry = (x, *kv, router0)
        x, *kv, router = run(carry, f, n)
        new_cache = None if cache is None else KVCache(k=kv[0], v=kv[1], valid=valid)
        aux = router_load_balancing_loss(*router) if e is not None and f < n else None
        return self.final_norm(x), new_cache, aux
