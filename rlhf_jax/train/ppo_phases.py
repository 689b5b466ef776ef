"""The pure phases of a PPO iteration, with its config and state (import them from
``rlhf_jax.train.ppo``, which composes them).

``generate`` samples; ``make_experience`` scores the rollout and computes KL-shaped rewards and
GAE advantages; ``minibatch_loss`` is :func:`rlhf_jax.losses.ppo.ppo_loss` (the one PPO
objective of the library) on the policy's (and value model's) forward, which
``rlhf_jax.train.ppo.ppo_update`` minimises over epochs x shuffled minibatches; ``update_kl``
steps the KL controller.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from rlhf_jax.control import KLController, KLState
from rlhf_jax.losses.advantages import gae
from rlhf_jax.losses.logprobs import entropy_from_logits, sequence_logprobs, whiten
from rlhf_jax.losses.ppo import kl_shaped_rewards, ppo_loss
from rlhf_jax.models.model import Model, Params
from rlhf_jax.rollout.sampler import SamplingConfig, sample, suppress_eos
from rlhf_jax.train.state import TrainState
from rlhf_jax.types import positions_from_mask


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO options (defaults follow lm-human-preferences / TRL's PPO trainer).

    Attributes:
      sampling: the rollout sampler (``max_new_tokens`` = R, temperature, top-k/p, EOS).
      num_ppo_epochs: passes over each rollout batch.
      num_minibatches: minibatches per epoch (the rollout batch must divide, and so must each
        batch shard: see ``rlhf_jax.train.ppo.ppo_update``).
      gamma: discount.
      lam: GAE lambda.
      clip_eps: policy ratio clip (Schulman et al. 2017 eq. 7).
      clip_eps_high: upper ratio clip if asymmetric (DAPO "clip-higher"); ``None`` = symmetric.
      dual_clip: dual-clip constant c > 1 for negative advantages (Ye et al. 2020); ``None`` off.
      clip_eps_value: value clip around the rollout's values.
      vf_coef: weight of the value loss.
      entropy_coef: weight of the entropy bonus.
      kl: the KL coefficient controller (fixed or adaptive, Ziegler et al. 2019 §2.2). Its
        current coefficient ``PPOState.kl.kl_coef`` weighs the KL wherever it enters (reward
        or loss) and is reported as ``objective/kl_coef``.
      kl_estimator: per-token KL estimator (``"k1"``, ``"k2"``, ``"k3"``) of the KL term, in
        the reward or in the loss. GRPO puts ``"k3"`` in the loss (Shao et al. 2024 eq. 4);
        ``"k1"`` in the loss has a zero-mean gradient on on-policy samples
        (``E_π[∇ log π] = 0``), so it barely regularises there.
      kl_in_reward: True: ``kl_coef x KL`` shapes the per-token reward (Ziegler et al. 2019
        §2.2, InstructGPT). False: no KL in the reward; ``kl_coef x KL`` is a term of the loss
        instead (Shao et al. 2024, GRPO). Either way the controller is fed the rollout's k1
        sequence KL.
      whiten_rewards: whiten the shaped rewards over the batch before GAE.
      whiten_advantages: whiten advantages over the batch (standard PPO practice).
      missing_eos_penalty: subtracted from the score of responses that never emit EOS
        (``None`` = off).
      reward_gain, reward_bias: affine normalisation of the reward model's score
        (Ziegler et al. 2019 §2.2: mean 0, std 1 on reference samples).
      value_model: ``"shared"`` (a value head on the policy trunk; policy is an ``"lm_value"``
        model) or ``"separate"`` (its own ``"scalar"`` model, optimizer and ``PPOState.value``;
        the policy may be a plain ``"lm"`` model).
      reference_shares_frozen_layers: the reference equals the policy in the embeddings and
        the lowest ``frozen_layers`` blocks (it is the policy's initialisation; check once with
        ``rlhf_jax.train.state.frozen_part_equal``): its forward starts from the policy's
        frozen hidden states. Unchecked inside the step; a wrong True gives wrong reference
        log-probs.
    """

    sampling: SamplingConfig
    num_ppo_epochs: int = 4
    num_minibatches: int = 1
    gamma: float = 1.0
    lam: float = 0.95
    clip_eps: float = 0.2
    clip_eps_high: float | None = None
    dual_clip: float | None = None
    clip_eps_value: float = 0.2
    vf_coef: float = 0.1
    entropy_coef: float = 0.0
    kl: KLController = KLController()
    kl_estimator: Literal["k1", "k2", "k3"] = "k1"
    kl_in_reward: bool = True
    whiten_rewards: bool = False
    whiten_advantages: bool = True
    missing_eos_penalty: float | None = None
    reward_gain: float = 1.0
    reward_bias: float = 0.0
    value_model: Literal["shared", "separate"] = "shared"
    reference_shares_frozen_layers: bool = False

    def __post_init__(self):
        if self.num_ppo_epochs < 1 or self.num_minibatches < 1:
            raise ValueError(f"PPOConfig: num_ppo_epochs={self.num_ppo_epochs} and "
                             f"num_minibatches={self.num_minibatches} must be >= 1")
        if not 0 <= self.lam <= 1 or not 0 <= self.gamma <= 1:
            raise ValueError(f"PPOConfig: gamma={self.gamma} and lam={self.lam} must be in [0, 1]")
        if self.value_model not in ("shared", "separate"):
            raise ValueError(f"PPOConfig.value_model must be 'shared' or 'separate', "
                             f"got {self.value_model!r}")
        if self.kl_estimator not in ("k1", "k2", "k3"):
            raise ValueError(f"PPOConfig.kl_estimator must be 'k1', 'k2' or 'k3', "
                             f"got {self.kl_estimator!r}")


