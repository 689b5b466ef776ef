"""PPO against a reward model with a per-token KL penalty (InstructGPT stage 3).

Ziegler et al. 2019 (lm-human-preferences), Stiennon et al. 2020 and Ouyang et al. 2022 §3.5:
the policy is initialised from the SFT model; the reward of a response is the reward
model's score at its last token minus ``kl_coef x KL_t(pi || pi_ref)`` at every token, with a
fixed or adaptive ``kl_coef``; a value function is trained alongside (on the policy's trunk, or
as a separate model); advantages come from GAE (Schulman et al. 2016); the policy and value
losses are clipped (Schulman et al. 2017); each rollout is used for several epochs of
shuffled minibatches.

One iteration is a composition of pure phases::

    sample -> score (old logp, values, reference logp, reward) -> rewards with KL shaping
           -> GAE -> scan over epochs x scan over minibatches -> KL controller update

``ppo_iteration`` composes them into ONE jitted function (everything on device, the reward a
reward model). For large models or a reward that is a host Python function of decoded text,
``PPOStages`` runs the same phases staged: ``generate`` (jit), the host reward, then
``learn`` (jit). Frozen parameters (reference, reward) are explicit arguments.

With frozen lower layers (``ModelConfig.frozen_layers``) the policy's embeddings and frozen
blocks run once per rollout (``Model.frozen_hidden``, kept in ``Experience.frozen_hidden``):
the scoring forward and every epoch's minibatch forwards start from them, since the optimizer
never moves those layers (``make_optimizer(..., frozen_layers=N)`` masks their updates, weight
decay included; a custom optimizer must do the same). With
``PPOConfig.reference_shares_frozen_layers`` the reference forward starts from them too.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from rlhf_jax.control import KLController, KLState
from rlhf_jax.losses.advantages import gae
from rlhf_jax.losses.logprobs import entropy_from_logits, masked_mean, sequence_logprobs, whiten
from rlhf_jax.losses.ppo import clipped_policy_loss, clipped_value_loss, kl_shaped_rewards
from rlhf_jax.losses.kl import kl_estimate
from rlhf_jax.models.model import Model, Params
from rlhf_jax.rollout.sampler import SampleOutput, SamplingConfig, sample, suppress_eos
from rlhf_jax.train.common import sequence_scores
from rlhf_jax.train.state import TrainState, apply_gradients
from rlhf_jax.types import positions_from_mask


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """PPO options (defaults follow lm-human-preferences / TRL's PPO trainer).

    Attributes:
      sampling: the rollout sampler (``max_new_tokens`` = R, temperature, top-k/p, EOS).
      num_ppo_epochs: passes over each rollout batch.
      num_minibatches: minibatches per epoch (the rollout batch must divide).
      gamma: discount.
      lam: GAE lambda.
      clip_eps: policy ratio clip (Schulman et al. 2017 eq. 7).
      clip_eps_high: upper ratio clip if asymmetric (DAPO "clip-higher"); ``None`` = symmetric.
      dual_clip: dual-clip constant c > 1 for negative advantages (Ye et al. 2020); ``None`` off.
      clip_eps_value: value clip around the rollout's values.
      vf_coef: weight of the value loss.
      entropy_coef: weight of the entropy bonus.
      kl: the KL coefficient controller (fixed or adaptive, Ziegler et al. 2019 §2.2).
      kl_estimator: per-token KL estimator in the reward (``"k1"``, ``"k2"``, ``"k3"``).
      kl_in_reward: True: KL shapes the per-token reward (InstructGPT). False: no KL in the
        reward; ``kl_coef x k3`` is added to the loss instead (Shao et al. 2024, GRPO).
      whiten_rewards: whiten the shaped rewards over the batch before GAE.
      whiten_advantages: whiten advantages over the batch (standard PPO practice).
      missing_eos_penalty: subtracted from the score of responses that never emit EOS
        (``None`` = off).
      reward_gain, reward_bias: affine normalisation of the reward model's score
        (Ziegler et al. 2019 §2.2: mean 0, std 1 on reference samples).
      value_model: ``"shared"`` (a value head on the policy trunk; policy is an ``"lm_value"``
        model) or ``"separate"`` (its own ``"scalar"`` model and optimizer).
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
      old_logp: ``[B, R]`` float32 rollout-policy log-probs of the response tokens.
      old_values: ``[B, R]`` value estimates ``V(x, y_<r)`` before each response token.
      ref_logp: ``[B, R]`` reference-policy log-probs.
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
    the same tokens, to skip the frozen layers.
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
    """Values ``[B, R]`` of a separate scalar value model."""
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

    Args:
      tokens, attn_mask, positions: ``[B, P + R]`` from ``generate``.
      response_mask: ``[B, R]``; ended: ``[B] bool`` (response contains EOS).
      scores: ``[B]`` raw reward (reward model or host function), before normalisation.
      ref_params: frozen reference policy parameters in the policy's tree (a copy of the
        initial policy; its value head, if any, is unused).
    """
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


def _minibatch_loss(trainable, mb: Experience, *, policy_model, value_model, cfg: PPOConfig):
    policy_params, value_params = trainable
    prompt_len = mb.tokens.shape[1] - mb.response_mask.shape[1]
    mask = mb.response_mask
    logp, entropy, values = policy_forward(policy_model, policy_params, mb.tokens, mb.positions,
                                           mb.attn_mask, prompt_len, cfg.sampling,
                                           frozen_hidden=mb.frozen_hidden)
    if cfg.value_model == "separate":
        values = value_forward(value_model, value_params, mb.tokens, mb.positions, mb.attn_mask,
                               prompt_len)
    pg_loss, metrics = clipped_policy_loss(logp, mb.old_logp, mb.advantages, mask,
                                           clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                           dual_clip=cfg.dual_clip)
    vf_loss, vf_metrics = clipped_value_loss(values, mb.old_values, mb.returns, mask,
                                             clip_eps_value=cfg.clip_eps_value)
    ent = masked_mean(entropy, mask)
    loss = pg_loss + cfg.vf_coef * vf_loss
    if cfg.entropy_coef:  # else no backward pass through the [B, R, V] entropy
        loss = loss - cfg.entropy_coef * ent
    else:
        ent = jax.lax.stop_gradient(ent)
    metrics = {**metrics, **vf_metrics}
    one = jnp.ones((), jnp.float32)
    if not cfg.kl_in_reward:
        # Zero padding first: k3 exponentiates, so garbage there could overflow.
        kl_term = masked_mean(kl_estimate(jnp.where(mask, logp, 0.0), mb.ref_logp, "k3"), mask)
        loss = loss + cfg.kl.init_kl_coef * kl_term
        metrics["ppo/policy/kl_loss"] = (kl_term, one)
    metrics["ppo/policy/entropy"] = (ent, one)
    metrics["ppo/loss/total"] = (loss, one)
    return loss, metrics


def ppo_update(state: PPOState, exp: Experience, *, policy_model: Model, value_model: Model | None,
               policy_tx: optax.GradientTransformation,
               value_tx: optax.GradientTransformation | None, cfg: PPOConfig):
    """Phase 4: ``scan`` over epochs x ``scan`` over shuffled minibatches.

    Each minibatch is one optimizer update of the policy (and the separate value model).
    Metrics are summed over all updates as ``(sum, count)`` pairs.
    """
    b = exp.tokens.shape[0]
    if b % cfg.num_minibatches:
        raise ValueError(f"rollout batch {b} is not divisible by num_minibatches={cfg.num_minibatches}")
    mb_size = b // cfg.num_minibatches
    loss_fn = functools.partial(_minibatch_loss, policy_model=policy_model, value_model=value_model,
                                cfg=cfg)
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.policy.step), 1)

    def minibatch_step(carry, idx):
        policy, value = carry
        mb = jax.tree.map(lambda x: x[idx], exp)
        value_params = None if value is None else value.params
        (_, metrics), (g_policy, g_value) = grad_fn((policy.params, value_params), mb)
        policy = apply_gradients(policy, g_policy, policy_tx)
        if value is not None:
            value = apply_gradients(value, g_value, value_tx)
        metrics = dict(metrics)
        metrics["ppo/policy/grad_norm"] = (optax.global_norm(g_policy), jnp.ones((), jnp.float32))
        return (policy, value), metrics

    def epoch(carry, epoch_key):
        perm = jax.random.permutation(epoch_key, b).reshape(cfg.num_minibatches, mb_size)
        return jax.lax.scan(minibatch_step, carry, perm)

    keys = jax.random.split(key, cfg.num_ppo_epochs)
    (policy, value), metrics = jax.lax.scan(epoch, (state.policy, state.value), keys)
    metrics = jax.tree.map(lambda x: jnp.sum(x), metrics)  # sum over epochs x minibatches
    return state.replace(policy=policy, value=value), metrics


def update_kl(state: PPOState, exp: Experience, cfg: PPOConfig, batch_size: int) -> PPOState:
    """Adaptive-KL controller step with the rollout's mean sequence KL (Ziegler et al. 2019)."""
    kl = jnp.mean(jnp.sum((exp.old_logp - exp.ref_logp) * exp.response_mask, axis=-1))
    return state.replace(kl=cfg.kl.update(state.kl, kl, batch_size))


