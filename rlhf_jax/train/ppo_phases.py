"""The pure phases of an on-policy iteration (PPO, GRPO, RLOO, REINFORCE++ ...), with its
config and state (import them from ``rlhf_jax.train.ppo``, which composes them).

``generate`` samples ``num_samples`` responses per prompt; ``make_experience`` scores the
rollout and computes rewards (KL-shaped or not) and advantages with the configured estimator;
``minibatch_loss`` is :func:`rlhf_jax.losses.ppo.ppo_loss` (the one policy-gradient objective
of the library, with the configured surrogate and aggregation) on the policy's (and value
model's) forward, which ``rlhf_jax.train.ppo.ppo_update`` minimises over epochs x shuffled
minibatches; ``update_kl`` steps the KL controller.

Every algorithmic choice is a registered name:

* ``advantage``: ``gae`` (with a critic), ``rloo``, ``grpo``, ``dr_grpo``, ``reinforce``,
  ``reinforce_pp`` (``losses.advantages.ADVANTAGE_ESTIMATORS``);
* ``policy_loss``: ``ppo`` (token ratio; asymmetric and dual clip), ``gspo``, ``cispo``
  (``losses.policy_gradient.POLICY_LOSSES``);
* ``loss_aggregation``: ``token_mean`` (DAPO), ``sequence_mean`` (GRPO), ``constant``
  (Dr. GRPO);
* ``kl_penalty``: ``reward``, ``loss`` or ``none`` (no reference model at all).

Presets of these options: PPO (Ouyang et al. 2022) is ``gae`` + ``ppo`` + KL in the reward;
GRPO (Shao et al. 2024) is ``grpo`` + ``ppo`` + ``sequence_mean`` + k3 KL in the loss; Dr. GRPO
is ``dr_grpo`` + ``constant``; DAPO (Yu et al. 2025) is ``grpo`` + ``token_mean`` +
``clip_eps_high`` + ``kl_penalty="none"`` + dynamic sampling + the overlong penalty; RLOO
(Ahmadian et al. 2024) is ``rloo`` + KL in the reward.
"""

from __future__ import annotations

import dataclasses
from typing import Literal

import jax
import jax.numpy as jnp
from flax import struct

from rlhf_jax.control import KLController, KLState
from rlhf_jax.losses.advantages import estimate_advantages, get_advantage_estimator
from rlhf_jax.losses.logprobs import entropy_from_logits, sequence_logprobs, whiten
from rlhf_jax.losses.policy_gradient import get_policy_loss
from rlhf_jax.losses.ppo import kl_shaped_rewards, overlong_penalty, ppo_loss
from rlhf_jax.sharding import constrain
from rlhf_jax.models.model import Model, Params
from rlhf_jax.rollout.sampler import SamplingConfig, logprob_mismatch, sample, suppress_eos
from rlhf_jax.train.common import add_router_aux_loss
from rlhf_jax.train.state import TrainState
from rlhf_jax.types import positions_from_mask


