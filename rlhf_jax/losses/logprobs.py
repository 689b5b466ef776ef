"""Log-probabilities, entropies, masked statistics and (sum, count) metrics.

This module is **the one place in the library that shifts logits by one token**. A causal LM
forward over ``tokens[b, 0..T-1]`` gives ``logits[b, t]`` = the distribution of token ``t+1``;
:func:`sequence_logprobs` and ``entropy_from_logits(..., shift=True)`` turn that into arrays
aligned with ``tokens`` and with ``loss_mask`` (see ``rlhf_jax/types.py``)::

    logp[b, t] = log softmax(logits[b, t - 1])[tokens[b, t]]   for t >= 1,   logp[b, 0] = 0

Logits from a sampler are already aligned with the tokens they produced; use
:func:`gather_logprobs` (no shift) for those.

Masks everywhere are bool or {0, 1}; masked entries are excluded with ``jnp.where`` (never
multiplied), so a NaN or inf sitting in a masked slot does not leak. Every denominator that
counts mask entries is clamped at 1, so a fully masked row gives 0, not NaN.

Metrics travel as ``name -> (sum, count)`` pairs of float32 scalars:
add pairs across microbatches/devices, then call :func:`reduce_metrics` once.
"""

from __future__ import annotations

from typing import Literal, Mapping

import jax
import jax.numpy as jnp

Metric = tuple[jax.Array, jax.Array]
Metrics = dict[str, Metric]


