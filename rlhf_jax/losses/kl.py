"""KL divergence between the policy π and the reference π_ref, estimated from samples of π.

Per-token estimators of ``KL(π || π_ref)`` from one sampled token ``y ~ π`` (Schulman 2020,
"Approximating KL Divergence", http://joschu.net/blog/kl-approx.html), with
``log_ratio = logp - ref_logp = log π(y)/π_ref(y)``:

* ``k1 = log_ratio`` — unbiased, high variance, can be negative.
* ``k2 = ½ log_ratio²`` — biased (exact to second order when π ≈ π_ref), low variance, >= 0.
* ``k3 = exp(-log_ratio) - 1 + log_ratio`` — unbiased and >= 0 (a Bregman divergence of log).
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import _float, masked_sum

Estimator = Literal["k1", "k2", "k3"]


def kl_estimate(logp: jax.Array, ref_logp: jax.Array, estimator: Estimator = "k1") -> jax.Array:
    """Per-token sample estimate of ``KL(π || π_ref)``, elementwise.

    With ``d = logp - ref_logp``: ``k1 = d``, ``k2 = d²/2``, ``k3 = exp(-d) - 1 + d``.
    ``E_{y~π}[k1] = E_{y~π}[k3] = KL(π || π_ref)`` exactly; ``E[k2] = KL + O(d³)``.
    Schulman 2020, "Approximating KL Divergence". ``k1`` is the reward-shaping penalty of
    Ziegler et al. 2019 §2.2; ``k3`` is the KL term of GRPO (Shao et al. 2024 eq. 4).

    Args:
      logp: ``[...]`` float ``log π(y_t | ...)`` of the *sampled* tokens (nats), e.g. ``[B, R]``
        aligned with the response tokens.
      ref_logp: ``[...]`` float ``log π_ref(y_t | ...)`` of the same tokens, same alignment.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
      Float (at least float32) array of the broadcast shape, nats per token. Not masked: multiply
      or ``masked_sum`` with the response mask.

    Raises:
      ValueError: unknown ``estimator``.
    """
    d = _float(logp) - _float(ref_logp)
    if estimator == "k1":
        return d
    if estimator == "k2":
        return 0.5 * jnp.square(d)
    if estimator == "k3":
        return jnp.expm1(-d) + d
    raise ValueError(f"kl_estimate: estimator must be 'k1', 'k2' or 'k3', got {estimator!r}")


def sequence_kl(
    logp: jax.Array, ref_logp: jax.Array, mask: jax.Array, estimator: Estimator = "k1"
) -> jax.Array:
    """Sequence-level KL estimate ``Σ_t mask[..., t] · k(logp[..., t], ref_logp[..., t])``.

    Summing a per-token unbiased estimator over the sampled response gives an unbiased estimate
    of the sequence KL ``KL(π(·|x) || π_ref(·|x))`` (chain rule). Schulman 2020.

    Args:
      logp: ``[..., R]`` float policy log-probs of sampled response tokens (nats).
      ref_logp: ``[..., R]`` float reference log-probs of the same tokens.
      mask: ``[..., R]`` bool/{0,1}, True on response tokens.
      estimator: ``"k1"``, ``"k2"`` or ``"k3"``.

    Returns:
      ``[...]`` float, nats per sequence (masked positions excluded).
    """
    return masked_sum(kl_estimate(logp, ref_logp, estimator), mask, axis=-1)


def kl_from_logits(logits: jax.Array, ref_logits: jax.Array) -> jax.Array:
    """Exact KL between the two full next-token distributions at each position.

    ``KL[..., t] = Σ_v p_v (log p_v - log q_v)`` with ``p = softmax(logits)``,
    ``q = softmax(ref_logits)`` (the "full" KL of TRL, zero-variance but needs the reference
    logits). Entries with ``p_v = 0`` contribute 0.

    Args:
      logits: ``[..., V]`` float policy logits (already aligned however the caller needs; no
        shift here).
      ref_logits: ``[..., V]`` float reference logits, same alignment.

    Returns:
      ``[...]`` float32, nats.
    """
    logp = jax.nn.log_softmax(_float(logits), axis=-1)
    logq = jax.nn.log_softmax(_float(ref_logits), axis=-1)
    p = jnp.exp(logp)
    return jnp.sum(jnp.where(p > 0, p * (logp - logq), 0.0), axis=-1)
