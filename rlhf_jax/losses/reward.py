"""Reward-model losses: pairwise Bradley–Terry, K-way ranking, best-of-N, and reward normalisation.

Rewards are scalar outputs of a reward model, one per (prompt, response), in arbitrary units
("reward units"); the losses are in nats.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.logprobs import Metrics, _bool, _float, masked_mean, masked_var, metric


def _pair_accuracy(diff: jax.Array) -> jax.Array:
    """1 where ``diff > 0``, 0.5 where ``diff == 0`` (a tie), 0 otherwise."""
    return jnp.where(diff > 0, 1.0, jnp.where(diff == 0, 0.5, 0.0)).astype(jnp.float32)


def bradley_terry_loss(
    r_chosen: jax.Array,
    r_rejected: jax.Array,
    *,
    margin: jax.Array | None = None,
    center_coef: float | jax.Array = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Pairwise Bradley–Terry reward-model loss with optional margin and reward centering.

    ``L = mean_b[-log σ(r_c - r_r - m)] + c · mean_b[(r_c + r_r)²]``.

    * Bradley–Terry preference likelihood as in Ouyang et al. 2022 §3.5 eq. 1 (K = 2).
    * Margin ``m`` (e.g. larger for "significantly better" ratings): Touvron et al. 2023
      (Llama 2) §3.2.2, eq. 2.
    * Centering term ``c`` (coefficient 0.01 in the paper), which pins the otherwise
      shift-invariant reward near zero: Eisenstein et al. 2023 ("Helping or Herding? Reward
      Model Ensembles Mitigate but do not Eliminate Reward Hacking"), auxiliary centering loss.

    Args:
      r_chosen: ``[B]`` float reward of the preferred response.
      r_rejected: ``[B]`` float reward of the dispreferred response (same prompt).
      margin: optional ``[B]`` (or scalar) float margin in reward units.
      center_coef: weight ``c >= 0`` of the centering term.

    Returns:
      ``(loss, metrics)``: scalar mean over pairs; metrics (each averaged over pairs)
      ``rm/loss``, ``rm/accuracy`` (``r_c > r_r``; a tie counts 0.5), ``rm/margin``
      (``r_c - r_r``), ``rm/chosen``, ``rm/rejected``.

    Raises:
      ValueError: if the shapes of ``r_chosen`` and ``r_rejected`` differ.
    """
    if r_chosen.shape != r_rejected.shape:
        raise ValueError(
            f"bradley_terry_loss: r_chosen {r_chosen.shape} and r_rejected {r_rejected.shape} "
            "must have the same shape"
        )
    r_c, r_r = _float(r_chosen), _float(r_rejected)
    diff = r_c - r_r
    logits = diff if margin is None else diff - _float(margin)
    loss_b = -jax.nn.log_sigmoid(logits) + center_coef * jnp.square(r_c + r_r)
    metrics = {
        "rm/loss": metric(loss_b),
        "rm/accuracy": metric(_pair_accuracy(diff)),
        "rm/margin": metric(diff),
        "rm/chosen": metric(r_c),
        "rm/rejected": metric(r_r),
    }
    return jnp.mean(loss_b), metrics