@struct.dataclass
class PPOState:
    """State of a PPO run.

    Attributes:
      policy: ``TrainState`` of the policy (an ``"lm_value"`` model when the value is shared).
      value: ``TrainState`` of a separate ``"scalar"`` value model, or ``None``.
      kl: KL controller state (``kl.kl_coef`` is an array, so a changing coefficient never
        recompiles).
      rng: typed key; iteration ``i`` uses ``fold_in(rng, policy.step)``.
    """

    policy: TrainState
    value: TrainState | None
    kl: KLState
    rng: jax.Array


@struct.dataclass
class Experience:
    """One rollout batch, scored, with advantages. ``T = P + R``.

    Attributes:
      tokens, attn_mask, positions: ``[B, T]`` prompt (left-padded) + response.
      response_mask: ``[B, R] bool`` response tokens up to and including EOS.
      old_logp: ``[B, R]`` float32 rollout-policy log-probs of the response tokens (nats).
      old_values: ``[B, R]`` value estimates ``V(x, y_<r)`` before each response token.
      ref_logp: ``[B, R]`` reference-policy log-probs (nats).
      scores: ``[B]`` normalised reward-model (or host) scores, after the EOS penalty.
      rewards: ``[B, R]`` shaped per-token rewards.
      advantages: ``[B, R]``.
      returns: ``[B, R]`` value targets (``advantages + old_values`` before whitening).
      frozen_hidden: ``[B, T, D]`` the policy's ``Model.frozen_hidden`` (compute dtype), or
        ``None`` when the policy has no frozen layers.
    """

    tokens: jax.Array
    attn_mask: jax.Array
    positions: jax.Array
    response_mask: jax.Array
    old_logp: jax.Array
    old_values: jax.Array
    ref_logp: jax.Array
    scores: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array
    frozen_hidden: jax.Array | None = None


def init_ppo_state(policy: TrainState, kl: KLController, rng: jax.Array,
                   value: TrainState | None = None) -> PPOState:
    """A ``PPOState`` from trained states (policy from SFT, value from the reward model)."""
    return PPOState(policy=policy, value=value, kl=kl.init(), rng=rng)