# ---- composed iteration ------------------------------------------------------------------
def ppo_iteration(state: PPOState, prompt_tokens, prompt_mask, ref_params: Params,
                  reward_params: Params, *, policy_model: Model, reward_model: Model,
                  value_model: Model | None, policy_tx, value_tx, cfg: PPOConfig):
    """One full PPO iteration as a single pure function (jit it with ``make_ppo_iteration``).

    Args:
      state: ``PPOState``.
      prompt_tokens, prompt_mask: ``[B, P]`` left-padded prompts.
      ref_params: frozen reference policy.
      reward_params: frozen reward model (``"scalar"`` kind) scoring ``[prompt + response]``.

    Returns:
      ``(new_state, metrics)`` with ``(sum, count)`` metrics of every phase.
    """
    out, tokens, attn_mask, positions = generate(state, prompt_tokens, prompt_mask,
                                                 policy_model=policy_model, cfg=cfg)
    scores = sequence_scores(reward_model, reward_params, tokens, positions, attn_mask)
    exp, metrics = make_experience(state, tokens, attn_mask, positions, out.response_mask, out.ended,
                                   scores, ref_params, policy_model=policy_model,
                                   value_model=value_model, cfg=cfg)
    new_state, upd_metrics = ppo_update(state, exp, policy_model=policy_model, value_model=value_model,
                                        policy_tx=policy_tx, value_tx=value_tx, cfg=cfg)
    new_state = update_kl(new_state, exp, cfg, prompt_tokens.shape[0])
    return new_state, {**metrics, **upd_metrics}