@dataclasses.dataclass(frozen=True, kw_only=True)
class PPOConfig:
    """Options of the on-policy trainer (defaults: PPO as lm-human-preferences / TRL).

    Attributes:
      sampling: the rollout sampler (``max_new_tokens`` = R, temperature, top-k/p, EOS).
      num_samples: ``k`` responses sampled per prompt in one sampler call (the prompts
        repeated ``k`` times; rows ``g k .. g k + k - 1`` are prompt ``g``'s group). The
        rollout batch is ``k x`` the prompt batch.
      advantage: the advantage estimator (``losses.advantages.ADVANTAGE_ESTIMATORS``); a value
        model is built and trained only for ``"gae"``. The group estimators (``rloo``,
        ``grpo``, ``dr_grpo``) need ``num_samples >= 2``.
      policy_loss: the policy surrogate (``losses.policy_gradient.POLICY_LOSSES``).
      loss_aggregation: how per-token losses are reduced over a minibatch:
        ``"token_mean"`` (every token of the minibatch weighs the same; DAPO, Yu et al. 2025
        §3.3), ``"sequence_mean"`` (mean over responses of their token-means; GRPO, Shao et
        al. 2024 eq. 3) or ``"constant"`` (token sum divided by rows x ``loss_normalizer``, a
        constant; Dr. GRPO, Liu et al. 2025 §3.1).
      loss_normalizer: the constant of ``"constant"`` aggregation, tokens per response
        (``None``: the response budget R).
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
      kl_penalty: ``"reward"``: ``kl_coef x KL`` shapes the per-token reward (Ziegler et al.
        2019 §2.2, InstructGPT). ``"loss"``: ``kl_coef x KL`` is a term of the loss instead
        (Shao et al. 2024, GRPO). Either way the controller is fed the rollout's k1 sequence
        KL. ``"none"``: no KL term and no reference model (pass ``ref_params=None``; DAPO, Yu
        et al. 2025 §2.3), which saves its memory and forward.
      whiten_rewards: whiten the shaped rewards over the batch before the estimator.
      whiten_advantages: whiten advantages over the batch; ``None``: the estimator's default
        (``gae`` and ``reinforce_pp`` whiten, the group estimators do not).
      overlong_buffer: DAPO's soft overlong punishment (Yu et al. 2025 eq. 13): a response
        longer than ``R - overlong_buffer`` tokens loses ``overlong_penalty x (length - R +
        buffer) / buffer`` of score, up to ``overlong_penalty`` at the budget R; 0 = off.
      overlong_penalty: the largest overlong punishment (reward units).
      missing_eos_penalty: subtracted from the score of responses that never emit EOS
        (``None`` = off).
      reward_gain, reward_bias: affine normalisation of the reward model's score
        (Ziegler et al. 2019 §2.2: mean 0, std 1 on reference samples).
      value_model: the critic of ``"gae"``: ``"shared"`` (a value head on the policy trunk;
        policy is an ``"lm_value"`` model) or ``"separate"`` (its own ``"scalar"`` model,
        optimizer and ``PPOState.value``; the policy may be a plain ``"lm"`` model). Ignored
        by the critic-free estimators.
      reference_shares_frozen_layers: the reference equals the policy in the embeddings and
        the lowest ``frozen_layers`` blocks (it is the policy's initialisation; check once with
        ``rlhf_jax.train.state.frozen_part_equal``): its forward starts from the policy's
        frozen hidden states. Unchecked inside the step; a wrong True gives wrong reference
        log-probs.
      reference_is_base: the reference is the policy's frozen base: its own parameters with
        the LoRA adapters switched off (``Model.apply(..., adapters=False)``; the policy
        started from fresh, zero-product adapters on the reference's weights, Hu et al. 2021).
        No reference copy exists: pass ``ref_params=None``. Needs a policy with
        ``cfg.lora``.
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
    kl_penalty: Literal["reward", "loss", "none"] = "reward"
    whiten_rewards: bool = False
    whiten_advantages: bool | None = None
    num_samples: int = 1
    advantage: str = "gae"
    policy_loss: str = "ppo"
    loss_aggregation: Literal["token_mean", "sequence_mean", "constant"] = "token_mean"
    loss_normalizer: int | None = None
    overlong_buffer: int = 0
    overlong_penalty: float = 1.0
    missing_eos_penalty: float | None = None
    reward_gain: float = 1.0
    reward_bias: float = 0.0
    value_model: Literal["shared", "separate"] = "shared"
    reference_shares_frozen_layers: bool = False
    reference_is_base: bool = False

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
        if self.kl_penalty not in ("reward", "loss", "none"):
            raise ValueError(f"PPOConfig.kl_penalty must be 'reward', 'loss' or 'none', "
                             f"got {self.kl_penalty!r}")
        if self.loss_aggregation not in ("token_mean", "sequence_mean", "constant"):
            raise ValueError(f"PPOConfig.loss_aggregation must be 'token_mean', "
                             f"'sequence_mean' or 'constant', got {self.loss_aggregation!r}")
        if self.num_samples < 1:
            raise ValueError(f"PPOConfig.num_samples={self.num_samples} must be >= 1")
        estimator = get_advantage_estimator(self.advantage)  # raises on an unknown name
        get_policy_loss(self.policy_loss)
        if estimator.name in ("rloo", "grpo", "dr_grpo") and self.num_samples < 2:
            raise ValueError(f"PPOConfig.advantage={self.advantage!r} needs num_samples >= 2 "
                             f"(got {self.num_samples}): with one sample per prompt the group "
                             "baseline is the sample itself and every advantage is 0")
        if not 0 <= self.overlong_buffer <= self.sampling.max_new_tokens:
            raise ValueError(f"PPOConfig.overlong_buffer={self.overlong_buffer} must be in "
                             f"[0, max_new_tokens={self.sampling.max_new_tokens}]")

    @property
    def needs_critic(self) -> bool:
        """Whether the advantage estimator uses a value function (only ``"gae"``)."""
        return get_advantage_estimator(self.advantage).needs_critic

    @property
    def uses_reference(self) -> bool:
        """Whether a reference model is needed (``kl_penalty != "none"``)."""
        return self.kl_penalty != "none"

    def aggregation(self, rows: int, response_len: int) -> dict:
        """``ppo_loss`` keyword arguments of ``loss_aggregation`` for a minibatch of ``rows``
        responses of ``response_len`` tokens."""
        if self.loss_aggregation == "sequence_mean":
            return {"reduction": "sequence"}
        if self.loss_aggregation == "constant":
            return {"reduction": "token",
                    "num_tokens": float(rows * (self.loss_normalizer or response_len))}
        return {"reduction": "token"}


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
    """One rollout batch, scored, with advantages. ``T = P + R``; ``B`` counts responses
    (prompts x ``num_samples``).

    Attributes:
      tokens, attn_mask, positions: ``[B, T]`` prompt (left-padded) + response.
      response_mask: ``[B, R] bool`` response tokens up to and including EOS.
      old_logp: ``[B, R]`` float32 rollout-policy log-probs of the response tokens (nats).
      old_values: ``[B, R]`` value estimates ``V(x, y_<r)`` before each response token, or
        ``None`` without a critic.
      ref_logp: ``[B, R]`` reference-policy log-probs (nats), or ``None`` with
        ``kl_penalty="none"``.
      scores: ``[B]`` normalised reward-model (or host) scores, after the EOS and overlong
        penalties.
      rewards: ``[B, R]`` shaped per-token rewards.
      advantages: ``[B, R]``.
      returns: ``[B, R]`` value targets (``advantages + old_values`` before whitening), or
        ``None`` without a critic.
      frozen_hidden: ``[B, T, D]`` the policy's ``Model.frozen_hidden`` (compute dtype), or
        ``None`` when the policy has no frozen layers.
    """

    tokens: jax.Array
    attn_mask: jax.Array
    positions: jax.Array
    response_mask: jax.Array
    old_logp: jax.Array
    old_values: jax.Array | None
    ref_logp: jax.Array | None
    scores: jax.Array
    rewards: jax.Array
    advantages: jax.Array
    returns: jax.Array | None
    frozen_hidden: jax.Array | None = None


def init_ppo_state(policy: TrainState, kl: KLController, rng: jax.Array,
                   value: TrainState | None = None) -> PPOState:
    """A ``PPOState`` from trained states (policy from SFT, value from the reward model)."""
    return PPOState(policy=policy, value=value, kl=kl.init(), rng=rng)


def check_models(cfg: PPOConfig, policy_model: Model, value_model: Model | None,
                 state: PPOState | None = None) -> None:
    """Raise ``ValueError`` when the models (and state) do not fit the config: the policy is
    never a ``"scalar"`` model; with a critic (``advantage="gae"``), ``value_model="shared"``
    needs an ``"lm_value"`` policy and ``"separate"`` a ``"scalar"`` value model and
    ``state.value``. Critic-free estimators take any ``"lm"`` / ``"lm_value"`` policy (a value
    head is then unused). ``cfg.reference_is_base`` needs a policy with LoRA."""
    if policy_model.kind == "scalar":
        raise ValueError("PPO: the policy must be an 'lm' or 'lm_value' model, got kind 'scalar'")
    if cfg.reference_is_base and policy_model.cfg.lora is None:
        raise ValueError("PPOConfig.reference_is_base needs a policy with LoRA adapters "
                         "(ModelConfig.lora); without them the policy's base is the policy "
                         "itself")
    if not cfg.needs_critic:
        return
    if cfg.value_model == "shared":
        if policy_model.kind != "lm_value":
            raise ValueError(f"PPOConfig.value_model='shared' needs an 'lm_value' policy (a value "
                             f"head on its trunk), got kind {policy_model.kind!r}; use "
                             f"value_model='separate' with a 'scalar' value model, or a "
                             f"critic-free advantage estimator")
        return
    if value_model is None or value_model.kind != "scalar":
        kind = None if value_model is None else value_model.kind
        raise ValueError(f"PPOConfig.value_model='separate' needs a 'scalar' value_model, got "
                         f"{kind!r}")
    if state is not None and state.value is None:
        raise ValueError("PPOConfig.value_model='separate' needs PPOState.value (the value "
                         "model's TrainState: init_ppo_state(..., value=...))")


def uses_separate_value(cfg: PPOConfig) -> bool:
    """Whether a separate value model is trained (a critic, ``value_model="separate"``)."""
    return cfg.needs_critic and cfg.value_model == "separate"


# ---- phases ------------------------------------------------------------------------------
def _values_before(values: jax.Array, prompt_len: int) -> jax.Array:
    """``V`` of the state before each response token: positions ``P-1 .. T-2``."""
    return values[:, prompt_len - 1:-1]


def policy_forward(model: Model, params: Params, tokens, positions, attn_mask, prompt_len: int,
                   sampling: SamplingConfig, *, frozen_hidden: jax.Array | None = None,
                   with_router_aux: bool = False, adapters: bool = True,
                   dropout_rng: jax.Array | None = None):
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
    ``with_router_aux``: a fourth result, ``ModelOutput.router_aux_loss``. ``adapters`` /
    ``dropout_rng``: LoRA's switch (``False``: the frozen base, the reference of
    ``PPOConfig.reference_is_base``) and adapter dropout (``Model.apply``).
    """
    out = model.apply(params, tokens, positions, attn_mask, compute_logits=False,
                      frozen_hidden=frozen_hidden, adapters=adapters, dropout_rng=dropout_rng)
    window = slice(prompt_len - 1, None)
    logits = model.logits(params, out.hidden[:, window]) / sampling.temperature  # [B, R + 1, V]
    # window row r predicts response slot r (the last row predicts nothing and is dropped)
    logits = suppress_eos(logits, jnp.arange(logits.shape[1]), sampling)
    logp = sequence_logprobs(logits, tokens[:, window])[:, 1:]
    entropy = entropy_from_logits(logits, shift=True)[:, 1:]
    values = None if out.values is None else _values_before(out.values, prompt_len)
    return (logp, entropy, values, out.router_aux_loss) if with_router_aux else (
        logp, entropy, values)