def check_models(cfg: PPOConfig, policy_model: Model, value_model: Model | None,
                 state: PPOState | None = None) -> None:
    """Raise ``ValueError`` when the models (and state) do not fit ``cfg.value_model``:
    ``"shared"`` needs an ``"lm_value"`` policy; ``"separate"`` a ``"scalar"`` value model
    and ``state.value``; the policy is never a ``"scalar"`` model."""
    if policy_model.kind == "scalar":
        raise ValueError("PPO: the policy must be an 'lm' or 'lm_value' model, got kind 'scalar'")
    if cfg.value_model == "shared":
        if policy_model.kind != "lm_value":
            raise ValueError(f"PPOConfig.value_model='shared' needs an 'lm_value' policy (a value "
                             f"head on its trunk), got kind {policy_model.kind!r}; use "
                             f"value_model='separate' with a 'scalar' value model")
        return
    if value_model is None or value_model.kind != "scalar":
        kind = None if value_model is None else value_model.kind
        raise ValueError(f"PPOConfig.value_model='separate' needs a 'scalar' value_model, got "
                         f"{kind!r}")
    if state is not None and state.value is None:
        raise ValueError("PPOConfig.value_model='separate' needs PPOState.value (the value "
                         "model's TrainState: init_ppo_state(..., value=...))")


# ---- phases ------------------------------------------------------------------------------
def _values_before(values: jax.Array, prompt_len: int) -> jax.Array:
    """``V`` of the state before each response token: positions ``P-1 .. T-2``."""
    return values[:, prompt_len - 1:-1]


def policy_forward(model: Model, params: Params, tokens, positions, attn_mask, prompt_len: int,
                   sampling: SamplingConfig, *, frozen_hidden: jax.Array | None = None):
    """Response log-probs ``[B, R]``, per-token entropy ``[B, R]`` and values ``[B, R]`` (or
    ``None`` for an ``"lm"`` model), from one forward, under the policy the sampler draws from:
    logits divided by ``sampling.temperature`` and EOS suppressed before
    ``sampling.min_new_tokens`` (``rollout.sampler.suppress_eos``).

    Only the ``R + 1`` positions from ``P - 1`` on are projected onto the vocabulary (the
    ``[B, T, V]`` logits of the prompt are never built): position ``P - 1 + r`` predicts
    response token ``r``, and ``sequence_logprobs`` / ``entropy_from_logits(shift=True)`` on
    that window do the one-token shift as everywhere else (its first column, which nothing
    predicts, is dropped). ``frozen_hidden``: ``[B, T, D]`` from ``Model.frozen_hidden`` of
    the same tokens, to skip the frozen layers. Log-probs and entropies are in nats.
    """
    out = model.apply(params, tokens, positions, attn_mask, compute_logits=False,
                      frozen_hidden=frozen_hidden)
    window = slice(prompt_len - 1, None)
    logits = model.logits(params, out.hidden[:, window]) / sampling.temperature  # [B, R + 1, V]
    # window row r predicts response slot r (the last row predicts nothing and is dropped)
    logits = suppress_eos(logits, jnp.arange(logits.shape[1]), sampling)
    logp = sequence_logprobs(logits, tokens[:, window])[:, 1:]
    entropy = entropy_from_logits(logits, shift=True)[:, 1:]
    values = None if out.values is None else _values_before(out.values, prompt_len)
    return logp, entropy, values


def value_forward(model: Model, params: Params, tokens, positions, attn_mask, prompt_len: int):
    """Values ``[B, R]`` of a separate scalar value model (``V(x, y_<r)``, reward units)."""
    out = model.apply(params, tokens, positions, attn_mask, compute_logits=False)
    return _values_before(out.values, prompt_len)


