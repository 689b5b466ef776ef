"""Decoder-only transformer trunk (Flax NNX): the Llama family and GPT-2 in one code path.

* Llama / SmolLM2 / Qwen2 / Mistral (Touvron et al. 2023): pre-RMSNorm, rotary position
  embeddings (Su et al. 2021) in the rotate-half convention of HF transformers, grouped-query
  attention (Ainslie et al. 2023), SwiGLU MLP (Shazeer 2020), optional q/k/v biases (Qwen2).
* GPT-2 (Radford et al. 2019): learned positions, pre-LayerNorm with bias, GELU (tanh
  approximation, "gelu_new"), biases on every projection.

The ``L`` blocks are *stacked* (each block parameter has a leading ``layers`` axis, created
with ``nnx.vmap``) and run with one ``jax.lax.scan``: one block is traced and compiled, never
a Python loop over layers. Optional ``jax.checkpoint`` per block (``ModelConfig.remat``).

Attention masks are built from *cache slots*: token ``t`` of a call sits in slot
``cache_index + t`` and attends to every valid slot ``<=`` its own. Without a cache the slots
are the tokens themselves, so the training forward and the sampler's cached forward are the
same function (rollout log-probs equal training log-probs by construction). Padding may be
on either side: positions are explicit and padded slots are never attended to.

Every parameter carries logical axis names (``out_sharding`` metadata) that
``rlhf_jax.sharding`` maps to the mesh.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlhf_jax.config import ModelConfig
from rlhf_jax.sharding import constrain


def _dtype(name: str):
    return jnp.dtype(name)


def _param(value: jax.Array, axes: tuple[str | None, ...]) -> nnx.Param:
    """A parameter tagged with its logical axes (consumed by ``rlhf_jax.sharding``)."""
    return nnx.Param(value, sharding_names=axes, eager_sharding=False)


class Dense(nnx.Module):
    """``y = x @ kernel (+ bias)`` with a multi-dimensional kernel ``[*in, *out]``.

    Computes in ``dtype`` (the config's compute dtype), stores in ``param_dtype``.
    """

    def __init__(self, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                 axes: tuple[str | None, ...], *, bias: bool, cfg: ModelConfig, rngs: nnx.Rngs,
                 std: float = 0.02):
        pdt = _dtype(cfg.param_dtype)
        shape = tuple(in_shape) + tuple(out_shape)
        self.kernel = _param(std * jax.random.normal(rngs.params(), shape, pdt), axes)
        self.bias = nnx.data(_param(jnp.zeros(out_shape, pdt), axes[len(in_shape):]) if bias else None)
        self.n_in = len(in_shape)
        self.dtype = _dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        k = self.kernel[...].astype(self.dtype)
        n = self.n_in
        lhs = "abcdefgh"[: x.ndim - n] + "ijkl"[:n]
        rhs = "ijkl"[:n] + "mnop"[: k.ndim - n]
        out = "abcdefgh"[: x.ndim - n] + "mnop"[: k.ndim - n]
        y = jnp.einsum(f"{lhs},{rhs}->{out}", x.astype(self.dtype), k)
        if self.bias is not None:
            y = y + self.bias[...].astype(self.dtype)
        return y


class Norm(nnx.Module):
    """RMSNorm (Zhang & Sennrich 2019) for Llama, LayerNorm (Ba et al. 2016) for GPT-2.

    Always computed in float32, result cast to the compute dtype.
    """

    def __init__(self, cfg: ModelConfig):
        pdt = _dtype(cfg.param_dtype)
        self.rms = cfg.arch == "llama"
        self.eps = cfg.norm_eps
        self.scale = _param(jnp.ones((cfg.d_model,), pdt), ("norm",))
        self.bias = nnx.data(None if self.rms else _param(jnp.zeros((cfg.d_model,), pdt), ("norm",)))
        self.dtype = _dtype(cfg.dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        if self.rms:
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + self.eps)
            y = y * self.scale[...].astype(jnp.float32)
        else:
            mean = jnp.mean(x32, axis=-1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps)
            y = y * self.scale[...].astype(jnp.float32) + self.bias[...].astype(jnp.float32)
        return y.astype(self.dtype)


def rope_inv_freq(cfg: ModelConfig) -> jax.Array:
    """Inverse frequencies ``[K/2] float32`` of RoPE, with the config's scaling.

    ``inv_freq[i] = theta^(-2i/K)`` (Su et al. 2021 eq. 15); ``linear`` divides by the factor
    (Chen et al. 2023); ``llama3`` follows Llama 3.1's wavelength bands.
    """
    k = cfg.per_head_dim
    inv = 1.0 / (cfg.rope_theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    s = cfg.rope_scaling
    if s is None:
        return inv
    if s.rope_type == "linear":
        return inv / s.factor
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between.
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    mid = (1 - smooth) * inv / s.factor + smooth * inv
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_mid, mid, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array) -> jax.Array:
    """Rotate ``x [B, T, H, K]`` by ``positions [B, T]`` (rotate-half convention of HF)."""
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, K/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, K]
    x32 = x.astype(jnp.float32)
    half = x.shape[-1] // 2
    rotated = jnp.concatenate([-x32[..., half:], x32[..., :half]], axis=-1)
    return (x32 * jnp.cos(angles) + rotated * jnp.sin(angles)).astype(x.dtype)


@struct.dataclass
class KVCache:
    """Key/value cache for all layers.

    Attributes:
      k: ``[L, B, S, H_kv, K]`` keys, in compute dtype.
      v: ``[L, B, S, H_kv, K]`` values.
      valid: ``[B, S] bool`` True for slots holding a real (non-padding) token.
    """

    k: jax.Array
    v: jax.Array
    valid: jax.Array

    @classmethod
    def zeros(cls, cfg: ModelConfig, batch: int, length: int) -> "KVCache":
        """An empty cache of ``length`` slots."""
        shape = (cfg.n_layers, batch, length, cfg.num_kv_heads, cfg.per_head_dim)
        dt = _dtype(cfg.dtype)
        return cls(k=jnp.zeros(shape, dt), v=jnp.zeros(shape, dt),
                   valid=jnp.zeros((batch, length), bool))


class Attention(nnx.Module):
    """Multi-head / grouped-query causal self-attention with RoPE (Llama) or without (GPT-2)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, h, hkv, k = cfg.d_model, cfg.n_heads, cfg.num_kv_heads, cfg.per_head_dim
        gpt2 = cfg.arch == "gpt2"
        qkv_bias = gpt2 or cfg.qkv_bias
        self.q = Dense((d,), (h, k), ("embed", "heads", "kv"), bias=qkv_bias, cfg=cfg, rngs=rngs)
        self.k = Dense((d,), (hkv, k), ("embed", "kv_heads", "kv"), bias=qkv_bias, cfg=cfg, rngs=rngs)
        self.v = Dense((d,), (hkv, k), ("embed", "kv_heads", "kv"), bias=qkv_bias, cfg=cfg, rngs=rngs)
        self.o = Dense((h, k), (d,), ("heads", "kv", "embed"), bias=gpt2, cfg=cfg, rngs=rngs)
        self.use_rope = not gpt2
        self.n_rep = h // hkv
        self.cfg = cfg

    def __call__(self, x, positions, q_slots, k_cache, v_cache, valid, cache_index, layer):
        """Attend from ``x [B, T, D]`` over the cache after writing this call's keys into it.

        Args:
          x: ``[B, T, D]`` normalised hidden states.
          positions: ``[B, T] int32`` RoPE positions.
          q_slots: ``[T] int32`` cache slots of the queries (``cache_index + arange(T)``).
          k_cache, v_cache: ``[L, B, S, H_kv, K]`` the cache of *all* layers, or ``None``
            (then S = T). Only this call's ``T`` slots of layer ``layer`` are written (an
            in-place update of the layer scan's carry), never a whole layer.
          valid: ``[B, S] bool`` valid slots, already including this call's tokens.
          cache_index: scalar int32, the slot of ``x[:, 0]``.
          layer: scalar int32, this block's index into the cache.

        Returns:
          ``(y [B, T, D], k_cache, v_cache)`` with the cache updated (``None`` if not given).
        """
        q, k, v = self.q(x), self.k(x), self.v(x)  # [B, T, H(kv), K]
        if self.use_rope:
            inv_freq = rope_inv_freq(self.cfg)
            q = apply_rope(q, positions, inv_freq)
            k = apply_rope(k, positions, inv_freq)
        if k_cache is not None:
            at = (layer, 0, cache_index, 0, 0)
            k_cache = jax.lax.dynamic_update_slice(k_cache, k.astype(k_cache.dtype)[None], at)
            v_cache = jax.lax.dynamic_update_slice(v_cache, v.astype(v_cache.dtype)[None], at)
            k = jax.lax.dynamic_index_in_dim(k_cache, layer, axis=0, keepdims=False)
            v = jax.lax.dynamic_index_in_dim(v_cache, layer, axis=0, keepdims=False)
        b, t, h, kd = q.shape
        s, hkv = k.shape[1], k.shape[2]
        q = q.reshape(b, t, hkv, self.n_rep, kd)
        scores = jnp.einsum("btgrk,bsgk->bgrts", q, k).astype(jnp.float32) / math.sqrt(kd)
        allowed = (jnp.arange(s)[None, :] <= q_slots[:, None])[None] & valid[:, None, :]  # [B,T,S]
        scores = jnp.where(allowed[:, None, None], scores, jnp.finfo(jnp.float32).min)
        probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
        out = jnp.einsum("bgrts,bsgk->btgrk", probs, v).reshape(b, t, h, kd)
        return self.o(out), k_cache, v_cache


class MLP(nnx.Module):
    """SwiGLU ``down(silu(gate x) * up x)`` (Llama) or ``down(gelu_tanh(up x))`` (GPT-2)."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        d, f = cfg.d_model, cfg.mlp_dim
        gpt2 = cfg.arch == "gpt2"
        self.gate = nnx.data(None if gpt2 else Dense((d,), (f,), ("embed", "mlp"), bias=False,
                                                     cfg=cfg, rngs=rngs))
        self.up = Dense((d,), (f,), ("embed", "mlp"), bias=gpt2, cfg=cfg, rngs=rngs)
        self.down = Dense((f,), (d,), ("mlp", "embed"), bias=gpt2, cfg=cfg, rngs=rngs)

    def __call__(self, x):
        if self.gate is None:
            h = jax.nn.gelu(self.up(x), approximate=True)
        else:
            h = jax.nn.silu(self.gate(x)) * self.up(x)
        h = constrain(h, ("batch", "seq", "mlp"))
        return self.down(h)


class Block(nnx.Module):
    """Pre-norm residual block: ``x + attn(norm x)`` then ``x + mlp(norm x)``."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.attn_norm = Norm(cfg)
        self.attn = Attention(cfg, rngs)
        self.mlp_norm = Norm(cfg)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x, positions, q_slots, k_cache, v_cache, valid, cache_index, layer):
        y, k_cache, v_cache = self.attn(self.attn_norm(x), positions, q_slots, k_cache, v_cache,
                                        valid, cache_index, layer)
        x = x + y
        x = x + self.mlp(self.mlp_norm(x))
        return constrain(x, ("batch", "seq", "embed")), k_cache, v_cache