def value_forward(model: Model, params: Params, tokens, positions, attn_mask, prompt_len: int,
                  *, with_router_aux: bool = False, dropout_rng: jax.Array | None = None):
    """Values ``[B, R]`` of a separate scalar value model (``V(x, y_<r)``, reward units);
    ``with_router_aux``: ``(values, ModelOutput.router_aux_loss)``; ``dropout_rng``: LoRA's
    adapter dropout."""
    out = model.apply(params, tokens, positions, attn_mask, compute_logits=False,
                      dropout_rng=dropout_rng)
    values = _values_before(out.values, prompt_len)
    return (values, out.router_aux_loss) if with_router_aux else values


def generate(state: PPOState, prompt_tokens, prompt_mask, *, policy_model: Model, cfg: PPOConfig):
    """Phase 1: sample ``cfg.num_samples`` responses per prompt with the current policy in one
    sampler call (each prompt prefilled once, its cache repeated ``k`` times; every row draws
    its own noise from the iteration's key). Rows ``g k .. g k + k - 1`` are prompt ``g``'s.

    Returns:
      ``(SampleOutput, tokens, attn_mask, positions)`` with ``tokens [B k, P + R]``.
    """
    key = jax.random.fold_in(state.rng, state.policy.step)
    out = sample(policy_model, state.policy.params, prompt_tokens, prompt_mask,
                 jax.random.fold_in(key, 0), cfg.sampling, num_samples=cfg.num_samples)
    prompt_tokens = constrain(out.prompt_tokens, ("batch", None))
    prompt_mask = constrain(out.prompt_mask, ("batch", None))
    tokens = jnp.concatenate([prompt_tokens, out.response], axis=1)
    attn_mask = jnp.concatenate([prompt_mask.astype(bool), out.response_mask], axis=1)
    return out, tokens, attn_mask, positions_from_mask(attn_mask)


