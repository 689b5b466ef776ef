"""Supervised fine-tuning step (InstructGPT stage 1, Ouyang et al. 2022 §3.5).

Masked next-token cross-entropy on response tokens only (every assistant turn, end-of-turn
token included), normalised by the *global* number of target tokens (or sequences) of the
batch so that microbatching does not change the loss or its gradient.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Literal

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.losses.sft import sft_loss
from rlhf_jax.models.model import Model, Params
from rlhf_jax.train.common import add_router_aux_loss
from rlhf_jax.train.state import (TrainState, accumulate_gradients, apply_gradients, jit_step,
                                  lora_dropout_rng)
from rlhf_jax.types import SFTBatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class SFTConfig:
    """SFT step options.

    Attributes:
      reduction: ``"token"`` (mean over all target tokens of the batch) or ``"sequence"``
        (mean over sequences of each sequence's token-mean).
      num_microbatches: gradient accumulation steps ``M`` per update (``B % M == 0``).
    """

    reduction: Literal["token", "sequence"] = "token"
    num_microbatches: int = 1

    def __post_init__(self):
        if self.num_microbatches < 1:
            raise ValueError(f"SFTConfig.num_microbatches must be >= 1, got {self.num_microbatches}")


def sft_loss_fn(params: Params, batch: SFTBatch, num_targets: jax.Array, num_sequences: jax.Array,
                *, model: Model, cfg: SFTConfig, dropout_rng: jax.Array | None = None):
    """``(loss, metrics)`` of one (micro)batch with global denominators (plus a
    mixture-of-experts model's load-balancing loss, weighted by this microbatch's share of
    the denominator: ``add_router_aux_loss``). ``dropout_rng``: LoRA's adapter dropout."""
    out = model.apply(params, batch.tokens, batch.positions, batch.attn_mask,
                      dropout_rng=dropout_rng)
    targets = batch.loss_mask.at[:, 0].set(False)
    if cfg.reduction == "token":
        loss, metrics = sft_loss(out.logits, batch.tokens, batch.loss_mask, reduction="token",
                                 num_targets=num_targets)
        share = jnp.sum(targets) / num_targets
    else:
        loss, metrics = sft_loss(out.logits, batch.tokens, batch.loss_mask, reduction="sequence",
                                 num_sequences=num_sequences)
        share = jnp.sum(jnp.any(targets, axis=-1)) / num_sequences
    return add_router_aux_loss(loss, metrics, model, out.router_aux_loss, share)


def sft_step(state: TrainState, batch: SFTBatch, *, model: Model, tx: optax.GradientTransformation,
             cfg: SFTConfig):
    """One SFT update: ``(state, batch) -> (state, metrics)`` (pure; jit with ``make_sft_step``).

    Args:
      state: ``TrainState`` of an ``"lm"`` model.
      batch: ``SFTBatch`` with ``[B, T]`` fields.

    Returns:
      New state and metrics as ``(sum, count)`` pairs (``rlhf_jax.losses.reduce_metrics``).
    """
    # Position 0 has no previous token: it is never a target (see losses.logprobs).
    target_mask = batch.loss_mask.at[:, 0].set(False)
    num_targets = jnp.maximum(jnp.sum(target_mask), 1).astype(jnp.float32)
    num_sequences = jnp.maximum(jnp.sum(jnp.any(target_mask, axis=-1)), 1).astype(jnp.float32)
    loss_fn = functools.partial(sft_loss_fn, model=model, cfg=cfg)
    _, grads, metrics = accumulate_gradients(loss_fn, state.params, batch, cfg.num_microbatches,
                                             num_targets, num_sequences,
                                             dropout_rng=lora_dropout_rng(state, model))
    metrics = dict(metrics)
    metrics["train/grad_norm"] = (optax.global_norm(grads), jnp.ones((), jnp.float32))
    return apply_gradients(state, grads, tx), metrics


def make_sft_step(model: Model, tx: optax.GradientTransformation, cfg: SFTConfig = SFTConfig(), *,
                  state_sharding=None, batch_sharding=None):
    """Jitted ``sft_step(state, batch)`` with shardings and the state donated."""
    return jit_step(functools.partial(sft_step, model=model, tx=tx, cfg=cfg),
                    state_sharding=state_sharding, batch_sharding=batch_sharding)
