"""Rotary position embeddings (Su et al. 2021, "RoFormer", eq. 15) in the rotate-half
convention of HF transformers, and the frequency scalings that HF configs name
(``ModelConfig.rope_scaling``), computed as transformers 5's ``modeling_rope_utils`` does:

* ``linear``: position interpolation (Chen et al. 2023): ``inv_freq / factor``;
* ``llama3``: Llama 3.1's wavelength bands (Meta 2024);
* ``yarn``: YaRN (Peng et al. 2023): a per-frequency ramp between interpolation and
  extrapolation, and an attention factor that multiplies cos and sin;
* ``dynamic``: dynamic NTK-aware scaling (bloc97 / emozilla 2023, transformers'
  ``_compute_dynamic_ntk_parameters`` + ``dynamic_rope_update``): the base grows with the
  longest position of the call.

**Dynamic NTK and the KV cache.** The dynamic base is a function of ``S = max(positions) + 1``
over the whole batch *of one forward call* (traced from the positions: no host sync, one
compile for every length). Below ``ModelConfig.max_positions`` nothing changes; above it
the base is ``theta (factor S / L - (factor - 1))^(R / (R - 2))`` (``L = max_positions``,
``R`` the rotated features). Consequences, all shared with transformers:

* a key cached at an earlier decode step keeps the rotation of *its* step, so once a
  sequence passes ``L`` the sampler's cached forward and a full training forward over the
  same tokens (one base for every token, from the whole sequence's ``S``) differ: rollout
  log-probs equal training log-probs only while every sequence stays within ``L``;
* the frequencies depend on the longest row of the call, so a row's logits beyond ``L``
  depend on the batch it is in (and on microbatching).

The sampler matches transformers' ``generate`` exactly (its cached decode is the same
computation). transformers keeps a grown base in the module between calls until a call is
shorter than ``L``; ours is stateless (a function of each call's positions), which is what
``generate`` computes for a fresh prompt.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlhf_jax.config import ModelConfig


def _inv_freq(theta, k: int) -> jax.Array:
    """``theta^(-2i/k)`` for ``i < k/2``: ``[k/2] float32`` (``theta``: float or traced scalar)."""
    return 1.0 / (theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k))


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """``0.1 mscale ln(scale) + 1`` for ``scale > 1``, else 1 (Peng et al. 2023 eq. 22)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def yarn_correction_range(cfg: ModelConfig) -> tuple[float, float]:
    """YaRN's ``(low, high)`` feature-pair indices (Peng et al. 2023 Sec. 3.2): pair ``d``
    rotates ``r(d) = L / (2 pi theta^(2d/R))`` times over the original length ``L``; pairs below
    ``low`` (``r > beta_fast``) are extrapolated, above ``high`` (``r < beta_slow``)
    interpolated. Solving ``r(d) = beta`` gives ``d = R ln(L / (2 pi beta)) / (2 ln theta)``;
    floored / ceiled unless ``no_truncate``, then clipped to ``[0, R - 1]``."""
    s, k, theta = cfg.rope_scaling, cfg.rope_dim, cfg.rope_theta
    length = s.original_max_position_embeddings

    def pair(rotations):
        return k * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = pair(s.beta_fast or 32), pair(s.beta_slow or 1)
    if not s.no_truncate:
        low, high = math.floor(low), math.ceil(high)
    return max(low, 0), min(high, k - 1)


def rope_attention_factor(cfg: ModelConfig) -> float:
    """The factor that multiplies cos and sin (hence q and k) on the global layers: YaRN's
    ``attention_factor`` (given, or ``mscale(factor, mscale) / mscale(factor,
    mscale_all_dim)`` when both are set, or ``0.1 ln(factor) + 1``; Peng et al. 2023 eq. 22);
    1 for every other scaling."""
    s = cfg.rope_scaling
    if s is None or s.rope_type != "yarn":
        return 1.0
    if s.attention_factor is not None:
        return float(s.attention_factor)
    if s.mscale and s.mscale_all_dim:
        return _yarn_mscale(s.factor, s.mscale) / _yarn_mscale(s.factor, s.mscale_all_dim)
    return _yarn_mscale(s.factor)


