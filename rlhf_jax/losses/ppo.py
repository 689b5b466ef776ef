"""PPO for RLHF: KL-shaped rewards, the clipped policy and value losses, and their combination.

Token-level arrays are ``[B, R]`` aligned with the response tokens: ``logp[b, r] =
log π(y_r | x, y_<r)`` (from ``sequence_logprobs`` sliced to the response, or from the
sampler), ``mask[b, r]`` True on valid response tokens (EOS included, padding after it False).

The per-token losses are reduced by :func:`~rlhf_jax.losses.logprobs.aggregate_loss`:
``reduction="token"`` (token-mean over the mask; the default, as DAPO Yu et al. 2025 §3.3 and
TRL) or ``"sequence"`` (mean over sequences of per-sequence token-means, as the original GRPO,
Shao et al. 2024 eq. 3), with optional global denominators ``num_tokens`` / ``num_sequences``
for exact gradient accumulation over microbatches.
"""

from __future__ import annotations

from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax.losses.kl import Estimator, kl_estimate
from rlhf_jax.losses.policy_gradient import check_clip, get_policy_loss
from rlhf_jax.losses.logprobs import (
    Metrics,
    _bool,
    _check_reduction,
    _float,
    aggregate_loss,
    masked_sum,
    masked_var,
    metric,
)

Reduction = Literal["token", "sequence"]


def _check_same_shape(name: str, **arrays) -> None:
    shapes = {k: tuple(jnp.shape(v)) for k, v in arrays.items() if v is not None}
    if len(set(shapes.values())) > 1:
        raise ValueError(f"{name}: arrays must share one [B, R] shape, got {shapes}")


# --------------------------------------------------------------------------------------------
# Rewards
# --------------------------------------------------------------------------------------------


def kl_shaped_rewards(
    scores: jax.Array,
    logp: jax.Array,
    ref_logp: jax.Array,
    mask: jax.Array,
    kl_coef: jax.Array | float,
    *,
    estimator: Estimator = "k1",
) -> tuple[jax.Array, Metrics]:
    """Per-token PPO rewards: a KL penalty on every token plus the sequence score on the last.

    ``rewards[b, r] = -β · KL_k(b, r) + [r == last valid token of b] · scores[b]`` with
    ``KL_k`` the per-token estimator (``k1 = logp - ref_logp`` by default) and ``β = kl_coef``.
    Ziegler et al. 2019 §2.2 (``R(x, y) = r(x, y) - β log π(y|x)/ρ(y|x)``), Stiennon et al. 2020
    §3.4, Ouyang et al. 2022 eq. 2; the per-token split with the score on the final token is
    lm-human-preferences' / TRL's. Masked positions get reward 0. A row with no valid token
    has nowhere to receive its score and gets all zeros (its score is still in the metrics).

    Args:
      scores: ``[B]`` float sequence rewards (reward-model output, after any normalisation and
        ``missing_eos_penalty``).
      logp: ``[B, R]`` float rollout policy log-probs of the sampled response tokens (nats).
      ref_logp: ``[B, R]`` float reference log-probs of the same tokens (nats).
      mask: ``[B, R]`` bool/{0,1}, True on valid response tokens.
      kl_coef: β, scalar (an array from ``control.KLState`` so that it never recompiles).
      estimator: per-token KL estimator for the penalty (``"k1"`` standard; see ``kl.py``).

    Returns:
      ``(rewards [B, R] float32, metrics)``, metrics averaged over sequences:
      ``objective/kl`` (sequence sum of k1), ``objective/kl_penalty`` (sequence sum of the
      chosen estimator), ``objective/score``, ``objective/non_score_reward`` (sequence sum of
      ``-β·KL``), ``objective/rlhf_reward`` (score + non-score reward), ``objective/kl_coef``.

    Raises:
      ValueError: on shape mismatch or an unknown estimator.
    """
    _check_same_shape("kl_shaped_rewards", logp=logp, ref_logp=ref_logp, mask=mask)
    if logp.ndim != 2 or scores.shape != logp.shape[:1]:
        raise ValueError(
            f"kl_shaped_rewards: scores must be [B] and logp [B, R]; got {scores.shape} and {logp.shape}"
        )
    m = _bool(mask)
    logp = jnp.where(m, _float(logp), 0.0)
    ref_logp = jnp.where(m, _float(ref_logp), 0.0)
    kl_coef = _float(kl_coef)
    kl_tok = jnp.where(m, kl_estimate(logp, ref_logp, estimator), 0.0)
    non_score = -kl_coef * kl_tok
    n_r = m.shape[1]
    last = n_r - 1 - jnp.argmax(m[:, ::-1], axis=1)
    has_any = jnp.any(m, axis=1)
    at_last = (jnp.arange(n_r)[None, :] == last[:, None]) & has_any[:, None]
    s = _float(scores)
    rewards = non_score + jnp.where(at_last, s[:, None], 0.0)
    kl_seq = masked_sum(kl_estimate(logp, ref_logp, "k1"), m, axis=1)
    non_score_seq = jnp.sum(non_score, axis=1)
    metrics = {
        "objective/kl": metric(kl_seq),
        "objective/kl_penalty": metric(jnp.sum(kl_tok, axis=1)),
        "objective/score": metric(s),
        "objective/non_score_reward": metric(non_score_seq),
        "objective/rlhf_reward": metric(s + non_score_seq),
        "objective/kl_coef": metric(kl_coef),
    }
    return rewards, metrics


