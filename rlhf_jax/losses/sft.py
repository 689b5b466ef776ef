"""Supervised fine-tuning loss: masked next-token negative log-likelihood (InstructGPT stage 1)."""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import (
    Metrics,
    _bool,
    _check_reduction,
    _shift_right,
    aggregate_loss,
    masked_count,
    metric,
    sequence_logprobs,
)


def sft_loss(
    logits: jax.Array,
    tokens: jax.Array,
    loss_mask: jax.Array,
    *,
    reduction: Literal["token", "sequence"] = "token",
    num_targets: jax.Array | float | None = None,
    num_sequences: jax.Array | float | None = None,
) -> tuple[jax.Array, Metrics]:
    """Masked negative log-likelihood of the target tokens.

    ``L = -Σ_{b,t} m[b,t] log π(tokens[b,t] | tokens[b,<t]) / D`` (token-mean, ``D`` = number of
    targets) or the mean over sequences of each sequence's token-mean (sequence-mean).
    Supervised fine-tuning on demonstrations, Ouyang et al. 2022 §3.5 "SFT".

    The one-token shift happens inside (:func:`~rlhf_jax.losses.logprobs.sequence_logprobs`):
    ``loss_mask`` is aligned with ``tokens`` (True where ``tokens[b, t]`` is a target). Column
    ``t = 0`` is never a target (nothing predicts it) and is dropped from the mask.

    Microbatching: pass the target count of the *whole* batch as ``num_targets`` (token-mean)
    or the number of sequences with at least one target as ``num_sequences`` (sequence-mean);
    then the sum of the microbatch losses (and gradients) equals the full-batch loss.

    Args:
      logits: ``[..., T, V]`` float logits of the forward over ``tokens`` (any float dtype).
      tokens: ``[..., T]`` int32 ids.
      loss_mask: ``[..., T]`` bool/{0,1}, True on target tokens.
      reduction: ``"token"`` (token-mean over all targets) or ``"sequence"`` (mean over
        sequences of the per-sequence token-mean; sequences without targets are skipped).
      num_targets: optional global token denominator (scalar array), token-mean only.
      num_sequences: optional global sequence denominator (scalar array), sequence-mean only.

    Returns:
      ``(loss, metrics)``: scalar float32 loss in nats per token; metrics ``sft/loss`` (reduces
      to the local loss), ``sft/accuracy`` (argmax of the predicting logits == target, over
      targets), ``sft/num_tokens`` (target tokens per sequence: ``(#targets, #sequences)``).

    Raises:
      ValueError: shape mismatch, unknown reduction, or a denominator for the other reduction.
    """
    if loss_mask.shape != tokens.shape:
        raise ValueError(
            f"sft_loss: loss_mask shape {loss_mask.shape} must equal tokens shape {tokens.shape}"
        )
    _check_reduction("sft_loss", reduction, num_targets, num_sequences)
    logp = sequence_logprobs(logits, tokens)
    col = jnp.arange(tokens.shape[-1])
    mask = _bool(loss_mask) & (col >= 1)
    loss, loss_metric = aggregate_loss(
        -logp, mask, reduction=reduction, num_tokens=num_targets, num_sequences=num_sequences
    )
    pred = _shift_right(jnp.argmax(logits[..., :-1, :], axis=-1).astype(tokens.dtype))
    correct = (pred == tokens).astype(jnp.float32)
    n_seq = jnp.asarray(math.prod(tokens.shape[:-1]), jnp.float32)
    metrics = {
        "sft/loss": loss_metric,
        "sft/accuracy": metric(correct, mask),
        "sft/num_tokens": (masked_count(mask), n_seq),
    }
    return loss, metrics
