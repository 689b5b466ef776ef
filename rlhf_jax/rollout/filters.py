"""Next-token logit filters and token selection, shared by the sampler and the training side.

Order of operations on the next-token logits (as in HF transformers' logits warpers, and as
``SamplingConfig`` documents): ``suppress_eos`` (``min_new_tokens``), divide by the
temperature, ``top_k_mask``, ``top_p_mask``, then draw (``select_tokens``); ``greedy`` takes
the argmax of the raw logits instead. Reported log-probs are under the unfiltered tempered
softmax, the same arithmetic as the training forward.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import gather_logprobs

if TYPE_CHECKING:  # the sampler imports this module; the config is only a type here
    from rlhf_jax.rollout.sampler import SamplingConfig


def top_k_mask(logits: jax.Array, k: int) -> jax.Array:
    """Set every logit below the ``k``-th largest of its row to ``-inf`` (ties kept).

    Args:
      logits: ``[..., V]`` float.
      k: static int; ``0`` or ``>= V`` returns ``logits`` unchanged.
    """
    v = logits.shape[-1]
    if k <= 0 or k >= v:
        return logits
    kth = jax.lax.top_k(logits, k)[0][..., -1:]
    return jnp.where(logits >= kth, logits, -jnp.inf)


def top_p_mask(logits: jax.Array, p: float) -> jax.Array:
    """Nucleus filter (Holtzman et al. 2020, eq. 2): keep the fewest most likely tokens whose
    mass under ``softmax(logits)`` reaches ``p``; the rest become ``-inf``.

    A token (in descending order) is kept iff the mass strictly before it is ``< p``, which is
    HF's ``TopPLogitsWarper`` rule; the argmax is always kept and ties with the last kept logit
    are kept. Sort-based, ``O(V log V)`` per row.

    Args:
      logits: ``[..., V]`` float (may already hold ``-inf`` from top-k).
      p: static float in ``(0, 1]``; ``1.0`` returns ``logits`` unchanged.
    """
    if p >= 1.0:
        return logits
    sorted_desc = -jnp.sort(-logits, axis=-1)
    probs = jax.nn.softmax(sorted_desc, axis=-1)
    mass_before = jnp.cumsum(probs, axis=-1) - probs
    keep = mass_before < p
    keep = keep.at[..., 0].set(True)
    threshold = jnp.min(jnp.where(keep, sorted_desc, jnp.inf), axis=-1, keepdims=True)
    return jnp.where(logits >= threshold, logits, -jnp.inf)


def suppress_eos(logits: jax.Array, response_index: jax.Array | int, cfg: SamplingConfig
                 ) -> jax.Array:
    """``logits`` with every EOS id at ``-inf`` where ``response_index < cfg.min_new_tokens``.

    Used by the sampler at each decode step and by the training forward over a whole response
    (``rlhf_jax.train.ppo.policy_forward``), so both see the same constrained policy.

    Args:
      logits: ``[..., V]`` float, the logits that predict response slot ``response_index``.
      response_index: int or int array broadcastable to ``logits.shape[:-1]``: the response
        slot ``r`` (0-based) each row of logits predicts.
      cfg: the sampling configuration (``min_new_tokens == 0`` returns ``logits`` unchanged).
    """
    if cfg.min_new_tokens == 0:
        return logits
    is_eos_column = jnp.zeros((logits.shape[-1],), bool).at[jnp.asarray(cfg.eos_ids)].set(True)
    early = jnp.asarray(response_index) < cfg.min_new_tokens
    return jnp.where(early[..., None] & is_eos_column, -jnp.inf, logits)


def select_tokens(logits: jax.Array, key: jax.Array, cfg: SamplingConfig,
                  step: jax.Array | int = 0) -> tuple[jax.Array, jax.Array]:
    """Draw one token per row and its log-prob under the unfiltered tempered softmax.

    Args:
      logits: ``[B, V] float32`` next-token logits.
      key: typed PRNG key (unused when ``cfg.greedy``).
      cfg: the sampling configuration.
      step: the response slot being drawn (for ``cfg.min_new_tokens``).

    Returns:
      ``(tokens [B] int32, logprobs [B] float32)`` with
      ``logprobs = log softmax(logits / temperature)[tokens]`` (see ``SampleOutput.logprobs``),
      ``logits`` after ``suppress_eos``.
    """
    logits = suppress_eos(logits, step, cfg)
    scaled = logits.astype(jnp.float32) / cfg.temperature
    if cfg.greedy:
        tokens = jnp.argmax(logits, axis=-1)
    else:
        filtered = top_p_mask(top_k_mask(scaled, cfg.top_k), cfg.top_p)
        tokens = jax.random.categorical(key, filtered, axis=-1)
    tokens = tokens.astype(jnp.int32)
    # same arithmetic as the training side (losses.logprobs.sequence_logprobs)
    logp = gather_logprobs(logits, tokens, temperature=cfg.temperature)
    return tokens, logp


__all__ = ["select_tokens", "suppress_eos", "top_k_mask", "top_p_mask"]
