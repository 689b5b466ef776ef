"""Model-side helpers shared by the trainers: sequence log-probs and last-token scores."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import sequence_logprobs
from rlhf_jax.models.model import Model, ModelOutput, Params


def flatten_candidates(x: jax.Array) -> jax.Array:
    """``[B, N, ...] -> [B*N, ...]`` (one forward over every candidate of every prompt)."""
    return x.reshape((x.shape[0] * x.shape[1],) + x.shape[2:])


def add_router_aux_loss(loss: jax.Array, metrics: dict, model: Model,
                        aux: jax.Array | None, share: jax.Array | float = 1.0):
    """Add a mixture-of-experts model's load-balancing loss to a trainer's loss.

    ``loss + alpha * share * aux`` with ``alpha = cfg.router_aux_loss_coef`` (Fedus et al.
    2022 eq. 4; nothing is added when it is ``None`` or 0), and the metric
    ``router/aux_loss`` as the ``(sum, count)`` pair ``(share * aux, share)``. ``share``: this
    (micro)batch's fraction of the full batch's loss denominator, so that microbatches add up
    to the share-weighted mean of their auxiliary losses (1 without microbatching).

    Args:
      aux: ``ModelOutput.router_aux_loss`` (scalar float32) or ``None`` for a dense model
        (then ``(loss, metrics)`` come back unchanged).
    """
    if aux is None:
        return loss, metrics
    share = jnp.asarray(share, jnp.float32)
    metrics = dict(metrics, **{"router/aux_loss": (share * aux, share)})
    coef = model.cfg.router_aux_loss_coef
    return (loss + coef * share * aux if coef else loss), metrics


def _token_logprobs(out: ModelOutput, tokens: jax.Array, temperature: float) -> jax.Array:
    logits = out.logits
    if temperature != 1.0:
        logits = logits / temperature
    return sequence_logprobs(logits, tokens)


def token_logprobs(model: Model, params: Params, tokens: jax.Array, positions: jax.Array,
                   attn_mask: jax.Array, temperature: float = 1.0, *,
                   frozen_hidden: jax.Array | None = None, with_router_aux: bool = False,
                   adapters: bool = True, dropout_rng: jax.Array | None = None):
    """``logp[b, t] = log π(tokens[b, t] | tokens[b, <t])`` ``[B, T]`` float32 (0 at t = 0).

    One forward (from ``frozen_hidden [B, T, D]`` when given: ``Model.frozen_hidden``); logits
    are divided by ``temperature`` (the sampler's distribution). ``with_router_aux``: return
    ``(logp, ModelOutput.router_aux_loss)`` (``None`` for a dense model). ``adapters`` /
    ``dropout_rng``: LoRA's switch and adapter dropout (``Model.apply``).
    """
    out = model.apply(params, tokens, positions, attn_mask, frozen_hidden=frozen_hidden,
                      adapters=adapters, dropout_rng=dropout_rng)
    logp = _token_logprobs(out, tokens, temperature)
    return (logp, out.router_aux_loss) if with_router_aux else logp


def sequence_logps(model: Model, params: Params, tokens: jax.Array, positions: jax.Array,
                   attn_mask: jax.Array, loss_mask: jax.Array, *,
                   frozen_hidden: jax.Array | None = None, with_router_aux: bool = False,
                   adapters: bool = True, dropout_rng: jax.Array | None = None):
    """Summed response log-probs ``[B]`` (nats) and response lengths ``[B]`` (tokens).

    ``sum_t loss_mask[b, t] * log π(tokens[b, t] | tokens[b, <t])`` - the quantity the DPO
    family is defined on (Rafailov et al. 2023 eq. 7). ``frozen_hidden``, ``adapters``,
    ``dropout_rng``: see ``token_logprobs``; ``with_router_aux``: a third result,
    ``ModelOutput.router_aux_loss``.
    """
    logp, aux = token_logprobs(model, params, tokens, positions, attn_mask,
                               frozen_hidden=frozen_hidden, with_router_aux=True,
                               adapters=adapters, dropout_rng=dropout_rng)
    mask = loss_mask.astype(jnp.float32)
    sums = (jnp.sum(logp * mask, axis=-1), jnp.sum(mask, axis=-1))
    return (*sums, aux) if with_router_aux else sums


def last_token_index(attn_mask: jax.Array) -> jax.Array:
    """Index ``[B] int32`` of the last real token of each row (left or right padding)."""
    t = attn_mask.shape[-1]
    return jnp.max(jnp.where(attn_mask.astype(bool), jnp.arange(t), 0), axis=-1).astype(jnp.int32)


def sequence_scores(model: Model, params: Params, tokens: jax.Array, positions: jax.Array,
                    attn_mask: jax.Array, *, with_router_aux: bool = False,
                    dropout_rng: jax.Array | None = None):
    """Scalar-head output at the last real token ``[B]`` float32: the reward of a sequence.

    Ouyang et al. 2022 §3.5 / Stiennon et al. 2020: the reward model reads the final token's
    hidden state (the end-of-turn token of the response). ``with_router_aux``: return
    ``(scores, ModelOutput.router_aux_loss)``. ``dropout_rng``: LoRA's adapter dropout.
    """
    out = model.apply(params, tokens, positions, attn_mask, compute_logits=False,
                      dropout_rng=dropout_rng)
    idx = last_token_index(attn_mask)
    scores = jnp.take_along_axis(out.values, idx[:, None], axis=-1)[:, 0]
    return (scores, out.router_aux_loss) if with_router_aux else scores


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
