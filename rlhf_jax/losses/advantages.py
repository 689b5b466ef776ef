"""Advantage estimators: GAE for PPO, and critic-free baselines (REINFORCE, RLOO, GRPO, Dr. GRPO,
REINFORCE++), registered by name for the on-policy trainer (``estimate_advantages``).

Token-level arrays are ``[B, R]`` aligned with the response tokens: ``x[b, r]`` belongs to the
action "emit response token r". Responses are right-padded (valid tokens first, padding after
EOS), but :func:`gae` treats masked positions as absent wherever they sit.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import _bool, _float, masked_mean, masked_var, whiten


def gae(
    rewards: jax.Array,
    values: jax.Array,
    mask: jax.Array,
    *,
    gamma: float | jax.Array = 1.0,
    lam: float | jax.Array = 0.95,
) -> tuple[jax.Array, jax.Array]:
    """Generalised advantage estimation over the response tokens, by a reverse ``lax.scan``.

    ``δ_t = r_t + γ V_{t+1} - V_t``, ``A_t = δ_t + γλ A_{t+1}``, ``returns_t = A_t + V_t``
    (Schulman et al. 2016, "High-Dimensional Continuous Control Using GAE", eq. 16), with the
    episode ending after the last valid token: ``V`` and ``A`` beyond it are 0 (no bootstrap),
    as in lm-human-preferences / TRL.

    Masked positions are treated as *absent*: the recursion runs over the valid tokens of
    each row only, ``t+1`` meaning the next valid token. For right-padded rows this is exactly
    the textbook recursion with zero bootstrap after the last token; it also makes left
    padding and interior holes (e.g. masked tool outputs) harmless, and the result equals the
    GAE of the row with the masked positions deleted. Masked positions get advantage 0 and
    return 0, and their rewards/values (whatever they hold, NaN included) are ignored — so
    rewards must sit on valid tokens (``kl_shaped_rewards`` puts the score on the last one).

    Args:
      rewards: ``[B, R]`` float per-token rewards (e.g. from ``ppo.kl_shaped_rewards``).
      values: ``[B, R]`` float value estimates ``V(s_t)`` of the state before token t, aligned
        with the response tokens (the old/rollout values).
      mask: ``[B, R]`` bool/{0,1}, True on valid response tokens.
      gamma: discount γ in ``[0, 1]`` (1.0 in InstructGPT/TRL).
      lam: GAE λ in ``[0, 1]`` (0.95).

    Returns:
      ``(advantages, returns)``, both ``[B, R]`` float32, 0 on masked positions.

    Raises:
      ValueError: if the shapes differ or are not 2-D.
    """
    if rewards.ndim != 2 or rewards.shape != values.shape or rewards.shape != mask.shape:
        raise ValueError(
            f"gae: rewards {rewards.shape}, values {values.shape} and mask {mask.shape} must all "
            "be the same [B, R]"
        )
    m = _bool(mask)
    r = jnp.where(m, _float(rewards), 0.0)
    v = jnp.where(m, _float(values), 0.0)
    gamma = jnp.asarray(gamma, r.dtype)
    lam = jnp.asarray(lam, r.dtype)

    def step(carry, xs):
        next_value, next_adv = carry
        r_t, v_t, m_t = xs
        delta = r_t + gamma * next_value - v_t
        adv = delta + gamma * lam * next_adv
        new_carry = (jnp.where(m_t, v_t, next_value), jnp.where(m_t, adv, next_adv))
        return new_carry, jnp.where(m_t, adv, 0.0)

    zeros_B = jnp.zeros(r.shape[:1], r.dtype)
    _, adv_RxB = jax.lax.scan(step, (zeros_B, zeros_B), (r.T, v.T, m.T), reverse=True)
    advantages = adv_RxB.T
    returns = jnp.where(m, advantages + v, 0.0)
    return advantages, returns


def whiten_advantages(advantages: jax.Array, mask: jax.Array, eps: float = 1e-8) -> jax.Array:
    """Whiten advantages over all masked tokens of the batch: mean 0, unbiased variance 1.

    ``(A - mean) / sqrt(var + eps)`` over masked entries; masked positions become 0. This is
    :func:`~rlhf_jax.losses.logprobs.whiten` with ``shift_mean=True`` (lm-human-preferences
    ``whiten(advantages)``; TRL ``masked_whiten``). Rewards, by contrast, are usually whitened
    with ``shift_mean=False`` (TRL ``whiten_rewards``).

    Args:
      advantages: ``[B, R]`` float.
      mask: ``[B, R]`` bool/{0,1}.
      eps: added to the variance.
    """
    return whiten(advantages, mask, shift_mean=True, eps=eps)


def reinforce_baseline_advantages(scores: jax.Array, baseline: jax.Array | float) -> jax.Array:
    """REINFORCE with a baseline: ``A = scores - baseline``.

    Williams 1992; the baseline is typically a running mean of the scores
    (``control.running_moments_update``) or a value estimate; Ahmadian et al. 2024 use a
    moving-average baseline.

    Args:
      scores: ``[B]`` or ``[B, N]`` float sequence rewards.
      baseline: scalar or any shape broadcastable to ``scores``.

    Returns:
      Per-sequence advantages, ``scores``' shape, float32.
    """
    return _float(scores) - _float(baseline)


def rloo_advantages(scores: jax.Array, valid: jax.Array | None = None) -> jax.Array:
    """REINFORCE leave-one-out: each sample's baseline is the mean score of the *other* samples.

    ``A_i = s_i - (Σ_{j≠i} s_j) / (n - 1)`` over the n valid samples of the same prompt
    (``= n/(n-1) · (s_i - mean)``). Kool et al. 2019 ("Buy 4 REINFORCE samples, get a baseline
    for free!"); Ahmadian et al. 2024 ("Back to Basics"), the RLOO estimator (eq. 7).
    Samples of a prompt with fewer than two valid samples, and invalid slots, get 0.

    Args:
      scores: ``[B, N]`` float sequence rewards of N samples per prompt.
      valid: optional ``[B, N]`` bool/{0,1}.

    Returns:
      ``[B, N]`` float32 per-sequence advantages.

    Raises:
      ValueError: if ``scores`` is not ``[B, N]`` with N >= 2.
    """
    if scores.ndim != 2 or scores.shape[1] < 2:
        raise ValueError(f"rloo_advantages: scores must be [B, N] with N >= 2, got {scores.shape}")
    m = jnp.ones(scores.shape, bool) if valid is None else _bool(valid)
    s = jnp.where(m, _float(scores), 0.0)  # invalid slots may hold garbage
    n = jnp.sum(m, axis=1, keepdims=True).astype(s.dtype)
    total = jnp.sum(jnp.where(m, s, 0.0), axis=1, keepdims=True)
    baseline = (total - s) / jnp.maximum(n - 1.0, 1.0)
    return jnp.where(m & (n >= 2), s - baseline, 0.0)


def grpo_advantages(
    scores: jax.Array,
    eps: float = 1e-4,
    scale_std: bool = True,
    valid: jax.Array | None = None,
) -> jax.Array:
    """Group-relative advantages: the score normalised within each prompt's group of samples.

    ``A_i = (s_i - mean(s)) / (std(s) + eps)`` over the group (outcome supervision, Shao et al.
    2024 "DeepSeekMath" §4.1.2). ``std`` is the unbiased sample std, as TRL/verl use.
    ``scale_std=False`` drops the division (Dr. GRPO, Liu et al. 2025 §3.1). Groups with a
    single valid sample give 0.

    Args:
      scores: ``[B, N]`` float sequence rewards of N samples per prompt.
      eps: added to the std (reward units).
      scale_std: divide by the group std.
      valid: optional ``[B, N]`` bool/{0,1}; invalid slots are excluded and get 0.

    Returns:
      ``[B, N]`` float32 per-sequence advantages.

    Raises:
      ValueError: if ``scores`` is not 2-D.
    """
    if scores.ndim != 2:
        raise ValueError(f"grpo_advantages: scores must be [B, N], got {scores.shape}")
    m = jnp.ones(scores.shape, bool) if valid is None else _bool(valid)
    s = jnp.where(m, _float(scores), 0.0)  # invalid slots may hold garbage
    mean = masked_mean(s, m, axis=1)[:, None]
    adv = s - mean
    if scale_std:
        std = jnp.sqrt(masked_var(s, m, unbiased=True, axis=1))[:, None]
        adv = adv / (std + eps)
    return jnp.where(m, adv, 0.0)


def broadcast_sequence_advantages(advantages: jax.Array, mask: jax.Array) -> jax.Array:
    """Give every response token its sequence's advantage: ``A[..., r] = A_seq[...] · mask[..., r]``.

    Critic-free methods (REINFORCE, RLOO, GRPO outcome supervision) use one advantage per
    sequence for all its tokens (Shao et al. 2024 §4.1.2: "Â_{i,t} = r̃_i").

    Args:
      advantages: ``[...]`` float per-sequence advantages, e.g. ``[B]`` or ``[B, N]``.
      mask: ``[..., R]`` bool/{0,1} response mask.

    Returns:
      ``[..., R]`` float32, 0 on masked positions.

    Raises:
      ValueError: if ``mask.shape[:-1] != advantages.shape``.
    """
    if mask.shape[:-1] != advantages.shape:
        raise ValueError(
            f"broadcast_sequence_advantages: mask {mask.shape} must be advantages "
            f"{advantages.shape} + (R,)"
        )
    return jnp.where(_bool(mask), _float(advantages)[..., None], 0.0)


# --------------------------------------------------------------------------------------------
# The registry of estimators the on-policy trainer uses (``PPOConfig.advantage``)
# --------------------------------------------------------------------------------------------


def _sequence_returns(rewards: jax.Array, mask: jax.Array) -> jax.Array:
    """``[B]`` undiscounted return of each response: ``Σ_t mask · rewards`` (the score plus
    the KL penalty when the KL is in the reward)."""
    return jnp.sum(jnp.where(_bool(mask), _float(rewards), 0.0), axis=-1)


def _groups(x_B: jax.Array, group_size: int, name: str) -> jax.Array:
    if group_size < 1 or x_B.shape[0] % group_size:
        raise ValueError(f"{name}: batch {x_B.shape[0]} is not a whole number of groups of "
                         f"group_size={group_size} (rows g*k .. g*k+k-1 are the samples of "
                         "prompt g)")
    return x_B.reshape(-1, group_size)


def _need_groups(name: str, group_size: int) -> None:
    if group_size < 2:
        raise ValueError(f"{name} needs at least 2 samples per prompt (PPOConfig.num_samples), "
                         f"got {group_size}: with one sample the group baseline is the sample "
                         "itself and every advantage is 0")


def _gae_estimator(rewards, mask, values, group_size, gamma, lam):
    return gae(rewards, values, mask, gamma=gamma, lam=lam)


def _rloo_estimator(rewards, mask, values, group_size, gamma, lam):
    _need_groups("rloo", group_size)
    seq = _groups(_sequence_returns(rewards, mask), group_size, "rloo")
    return broadcast_sequence_advantages(rloo_advantages(seq).reshape(-1), mask), None


def _grpo_estimator(scale_std: bool, name: str):
    def estimate(rewards, mask, values, group_size, gamma, lam):
        _need_groups(name, group_size)
        seq = _groups(_sequence_returns(rewards, mask), group_size, name)
        adv = grpo_advantages(seq, scale_std=scale_std).reshape(-1)
        return broadcast_sequence_advantages(adv, mask), None
    return estimate


def _reinforce_estimator(rewards, mask, values, group_size, gamma, lam):
    seq = _sequence_returns(rewards, mask)
    adv = reinforce_baseline_advantages(seq, jnp.mean(seq))
    return broadcast_sequence_advantages(adv, mask), None


def _reinforce_pp_estimator(rewards, mask, values, group_size, gamma, lam):
    returns, _ = gae(rewards, jnp.zeros_like(_float(rewards)), mask, gamma=gamma, lam=1.0)
    return returns, None


@dataclasses.dataclass(frozen=True)
class AdvantageEstimator:
    """A registered advantage estimator.

    Attributes:
      name: the config name (``PPOConfig.advantage``).
      estimate: ``(rewards [B, R], mask [B, R], values [B, R] | None, group_size, gamma, lam)
        -> (advantages [B, R], returns [B, R] | None)``.
      needs_critic: uses ``values`` (and returns value targets); the trainer builds a value
        model only for these.
      whiten: whether the trainer whitens its advantages over the batch by default.
      source: the paper and equation.
    """

    name: str
    estimate: Callable
    needs_critic: bool
    whiten: bool
    source: str


ADVANTAGE_ESTIMATORS: dict[str, AdvantageEstimator] = {
    e.name: e for e in (
        AdvantageEstimator("gae", _gae_estimator, True, True,
                           "Schulman et al. 2016 eq. 16 (GAE)"),
        AdvantageEstimator("rloo", _rloo_estimator, False, False,
                           "Ahmadian et al. 2024 eq. 7 (RLOO); Kool et al. 2019"),
        AdvantageEstimator("grpo", _grpo_estimator(True, "grpo"), False, False,
                           "Shao et al. 2024 §4.1.2 (GRPO outcome supervision)"),
        AdvantageEstimator("dr_grpo", _grpo_estimator(False, "dr_grpo"), False, False,
                           "Liu et al. 2025 §3.1 (Dr. GRPO: no std division)"),
        AdvantageEstimator("reinforce", _reinforce_estimator, False, False,
                           "Williams 1992, with the batch-mean baseline"),
        AdvantageEstimator("reinforce_pp", _reinforce_pp_estimator, False, True,
                           "Hu 2025 (REINFORCE++) §3: token-level KL-shaped returns, batch "
                           "whitening"),
    )
}


def get_advantage_estimator(name: str) -> AdvantageEstimator:
    """The estimator called ``name``.

    Raises:
      ValueError: unknown name (lists the registered ones).
    """
    if name not in ADVANTAGE_ESTIMATORS:
        raise ValueError(f"unknown advantage estimator {name!r}; expected one of "
                         f"{sorted(ADVANTAGE_ESTIMATORS)}")
    return ADVANTAGE_ESTIMATORS[name]


def estimate_advantages(
    name: str,
    rewards: jax.Array,
    mask: jax.Array,
    *,
    values: jax.Array | None = None,
    group_size: int = 1,
    gamma: float | jax.Array = 1.0,
    lam: float | jax.Array = 0.95,
    whiten_advantages: bool | None = None,
) -> tuple[jax.Array, jax.Array | None]:
    """Advantages of a rollout with the estimator ``name``.

    Estimators (``ADVANTAGE_ESTIMATORS``):

    * ``gae``: GAE over the per-token rewards with the critic's ``values`` (Schulman et al.
      2016 eq. 16); returns the value targets.
    * ``rloo``: ``A_i = R_i - mean_{j≠i} R_j`` within each prompt's group (Ahmadian et al.
      2024 eq. 7).
    * ``grpo``: ``A_i = (R_i - mean_g R) / (std_g R + 1e-4)`` (Shao et al. 2024 §4.1.2).
    * ``dr_grpo``: ``A_i = R_i - mean_g R`` (Liu et al. 2025 §3.1).
    * ``reinforce``: ``A_i = R_i - mean_batch R`` (Williams 1992; the batch-mean baseline).
    * ``reinforce_pp``: ``A_t = Σ_{s>=t} γ^{s-t} r_s`` over the per-token KL-shaped rewards,
      whitened over the batch (Hu 2025, REINFORCE++ §3.1-3.2).

    The sequence-level estimators use ``R_i = Σ_t rewards[i, t]``: the score, minus ``β Σ_t
    KL_t`` when the KL is in the reward (``kl_shaped_rewards``), as RLOO does. Every token of
    a response gets its sequence's advantage. Groups are ``group_size`` consecutive rows
    (``g k .. g k + k - 1``): a batch sharded over devices keeps each group on one device
    when the number of groups divides the shards, so the group statistics need no
    collective.

    Args:
      name: the estimator.
      rewards: ``[B, R]`` float per-token rewards (``kl_shaped_rewards``).
      mask: ``[B, R]`` bool/{0,1} valid response tokens.
      values: ``[B, R]`` float rollout values (``gae`` only).
      group_size: ``k``, samples per prompt.
      gamma, lam: discount and GAE λ (``gae``; ``reinforce_pp`` uses ``gamma``).
      whiten_advantages: whiten over the batch's valid tokens; ``None``: the estimator's
        default (``gae`` and ``reinforce_pp`` do, the group estimators do not).

    Returns:
      ``(advantages [B, R] float32, returns [B, R] float32 | None)``, 0 on masked positions;
      returns only for ``gae``.

    Raises:
      ValueError: unknown name; ``gae`` without values; a group estimator with
        ``group_size < 2`` (GRPO with one sample is degenerate) or a batch that is not whole
        groups.
    """
    est = get_advantage_estimator(name)
    if est.needs_critic and values is None:
        raise ValueError(f"advantage estimator {name!r} needs the critic's values")
    advantages, returns = est.estimate(rewards, mask, values, group_size, gamma, lam)
    if est.whiten if whiten_advantages is None else whiten_advantages:
        advantages = whiten(advantages, mask)
    return jnp.where(_bool(mask), advantages, 0.0), returns
