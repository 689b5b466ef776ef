"""PPO against a reward model with a per-token KL penalty (InstructGPT stage 3).

Ziegler et al. 2019 (lm-human-preferences), Stiennon et al. 2020 and Ouyang et al. 2022 §3.5:
the policy is initialised from the SFT model; the reward of a response is the reward
model's score at its last token minus ``kl_coef x KL_t(pi || pi_ref)`` at every token, with a
fixed or adaptive ``kl_coef`` (or, with ``kl_penalty="loss"``, the KL is a term of the loss,
as in GRPO, Shao et al. 2024); a value function is trained alongside (on the policy's trunk,
or as a separate model); advantages come from GAE (Schulman et al. 2016); the policy and value
losses are clipped (Schulman et al. 2017); each rollout is used for several epochs of
shuffled minibatches. The loss of a minibatch is :func:`rlhf_jax.losses.ppo.ppo_loss`.

One iteration is a composition of pure phases (``rlhf_jax.train.ppo_phases``)::

    sample -> score (old logp, values, reference logp, reward) -> rewards with KL shaping
           -> GAE -> scan over epochs x scan over minibatches -> KL controller update

``ppo_iteration`` composes them into ONE jitted function (everything on device, the reward a
reward model); ``make_ppo_iteration`` jits it, optionally with explicit shardings. For large
models or a reward that is a host Python function of decoded text, ``PPOStages`` runs the
same phases staged: ``generate`` (jit), the host reward, then ``ppo_learn`` (jit). Frozen
parameters (reference, reward) are explicit arguments. The KL coefficient the iteration
uses (in the reward or the loss, and reported as ``objective/kl_coef``) is
``state.kl.kl_coef`` at its start; the controller then moves it for the next iteration.

With frozen lower layers (``ModelConfig.frozen_layers``) the policy's embeddings and frozen
blocks run once per rollout (``Model.frozen_hidden``, kept in ``Experience.frozen_hidden``):
the scoring forward and every epoch's minibatch forwards start from them, since the optimizer
never moves those layers (``make_optimizer(..., frozen_layers=N)`` masks their updates, weight
decay included; a custom optimizer must do the same). With
``PPOConfig.reference_shares_frozen_layers`` the reference forward starts from them too.

**Shuffling under data parallelism.** With the rollout batch split over ``S`` batch shards
(the ``data x fsdp`` mesh axes), a global random permutation would make every minibatch
gather rows held by other devices (XLA lowers it to a masked local gather plus an all-reduce
of the whole ``[B/M, T, D]`` minibatch, which then sits replicated on every device). Instead
each epoch draws one permutation *per shard*, and minibatch ``m`` takes the same number
``B / (M S)`` of rows from every shard: the rows are viewed as ``[S, B/S]`` and gathered with
a batched (per-shard) index, which the SPMD partitioner keeps local. Every row is still seen
exactly once per epoch; what changes with ``S`` is which rows share a minibatch, so with
``num_minibatches > 1`` runs with different ``S`` follow different (equally valid) shuffles.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import NamedSharding

from rlhf_jax.models.model import Model, Params
from rlhf_jax.control import KLState
from rlhf_jax.sharding import DATA_AXES, constrain, replicated
from rlhf_jax.train.common import sequence_scores
from rlhf_jax.train.ppo_phases import (
    Experience,
    PPOConfig,
    PPOState,
    check_models,
    generate,
    init_ppo_state,
    make_experience,
    minibatch_loss,
    policy_forward,
    update_kl,
    uses_separate_value,
    value_forward,
)
from rlhf_jax.train.state import apply_gradients, lora_dropout_rng, value_and_grad_trainable

__all__ = [
    "Experience", "PPOConfig", "PPOStages", "PPOState", "check_models", "context_batch_shards",
    "generate", "init_ppo_state", "make_experience", "make_ppo_iteration", "minibatch_indices",
    "minibatch_loss", "policy_forward", "ppo_iteration", "ppo_learn",
    "ppo_state_shardings",
    "ppo_update", "take_minibatch", "update_kl", "value_forward",
]


# ---- shard-local shuffling ---------------------------------------------------------------
def context_batch_shards() -> int:
    """Batch shards (``data x fsdp``) of the mesh set by ``jax.set_mesh``; 1 without one."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty:
        return 1
    sizes = dict(mesh.shape)
    n = 1
    for axis in DATA_AXES:
        n *= sizes.get(axis, 1)
    return n