class Transformer(nnx.Module):
    """Embeddings, ``L`` stacked blocks under one ``lax.scan``, final norm."""

    def __init__(self, cfg: ModelConfig, rngs: nnx.Rngs):
        self.cfg = cfg
        pdt = _dtype(cfg.param_dtype)
        self.embed = _param(0.02 * jax.random.normal(rngs.params(), (cfg.vocab_size, cfg.d_model), pdt),
                            ("vocab", "embed"))
        self.pos_embed = nnx.data(None)
        if cfg.arch == "gpt2":
            self.pos_embed = _param(
                0.01 * jax.random.normal(rngs.params(), (cfg.max_positions, cfg.d_model), pdt),
                ("positions", "embed"))

        @nnx.split_rngs(splits=cfg.n_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.final_norm = Norm(cfg)

    def __call__(self, tokens: jax.Array, positions: jax.Array, attn_mask: jax.Array,
                 cache: KVCache | None = None, cache_index: jax.Array | int = 0, *,
                 frozen_hidden: jax.Array | None = None, stop_after_frozen: bool = False):
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
          stop_after_frozen: return ``(x [B, T, D], None)`` right after the frozen blocks (no
            final norm), under ``stop_gradient``.

        Returns:
          ``(hidden [B, T, D], cache)``; ``cache`` has this call's keys/values written.

        Raises:
          ValueError: ``frozen_hidden`` / ``stop_after_frozen`` with ``cfg.frozen_layers == 0``
            or with a cache.
        """
        cfg = self.cfg
        dt = _dtype(cfg.dtype)
        t = tokens.shape[1]
        f = cfg.frozen_layers
        if (frozen_hidden is not None or stop_after_frozen) and (f == 0 or cache is not None):
            raise ValueError("frozen_hidden / stop_after_frozen need ModelConfig.frozen_layers > 0 "
                             f"(got {f}) and no KV cache")
        if frozen_hidden is None:
            x = jnp.take(self.embed[...], tokens, axis=0).astype(dt)
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
            x, k_all, v_all = carry
            params, index = layer
            block = nnx.merge(graphdef, params)
            x, k_all, v_all = block(x, positions, q_slots, k_all, v_all, valid, cache_index, index)
            return (x, k_all, v_all), None

        if cfg.remat:
            body = jax.checkpoint(body, prevent_cse=False,
                                  policy=jax.checkpoint_policies.nothing_saveable)
        xs = (block_state, jnp.arange(cfg.n_layers, dtype=jnp.int32))
        n = cfg.n_layers

        def run(carry, lo, hi):
            """Blocks ``lo..hi-1`` under one scan."""
            if lo == hi:
                return carry
            part = xs if (lo, hi) == (0, n) else jax.tree.map(lambda a: a[lo:hi], xs)
            return jax.lax.scan(body, carry, part, unroll=cfg.scan_unroll)[0]

        carry = (x, *kv)
        if f:
            # Frozen lower blocks: their own scan, no backward pass through them.
            if frozen_hidden is None:
                x, *kv = run(carry, 0, f)
                x = jax.lax.stop_gradient(x)
                if stop_after_frozen:
                    return x, None
            carry = (x, *kv)
        x, *kv = run(carry, f, n)
        new_cache = None if cache is None else KVCache(k=kv[0], v=kv[1], valid=valid)
        return self.final_norm(x), new_cache