def ranking_loss(
    rewards: jax.Array, valid: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """InstructGPT K-way ranking loss: Bradley–Terry over all C(K, 2) pairs, one weight per prompt.

    ``L = mean_prompts [ mean_{i<j, valid} -log σ(r_i - r_j) ]``, responses ranked best first
    (``rewards[b, 0]`` belongs to the best response). Each prompt's comparisons form a single
    batch element, so a prompt with many responses does not dominate (Ouyang et al. 2022 §3.5,
    eq. 1). Prompts with fewer than two valid responses contribute nothing (and are not counted).

    Vectorised over a static list of the ``K(K-1)/2`` index pairs.

    Args:
      rewards: ``[B, K]`` float rewards, column order = human ranking, best first.
      valid: optional ``[B, K]`` bool/{0,1}; False for padding slots (rankings shorter than K).

    Returns:
      ``(loss, metrics)``: scalar loss; metrics ``rm/loss`` (per prompt), ``rm/accuracy`` and
      ``rm/margin`` (``r_i - r_j``) averaged over all valid pairs, ``rm/num_pairs`` (valid pairs
      per counted prompt).

    Raises:
      ValueError: if ``rewards`` is not 2-D or ``valid`` has another shape.
    """
    if rewards.ndim != 2:
        raise ValueError(f"ranking_loss: rewards must be [B, K], got shape {rewards.shape}")
    if valid is None:
        valid = jnp.ones(rewards.shape, bool)
    elif valid.shape != rewards.shape:
        raise ValueError(f"ranking_loss: valid {valid.shape} must match rewards {rewards.shape}")
    valid = _bool(valid)
    k = rewards.shape[1]
    i_idx, j_idx = np.triu_indices(k, 1)  # static pair list, i ranked above j
    r = jnp.where(valid, _float(rewards), 0.0)  # padding slots may hold garbage (even NaN)
    diff_BxP = r[:, i_idx] - r[:, j_idx]
    pair_valid_BxP = valid[:, i_idx] & valid[:, j_idx]
    per_prompt = masked_mean(-jax.nn.log_sigmoid(diff_BxP), pair_valid_BxP, axis=-1)
    has_pair = jnp.any(pair_valid_BxP, axis=-1)
    n_prompts = jnp.sum(has_pair).astype(jnp.float32)
    loss = jnp.sum(jnp.where(has_pair, per_prompt, 0.0)) / jnp.maximum(n_prompts, 1.0)
    metrics = {
        "rm/loss": metric(per_prompt, has_pair),
        "rm/accuracy": metric(_pair_accuracy(diff_BxP), pair_valid_BxP),
        "rm/margin": metric(diff_BxP, pair_valid_BxP),
        "rm/num_pairs": (jnp.sum(pair_valid_BxP).astype(jnp.float32), n_prompts),
    }
    return loss, metrics


def best_of_n_loss(
    rewards: jax.Array, best_index: jax.Array, valid: jax.Array | None = None
) -> tuple[jax.Array, Metrics]:
    """Softmax cross-entropy for "pick the best of N": the reward model's logits are the rewards.

    ``L = mean_b [ logsumexp_{n valid} r[b, n] - r[b, best[b]] ]``.
    Ziegler et al. 2019 §2 ("choose the best of 4" labels, a softmax over the rewards); Stiennon
    et al. 2020 §3.4 (the pairwise case N = 2).

    Args:
      rewards: ``[B, N]`` float rewards of N candidates per prompt.
      best_index: ``[B]`` int index of the labelled best candidate; it must point at a valid
        slot (not checked inside jit).
      valid: optional ``[B, N]`` bool/{0,1}; invalid slots are excluded from the softmax.
        Prompts with no valid slot contribute 0 and are not counted.

    Returns:
      ``(loss, metrics)``: scalar mean over counted prompts; metrics ``rm/loss``,
      ``rm/accuracy`` (argmax over valid slots == best_index).

    Raises:
      ValueError: on shape mismatch.
    """
    if rewards.ndim != 2 or best_index.shape != rewards.shape[:1]:
        raise ValueError(
            f"best_of_n_loss: rewards must be [B, N] and best_index [B]; got {rewards.shape} "
            f"and {best_index.shape}"
        )
    if valid is None:
        valid = jnp.ones(rewards.shape, bool)
    elif valid.shape != rewards.shape:
        raise ValueError(f"best_of_n_loss: valid {valid.shape} must match rewards {rewards.shape}")
    valid = _bool(valid)
    row_ok = jnp.any(valid, axis=-1)
    r = _float(rewards)
    # Rows with no valid slot use plain zeros so neither the value nor its gradient is NaN.
    logits = jnp.where(valid, r, -jnp.inf)
    logits = jnp.where(row_ok[:, None], logits, 0.0)
    best = best_index.astype(jnp.int32)[:, None]
    chosen = jnp.take_along_axis(logits, best, axis=-1, mode="clip")[:, 0]
    loss_b = jnp.where(row_ok, jax.nn.logsumexp(logits, axis=-1) - chosen, 0.0)
    n = jnp.sum(row_ok).astype(jnp.float32)
    correct = (jnp.argmax(logits, axis=-1) == best[:, 0]).astype(jnp.float32)
    metrics = {"rm/loss": metric(loss_b, row_ok), "rm/accuracy": metric(correct, row_ok)}
    return jnp.sum(loss_b) / jnp.maximum(n, 1.0), metrics


def normalization_gain_bias(
    scores: jax.Array,
    target_mean: float | jax.Array = 0.0,
    target_std: float | jax.Array = 1.0,
    *,
    mask: jax.Array | None = None,
    eps: float = 1e-8,
) -> tuple[jax.Array, jax.Array]:
    """Gain and bias that map ``scores`` to a target mean and standard deviation.

    ``gain = target_std / sqrt(var + eps)``, ``bias = target_mean - gain · mean``, so that
    ``gain · scores + bias`` has mean ``target_mean`` and (population) std ``target_std``.
    Reward normalisation before RL: Ziegler et al. 2019 §2.2 (lm-human-preferences
    ``reward_norm``, which uses the population moments of rewards of policy samples).

    Args:
      scores: ``[N]`` (any shape) float rewards of samples from the initial policy.
      target_mean: desired mean (reward units).
      target_std: desired standard deviation (reward units).
      mask: optional bool/{0,1} of ``scores``' shape; only True entries are used.
      eps: added to the variance (constant scores give a large finite gain, not inf).

    Returns:
      ``(gain, bias)`` float32 scalars.
    """
    s = _float(scores)
    m = jnp.ones(s.shape, bool) if mask is None else mask
    mean = masked_mean(s, m)
    var = masked_var(s, m, unbiased=False)
    gain = target_std * jax.lax.rsqrt(var + eps)
    return gain, target_mean - gain * mean