def make_ppo_iteration(*, policy_model: Model, reward_model: Model, policy_tx, cfg: PPOConfig,
                       value_model: Model | None = None, value_tx=None):
    """Jitted ``ppo_iteration(state, prompt_tokens, prompt_mask, ref_params, reward_params)``
    with the state donated; compiles once per prompt shape."""
    fn = functools.partial(ppo_iteration, policy_model=policy_model, reward_model=reward_model,
                           value_model=value_model, policy_tx=policy_tx, value_tx=value_tx, cfg=cfg)
    return jax.jit(fn, donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class PPOStages:
    """The same iteration run staged (one jit per phase), for a host reward function.

    ``reward_fn(prompt_tokens, response_tokens, response_mask) -> scores [B]`` runs on the host
    between ``generate`` and ``learn`` (e.g. decode and score text in Python).
    """

    policy_model: Model
    policy_tx: optax.GradientTransformation
    cfg: PPOConfig
    value_model: Model | None = None
    value_tx: optax.GradientTransformation | None = None

    def __post_init__(self):
        gen = functools.partial(generate, policy_model=self.policy_model, cfg=self.cfg)
        object.__setattr__(self, "_generate", jax.jit(gen))

        def learn(state, tokens, attn_mask, positions, response_mask, ended, scores, ref_params):
            exp, metrics = make_experience(state, tokens, attn_mask, positions, response_mask, ended,
                                           scores, ref_params, policy_model=self.policy_model,
                                           value_model=self.value_model, cfg=self.cfg)
            new_state, upd = ppo_update(state, exp, policy_model=self.policy_model,
                                        value_model=self.value_model, policy_tx=self.policy_tx,
                                        value_tx=self.value_tx, cfg=self.cfg)
            new_state = update_kl(new_state, exp, self.cfg, tokens.shape[0])
            return new_state, {**metrics, **upd}

        object.__setattr__(self, "_learn", jax.jit(learn, donate_argnums=(0,)))

    def iteration(self, state: PPOState, prompt_tokens, prompt_mask, ref_params: Params,
                  reward_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]):
        """``generate`` (device) -> ``reward_fn`` (host) -> ``learn`` (device)."""
        out, tokens, attn_mask, positions = self._generate(state, prompt_tokens, prompt_mask)
        scores = np.asarray(reward_fn(np.asarray(prompt_tokens), np.asarray(out.response),
                                      np.asarray(out.response_mask)), np.float32)
        if scores.shape != (tokens.shape[0],):
            raise ValueError(f"reward_fn returned shape {scores.shape}, expected ({tokens.shape[0]},)")
        return self._learn(state, tokens, attn_mask, positions, out.response_mask, out.ended,
                           jnp.asarray(scores), ref_params)
