"""Rotary position embeddings (Su et al. 2021, "RoFormer", eq. 15) in the rotate-half
convention of HF transformers, and the frequency scalings that HF configs name
(``ModelConfig.rope_scaling``)."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlhf_jax.config import ModelConfig


def rope_inv_freq(cfg: ModelConfig, local: bool = False) -> jax.Array:
    """Inverse frequencies ``[R/2] float32`` of RoPE (``R = cfg.rope_dim``), with the config's
    scaling.

    ``inv_freq[i] = theta^(-2i/R)`` (Su et al. 2021 eq. 15); ``linear`` divides by the factor
    (Chen et al. 2023); ``llama3`` follows Llama 3.1's wavelength bands. ``local=True``: the
    sliding layers' frequencies when ``cfg.rope_local_theta`` is set (that base, no scaling).
    """
    k = cfg.rope_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    inv = 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))
    s = cfg.rope_scaling
    if s is None or local:
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
    """Rotate the first ``R = 2 len(inv_freq)`` features of ``x [B, T, H, K]`` by
    ``positions [B, T]`` (rotate-half convention of HF); features ``R..K-1`` pass through."""
    r = 2 * inv_freq.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, R]
    x32 = x.astype(jnp.float32)
    rot, rest = x32[..., :r], x32[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * jnp.cos(angles) + rotated * jnp.sin(angles)
    if rest.shape[-1]:
        out = jnp.concatenate([out, rest], axis=-1)
    return out.astype(x.dtype)