def rope_inv_freq(cfg: ModelConfig, local: bool = False,
                  positions: jax.Array | None = None) -> jax.Array:
    """Inverse frequencies ``[R/2] float32`` of RoPE (``R = cfg.rope_dim``), with the config's
    scaling.

    ``inv_freq[i] = theta^(-2i/R)`` (Su et al. 2021 eq. 15); ``linear`` divides by the factor
    (Chen et al. 2023); ``llama3`` follows Llama 3.1's wavelength bands; ``yarn`` blends
    ``inv_freq / factor`` (interpolation) and ``inv_freq`` (extrapolation) with a linear ramp
    over the pairs ``low..high`` of ``yarn_correction_range`` (Peng et al. 2023 Sec. 3.2,
    "NTK-by-parts"); ``dynamic`` raises the base to ``theta (factor S / L - (factor - 1))^(R /
    (R - 2))`` with ``S = max(positions) + 1`` over the whole batch once ``S > L =
    cfg.max_positions`` (bloc97 / emozilla 2023; see the module docstring for what that means
    for a KV cache). ``local=True``: the sliding layers' frequencies when
    ``cfg.rope_local_theta`` is set (that base, no scaling).

    Args:
      cfg: the model config.
      local: the sliding layers' frequencies.
      positions: ``[B, T] int`` positions of the call (only ``dynamic`` reads them; traced,
        no host sync). ``None``: the frequencies of sequences within ``L`` (the unscaled base).
    """
    k = cfg.rope_dim
    theta = cfg.rope_local_theta if local else cfg.rope_theta
    s = cfg.rope_scaling
    if s is None or local:
        return _inv_freq(theta, k)
    if s.rope_type == "linear":
        return _inv_freq(theta, k) / s.factor
    if s.rope_type == "yarn":
        pos_freq = theta ** (jnp.arange(0, k, 2, dtype=jnp.float32) / k)
        extrapolated, interpolated = 1.0 / pos_freq, 1.0 / (s.factor * pos_freq)
        low, high = yarn_correction_range(cfg)
        if low == high:
            high += 0.001  # transformers: avoid a zero-width ramp
        ramp = jnp.clip((jnp.arange(k // 2, dtype=jnp.float32) - low) / (high - low), 0, 1)
        keep = 1 - ramp  # 1: extrapolate (high frequencies), 0: interpolate
        return interpolated * (1 - keep) + extrapolated * keep
    if s.rope_type == "dynamic":
        if positions is None:
            return _inv_freq(theta, k)
        length = cfg.max_positions
        seq = jnp.maximum(jnp.max(positions).astype(jnp.int32) + 1, length).astype(jnp.float32)
        grow = (s.factor * seq / length - (s.factor - 1)) ** (k / (k - 2))
        grow = jnp.where(seq > length, grow, 1.0)  # exactly the base within L
        return _inv_freq(theta * grow, k)
    # llama3: keep high frequencies, divide low ones by factor, interpolate in between.
    inv = _inv_freq(theta, k)
    low_wavelen = s.original_max_position_embeddings / s.low_freq_factor
    high_wavelen = s.original_max_position_embeddings / s.high_freq_factor
    wavelen = 2 * math.pi / inv
    smooth = (s.original_max_position_embeddings / wavelen - s.low_freq_factor) / (
        s.high_freq_factor - s.low_freq_factor)
    scaled = jnp.where(wavelen > low_wavelen, inv / s.factor, inv)
    mid = (1 - smooth) * inv / s.factor + smooth * inv
    is_mid = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return jnp.where(is_mid, mid, scaled)


def apply_rope(x: jax.Array, positions: jax.Array, inv_freq: jax.Array,
               scale: float | jax.Array = 1.0) -> jax.Array:
    """Rotate the first ``R = 2 len(inv_freq)`` features of ``x [B, T, H, K]`` by
    ``positions [B, T]`` (rotate-half convention of HF); features ``R..K-1`` pass through.

    ``scale`` multiplies cos and sin (YaRN's attention factor, ``rope_attention_factor``),
    so the rotated features come out ``scale`` times longer; computed in float32, the
    result cast to ``x.dtype``.
    """
    r = 2 * inv_freq.shape[-1]
    angles = positions.astype(jnp.float32)[..., None] * inv_freq  # [B, T, R/2]
    angles = jnp.concatenate([angles, angles], axis=-1)[:, :, None, :]  # [B, T, 1, R]
    cos, sin = jnp.cos(angles), jnp.sin(angles)
    if not (isinstance(scale, (int, float)) and scale == 1.0):
        cos, sin = cos * scale, sin * scale
    x32 = x.astype(jnp.float32)
    rot, rest = x32[..., :r], x32[..., r:]
    half = r // 2
    rotated = jnp.concatenate([-rot[..., half:], rot[..., :half]], axis=-1)
    out = rot * cos + rotated * sin
    if rest.shape[-1]:
        out = jnp.concatenate([out, rest], axis=-1)
    return out.astype(x.dtype)


def rope_layer_table(cfg: ModelConfig) -> jax.Array | None:
    """``[L] bool``: whether each layer applies RoPE (``False``: a NoPE layer, SmolLM3;
    Kazemnejad et al. 2023), or ``None`` when every layer does."""
    if cfg.rope_layers is None:
        return None
    return jnp.asarray(cfg.rope_layers, bool)


def rope_qk(cfg: ModelConfig, q: jax.Array, k: jax.Array, positions: jax.Array,
            layer: jax.Array) -> tuple[jax.Array, jax.Array]:
    """RoPE on the queries ``[B, T, H, K]`` and keys ``[B, T, H_kv, K]`` of layer ``layer``
    (a traced scalar int32: per-layer settings are looked up in tables inside the layer scan).

    The layer's frequencies are the sliding layers' (``rope_local_theta``, unscaled) or the
    global ones (``rope_inv_freq`` at these ``positions [B, T]``), cos and sin times
    ``rope_attention_factor`` on global layers; a NoPE layer (``rope_layers``) returns q and
    k unrotated.
    """
    inv_freq = rope_inv_freq(cfg, positions=positions)
    scale: float | jax.Array = rope_attention_factor(cfg)
    if cfg.rope_local_theta is not None and cfg.sliding_window is not None:
        local = jnp.asarray([t == "sliding" for t in cfg.layer_kinds])[layer]
        inv_freq = jnp.where(local, rope_inv_freq(cfg, local=True), inv_freq)
        if scale != 1.0:
            scale = jnp.where(local, 1.0, scale)
    q_rot = apply_rope(q, positions, inv_freq, scale)
    k_rot = apply_rope(k, positions, inv_freq, scale)
    table = rope_layer_table(cfg)
    if table is None:
        return q_rot, k_rot
    on = table[layer]
    return jnp.where(on, q_rot, q), jnp.where(on, k_rot, k)