def missing_eos_penalty(
    scores: jax.Array,
    contains_eos: jax.Array,
    penalty: float | jax.Array,
    *,
    replace: bool = False,
) -> jax.Array:
    """Penalise responses that never emitted the stop token.

    ``replace=False``: ``score - penalty`` where there is no EOS (TRL ``missing_eos_penalty``).
    ``replace=True``: the score is *replaced* by ``-penalty`` where there is no EOS
    (lm-human-preferences' ``penalty_reward_value = -1``, i.e. ``penalty = 1``, for samples
    truncated without a stop token; Ziegler et al. 2019).

    Args:
      scores: ``[B]`` float sequence rewards.
      contains_eos: ``[B]`` bool, True when the response contains EOS (was not truncated).
      penalty: penalty in reward units (>= 0 for a penalty).
      replace: see above.

    Returns:
      ``[B]`` float32 scores.

    Raises:
      ValueError: on shape mismatch.
    """
    if scores.shape != contains_eos.shape:
        raise ValueError(
            f"missing_eos_penalty: scores {scores.shape} and contains_eos {contains_eos.shape} differ"
        )
    s = _float(scores)
    ok = _bool(contains_eos)
    bad_value = -_float(penalty) if replace else s - penalty
    return jnp.where(ok, s, bad_value)


# --------------------------------------------------------------------------------------------
# Policy and value losses
# --------------------------------------------------------------------------------------------


def clipped_policy_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_eps: float | jax.Array = 0.2,
    clip_eps_high: float | jax.Array | None = None,
    dual_clip: float | jax.Array | None = None,
    policy_loss: str = "ppo",
    reduction: Reduction = "token",
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
) -> tuple[jax.Array, Metrics]:
    """PPO clipped surrogate objective (as a loss to minimise), per token.

    ``ρ = exp(logp - old_logp)``, ``ℓ = max(-A ρ, -A clip(ρ, 1 - ε_low, 1 + ε_high))``;
    with dual clip ``c > 1``: ``ℓ = min(ℓ, -c A)`` where ``A < 0``.
    Schulman et al. 2017 eq. 7; asymmetric "clip-higher" ``ε_high > ε_low`` from DAPO (Yu et
    al. 2025 §3.1); dual clip from Ye et al. 2020 ("Mastering Complex Control in MOBA Games
    with Deep RL", AAAI) which bounds the loss of very large ratios on negative advantages.

    Args:
      logp: ``[B, R]`` float current-policy log-probs of the sampled tokens (nats), with grad.
      old_logp: ``[B, R]`` float behaviour (rollout) log-probs of the same tokens.
      advantages: ``[B, R]`` float per-token advantages (``gae``, or
        ``broadcast_sequence_advantages`` of per-sequence ones).
      mask: ``[B, R]`` bool/{0,1} valid response tokens.
      clip_eps: ε (= ε_low), ``>= 0``.
      clip_eps_high: ε_high; None means ``clip_eps`` (symmetric).
      dual_clip: c > 1 or None (off).
      policy_loss: the surrogate, a name in ``losses.policy_gradient.POLICY_LOSSES``
        (``"ppo"`` token ratio, ``"gspo"`` sequence ratio, ``"cispo"`` clipped weight).
      reduction: ``"token"`` or ``"sequence"`` (see module docstring).
      num_tokens: optional global token denominator (token reduction).
      num_sequences: optional global sequence denominator (sequence reduction).

    Returns:
      ``(loss, metrics)``: ``ppo/policy/loss``; token-means over the mask of
      ``ppo/policy/clipfrac`` (clipped term active), ``ppo/policy/approxkl``
      (``½ (logp - old_logp)²``), ``ppo/policy/approxkl_k3`` (k3 of old vs new),
      ``ppo/policy/ratio``; ``ppo/policy/dual_clipfrac`` when ``dual_clip`` is set.

    Raises:
      ValueError: shape mismatch, negative ε, ``dual_clip <= 1``, bad reduction.
    """
    _check_same_shape(
        "clipped_policy_loss", logp=logp, old_logp=old_logp, advantages=advantages, mask=mask
    )
    check_clip("clipped_policy_loss", clip_eps, clip_eps_high, dual_clip)
    _check_reduction("clipped_policy_loss", reduction, num_tokens, num_sequences)
    pg, metrics = get_policy_loss(policy_loss).terms(
        logp, old_logp, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
        dual_clip=dual_clip)
    loss, pair = aggregate_loss(
        pg, mask, reduction=reduction, num_tokens=num_tokens, num_sequences=num_sequences
    )
    metrics["ppo/policy/loss"] = pair
    return loss, metrics


