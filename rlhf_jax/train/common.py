"""Model-side helpers shared by the trainers: sequence log-probs and last-token scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import sequence_logprobs
from rlhf_jax.models.model import Model, Params


def flatten_candidates(x: jax.Array) -> jax.Array:
    """``[B, N, ...] -> [B*N, ...]`` (one forward over every candidate of every prompt)."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def token_logprobs(model: Model, params: Params, tokens: jax.Array, positions: jax.Array,
                   attn_mask: jax.Array, temperature: float = 1.0, *,
                   frozen_hidden: jax.Array | None = None) -> jax.Array:
    """``logp[b, t] = log π(tokens[b, t] | tokens[b, <t])`` ``[B, T]`` float32 (0 at t = 0).

    One forward (from ``frozen_hidden [B, T, D]`` when given: ``Model.frozen_hidden``); logits
    are divided by ``temperature`` (the sampler's distribution).
    """
    logits = model.apply(params, tokens, positions, attn_mask, frozen_hidden=frozen_hidden).logits
    if temperature != 1.0:
        logits = logits / temperature
    return sequence_logprobs(logits, tokens)


def sequence_logps(model: Model, params: Params, tokens: jax.Array, positions: jax.Array,
                   attn_mask: jax.Array, loss_mask: jax.Array, *,
                   frozen_hidden: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Summed response log-probs ``[B]`` (nats) and response lengths ``[B]`` (tokens).

    ``sum_t loss_mask[b, t] * log π(tokens[b, t] | tokens[b, <t])`` - the quantity the DPO
    family is defined on (Rafailov et al. 2023 eq. 7). ``frozen_hidden``: see
    ``token_logprobs``.
    """
    logp = token_logprobs(model, params, tokens, positions, attn_mask,
                          frozen_hidden=frozen_hidden)
    mask = loss_mask.astype(jnp.float32)
    return jnp.sum(logp * mask, axis=-1), jnp.sum(mask, axis=-1)


def last_token_index(attn_mask: jax.Array) -> jax.Array:
    """Index ``[B] int32`` of the last real token of each row (left or right padding)."""
    t = attn_mask.shape[-1]
    return jnp.max(jnp.where(attn_mask.astype(bool), jnp.arange(t), 0), axis=-1).astype(jnp.int32)


def sequence_scores(model: Model, params: Params, tokens: jax.Array, positions: jax.Array,
                    attn_mask: jax.Array) -> jax.Array:
    """Scalar-head output at the last real token ``[B]`` float32: the reward of a sequence.

    Ouyang et al. 2022 §3.5 / Stiennon et al. 2020: the reward model reads the final token's
    hidden state (the end-of-turn token of the response).
    """
    values = model.apply(params, tokens, positions, attn_mask, compute_logits=False).values
    idx = last_token_index(attn_mask)
    return jnp.take_along_axis(values, idx[:, None], axis=-1)[:, 0]


def rowwise_mean(loss_fn, counted: jax.Array, denominator: jax.Array, *rows: jax.Array):
    """A batch-mean loss restricted to counted rows, over a *global* row count.

    ``loss_fn(*rows) -> (mean over rows, (sum, count) metrics)`` is applied to each row on its
    own (``vmap`` over ``[1, ...]`` slices); the result is ``sum_b counted[b] * loss_b /
    denominator`` with metrics summed over the counted rows only. With ``denominator`` the
    number of counted rows of the *whole* batch, the sum over microbatches is the full-batch
    loss, and rows that carry no loss (``PreferenceBatch.valid`` False: filler rows of
    ``remainder="pad"``, rankings with fewer than two responses) neither add to it nor dilute
    it. Callers make the inputs of uncounted rows finite (a ``where``), so no NaN reaches the
    gradient.

    Args:
      loss_fn: a loss whose value is the mean over its rows and whose metrics are
        ``(sum, count)`` pairs (every loss in ``rlhf_jax.losses.reward`` / ``.dpo``).
      counted: ``[B] bool`` rows that carry loss.
      denominator: scalar, the number of counted rows of the full batch (>= 1).
      *rows: arrays with leading dimension ``B``.

    Returns:
      ``(loss, metrics)``.
    """
    loss_b, metrics_b = jax.vmap(lambda *xs: loss_fn(*(x[None] for x in xs)))(*rows)
    w = counted.astype(bool)
    keep = lambda x: jnp.sum(jnp.where(w, x, jnp.zeros_like(x)))
    metrics = {k: (keep(s), keep(c)) for k, (s, c) in metrics_b.items()}
    return keep(loss_b) / denominator, metrics