def generate(state: PPOState, prompt_tokens, prompt_mask, *, policy_model: Model, cfg: PPOConfig):
    """Phase 1: sample responses with the current policy. Returns ``(SampleOutput, tokens,
    attn_mask, positions)`` with ``tokens [B, P + R]``."""
    key = jax.random.fold_in(state.rng, state.policy.step)
    out = sample(policy_model, state.policy.params, prompt_tokens, prompt_mask,
                 jax.random.fold_in(key, 0), cfg.sampling)
    tokens = jnp.concatenate([prompt_tokens, out.response], axis=1)
    attn_mask = jnp.concatenate([prompt_mask.astype(bool), out.response_mask], axis=1)
    return out, tokens, attn_mask, positions_from_mask(attn_mask)


def make_experience(state: PPOState, tokens, attn_mask, positions, response_mask, ended, scores,
                    ref_params: Params, *, policy_model: Model, value_model: Model | None,
                    cfg: PPOConfig) -> tuple[Experience, dict]:
    """Phases 2-3: score the rollout and compute rewards and advantages.

    With ``cfg.kl_in_reward`` the per-token reward is ``-β KL_k + score`` on the last token
    (``kl_shaped_rewards``, Ziegler et al. 2019 §2.2) with ``β = state.kl.kl_coef``; else the
    reward is the score alone (the KL goes into the loss, ``minibatch_loss``). Advantages are
    GAE (Schulman et al. 2016), whitened over the batch if ``cfg.whiten_advantages``.

    Args:
      tokens, attn_mask, positions: ``[B, P + R]`` from ``generate``.
      response_mask: ``[B, R]``; ended: ``[B] bool`` (response contains EOS).
      scores: ``[B]`` raw reward (reward model or host function), before normalisation.
      ref_params: frozen reference policy parameters in the policy's tree (a copy of the
        initial policy; its value head, if any, is unused).

    Returns:
      ``(Experience, metrics)``; ``objective/kl_coef`` is ``state.kl.kl_coef``, the β this
      iteration uses in the reward or the loss.

    Raises:
      ValueError: models that do not fit ``cfg.value_model`` (see ``check_models``).
    """
    check_models(cfg, policy_model, value_model, state)
    prompt_len = tokens.shape[1] - response_mask.shape[1]
    mask = response_mask.astype(bool)
    hidden = None
    if policy_model.cfg.frozen_layers:
        hidden = policy_model.frozen_hidden(state.policy.params, tokens, positions, attn_mask)
    old_logp, _, values = policy_forward(policy_model, state.policy.params, tokens, positions,
                                         attn_mask, prompt_len, cfg.sampling, frozen_hidden=hidden)
    if cfg.value_model == "separate":
        values = value_forward(value_model, state.value.params, tokens, positions, attn_mask,
                               prompt_len)
    ref_logp, _, _ = policy_forward(
        policy_model, ref_params, tokens, positions, attn_mask, prompt_len, cfg.sampling,
        frozen_hidden=hidden if cfg.reference_shares_frozen_layers else None)
    old_logp, values, ref_logp = (jax.lax.stop_gradient(jnp.where(mask, x, 0.0))
                                  for x in (old_logp, values, ref_logp))
    scores = scores.astype(jnp.float32) * cfg.reward_gain + cfg.reward_bias
    if cfg.missing_eos_penalty is not None:
        scores = jnp.where(ended, scores, scores - cfg.missing_eos_penalty)
    kl_coef = state.kl.kl_coef if cfg.kl_in_reward else jnp.zeros((), jnp.float32)
    rewards, metrics = kl_shaped_rewards(scores, old_logp, ref_logp, mask, kl_coef,
                                         estimator=cfg.kl_estimator)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = gae(rewards, values, mask, gamma=cfg.gamma, lam=cfg.lam)
    if cfg.whiten_advantages:
        advantages = whiten(advantages, mask)
    advantages = jnp.where(mask, advantages, 0.0)
    exp = Experience(tokens=tokens, attn_mask=attn_mask, positions=positions, response_mask=mask,
                     old_logp=old_logp, old_values=values, ref_logp=ref_logp, scores=scores,
                     rewards=rewards, advantages=advantages, returns=returns,
                     frozen_hidden=hidden)
    metrics = dict(metrics)
    one = jnp.ones((), jnp.float32)
    metrics["objective/entropy"] = (jnp.sum(-old_logp * mask) / mask.shape[0], one)
    lengths = jnp.sum(mask, axis=-1).astype(jnp.float32)
    metrics["rollout/response_length"] = (jnp.sum(lengths), jnp.asarray(lengths.size, jnp.float32))
    metrics["rollout/no_eos_share"] = (jnp.sum(1.0 - ended.astype(jnp.float32)),
                                       jnp.asarray(ended.size, jnp.float32))
    metrics["objective/kl_coef"] = (state.kl.kl_coef, one)
    return exp, metrics