def _value_terms(values, old_values, returns, mask, clip_eps_value):
    m = _bool(mask)
    v = jnp.where(m, _float(values), 0.0)
    ret = jnp.where(m, _float(returns), 0.0)
    vf1 = jnp.square(v - ret)
    if clip_eps_value is None:
        vf = vf1
        clipfrac = jnp.zeros_like(vf1)
    else:
        old = jnp.where(m, _float(old_values), 0.0)
        v_clipped = old + jnp.clip(v - old, -clip_eps_value, clip_eps_value)
        vf2 = jnp.square(v_clipped - ret)
        vf = jnp.maximum(vf1, vf2)
        clipfrac = (vf2 > vf1).astype(jnp.float32)
    n = jnp.sum(m).astype(jnp.float32)
    var_ret = masked_var(ret, m, unbiased=False)
    var_res = masked_var(ret - v, m, unbiased=False)
    ev = jnp.where(var_ret > 0, 1.0 - var_res / jnp.where(var_ret > 0, var_ret, 1.0), 0.0)
    metrics = {
        "ppo/val/clipfrac": metric(clipfrac, m),
        "ppo/val/error": metric(vf1, m),
        "ppo/val/explained_variance": (ev * n, n),
        "ppo/val/vpred": metric(v, m),
    }
    return jnp.where(m, 0.5 * vf, 0.0), metrics


def clipped_value_loss(
    values: jax.Array,
    old_values: jax.Array,
    returns: jax.Array,
    mask: jax.Array,
    *,
    clip_eps_value: float | jax.Array | None = 0.2,
    reduction: Reduction = "token",
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
) -> tuple[jax.Array, Metrics]:
    """Clipped value-function loss.

    ``V_clip = V_old + clip(V - V_old, -ε_v, ε_v)``, ``ℓ = ½ max((V - G)², (V_clip - G)²)``
    with ``G`` the returns; ``clip_eps_value=None`` gives the unclipped ``½ (V - G)²``.
    OpenAI baselines ``ppo2`` / lm-human-preferences ``train_policy`` (Ziegler et al. 2019);
    TRL ``cliprange_value``.

    Args:
      values: ``[B, R]`` float current value predictions ``V(s_t)`` (with grad).
      old_values: ``[B, R]`` float rollout values (the ones used by ``gae``).
      returns: ``[B, R]`` float return targets (``gae``'s second output).
      mask: ``[B, R]`` bool/{0,1} valid response tokens.
      clip_eps_value: ε_v >= 0 in value units, or None (no clipping).
      reduction: ``"token"`` or ``"sequence"``.
      num_tokens: optional global token denominator.
      num_sequences: optional global sequence denominator.

    Returns:
      ``(loss, metrics)``: ``ppo/val/loss``; token-means of ``ppo/val/clipfrac``,
      ``ppo/val/error`` (``(V - G)²``), ``ppo/val/vpred``; ``ppo/val/explained_variance``
      ``= 1 - Var[G - V] / Var[G]`` over the masked tokens (0 when ``Var[G] = 0``; exact for one
      batch, a token-weighted average of per-batch values once pairs are summed).

    Raises:
      ValueError: shape mismatch, negative ε_v, bad reduction.
    """
    _check_same_shape(
        "clipped_value_loss", values=values, old_values=old_values, returns=returns, mask=mask
    )
    if isinstance(clip_eps_value, (int, float)) and not clip_eps_value >= 0:
        raise ValueError(f"clipped_value_loss: clip_eps_value must be >= 0, got {clip_eps_value}")
    _check_reduction("clipped_value_loss", reduction, num_tokens, num_sequences)
    vf, metrics = _value_terms(values, old_values, returns, mask, clip_eps_value)
    loss, pair = aggregate_loss(
        vf, mask, reduction=reduction, num_tokens=num_tokens, num_sequences=num_sequences
    )
    metrics["ppo/val/loss"] = pair
    return loss, metrics