def _float(x: jax.Array) -> jax.Array:
    """``x`` as at least float32 (bf16/f16 -> f32; f64 stays f64 when x64 is enabled)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _bool(mask: jax.Array) -> jax.Array:
    return jnp.asarray(mask).astype(bool)


# --------------------------------------------------------------------------------------------
# Log-probabilities and entropy
# --------------------------------------------------------------------------------------------


def gather_logprobs(
    logits_BxRxV: jax.Array, targets_BxR: jax.Array, *, temperature: float | jax.Array = 1.0
) -> jax.Array:
    """Log-probability of each target under logits already aligned with it (no shift).

    ``logp[..., r] = logits[..., r, y_r] / τ - logsumexp_v(logits[..., r, v] / τ)``
    ``= log π(y_r | x, y_<r)`` when ``logits[..., r]`` is the distribution that produced ``y_r``
    (e.g. the logits a sampler returns with each sampled token).

    Computed in float32 (or float64 under x64) whatever the logits dtype, as
    ``selected logit - logsumexp``: no one-hot and no ``[..., V]`` log-softmax is built.

    Args:
      logits_BxRxV: ``[..., R, V]`` float (any float dtype), unnormalised logits.
      targets_BxR: ``[..., R]`` int token ids. Ids outside ``[0, V)`` (e.g. a negative padding
        id) are clipped into range: their value is meaningless and must be masked by the
        caller, but it is finite.
      temperature: sampling temperature τ > 0 (Python float or scalar array); the logits are
        divided by it, so the result matches a sampler that used the same τ.

    Returns:
      ``[..., R]`` float32 log-probabilities in nats, aligned with ``targets``.

    Raises:
      ValueError: if the leading shapes of logits and targets differ.
    """
    if logits_BxRxV.shape[:-1] != targets_BxR.shape:
        raise ValueError(
            f"gather_logprobs: logits shape {logits_BxRxV.shape} must be targets shape "
            f"{targets_BxR.shape} + (V,)"
        )
    logits = _float(logits_BxRxV) / temperature
    idx = targets_BxR.astype(jnp.int32)[..., None]
    selected = jnp.take_along_axis(logits, idx, axis=-1, mode="clip")[..., 0]
    return selected - jax.nn.logsumexp(logits, axis=-1)


def _shift_right(x_BxT: jax.Array) -> jax.Array:
    """Prepend a zero column on the last axis (so a ``[..., T-1]`` array is aligned with T)."""
    pad = [(0, 0)] * (x_BxT.ndim - 1) + [(1, 0)]
    return jnp.pad(x_BxT, pad)


def sequence_logprobs(
    logits_BxTxV: jax.Array, tokens_BxT: jax.Array, *, temperature: float | jax.Array = 1.0
) -> jax.Array:
    """Per-token log-probabilities of ``tokens`` under a causal LM's logits, aligned with tokens.

    ``logp[..., t] = log softmax(logits[..., t-1] / τ)[tokens[..., t]]`` for ``t >= 1`` and
    ``logp[..., 0] = 0`` (nothing predicts the first token). This is the library's one-token
    shift: the result is aligned with ``tokens`` and with ``loss_mask`` from ``types.py``, so
    ``masked_sum(logp, loss_mask, axis=-1)`` is the response log-likelihood
    ``log π(y | x)`` in nats.

    Args:
      logits_BxTxV: ``[..., T, V]`` float logits of a forward over ``tokens`` (bf16 is fine;
        the maths is done in float32).
      tokens_BxT: ``[..., T]`` int32 token ids (prompt + response). Padding ids are clipped
        into ``[0, V)`` and give finite values that must be masked.
      temperature: τ > 0 the sampler used (Python float or scalar array).

    Returns:
      ``[..., T]`` float32 log-probabilities in nats; column 0 is 0.

    Raises:
      ValueError: if ``logits.shape[:-1] != tokens.shape``.
    """
    if logits_BxTxV.shape[:-1] != tokens_BxT.shape:
        raise ValueError(
            f"sequence_logprobs: logits shape {logits_BxTxV.shape} must be tokens shape "
            f"{tokens_BxT.shape} + (V,)"
        )
    # Shift the [..., T] tokens, not the [..., T, V] logits: slicing the logits to T-1 rows
    # costs a copy of them (and a zero-filled scatter in the backward) on XLA:CPU. Row T-1
    # pairs the last logits with a dummy target; its value is dropped by the final shift.
    next_tokens = jnp.concatenate([tokens_BxT[..., 1:], tokens_BxT[..., :1]], axis=-1)
    logp = gather_logprobs(logits_BxTxV, next_tokens, temperature=temperature)
    return _shift_right(logp[..., :-1])


def entropy_from_logits(
    logits: jax.Array, *, shift: bool, temperature: float | jax.Array = 1.0
) -> jax.Array:
    """Entropy (nats) of the categorical distribution at each position.

    ``H[..., t] = -Σ_v p_v log p_v`` with ``p = softmax(logits[..., s] / τ)`` where ``s = t``
    when ``shift=False`` and ``s = t - 1`` when ``shift=True``.

    * ``shift=True``: ``logits`` is a training forward over ``tokens [..., T]``; the result is
      aligned like :func:`sequence_logprobs` (``H[..., t]`` is the entropy of the distribution
      that predicts ``tokens[..., t]``; ``H[..., 0] = 0``), so it can be masked with
      ``loss_mask``.
    * ``shift=False``: ``logits`` is already aligned with its targets (e.g. from a sampler).

    ``shift`` has no default on purpose: the caller states which alignment it has.
    Vocabulary entries with logit ``-inf`` contribute 0 (no NaN).

    Args:
      logits: ``[..., T, V]`` float logits (any float dtype; computed in float32).
      shift: see above.
      temperature: τ > 0 applied to the logits before the softmax.

    Returns:
      ``[..., T]`` float32 entropies in nats.
    """
    logits = _float(logits) / temperature
    logp = jax.nn.log_softmax(logits, axis=-1)
    p = jnp.exp(logp)
    # p log p -> 0 as p -> 0; the inner where keeps -inf logits (masked tokens) out of the
    # gradient too (0 * -inf would be NaN there).
    ent = -jnp.sum(jnp.where(p > 0, p * jnp.where(p > 0, logp, 0.0), 0.0), axis=-1)
    # shift the [..., T] result rather than slice the [..., T, V] logits (see sequence_logprobs)
    return _shift_right(ent[..., :-1]) if shift else ent


# --------------------------------------------------------------------------------------------
# Masked statistics
# --------------------------------------------------------------------------------------------


def masked_sum(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """``Σ_{mask} x`` over ``axis`` (all axes when None); masked entries are excluded (not multiplied).

    Args:
      x: ``[...]`` float array.
      mask: bool or {0, 1} array broadcastable to ``x``.
      axis: int, tuple of ints or None.

    Returns:
      The sum, float (at least float32).
    """
    x = _float(x)
    return jnp.sum(jnp.where(_bool(mask), x, 0.0), axis=axis)


def masked_count(mask: jax.Array, axis=None, *, like: jax.Array | None = None) -> jax.Array:
    """Number of True entries of ``mask`` (broadcast to ``like`` when given), as float32."""
    m = _bool(mask)
    if like is not None:
        m = jnp.broadcast_to(m, jnp.shape(like))
    return jnp.sum(m, axis=axis).astype(jnp.float32)


def masked_mean(x: jax.Array, mask: jax.Array, axis=None) -> jax.Array:
    """``Σ_{mask} x / max(Σ mask, 1)`` over ``axis`` (all axes when None).

    Token-mean when reducing over all axes of a ``[B, R]`` array. A fully masked slice gives 0.

    Args:
      x: ``[...]`` float array.
      mask: bool or {0, 1} array broadcastable to ``x``.
      axis: int, tuple of ints or None.
    """
    x = _float(x)
    return masked_sum(x, mask, axis) / jnp.maximum(masked_count(mask, axis, like=x), 1.0).astype(
        x.dtype
    )


def masked_var(x: jax.Array, mask: jax.Array, unbiased: bool = True, axis=None) -> jax.Array:
    """Variance of ``x`` over the masked entries (two-pass: mean first, then squared deviations).

    ``var = Σ_{mask} (x - mean)² / n`` times ``n / max(n - 1, 1)`` when ``unbiased`` (Bessel's
    correction, as TRL's ``masked_var``), ``n = Σ mask``. Fewer than two entries give a finite
    value (0 for one entry, 0 for none) instead of NaN.

    Args:
      x: ``[...]`` float array.
      mask: bool or {0, 1} array broadcastable to ``x``.
      unbiased: apply Bessel's correction.
      axis: int, tuple of ints or None (all axes).
    """
    x = jnp.where(_bool(mask), _float(x), 0.0)  # masked garbage must not reach any gradient
    mean = masked_mean(x, mask, axis=axis)
    mean_b = mean if axis is None else jnp.expand_dims(mean, axis)
    n = masked_count(mask, axis, like=x).astype(x.dtype)
    var = masked_sum(jnp.square(x - mean_b), mask, axis) / jnp.maximum(n, 1.0)
    if unbiased:
        var = var * n / jnp.maximum(n - 1.0, 1.0)
    return var


def whiten(
    x: jax.Array, mask: jax.Array, shift_mean: bool = True, eps: float = 1e-8
) -> jax.Array:
    """Normalise ``x`` to mean 0 and variance 1 over the masked entries (all axes together).

    ``y = (x - mean) / sqrt(var + eps)`` (+ ``mean`` when ``shift_mean=False``), with ``mean``
    and the unbiased ``var`` of :func:`masked_var` taken over every masked entry. Masked
    entries of the result are 0. ``shift_mean=False`` keeps the original mean (rescales only),
    as TRL's ``masked_whiten`` and lm-human-preferences' ``whiten`` do for rewards; PPO
    advantages use ``shift_mean=True``.

    Source: lm-human-preferences ``core.whiten`` (Ziegler et al. 2019); TRL ``masked_whiten``.

    Args:
      x: ``[...]`` float array (e.g. advantages ``[B, R]``).
      mask: bool or {0, 1} broadcastable to ``x``.
      shift_mean: subtract the mean (True) or add it back after scaling (False).
      eps: added to the variance.

    Returns:
      Float array of ``x``'s shape.
    """
    x = jnp.where(_bool(mask), _float(x), 0.0)  # masked garbage must not reach any gradient
    mean = masked_mean(x, mask)
    var = masked_var(x, mask, unbiased=True)
    y = (x - mean) * jax.lax.rsqrt(var + eps)
    if not shift_mean:
        y = y + mean
    return jnp.where(_bool(mask), y, 0.0)


def aggregate_loss(
    loss_BxT: jax.Array,
    mask_BxT: jax.Array,
    *,
    reduction: Literal["token", "sequence"] = "token",
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
) -> tuple[jax.Array, Metric]:
    """Reduce a per-token loss to a scalar: token-mean or sequence-mean, optionally with a global denominator.

    * ``reduction="token"``: ``Σ_{b,t} mask·ℓ / D`` with ``D = num_tokens`` when given, else
      ``max(Σ mask, 1)``. Passing the token count of the *whole* batch as ``num_tokens`` makes
      the sum of microbatch losses equal the full-batch loss (so gradient accumulation is
      exact). A constant ``num_tokens = B·T_max`` gives the "token-sum / constant" reduction of
      Dr. GRPO (Liu et al. 2025, §3.1).
    * ``reduction="sequence"``: each sequence's token-mean ``Σ_t mask·ℓ / max(Σ_t mask, 1)``,
      averaged over sequences that have at least one masked token, or divided by
      ``num_sequences`` when given (same microbatch rule). Sequences are all leading axes.

    Args:
      loss_BxT: ``[..., T]`` per-token loss.
      mask_BxT: ``[..., T]`` bool/{0,1}, True where the token counts.
      reduction: ``"token"`` or ``"sequence"``.
      num_tokens: optional global token denominator (scalar), only for ``"token"``.
      num_sequences: optional global sequence denominator (scalar), only for ``"sequence"``.

    Returns:
      ``(loss, (sum, count))``: the scalar loss, and the metric pair that reduces to the local
      loss (``(Σ mask·ℓ, Σ mask)`` for token, ``(Σ sequence means, #sequences)`` for sequence).

    Raises:
      ValueError: unknown ``reduction`` or a denominator given for the other reduction.
    """
    _check_reduction("aggregate_loss", reduction, num_tokens, num_sequences)
    loss = _float(loss_BxT)
    mask = jnp.broadcast_to(_bool(mask_BxT), loss.shape)
    if reduction == "token":
        total = masked_sum(loss, mask)
        count = masked_count(mask)
        denom = jnp.maximum(count, 1.0) if num_tokens is None else jnp.asarray(num_tokens)
        return total / denom.astype(total.dtype), (total, count)
    else:
        seq_mean = masked_mean(loss, mask, axis=-1)
        has_tokens = jnp.any(mask, axis=-1)
        total = jnp.sum(jnp.where(has_tokens, seq_mean, 0.0))
        count = jnp.sum(has_tokens).astype(jnp.float32)
        denom = jnp.maximum(count, 1.0) if num_sequences is None else jnp.asarray(num_sequences)
        return total / denom.astype(total.dtype), (total, count)


def _check_reduction(name: str, reduction: str, num_tokens, num_sequences) -> None:
    """Raise ValueError for an unknown reduction or a denominator meant for the other one."""
    if reduction not in ("token", "sequence"):
        raise ValueError(f"{name}: reduction must be 'token' or 'sequence', got {reduction!r}")
    if reduction == "token" and num_sequences is not None:
        raise ValueError(f"{name}: num_sequences is only used with reduction='sequence'")
    if reduction == "sequence" and num_tokens is not None:
        raise ValueError(f"{name}: num_tokens (num_targets) is only used with reduction='token'")


# --------------------------------------------------------------------------------------------
# (sum, count) metrics
# --------------------------------------------------------------------------------------------


def metric(x: jax.Array, mask: jax.Array | None = None) -> Metric:
    """A ``(sum, count)`` metric pair of float32 scalars for the mean of ``x`` over ``mask``.

    Args:
      x: any-shape array (a scalar counts once).
      mask: optional bool/{0,1} broadcastable to ``x``; all entries when None.
    """
    x = jnp.asarray(x).astype(jnp.float32)
    if mask is None:
        return jnp.sum(x), jnp.asarray(x.size, jnp.float32)
    return masked_sum(x, mask).astype(jnp.float32), masked_count(mask, like=x)


def add_metrics(a: Mapping[str, Metric], b: Mapping[str, Metric]) -> Metrics:
    """Combine two metric dicts by adding ``(sum, count)`` pairs (microbatch/step accumulation).

    Keys present in only one dict are kept as they are.
    """
    out = dict(a)
    for k, (s, c) in b.items():
        if k in out:
            out[k] = (out[k][0] + s, out[k][1] + c)
        else:
            out[k] = (s, c)
    return out


def reduce_metrics(metrics: Mapping[str, Metric]) -> dict[str, jax.Array]:
    """``{name: sum / max(count, 1)}``: turn accumulated ``(sum, count)`` pairs into means.

    Call once, after summing pairs over microbatches/devices/steps, so the result does not
    depend on how the batch was split. Works on jax or NumPy scalars.
    """
    return {k: s / jnp.maximum(c, 1.0) for k, (s, c) in metrics.items()}
