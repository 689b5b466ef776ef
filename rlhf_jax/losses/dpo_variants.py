"""More pairwise members of the DPO family, each with a frozen reference: BCO (pairs), APO-zero,
APO-down, NCA (pairs), DPOP, EXO (pairs) and SPPO (hard labels).

Same inputs, reduction and metrics as ``rlhf_jax.losses.dpo`` (module docstring there): ``[B]``
sequence log-probabilities in nats, ``log π(y|x) = Σ_t loss_mask[t] · logp[t]``, summed over
the response tokens (none of these losses is length-normalised); the loss is the mean over the
B pairs; the implicit reward of a response is ``β (log π_θ(y|x) - log π_ref(y|x))``. Below,
``c = log π_θ(y_w|x) - log π_ref(y_w|x)`` and ``r = log π_θ(y_l|x) - log π_ref(y_l|x)`` are
the chosen and rejected log-ratios and ``h = c - r``. Registered in
``rlhf_jax.losses.dpo.DPO_LOSSES``.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from rlhf_jax.losses._pairwise import (_check_beta, _check_nonneg, _check_shapes, _logratios,
                                       _metrics)
from rlhf_jax.losses.logprobs import Metrics, _float, metric


def _pair(name, beta, pc, pr, rc, rr):
    """Checks, then the chosen / rejected log-ratios ``c, r`` ``[B]``."""
    _check_beta(name, beta)
    _check_shapes(name, pc, pr, rc, rr)
    return _logratios(pc, pr, rc, rr)


def _finish(loss_b, beta, c, r, pc, pr) -> tuple[jax.Array, Metrics]:
    return jnp.mean(loss_b), _metrics(loss_b, beta * c, beta * r, _float(pc), _float(pr))


def bco_reward_shift(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    weights: jax.Array | None = None,
) -> jax.Array:
    """BCO's reward shift δ over a batch: the mean implicit reward of its 2B responses.

    ``δ = Σ_b w_b (β c_b + β r_b) / (2 Σ_b w_b)``, without gradient. Jung et al. 2024 keep δ
    as a moving average of the rewards across training steps; here it is the mean over the
    current batch (a window of one step), so a step needs no state.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float sequence log-probabilities (nats).
      beta: β > 0.
      weights: optional ``[B]`` {0, 1} rows to average over (valid pairs); all when None.

    Returns:
      Scalar δ (reward units), ``stop_gradient``-ed.
    """
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps)
    w = jnp.ones_like(c) if weights is None else _float(weights)
    delta = jnp.sum(w * beta * (c + r)) / jnp.maximum(2.0 * jnp.sum(w), 1.0)
    return jax.lax.stop_gradient(delta)


def bco_pair_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    delta: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """BCO on pairs: a binary classifier with logit ``β log(π_θ/π_ref) - δ``, the chosen
    response labelled 1 and the rejected one 0.

    ``L = -log σ(β c - δ) - log σ(-(β r - δ))``. Jung et al. 2024 ("Binary Classifier
    Optimization for Large Language Model Alignment"), the BCO loss with the reward shift δ,
    applied to a preference pair with ``y_w`` as the desirable and ``y_l`` as the undesirable
    completion (TRL's ``bco_pair``). δ is the mean implicit reward of the batch
    (:func:`bco_reward_shift`; the paper keeps a moving average over steps), without gradient.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float sequence log-probabilities (nats).
      beta: β > 0.
      delta: the reward shift δ (scalar, reward units); None: :func:`bco_reward_shift` of
        these B pairs. A trainer that splits a batch passes the whole batch's δ.

    Returns:
      ``(loss, metrics)`` with implicit rewards ``β c``, ``β r``, plus ``bco/delta``.

    Raises:
      ValueError: ``beta <= 0`` or shape mismatch.
    """
    pc, pr, rc, rr = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps)
    c, r = _pair("bco_pair_loss", beta, pc, pr, rc, rr)
    if delta is None:
        delta = bco_reward_shift(pc, pr, rc, rr, beta=beta)
    delta = jax.lax.stop_gradient(jnp.asarray(delta, c.dtype))
    loss_b = -jax.nn.log_sigmoid(beta * c - delta) - jax.nn.log_sigmoid(-(beta * r - delta))
    loss, m = _finish(loss_b, beta, c, r, pc, pr)
    m["bco/delta"] = metric(jnp.broadcast_to(delta, c.shape))
    return loss, m


def apo_zero_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
) -> tuple[jax.Array, Metrics]:
    """APO-zero: raise the chosen likelihood and lower the rejected one, each anchored at the
    reference.

    ``L = -σ(β c) + σ(β r)``. D'Oosterlinck et al. 2024 ("Anchored Preference Optimization and
    Contrastive Revisions") eq. 4, for data whose chosen answers are better than the model's
    own. The value lies in (-1, 1) and is 0 at ``π_θ = π_ref`` (TRL's ``apo_zero`` adds the
    constant 1; the gradient is the same).

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float sequence log-probabilities (nats).
      beta: β > 0.

    Returns:
      ``(loss, metrics)`` with implicit rewards ``β c``, ``β r``.

    Raises:
      ValueError: ``beta <= 0`` or shape mismatch.
    """
    pc, pr, rc, rr = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps)
    c, r = _pair("apo_zero_loss", beta, pc, pr, rc, rr)
    loss_b = -jax.nn.sigmoid(beta * c) + jax.nn.sigmoid(beta * r)
    return _finish(loss_b, beta, c, r, pc, pr)


def apo_down_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
) -> tuple[jax.Array, Metrics]:
    """APO-down: lower the chosen likelihood, and the rejected one more.

    ``L = σ(β c) - σ(β (c - r))``. D'Oosterlinck et al. 2024 eq. 5, for data whose chosen
    answers are worse than the model's own. In (-1, 1), 0 at ``π_θ = π_ref`` (TRL's
    ``apo_down`` adds the constant 1).

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float sequence log-probabilities (nats).
      beta: β > 0.

    Returns:
      ``(loss, metrics)`` with implicit rewards ``β c``, ``β r``.

    Raises:
      ValueError: ``beta <= 0`` or shape mismatch.
    """
    pc, pr, rc, rr = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps)
    c, r = _pair("apo_down_loss", beta, pc, pr, rc, rr)
    loss_b = jax.nn.sigmoid(beta * c) - jax.nn.sigmoid(beta * (c - r))
    return _finish(loss_b, beta, c, r, pc, pr)


def nca_pair_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
) -> tuple[jax.Array, Metrics]:
    """NCA on pairs: classify each response's implicit reward against noise, absolutely rather
    than relative to the other response.

    ``L = -log σ(β c) - ½ log σ(-β c) - ½ log σ(-β r)``. Chen et al. 2024 ("Noise
    Contrastive Alignment of Language Models with Explicit Rewards"), the NCA loss for pairwise preference
    data (K = 2 responses; TRL's ``nca_pair``). Unlike DPO it penalises a falling chosen
    likelihood: the chosen term pushes ``β c`` up on its own, not only relative to ``β r``.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float sequence log-probabilities (nats).
      beta: β > 0.

    Returns:
      ``(loss, metrics)`` with implicit rewards ``β c``, ``β r``.

    Raises:
      ValueError: ``beta <= 0`` or shape mismatch.
    """
    pc, pr, rc, rr = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps)
    c, r = _pair("nca_pair_loss", beta, pc, pr, rc, rr)
    loss_b = (-jax.nn.log_sigmoid(beta * c) - 0.5 * jax.nn.log_sigmoid(-beta * c)
              - 0.5 * jax.nn.log_sigmoid(-beta * r))
    return _finish(loss_b, beta, c, r, pc, pr)


def dpop_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    lam: float | jax.Array = 50.0,
) -> tuple[jax.Array, Metrics]:
    """DPO-Positive (DPOP): DPO with a penalty when the chosen likelihood falls below the
    reference's.

    ``L = -log σ(β (c - r - λ · max(0, -c)))``, ``max(0, -c) = max(0, log π_ref(y_w|x) - log
    π_θ(y_w|x))``. Pal et al. 2024 ("Smaug: Fixing Failure Modes of Preference Optimisation
    with DPO-Positive") eq. 3, the penalty inside the β-scaled logit; the paper trains with
    λ = 50. Equals DPO while ``π_θ(y_w|x) >= π_ref(y_w|x)``.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float sequence log-probabilities (nats).
      beta: β > 0.
      lam: λ >= 0, weight of the penalty (in log-ratio units, inside β).

    Returns:
      ``(loss, metrics)`` with implicit rewards ``β c``, ``β r`` (without the penalty), plus
      ``dpop/penalty`` (``max(0, -c)``, nats).

    Raises:
      ValueError: ``beta <= 0``, ``lam < 0``, shape mismatch.
    """
    pc, pr, rc, rr = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps)
    c, r = _pair("dpop_loss", beta, pc, pr, rc, rr)
    _check_nonneg("dpop_loss", "lam (dpop_lambda)", lam)
    penalty = jax.nn.relu(-c)
    loss_b = -jax.nn.log_sigmoid(beta * (c - r - lam * penalty))
    loss, m = _finish(loss_b, beta, c, r, pc, pr)
    m["dpop/penalty"] = metric(penalty)
    return loss, m


#: ε used by :func:`exo_pair_loss` when it is given ``label_smoothing=0``: the value of Ji et
#: al. 2024 for pairwise data (and TRL's), since ε = 0 makes the target degenerate.
EXO_DEFAULT_EPSILON = 1e-3


def exo_pair_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    label_smoothing: float = EXO_DEFAULT_EPSILON,
) -> tuple[jax.Array, Metrics]:
    """EXO on pairs: the reverse KL from the policy's preference distribution over the pair to
    the (smoothed) label.

    ``p = σ(β h)``, ``L = p (log p - log(1 - ε)) + (1 - p) (log(1 - p) - log ε)`` =
    ``KL(Bern(p) || Bern(1 - ε))``. Ji et al. 2024 ("Towards Efficient Exact Optimization of
    Language Model Alignment"), the EXO loss with K = 2 and the preference label smoothed to
    ``(1 - ε, ε)`` (TRL's ``exo_pair``). DPO is the *forward* KL of the same two
    distributions at ε = 0; EXO's reverse KL is mode-seeking. Its minimum over h is 0, at
    ``β h = log((1 - ε)/ε)``.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float sequence log-probabilities (nats).
      beta: β > 0.
      label_smoothing: ε in ``[0, 0.5)``; 0 is read as :data:`EXO_DEFAULT_EPSILON` (1e-3).

    Returns:
      ``(loss, metrics)`` with implicit rewards ``β c``, ``β r``.

    Raises:
      ValueError: ``beta <= 0``, ``label_smoothing`` outside ``[0, 0.5)``, shape mismatch.
    """
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"exo_pair_loss: label_smoothing must be in [0, 0.5), got "
                         f"{label_smoothing}")
    eps = label_smoothing or EXO_DEFAULT_EPSILON
    pc, pr, rc, rr = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps)
    c, r = _pair("exo_pair_loss", beta, pc, pr, rc, rr)
    z = beta * (c - r)
    loss_b = (jax.nn.sigmoid(z) * (jax.nn.log_sigmoid(z) - math.log(1.0 - eps))
              + jax.nn.sigmoid(-z) * (jax.nn.log_sigmoid(-z) - math.log(eps)))
    return _finish(loss_b, beta, c, r, pc, pr)


def sppo_hard_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
) -> tuple[jax.Array, Metrics]:
    """SPPO with hard labels: regress each log-ratio onto ``±η/2`` with ``η = 1/β``.

    ``L = (c - 1/(2β))² + (r + 1/(2β))²``. Wu et al. 2024 ("Self-Play Preference Optimization
    for Language Model Alignment"): the SPPO objective ``(log(π_θ(y|x)/π_t(y|x)) - η (P(y ≻
    π_t | x) - ½))²`` with the win probability replaced by the hard label (1 for ``y_w``, 0
    for ``y_l``) and the previous iterate ``π_t`` by the reference; η = 1/β as in TRL's
    ``sppo_hard``. In log-ratio units (nats²), like IPO here; ``(β c - ½)² + (β r + ½)²`` is
    β² times this (same minimiser, gradients scaled by β²).

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float sequence log-probabilities (nats).
      beta: β > 0 (η = 1/β).

    Returns:
      ``(loss, metrics)`` with implicit rewards ``β c``, ``β r``.

    Raises:
      ValueError: ``beta <= 0`` or shape mismatch.
    """
    pc, pr, rc, rr = (policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
                      ref_rejected_logps)
    c, r = _pair("sppo_hard_loss", beta, pc, pr, rc, rr)
    half_eta = 0.5 / beta
    loss_b = jnp.square(c - half_eta) + jnp.square(r + half_eta)
    return _finish(loss_b, beta, c, r, pc, pr)