def ppo_loss(
    logp: jax.Array,
    old_logp: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    values: jax.Array | None = None,
    old_values: jax.Array | None = None,
    returns: jax.Array | None = None,
    clip_eps: float | jax.Array = 0.2,
    clip_eps_high: float | jax.Array | None = None,
    dual_clip: float | jax.Array | None = None,
    policy_loss: str = "ppo",
    clip_eps_value: float | jax.Array | None = 0.2,
    vf_coef: float | jax.Array = 0.1,
    entropy: jax.Array | None = None,
    entropy_coef: float | jax.Array = 0.0,
    ref_logp: jax.Array | None = None,
    kl_loss_coef: float | jax.Array = 0.0,
    kl_loss_estimator: Estimator = "k3",
    reduction: Reduction = "token",
    num_tokens: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
) -> tuple[jax.Array, Metrics]:
    """Full PPO loss: clipped policy + value + entropy bonus + optional KL-to-reference loss.

    ``L = L_clip + vf_coef · L_V - entropy_coef · H + kl_loss_coef · KL_k(π || π_ref)``, each
    term reduced the same way (token- or sequence-mean over ``mask``). Schulman et al. 2017
    eq. 7 (``L_clip``) and eq. 9 (c1 = vf_coef, c2 = entropy_coef). This is the objective the
    PPO trainer (``rlhf_jax.train.ppo``) minimises on every minibatch.

    * Value term: only when ``values``, ``old_values`` and ``returns`` are all given (PPO with
      a critic); omit all three for critic-free methods (GRPO, RLOO, REINFORCE).
    * Entropy term: only when ``entropy`` (per-token, e.g. ``entropy_from_logits(...,
      shift=...)`` sliced to the response) is given. With a Python ``entropy_coef == 0`` the
      entropy is reported but carries no gradient (no backward pass through its ``[B, R, V]``
      softmax).
    * KL loss: only when ``ref_logp`` is given: ``kl_loss_coef · mean(KL_k(logp, ref_logp))``
      with ``k = kl_loss_estimator``, the KL-in-the-loss of GRPO (Shao et al. 2024 eq. 3–4,
      which uses k3) — an alternative to shaping the rewards with :func:`kl_shaped_rewards`
      (use one or the other). ``kl_loss_coef`` may be an array (an adaptive controller's
      ``KLState.kl_coef``), so a changing coefficient never recompiles.

    Args:
      logp: ``[B, R]`` float current-policy log-probs of the sampled tokens (nats), with grad.
      old_logp: ``[B, R]`` float rollout log-probs.
      advantages: ``[B, R]`` float per-token advantages.
      mask: ``[B, R]`` bool/{0,1} valid response tokens.
      values: ``[B, R]`` float current value predictions, or None.
      old_values: ``[B, R]`` float rollout values, or None.
      returns: ``[B, R]`` float return targets, or None.
      clip_eps: policy ε (ε_low).
      clip_eps_high: policy ε_high or None (= clip_eps).
      dual_clip: dual-clip c > 1 or None.
      policy_loss: the policy surrogate (``losses.policy_gradient.POLICY_LOSSES``).
      clip_eps_value: value ε_v or None (unclipped value loss).
      vf_coef: value-loss weight (0.1 in lm-human-preferences/TRL).
      entropy: ``[B, R]`` float per-token entropy (nats) with grad, or None.
      entropy_coef: entropy-bonus weight.
      ref_logp: ``[B, R]`` float reference log-probs of the sampled tokens, or None.
      kl_loss_coef: weight β of the KL loss (Python scalar or ``[]`` array).
      kl_loss_estimator: ``"k3"`` (GRPO), ``"k1"`` or ``"k2"`` (``losses.kl.kl_estimate``).
      reduction: ``"token"`` or ``"sequence"``.
      num_tokens: optional global token denominator.
      num_sequences: optional global sequence denominator.

    Returns:
      ``(loss, metrics)``: everything from :func:`clipped_policy_loss` and (with a critic)
      :func:`clipped_value_loss`, plus ``ppo/loss/total`` (the total), ``ppo/policy/entropy``
      and ``ppo/policy/kl_loss`` (the unweighted KL estimate, nats per token) when those
      terms are on.

    Raises:
      ValueError: shape mismatch; only some of values/old_values/returns given; a nonzero
        Python ``entropy_coef`` without ``entropy`` or ``kl_loss_coef`` without ``ref_logp``;
        plus the checks of the policy and value losses.
    """
    _check_same_shape(
        "ppo_loss", logp=logp, old_logp=old_logp, advantages=advantages, mask=mask,
        values=values, old_values=old_values, returns=returns, entropy=entropy, ref_logp=ref_logp,
    )
    check_clip("ppo_loss", clip_eps, clip_eps_high, dual_clip)
    _check_reduction("ppo_loss", reduction, num_tokens, num_sequences)
    critic = [x is not None for x in (values, old_values, returns)]
    if any(critic) and not all(critic):
        raise ValueError("ppo_loss: pass all of values, old_values and returns, or none of them")
    if entropy is None and not (isinstance(entropy_coef, (int, float)) and entropy_coef == 0):
        raise ValueError("ppo_loss: entropy_coef is set but entropy is None")
    if ref_logp is None and not (isinstance(kl_loss_coef, (int, float)) and kl_loss_coef == 0):
        raise ValueError("ppo_loss: kl_loss_coef is set but ref_logp is None")
    agg = dict(reduction=reduction, num_tokens=num_tokens, num_sequences=num_sequences)

    total, metrics = get_policy_loss(policy_loss).terms(
        logp, old_logp, advantages, mask, clip_eps=clip_eps, clip_eps_high=clip_eps_high,
        dual_clip=dual_clip)
    _, metrics["ppo/policy/loss"] = aggregate_loss(total, mask, **agg)
    if all(critic):
        vf, vmetrics = _value_terms(values, old_values, returns, mask, clip_eps_value)
        _, vmetrics["ppo/val/loss"] = aggregate_loss(vf, mask, **agg)
        metrics.update(vmetrics)
        total = total + vf_coef * vf
    m = _bool(mask)
    if entropy is not None:
        ent = jnp.where(m, _float(entropy), 0.0)
        if isinstance(entropy_coef, (int, float)) and entropy_coef == 0:
            ent = jax.lax.stop_gradient(ent)
        _, metrics["ppo/policy/entropy"] = aggregate_loss(ent, mask, **agg)
        total = total - entropy_coef * ent
    if ref_logp is not None:
        safe_logp = jnp.where(m, _float(logp), 0.0)
        safe_ref = jnp.where(m, _float(ref_logp), 0.0)
        kl = jnp.where(m, kl_estimate(safe_logp, safe_ref, kl_loss_estimator), 0.0)
        _, metrics["ppo/policy/kl_loss"] = aggregate_loss(kl, mask, **agg)
        total = total + kl_loss_coef * kl
    loss, metrics["ppo/loss/total"] = aggregate_loss(total, mask, **agg)
    return loss, metrics