def minibatch_loss(trainable, mb: Experience, kl_coef: jax.Array, *, policy_model: Model,
                   value_model: Model | None, cfg: PPOConfig):
    """The PPO loss of one minibatch: :func:`rlhf_jax.losses.ppo.ppo_loss` on a forward.

    ``L = L_clip + vf_coef L_V - entropy_coef H [+ β KL_k(π || π_ref)]``, token-means over
    ``mb.response_mask`` (Schulman et al. 2017 eq. 7 and 9); the KL term only when
    ``cfg.kl_in_reward`` is False (Shao et al. 2024 eq. 3-4), with ``β = kl_coef`` and the
    estimator ``cfg.kl_estimator``. With ``entropy_coef == 0`` the entropy is a metric only.

    Args:
      trainable: ``(policy_params, value_params)``; ``value_params`` is ``None`` unless
        ``cfg.value_model == "separate"``.
      mb: ``Experience`` rows of the minibatch (``[b, T]`` / ``[b, R]``).
      kl_coef: ``[] float32`` β, the KL controller's current coefficient (an array: changing
        it never recompiles).

    Returns:
      ``(loss, metrics)`` with ``ppo_loss``'s ``(sum, count)`` metrics (``ppo/loss/total`` ...).
    """
    policy_params, value_params = trainable
    prompt_len = mb.tokens.shape[1] - mb.response_mask.shape[1]
    logp, entropy, values = policy_forward(policy_model, policy_params, mb.tokens, mb.positions,
                                           mb.attn_mask, prompt_len, cfg.sampling,
                                           frozen_hidden=mb.frozen_hidden)
    if cfg.value_model == "separate":
        values = value_forward(value_model, value_params, mb.tokens, mb.positions, mb.attn_mask,
                               prompt_len)
    kl = {} if cfg.kl_in_reward else dict(ref_logp=mb.ref_logp, kl_loss_coef=kl_coef,
                                          kl_loss_estimator=cfg.kl_estimator)
    return ppo_loss(logp, mb.old_logp, mb.advantages, mb.response_mask, values=values,
                    old_values=mb.old_values, returns=mb.returns, clip_eps=cfg.clip_eps,
                    clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip,
                    clip_eps_value=cfg.clip_eps_value, vf_coef=cfg.vf_coef, entropy=entropy,
                    entropy_coef=cfg.entropy_coef, **kl)


def update_kl(state: PPOState, exp: Experience, cfg: PPOConfig, batch_size: int) -> PPOState:
    """Adaptive-KL controller step with the rollout's mean k1 sequence KL (nats per sequence;
    Ziegler et al. 2019 §2.2), ``batch_size`` samples."""
    kl = jnp.mean(jnp.sum((exp.old_logp - exp.ref_logp) * exp.response_mask, axis=-1))
    return state.replace(kl=cfg.kl.update(state.kl, kl, batch_size))
