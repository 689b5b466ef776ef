"""Reference-free members of the DPO family: SimPO (Meng et al. 2024) and ORPO (Hong et al.
2024). Same inputs and metrics as ``rlhf_jax.losses.dpo`` but no reference policy: the
implicit reward is the policy's own (length-normalised) log-likelihood. Registered in
``rlhf_jax.losses.dpo.DPO_LOSSES`` with ``needs_reference=False``."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._pairwise import _average, _check_beta, _check_lengths, _check_shapes, _metrics
from rlhf_jax.losses.logprobs import Metrics, metric


def simpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 2.0,
    gamma: float | jax.Array = 0.5,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """SimPO: reference-free, length-normalised preference loss with a target margin.

    ``L = -log σ(β/|y_w| · log π_θ(y_w) - β/|y_l| · log π_θ(y_l) - γ)``.
    Meng et al. 2024 ("SimPO: Simple Preference Optimization with a Reference-Free Reward")
    eq. 6; the paper uses β ≈ 2–2.5 and γ ≈ 0.3–1.6 (γ in reward units, not γ/β).

    Args:
      policy_chosen_logps: ``[B]`` float; sum over response tokens (nats) if lengths are given,
        else the per-token average.
      policy_rejected_logps: ``[B]`` float, same convention.
      beta: β > 0, reward scale.
      gamma: target reward margin γ >= 0.
      chosen_lengths: optional ``[B]`` response token count ``|y_w|`` (both or neither).
      rejected_lengths: optional ``[B]`` ``|y_l|``.

    Returns:
      ``(loss, metrics)`` with rewards ``β/|y| · log π_θ(y)`` (SimPO's implicit reward).

    Raises:
      ValueError: ``beta <= 0``, only one of the lengths given, shape mismatch.
    """
    _check_beta("simpo_loss", beta)
    _check_lengths("simpo_loss", chosen_lengths, rejected_lengths)
    _check_shapes("simpo_loss", policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    pc = _average(policy_chosen_logps, chosen_lengths)
    pr = _average(policy_rejected_logps, rejected_lengths)
    rew_c, rew_r = beta * pc, beta * pr
    loss_b = -jax.nn.log_sigmoid(rew_c - rew_r - gamma)
    return jnp.mean(loss_b), _metrics(loss_b, rew_c, rew_r, pc, pr)


def _log1mexp(x: jax.Array) -> jax.Array:
    """``log(1 - exp(x))`` for ``x < 0``, stable at both ends (Mächler 2012)."""
    return jnp.where(x > -jnp.log(2.0), jnp.log(-jnp.expm1(x)), jnp.log1p(-jnp.exp(x)))


def orpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    *,
    lam: float | jax.Array = 0.1,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """ORPO: NLL on the chosen response plus a log-odds-ratio preference term (reference-free).

    ``L = -ℓ(y_w) + λ · -log σ(log odds(y_w) - log odds(y_l))`` with ``ℓ(y) = log π_θ(y|x)/|y|``
    (per-token average), ``P = exp(ℓ)`` and ``log odds = ℓ - log(1 - exp(ℓ))``.
    Hong et al. 2024 ("ORPO: Monolithic Preference Optimization without Reference Model")
    §3 (eq. 6–7); λ = 0.1 in the paper. The NLL here is the mean over pairs of each chosen response's
    per-token average NLL (TRL takes a token-mean over the batch instead; the two agree when all
    chosen responses have the same length). ``ℓ`` is clamped at ``-1e-6`` so that a probability
    of exactly 1 gives a large finite log-odds.

    Args:
      policy_chosen_logps: ``[B]`` float; sum over response tokens (nats) if lengths are given,
        else the per-token average.
      policy_rejected_logps: ``[B]`` float, same convention.
      lam: λ >= 0, weight of the odds-ratio term.
      chosen_lengths: optional ``[B]`` ``|y_w|`` (both or neither).
      rejected_lengths: optional ``[B]`` ``|y_l|``.

    Returns:
      ``(loss, metrics)``; rewards ``λ · ℓ`` (as TRL reports), plus ``orpo/nll`` and
      ``orpo/log_odds_ratio``.

    Raises:
      ValueError: only one of the lengths given, or shape mismatch.
    """
    _check_lengths("orpo_loss", chosen_lengths, rejected_lengths)
    _check_shapes("orpo_loss", policy_chosen_logps, policy_rejected_logps, chosen_lengths, rejected_lengths)
    pc = _average(policy_chosen_logps, chosen_lengths)
    pr = _average(policy_rejected_logps, rejected_lengths)
    lc, lr = jnp.minimum(pc, -1e-6), jnp.minimum(pr, -1e-6)
    log_odds = (lc - _log1mexp(lc)) - (lr - _log1mexp(lr))
    nll_b = -pc
    loss_b = nll_b - lam * jax.nn.log_sigmoid(log_odds)
    m = _metrics(loss_b, lam * pc, lam * pr, pc, pr)
    m["orpo/nll"] = metric(nll_b)
    m["orpo/log_odds_ratio"] = metric(log_odds)
    return jnp.mean(loss_b), m