def overlong_penalty(
    lengths: jax.Array,
    max_length: int,
    buffer: int,
    penalty: float | jax.Array = 1.0,
) -> jax.Array:
    """DAPO's soft overlong punishment, added to the score.

    ``R_len(y) = 0`` for ``|y| <= L_max - L_buf``, ``(L_max - L_buf - |y|) / L_buf`` for
    ``L_max - L_buf < |y| <= L_max``, and ``-1`` beyond, times ``penalty`` (Yu et al. 2025,
    "DAPO", eq. 13; ``L_max`` the response budget, ``L_buf`` the punishment interval).

    Args:
      lengths: ``[B]`` response lengths (tokens, EOS included).
      max_length: ``L_max`` (tokens); buffer: ``L_buf`` (tokens, > 0).
      penalty: the largest punishment (reward units).

    Returns:
      ``[B]`` float32, in ``[-penalty, 0]``.

    Raises:
      ValueError: ``buffer`` not in ``(0, max_length]``.
    """
    if not 0 < buffer <= max_length:
        raise ValueError(f"overlong_penalty: buffer {buffer} must be in (0, max_length={max_length}]")
    excess = _float(lengths) - (max_length - buffer)
    return -_float(penalty) * jnp.clip(excess / buffer, 0.0, 1.0)