def _group_metrics(scores: jax.Array, k: int) -> dict:
    """``rollout/equal_reward_groups``: share of prompts whose ``k`` scores are all equal (they
    carry no signal for the group estimators; DAPO §3.2); ``rollout/group_score_std``."""
    groups = scores.reshape(-1, k)
    equal = (jnp.max(groups, axis=1) == jnp.min(groups, axis=1)).astype(jnp.float32)
    n = jnp.asarray(equal.size, jnp.float32)
    return {"rollout/equal_reward_groups": (jnp.sum(equal), n),
            "rollout/group_score_std": (jnp.sum(jnp.std(groups, axis=1)), n)}


def make_experience(state: PPOState, tokens, attn_mask, positions, response_mask, ended, scores,
                    ref_params: Params | None, *, policy_model: Model, value_model: Model | None,
                    cfg: PPOConfig, sampler_logprobs: jax.Array | None = None
                    ) -> tuple[Experience, dict]:
    """Phases 2-3: score the rollout and compute rewards and advantages.

    With ``cfg.kl_penalty == "reward"`` the per-token reward is ``-β KL_k + score`` on the last
    token (``kl_shaped_rewards``, Ziegler et al. 2019 §2.2) with ``β = state.kl.kl_coef``; else
    the reward is the score alone (the KL goes into the loss, ``minibatch_loss``, or nowhere).
    Advantages come from ``cfg.advantage`` (``losses.advantages.estimate_advantages``) over
    groups of ``cfg.num_samples`` consecutive rows.

    Args:
      tokens, attn_mask, positions: ``[B, P + R]`` from ``generate``.
      response_mask: ``[B, R]``; ended: ``[B] bool`` (response contains EOS).
      scores: ``[B]`` raw reward (reward model or host function), before normalisation.
      ref_params: frozen reference policy parameters in the policy's tree (a copy of the
        initial policy; its value head, if any, is unused); ``None`` with
        ``kl_penalty="none"`` or ``cfg.reference_is_base`` (the policy's own parameters
        with the LoRA adapters off are the reference).
      sampler_logprobs: ``[B, R]`` ``SampleOutput.logprobs`` of this rollout, or ``None``:
        adds ``rollout/logprob_mismatch`` and ``rollout/logprob_mismatch_k3``
        (``rollout.sampler.logprob_mismatch``: sampler vs training-forward log-probs, e.g. a
        bfloat16 ``sampling.dtype`` against float32 masters).

    Returns:
      ``(Experience, metrics)``; ``objective/kl_coef`` is ``state.kl.kl_coef``, the β this
      iteration uses in the reward or the loss.

    Raises:
      ValueError: models that do not fit the config (see ``check_models``); a missing
        reference with a KL penalty.
    """
    check_models(cfg, policy_model, value_model, state)
    if cfg.reference_is_base:
        ref_params = state.policy.params
    if cfg.uses_reference and ref_params is None:
        raise ValueError(f"PPOConfig.kl_penalty={cfg.kl_penalty!r} needs ref_params (the "
                         "reference policy); pass kl_penalty='none' to train without one")
    prompt_len = tokens.shape[1] - response_mask.shape[1]
    mask = response_mask.astype(bool)
    hidden = None
    if policy_model.cfg.frozen_layers:
        hidden = policy_model.frozen_hidden(state.policy.params, tokens, positions, attn_mask)
    old_logp, _, values = policy_forward(policy_model, state.policy.params, tokens, positions,
                                         attn_mask, prompt_len, cfg.sampling, frozen_hidden=hidden)
    if not cfg.needs_critic:
        values = None
    elif cfg.value_model == "separate":
        values = value_forward(value_model, state.value.params, tokens, positions, attn_mask,
                               prompt_len)
    ref_logp = None
    if cfg.uses_reference:
        ref_logp, _, _ = policy_forward(
            policy_model, ref_params, tokens, positions, attn_mask, prompt_len, cfg.sampling,
            frozen_hidden=hidden if cfg.reference_shares_frozen_layers else None,
            adapters=not cfg.reference_is_base)
    old_logp, values, ref_logp = (None if x is None else
                                  jax.lax.stop_gradient(jnp.where(mask, x, 0.0))
                                  for x in (old_logp, values, ref_logp))
    scores = scores.astype(jnp.float32) * cfg.reward_gain + cfg.reward_bias
    if cfg.missing_eos_penalty is not None:
        scores = jnp.where(ended, scores, scores - cfg.missing_eos_penalty)
    lengths = jnp.sum(mask, axis=-1).astype(jnp.float32)
    one = jnp.ones((), jnp.float32)
    metrics = {}
    if sampler_logprobs is not None:
        metrics.update(logprob_mismatch(sampler_logprobs, old_logp, mask))
    if cfg.overlong_buffer:
        penalty = overlong_penalty(lengths, mask.shape[1], cfg.overlong_buffer,
                                   cfg.overlong_penalty)
        scores = scores + penalty
        metrics["rollout/overlong_penalty"] = (jnp.sum(penalty), jnp.asarray(penalty.size, jnp.float32))
    kl_coef = state.kl.kl_coef if cfg.kl_penalty == "reward" else jnp.zeros((), jnp.float32)
    rewards, kl_metrics = kl_shaped_rewards(scores, old_logp,
                                            old_logp if ref_logp is None else ref_logp, mask,
                                            kl_coef, estimator=cfg.kl_estimator)
    if ref_logp is None:  # no reference: report the score alone
        kl_metrics = {"objective/score": kl_metrics["objective/score"]}
    metrics.update(kl_metrics)
    if cfg.whiten_rewards:
        rewards = whiten(rewards, mask, shift_mean=False)
    advantages, returns = estimate_advantages(
        cfg.advantage, rewards, mask, values=values, group_size=cfg.num_samples,
        gamma=cfg.gamma, lam=cfg.lam, whiten_advantages=cfg.whiten_advantages)
    exp = Experience(tokens=tokens, attn_mask=attn_mask, positions=positions, response_mask=mask,
                     old_logp=old_logp, old_values=values, ref_logp=ref_logp, scores=scores,
                     rewards=rewards, advantages=advantages, returns=returns,
                     frozen_hidden=hidden)
    metrics["objective/entropy"] = (jnp.sum(-old_logp * mask) / mask.shape[0], one)
    metrics["rollout/response_length"] = (jnp.sum(lengths), jnp.asarray(lengths.size, jnp.float32))
    metrics["rollout/no_eos_share"] = (jnp.sum(1.0 - ended.astype(jnp.float32)),
                                       jnp.asarray(ended.size, jnp.float32))
    if cfg.uses_reference:
        metrics["objective/kl_coef"] = (state.kl.kl_coef, one)
    if cfg.num_samples > 1:
        metrics.update(_group_metrics(scores, cfg.num_samples))
    return exp, metrics


