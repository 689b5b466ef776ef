"""Reward-model step (InstructGPT stage 2, Ouyang et al. 2022 §3.5).

A scalar head on a language-model trunk scores every candidate of a ``PreferenceBatch``
(``[B, N, T]``, candidates ranked best first) in ONE forward over ``B * N`` sequences; the
score is the head's output at each candidate's last real token. Loss selected by
``RewardConfig.loss``:

* ``"pairwise"`` - Bradley-Terry on ``N = 2`` (chosen, rejected) with optional margin and
  reward-centering term (Stiennon et al. 2020; Touvron et al. 2023 §3.2.2; Eisenstein et al. 2023).
* ``"ranking"``  - all ``C(K, 2)`` pairs of a K-way ranking from the one forward, each prompt
  weighted once (Ouyang et al. 2022 §3.5 eq. 1).
* ``"best_of_n"`` - softmax cross-entropy picking candidate 0 (Ziegler et al. 2019 §2).

Each loss is a mean over the prompts that carry loss (``counted_prompts``: filler rows of
``BatchConfig.remainder="pad"`` and rankings with fewer than two valid responses do not), with
the count of the *whole* batch as denominator, so microbatching changes nothing.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.losses.reward import best_of_n_loss, bradley_terry_loss, ranking_loss
from rlhf_jax.models.model import Model, Params
from rlhf_jax.train.common import (add_router_aux_loss, flatten_candidates, rowwise_mean,
                                   sequence_scores)
from rlhf_jax.train.state import (TrainState, accumulate_gradients, apply_gradients, jit_step,
                                  lora_dropout_rng)
from rlhf_jax.types import PreferenceBatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class RewardConfig:
    """Reward-model step options.

    Attributes:
      loss: ``"pairwise"``, ``"ranking"`` or ``"best_of_n"`` (module docstring).
      center_coef: weight of the reward-centering term ``mean((r_c + r_r)^2)`` (pairwise).
      num_microbatches: gradient accumulation steps ``M`` per update.
    """

    loss: Literal["pairwise", "ranking", "best_of_n"] = "pairwise"
    center_coef: float = 0.0
    num_microbatches: int = 1


def candidate_scores(model: Model, params: Params, batch: PreferenceBatch, *,
                     with_router_aux: bool = False, dropout_rng: jax.Array | None = None):
    """Scores ``[B, N]`` float32 of every candidate, one forward over ``B * N`` sequences;
    ``with_router_aux``: ``(scores, ModelOutput.router_aux_loss)``; ``dropout_rng``: LoRA's
    adapter dropout."""
    b, n = batch.tokens.shape[:2]
    scores, aux = sequence_scores(model, params, flatten_candidates(batch.tokens),
                                  flatten_candidates(batch.positions),
                                  flatten_candidates(batch.attn_mask), with_router_aux=True,
                                  dropout_rng=dropout_rng)
    return (scores.reshape(b, n), aux) if with_router_aux else scores.reshape(b, n)


def preference_loss(scores: jax.Array, valid: jax.Array, cfg: RewardConfig):
    """The loss of ``cfg.loss`` on candidate scores ``[B, N]`` (a mean over the B prompts)."""
    if cfg.loss == "pairwise":
        if scores.shape[1] != 2:
            raise ValueError(f"RewardConfig.loss='pairwise' needs N=2 candidates, got {scores.shape[1]}")
        return bradley_terry_loss(scores[:, 0], scores[:, 1], center_coef=cfg.center_coef)
    if cfg.loss == "ranking":
        return ranking_loss(scores, valid)
    return best_of_n_loss(scores, jnp.zeros(scores.shape[0], jnp.int32), valid=valid)


def counted_prompts(valid: jax.Array, cfg: RewardConfig) -> jax.Array:
    """``[B] bool`` prompts that carry loss: both candidates valid (pairwise), at least two
    valid candidates (ranking), the labelled best candidate 0 valid (best-of-N). Filler rows
    (``valid`` all False) never count."""
    valid = valid.astype(bool)
    if cfg.loss == "pairwise":
        return valid[:, 0] & valid[:, 1]
    if cfg.loss == "ranking":
        return jnp.sum(valid, axis=-1) >= 2
    return valid[:, 0]


def num_counted_prompts(valid: jax.Array, cfg: RewardConfig) -> jax.Array:
    """The global loss denominator: counted prompts of the whole batch (at least 1), float32."""
    return jnp.maximum(jnp.sum(counted_prompts(valid, cfg)), 1).astype(jnp.float32)


def masked_preference_loss(scores: jax.Array, valid: jax.Array, total_prompts: jax.Array,
                           cfg: RewardConfig):
    """``preference_loss`` over the counted prompts only, divided by ``total_prompts`` (the
    counted prompts of the whole batch, so microbatches sum to the full-batch loss)."""
    return rowwise_mean(functools.partial(preference_loss, cfg=cfg), counted_prompts(valid, cfg),
                        total_prompts, scores, valid)


def reward_loss_fn(params: Params, batch: PreferenceBatch, total_prompts: jax.Array, *,
                   model: Model, cfg: RewardConfig, dropout_rng: jax.Array | None = None):
    """Loss of one (micro)batch: summed over its counted prompts, divided by the full batch's
    (plus a mixture-of-experts trunk's load-balancing loss, weighted by this microbatch's
    share of the counted prompts: ``add_router_aux_loss``)."""
    scores, aux = candidate_scores(model, params, batch, with_router_aux=True,
                                   dropout_rng=dropout_rng)
    loss, metrics = masked_preference_loss(scores, batch.valid, total_prompts, cfg)
    share = jnp.sum(counted_prompts(batch.valid, cfg)) / total_prompts
    return add_router_aux_loss(loss, metrics, model, aux, share)


def reward_step(state: TrainState, batch: PreferenceBatch, *, model: Model,
                tx: optax.GradientTransformation, cfg: RewardConfig):
    """One reward-model update ``(state, batch) -> (state, metrics)`` (pure)."""
    total = num_counted_prompts(batch.valid, cfg)
    loss_fn = functools.partial(reward_loss_fn, model=model, cfg=cfg)
    _, grads, metrics = accumulate_gradients(loss_fn, state.params, batch, cfg.num_microbatches,
                                             total, dropout_rng=lora_dropout_rng(state, model))
    metrics = dict(metrics)
    metrics["train/grad_norm"] = (optax.global_norm(grads), jnp.ones((), jnp.float32))
    return apply_gradients(state, grads, tx), metrics


def make_reward_step(model: Model, tx: optax.GradientTransformation,
                     cfg: RewardConfig = RewardConfig(), *, state_sharding=None, batch_sharding=None):
    """Jitted ``reward_step(state, batch)`` with shardings and the state donated."""
    return jit_step(functools.partial(reward_step, model=model, tx=tx, cfg=cfg),
                    state_sharding=state_sharding, batch_sharding=batch_sharding)


def make_reward_eval(model: Model, cfg: RewardConfig = RewardConfig()):
    """Jitted ``(params, batch) -> metrics`` (no update), for held-out accuracy."""
    def evaluate(params, batch):
        return masked_preference_loss(candidate_scores(model, params, batch), batch.valid,
                                      num_counted_prompts(batch.valid, cfg), cfg)[1]
    return jax.jit(evaluate)