def minibatch_indices(key: jax.Array, batch_size: int, num_minibatches: int,
                      batch_shards: int = 1) -> jax.Array:
    """Row indices of one epoch's minibatches, local to each batch shard.

    Shard ``s`` holds rows ``s B/S .. (s+1) B/S - 1``; each epoch draws an independent
    permutation of every shard's rows and minibatch ``m`` takes slice ``m`` of each.

    Args:
      key: typed key of the epoch.
      batch_size: ``B``; num_minibatches: ``M``; batch_shards: ``S``.

    Returns:
      ``[M, S, B/(M S)] int32``: ``idx[m, s, k]`` is a row *within shard s*; global row
      ``s B/S + idx[m, s, k]``. Over ``m`` and ``k`` every row of every shard appears once.

    Raises:
      ValueError: ``B`` not divisible by ``M S`` (all three named).
    """
    if batch_size % (num_minibatches * batch_shards):
        raise ValueError(
            f"rollout batch {batch_size} is not divisible by num_minibatches={num_minibatches} x "
            f"batch shards={batch_shards} (every minibatch takes the same number of rows from "
            f"each shard of the data x fsdp mesh axes)")
    rows = batch_size // batch_shards
    keys = jax.random.split(key, batch_shards)
    perm = jax.vmap(lambda k: jax.random.permutation(k, rows))(keys)  # [S, B/S]
    return perm.reshape(batch_shards, num_minibatches, rows // num_minibatches).swapaxes(0, 1)


def take_minibatch(exp: Experience, idx_SxK: jax.Array) -> Experience:
    """Rows ``idx[s, k]`` of every shard ``s`` of each leaf: ``[B, ...] -> [S K, ...]``.

    Each leaf is viewed as ``[S, B/S, ...]`` and gathered per shard (a batched gather over
    ``S``), so a batch-sharded experience is never gathered across devices; the minibatch keeps
    the batch sharding (row ``s K + k`` lives with shard ``s``). Both are pinned to the batch
    axes of the mesh in context when their leading dimension divides over them.
    """
    shards, per_shard = idx_SxK.shape
    mesh_shards = context_batch_shards()

    def pin(x):
        if x.shape[0] % mesh_shards:
            return x
        return constrain(x, ("batch",) + (None,) * (x.ndim - 1))

    def take(x):
        x_SxN = pin(x.reshape((shards, x.shape[0] // shards) + x.shape[1:]))
        mb_SxK = jax.vmap(lambda rows, i: rows[i])(x_SxN, idx_SxK)
        return pin(mb_SxK.reshape((shards * per_shard,) + x.shape[1:]))

    return jax.tree.map(take, exp)


def ppo_update(state: PPOState, exp: Experience, *, policy_model: Model, value_model: Model | None,
               policy_tx: optax.GradientTransformation,
               value_tx: optax.GradientTransformation | None, cfg: PPOConfig,
               batch_shards: int | None = None):
    """Phase 4: ``scan`` over epochs x ``scan`` over shuffled minibatches.

    Each minibatch is one optimizer update of the policy (and the separate value model) on
    ``minibatch_loss`` with ``β = state.kl.kl_coef``. Each epoch visits every row exactly once;
    the shuffle is local to each of ``batch_shards`` batch shards (``minibatch_indices``,
    module docstring). Metrics are summed over all updates as ``(sum, count)`` pairs.

    Args:
      batch_shards: ``S``, the number of shards the batch is split into; ``None`` = the
        ``data x fsdp`` size of the mesh in context (``jax.set_mesh``), 1 without one.

    Raises:
      ValueError: ``B`` not divisible by ``num_minibatches x S``; models that do not fit
        ``cfg.value_model``.
    """
    check_models(cfg, policy_model, value_model, state)
    if uses_separate_value(cfg) and value_tx is None:
        raise ValueError("PPOConfig.value_model='separate' needs value_tx")
    separate = uses_separate_value(cfg)
    b = exp.tokens.shape[0]
    shards = context_batch_shards() if batch_shards is None else batch_shards
    loss_fn = functools.partial(minibatch_loss, policy_model=policy_model,
                                value_model=value_model, cfg=cfg)
    grad_fn = value_and_grad_trainable(loss_fn, has_aux=True)  # LoRA: the adapters only
    key = jax.random.fold_in(jax.random.fold_in(state.rng, state.policy.step), 1)
    kl_coef = state.kl.kl_coef
    dropout = policy_model.cfg.lora is not None and policy_model.cfg.lora.dropout_rate > 0

    def minibatch_step(carry, idx_SxK):
        policy, value = carry
        mb = take_minibatch(exp, idx_SxK)
        value_params = None if value is None else value.params
        extra = {"dropout_rng": lora_dropout_rng(policy, policy_model)} if dropout else {}
        (_, metrics), (g_policy, g_value) = grad_fn((policy.params, value_params), mb, kl_coef,
                                                    **extra)
        policy = apply_gradients(policy, g_policy, policy_tx)
        if value is not None:
            value = apply_gradients(value, g_value, value_tx)
        metrics = dict(metrics)
        metrics["ppo/policy/grad_norm"] = (optax.global_norm(g_policy), jnp.ones((), jnp.float32))
        return (policy, value), metrics

    def epoch(carry, epoch_key):
        idx = minibatch_indices(epoch_key, b, cfg.num_minibatches, shards)
        return jax.lax.scan(minibatch_step, carry, idx)

    keys = jax.random.split(key, cfg.num_ppo_epochs)
    carry = (state.policy, state.value if separate else None)
    (policy, value), metrics = jax.lax.scan(epoch, carry, keys)
    metrics = jax.tree.map(lambda x: jnp.sum(x), metrics)  # sum over epochs x minibatches
    return state.replace(policy=policy, value=value if separate else state.value), metrics


# ---- composed iteration ------------------------------------------------------------------
def ppo_learn(state: PPOState, tokens, attn_mask, positions, response_mask, ended, scores,
              ref_params: Params, *, policy_model: Model, value_model: Model | None, policy_tx,
              value_tx, cfg: PPOConfig, batch_shards: int | None = None,
              sampler_logprobs: jax.Array | None = None):
    """Phases 2-5 on a sampled, scored rollout: ``make_experience`` -> ``ppo_update`` ->
    ``update_kl``.

    Args:
      state: ``PPOState`` the rollout was sampled with.
      tokens, attn_mask, positions: ``[B, P + R]``; response_mask: ``[B, R]``; ended: ``[B]``.
      scores: ``[B]`` raw rewards; ref_params: frozen reference policy.
      batch_shards: see ``ppo_update``.
      sampler_logprobs: ``[B, R]`` the sampler's log-probs of the rollout
        (``SampleOutput.logprobs``): adds the ``rollout/logprob_mismatch`` metrics
        (``make_experience``); ``None``: not measured.

    Returns:
      ``(new_state, metrics)``: every phase's ``(sum, count)`` metrics.
    """
    exp, metrics = make_experience(state, tokens, attn_mask, positions, response_mask, ended,
                                   scores, ref_params, policy_model=policy_model,
                                   value_model=value_model, cfg=cfg,
                                   sampler_logprobs=sampler_logprobs)
    new_state, upd_metrics = ppo_update(state, exp, policy_model=policy_model,
                                        value_model=value_model, policy_tx=policy_tx,
                                        value_tx=value_tx, cfg=cfg, batch_shards=batch_shards)
    new_state = update_kl(new_state, exp, cfg, tokens.shape[0])
    return new_state, {**metrics, **upd_metrics}


def ppo_iteration(state: PPOState, prompt_tokens, prompt_mask, ref_params: Params,
                  reward_params: Params, *, policy_model: Model, reward_model: Model,
                  value_model: Model | None, policy_tx, value_tx, cfg: PPOConfig,
                  batch_shards: int | None = None):
    """One full PPO iteration as a single pure function (jit it with ``make_ppo_iteration``).

    Args:
      state: ``PPOState``.
      prompt_tokens, prompt_mask: ``[B, P]`` left-padded prompts.
      ref_params: frozen reference policy.
      reward_params: frozen reward model (``"scalar"`` kind) scoring ``[prompt + response]``.
      batch_shards: see ``ppo_update``.

    Returns:
      ``(new_state, metrics)`` with ``(sum, count)`` metrics of every phase.
    """
    out, tokens, attn_mask, positions = generate(state, prompt_tokens, prompt_mask,
                                                 policy_model=policy_model, cfg=cfg)
    scores = sequence_scores(reward_model, reward_params, tokens, positions, attn_mask)
    return ppo_learn(state, tokens, attn_mask, positions, out.response_mask, out.ended, scores,
                     ref_params, policy_model=policy_model, value_model=value_model,
                     policy_tx=policy_tx, value_tx=value_tx, cfg=cfg, batch_shards=batch_shards,
                     sampler_logprobs=out.logprobs)


def _batch_shards_of(sharding) -> int | None:
    """Shards of dimension 0 under a ``NamedSharding`` (``None`` for other shardings)."""
    if not isinstance(sharding, NamedSharding):
        return None
    axes = sharding.spec[0] if len(sharding.spec) else None
    axes = () if axes is None else ((axes,) if isinstance(axes, str) else tuple(axes))
    return int(np.prod([sharding.mesh.shape[a] for a in axes], dtype=np.int64))


def ppo_state_shardings(policy_sharding, mesh, value_sharding=None) -> PPOState:
    """Shardings of a ``PPOState``: the policy's (and separate value model's) ``TrainState``
    shardings (``state.train_state_shardings``), the KL state and the key replicated."""
    rep = replicated(mesh)
    return PPOState(policy=policy_sharding, value=value_sharding, kl=KLState(kl_coef=rep), rng=rep)


def make_ppo_iteration(*, policy_model: Model, reward_model: Model, policy_tx, cfg: PPOConfig,
                       value_model: Model | None = None, value_tx=None, state_sharding=None,
                       prompt_sharding=None, frozen_shardings: tuple = (),
                       metrics_sharding=None):
    """Jitted ``ppo_iteration(state, prompt_tokens, prompt_mask, ref_params, reward_params)``
    with the state donated; compiles once per prompt shape.

    Shardings (as ``rlhf_jax.train.state.jit_step``) may be ``None`` (left to propagation,
    e.g. on one device); given any, the function is jitted with ``in_shardings =
    (state_sharding, prompt_sharding, prompt_sharding, *frozen_shardings)`` and
    ``out_shardings = (state_sharding, metrics_sharding)``. Trace it under
    ``jax.set_mesh(mesh)`` so that the model's activation constraints apply.

    Args:
      value_model, value_tx: the separate ``"scalar"`` value model and its optimizer
        (``cfg.value_model == "separate"``; its ``TrainState`` is ``PPOState.value``).
      state_sharding: shardings of the ``PPOState`` (``ppo_state_shardings``).
      prompt_sharding: sharding of ``[B, P]`` prompts and masks (``sharding.batch_sharding``).
        A ``NamedSharding`` also fixes the number of batch shards of the minibatch shuffle
        (``ppo_update``); otherwise it is read from the mesh in context.
      frozen_shardings: ``(ref_params_sharding, reward_params_sharding)``, or ``()``.
      metrics_sharding: of the metrics (``None``: propagation).

    Raises:
      ValueError: more than two frozen shardings; models that do not fit ``cfg.value_model``.
    """
    check_models(cfg, policy_model, value_model)
    if len(frozen_shardings) > 2:
        raise ValueError(f"make_ppo_iteration: frozen_shardings takes (reference, reward), got "
                         f"{len(frozen_shardings)} entries")
    fn = functools.partial(ppo_iteration, policy_model=policy_model, reward_model=reward_model,
                           value_model=value_model, policy_tx=policy_tx, value_tx=value_tx, cfg=cfg,
                           batch_shards=_batch_shards_of(prompt_sharding))
    frozen = tuple(frozen_shardings) + (None,) * (2 - len(frozen_shardings))
    in_shardings = (state_sharding, prompt_sharding, prompt_sharding, *frozen)
    if all(s is None for s in in_shardings) and metrics_sharding is None:
        return jax.jit(fn, donate_argnums=(0,))
    return jax.jit(fn, in_shardings=in_shardings, out_shardings=(state_sharding, metrics_sharding),
                   donate_argnums=(0,))


@dataclasses.dataclass(frozen=True)
class PPOStages:
    """The same iteration run staged (one jit per phase), for host rewards and for dynamic
    sampling: ``generate`` (device) -> rewards (host) -> ``learn`` (device).

    Shardings are optional (``None``: left to propagation); given, ``generate`` and ``learn``
    are jitted with them, and ``learn`` donates the state.

    Attributes:
      state_sharding: of the ``PPOState`` (``ppo_state_shardings``).
      row_sharding: of every ``[rows, ...]`` array (prompts, rollout rows, scores): batch
        axes. A ``NamedSharding`` also fixes the minibatch shuffle's batch shards.
      ref_sharding: of the reference parameters (``None`` with ``kl_penalty="none"``).
    """

    policy_model: Model
    policy_tx: optax.GradientTransformation
    cfg: PPOConfig
    value_model: Model | None = None
    value_tx: optax.GradientTransformation | None = None
    state_sharding: object = None
    row_sharding: object = None
    ref_sharding: object = None

    def __post_init__(self):
        check_models(self.cfg, self.policy_model, self.value_model)
        gen = functools.partial(generate, policy_model=self.policy_model, cfg=self.cfg)
        learn = functools.partial(ppo_learn, policy_model=self.policy_model,
                                  value_model=self.value_model, policy_tx=self.policy_tx,
                                  value_tx=self.value_tx, cfg=self.cfg,
                                  batch_shards=_batch_shards_of(self.row_sharding))
        def learn_measured(state, tokens, attn_mask, positions, response_mask, ended, scores,
                           ref_params, sampler_logprobs):
            return learn(state, tokens, attn_mask, positions, response_mask, ended, scores,
                         ref_params, sampler_logprobs=sampler_logprobs)

        rows = self.row_sharding
        if self.state_sharding is None and rows is None:
            gen_jit, learn_jit = jax.jit(gen), jax.jit(learn, donate_argnums=(0,))
            measured_jit = jax.jit(learn_measured, donate_argnums=(0,))
        else:
            gen_jit = jax.jit(gen, in_shardings=(self.state_sharding, rows, rows))
            ins = (self.state_sharding, *(rows,) * 6, self.ref_sharding)
            learn_jit = jax.jit(learn, in_shardings=ins, out_shardings=(self.state_sharding, None),
                                donate_argnums=(0,))
            measured_jit = jax.jit(learn_measured, in_shardings=(*ins, rows),
                                   out_shardings=(self.state_sharding, None), donate_argnums=(0,))
        object.__setattr__(self, "_generate", gen_jit)
        object.__setattr__(self, "_learn", learn_jit)
        object.__setattr__(self, "_learn_measured", measured_jit)

    def generate(self, state: PPOState, prompt_tokens, prompt_mask):
        """Jitted ``generate``: ``(SampleOutput, tokens [B k, P + R], attn_mask, positions)``."""
        return self._generate(state, prompt_tokens, prompt_mask)

    def learn(self, state: PPOState, tokens, attn_mask, positions, response_mask, ended, scores,
              ref_params: Params | None, sampler_logprobs=None):
        """Jitted ``ppo_learn`` (state donated) on a sampled, scored rollout;
        ``sampler_logprobs`` (``[B, R]``, the rollout's ``SampleOutput.logprobs``) adds the
        ``rollout/logprob_mismatch`` metrics."""
        if sampler_logprobs is None:
            return self._learn(state, tokens, attn_mask, positions, response_mask, ended, scores,
                               ref_params)
        return self._learn_measured(state, tokens, attn_mask, positions, response_mask, ended,
                                    scores, ref_params, sampler_logprobs)

    def iteration(self, state: PPOState, prompt_tokens, prompt_mask, ref_params: Params | None,
                  reward_fn: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]):
        """``generate`` -> ``reward_fn(prompt_tokens [B k, P], response [B k, R],
        response_mask [B k, R]) -> scores [B k]`` on the host -> ``learn``.

        Raises:
          ValueError: ``reward_fn`` returned the wrong shape.
        """
        out, tokens, attn_mask, positions = self._generate(state, prompt_tokens, prompt_mask)
        p = tokens.shape[1] - out.response.shape[1]
        scores = np.asarray(reward_fn(np.asarray(tokens[:, :p]), np.asarray(out.response),
                                      np.asarray(out.response_mask)), np.float32)
        if scores.shape != (tokens.shape[0],):
            raise ValueError(f"reward_fn returned shape {scores.shape}, expected ({tokens.shape[0]},)")
        return self.learn(state, tokens, attn_mask, positions, out.response_mask, out.ended,
                          jnp.asarray(scores), ref_params, out.logprobs)