def minibatch_loss(trainable, mb: Experience, kl_coef: jax.Array, *, policy_model: Model,
                   value_model: Model | None, cfg: PPOConfig,
                   dropout_rng: jax.Array | None = None):
    """The loss of one minibatch: :func:`rlhf_jax.losses.ppo.ppo_loss` on a forward.

    ``L = L_policy + vf_coef L_V - entropy_coef H [+ β KL_k(π || π_ref)]``, reduced by
    ``cfg.loss_aggregation`` over ``mb.response_mask`` (Schulman et al. 2017 eq. 7 and 9 for
    the ``ppo`` surrogate); the value term only with a critic, the KL term only when
    ``cfg.kl_penalty == "loss"`` (Shao et al. 2024 eq. 3-4), with ``β = kl_coef`` and the
    estimator ``cfg.kl_estimator``. With ``entropy_coef == 0`` the entropy is a metric only.
    Mixture-of-experts policy / value models add their load-balancing losses
    (``add_router_aux_loss``).

    Args:
      trainable: ``(policy_params, value_params)``; ``value_params`` is ``None`` unless a
        separate value model is trained.
      mb: ``Experience`` rows of the minibatch (``[b, T]`` / ``[b, R]``).
      kl_coef: ``[] float32`` β, the KL controller's current coefficient (an array: changing
        it never recompiles).
      dropout_rng: LoRA's adapter dropout key (the policy's; the value model's is folded
        from it), or ``None``.

    Returns:
      ``(loss, metrics)`` with ``ppo_loss``'s ``(sum, count)`` metrics (``ppo/loss/total`` ...).
    """
    policy_params, value_params = trainable
    prompt_len = mb.tokens.shape[1] - mb.response_mask.shape[1]
    logp, entropy, values, aux = policy_forward(
        policy_model, policy_params, mb.tokens, mb.positions, mb.attn_mask, prompt_len,
        cfg.sampling, frozen_hidden=mb.frozen_hidden, with_router_aux=True,
        dropout_rng=dropout_rng)
    critic = {}
    value_aux = None
    if cfg.needs_critic:
        if cfg.value_model == "separate":
            value_key = None if dropout_rng is None else jax.random.fold_in(dropout_rng, 1)
            values, value_aux = value_forward(value_model, value_params, mb.tokens, mb.positions,
                                              mb.attn_mask, prompt_len, with_router_aux=True,
                                              dropout_rng=value_key)
        critic = dict(values=values, old_values=mb.old_values, returns=mb.returns,
                      clip_eps_value=cfg.clip_eps_value, vf_coef=cfg.vf_coef)
    kl = {}
    if cfg.kl_penalty == "loss":
        kl = dict(ref_logp=mb.ref_logp, kl_loss_coef=kl_coef, kl_loss_estimator=cfg.kl_estimator)
    loss, metrics = ppo_loss(
        logp, mb.old_logp, mb.advantages, mb.response_mask, clip_eps=cfg.clip_eps,
        clip_eps_high=cfg.clip_eps_high, dual_clip=cfg.dual_clip, policy_loss=cfg.policy_loss,
        entropy=entropy, entropy_coef=cfg.entropy_coef, **critic, **kl,
        **cfg.aggregation(*mb.response_mask.shape))
    loss, metrics = add_router_aux_loss(loss, metrics, policy_model, aux)
    if value_aux is not None:
        loss, value_metrics = add_router_aux_loss(loss, {}, value_model, value_aux)
        metrics["router/value_aux_loss"] = value_metrics["router/aux_loss"]
    return loss, metrics


def update_kl(state: PPOState, exp: Experience, cfg: PPOConfig, batch_size: int) -> PPOState:
    """Adaptive-KL controller step with the rollout's mean k1 sequence KL (nats per sequence;
    Ziegler et al. 2019 §2.2), ``batch_size`` samples; unchanged without a reference."""
    if exp.ref_logp is None:
        return state
    kl = jnp.mean(jnp.sum((exp.old_logp - exp.ref_logp) * exp.response_mask, axis=-1))
    return state.replace(kl=cfg.kl.update(state.kl, kl, batch_size))
