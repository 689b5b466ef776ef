"""Per-token policy-gradient surrogates of the on-policy trainers, one registry.

Each surrogate maps ``(logp, old_logp, advantages, mask)`` (``[B, R]``, aligned with the
response tokens, ``logp`` with gradient) to a per-token loss ``[B, R]`` (0 on masked
positions) and token-level ``(sum, count)`` diagnostics; ``losses.ppo.ppo_loss`` reduces it
with the chosen aggregation. Names (``PPOConfig.policy_loss``):

* ``ppo``: the token ratio ``ρ_t = π/π_old`` with the clipped surrogate
  ``max(-A ρ, -A clip(ρ, 1-ε_low, 1+ε_high))`` (Schulman et al. 2017 eq. 7; the asymmetric
  "clip-higher" ε_high of DAPO, Yu et al. 2025 §3.1), optionally dual-clipped at ``-c A`` for
  ``A < 0`` (Ye et al. 2020, "Mastering Complex Control in MOBA Games", eq. 5).
* ``gspo``: GSPO's sequence-level ratio ``s_i = exp(mean_t log ρ_{i,t})`` (Zheng et al. 2025,
  "Group Sequence Policy Optimization", eq. 5-7), used in its token form
  ``s_{i,t} = sg(s_i) · π(y_t)/sg(π(y_t))``, which has the value of ``s_i`` and the gradient of
  GSPO's sequence objective when reduced with ``sequence_mean``. With one token per sequence it
  is ``ppo``. GSPO's clipping range is small (ε ≈ 3e-4 to 4e-4 in the paper).
* ``cispo``: CISPO's clipped, stop-gradient importance weight on REINFORCE:
  ``-sg(clip(ρ_t, 1-ε_low, 1+ε_high)) · A_t · log π(y_t)`` (MiniMax 2025, "MiniMax-M1", eq. 4);
  no token is dropped from the gradient, unlike ``ppo``'s clip.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import Metrics, _bool, _float, masked_mean, metric


def check_clip(name, clip_eps, clip_eps_high, dual_clip) -> None:
    """Raise ``ValueError`` (prefixed ``name``) for ε < 0, ε_high < 0 or a dual clip <= 1."""
    if isinstance(clip_eps, (int, float)) and not clip_eps >= 0:
        raise ValueError(f"{name}: clip_eps must be >= 0, got {clip_eps}")
    if isinstance(clip_eps_high, (int, float)) and not clip_eps_high >= 0:
        raise ValueError(f"{name}: clip_eps_high must be >= 0, got {clip_eps_high}")
    if isinstance(dual_clip, (int, float)) and not dual_clip > 1:
        raise ValueError(f"{name}: dual_clip must be > 1 (Ye et al. 2020), got {dual_clip}")


def _ratio_metrics(log_ratio, ratio, m) -> Metrics:
    return {
        "ppo/policy/approxkl": metric(0.5 * jnp.square(log_ratio), m),
        "ppo/policy/approxkl_k3": metric(jnp.expm1(-log_ratio) + log_ratio, m),
        "ppo/policy/ratio": metric(ratio, m),
    }


def _clipped(log_ratio, adv, m, clip_eps, clip_eps_high, dual_clip):
    """The clipped surrogate on a given per-token log-ratio (``ppo`` and ``gspo``)."""
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = jnp.exp(log_ratio)
    pg1 = -adv * ratio
    pg2 = -adv * jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high)
    pg = jnp.maximum(pg1, pg2)
    metrics = {"ppo/policy/clipfrac": metric((pg2 > pg1).astype(jnp.float32), m),
               **_ratio_metrics(log_ratio, ratio, m)}
    if dual_clip is not None:
        pg3 = -dual_clip * adv
        dual = (adv < 0) & (pg3 < pg)
        pg = jnp.where(adv < 0, jnp.minimum(pg, pg3), pg)
        metrics["ppo/policy/dual_clipfrac"] = metric(dual.astype(jnp.float32), m)
    return jnp.where(m, pg, 0.0), metrics


def _inputs(logp, old_logp, advantages, mask):
    m = _bool(mask)
    logp = jnp.where(m, _float(logp), 0.0)
    log_ratio = jnp.where(m, logp - _float(old_logp), 0.0)
    adv = jnp.where(m, _float(advantages), 0.0)
    return m, logp, log_ratio, adv


def ppo_clip_terms(logp, old_logp, advantages, mask, *, clip_eps, clip_eps_high=None,
                   dual_clip=None):
    """``ppo``: per-token clipped surrogate of the token ratio (module docstring).

    Args:
      logp, old_logp: ``[B, R]`` float current / rollout log-probs of the sampled tokens (nats).
      advantages: ``[B, R]`` float; mask: ``[B, R]`` bool/{0,1}.
      clip_eps: ε_low >= 0; clip_eps_high: ε_high (None = ε_low); dual_clip: c > 1 or None.

    Returns:
      ``(loss [B, R] float32, metrics)``: ``ppo/policy/clipfrac`` (the clipped term active),
      ``approxkl`` (``½ log ρ²``), ``approxkl_k3``, ``ratio``, and ``dual_clipfrac`` with a
      dual clip; token-level ``(sum, count)`` pairs.
    """
    m, _, log_ratio, adv = _inputs(logp, old_logp, advantages, mask)
    return _clipped(log_ratio, adv, m, clip_eps, clip_eps_high, dual_clip)


def gspo_terms(logp, old_logp, advantages, mask, *, clip_eps, clip_eps_high=None,
               dual_clip=None):
    """``gspo``: the clipped surrogate of the length-normalised sequence ratio, token form.

    ``log s_i = (1/|y_i|) Σ_t log ρ_{i,t}``; per token ``log s_{i,t} = sg(log s_i) + log π(y_t)
    - sg(log π(y_t))`` (Zheng et al. 2025 eq. 7 and §4.2, "GSPO-token"). Arguments and
    results as :func:`ppo_clip_terms`; ``ppo/policy/ratio`` is ``s_i`` at every token.
    """
    m, logp, log_ratio, adv = _inputs(logp, old_logp, advantages, mask)
    log_s = masked_mean(log_ratio, m, axis=-1)[:, None]
    token_log_s = jax.lax.stop_gradient(log_s) + logp - jax.lax.stop_gradient(logp)
    return _clipped(jnp.where(m, token_log_s, 0.0), adv, m, clip_eps, clip_eps_high, dual_clip)


def cispo_terms(logp, old_logp, advantages, mask, *, clip_eps, clip_eps_high=None,
                dual_clip=None):
    """``cispo``: ``-sg(clip(ρ_t, 1-ε_low, 1+ε_high)) A_t log π(y_t)`` (MiniMax-M1 eq. 4).

    Arguments as :func:`ppo_clip_terms` (``dual_clip`` must be None). ``ppo/policy/clipfrac``
    is the share of tokens whose weight was clipped.

    Raises:
      ValueError: a dual clip (it has no meaning for a fixed weight).
    """
    if dual_clip is not None:
        raise ValueError("cispo: dual_clip does not apply (the importance weight is already "
                         "clipped and carries no gradient)")
    m, logp, log_ratio, adv = _inputs(logp, old_logp, advantages, mask)
    eps_high = clip_eps if clip_eps_high is None else clip_eps_high
    ratio = jnp.exp(log_ratio)
    weight = jax.lax.stop_gradient(jnp.clip(ratio, 1.0 - clip_eps, 1.0 + eps_high))
    clipped = (ratio < 1.0 - clip_eps) | (ratio > 1.0 + eps_high)
    metrics = {"ppo/policy/clipfrac": metric(clipped.astype(jnp.float32), m),
               **_ratio_metrics(log_ratio, ratio, m)}
    return jnp.where(m, -weight * adv * logp, 0.0), metrics


@dataclasses.dataclass(frozen=True)
class PolicyLoss:
    """A registered surrogate: ``terms(logp, old_logp, advantages, mask, *, clip_eps,
    clip_eps_high, dual_clip) -> (loss [B, R], metrics)`` and its source."""

    name: str
    terms: Callable
    source: str


POLICY_LOSSES: dict[str, PolicyLoss] = {
    "ppo": PolicyLoss("ppo", ppo_clip_terms, "Schulman et al. 2017 eq. 7; DAPO §3.1; Ye et al. 2020"),
    "gspo": PolicyLoss("gspo", gspo_terms, "Zheng et al. 2025 (GSPO) eq. 5-7"),
    "cispo": PolicyLoss("cispo", cispo_terms, "MiniMax 2025 (MiniMax-M1) eq. 4"),
}


def get_policy_loss(name: str) -> PolicyLoss:
    """The surrogate called ``name``.

    Raises:
      ValueError: unknown name (lists the registered ones).
    """
    if name not in POLICY_LOSSES:
        raise ValueError(f"unknown policy loss {name!r}; expected one of {sorted(POLICY_LOSSES)}")
    return POLICY_LOSSES[name]
