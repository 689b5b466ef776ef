"""Batches and states that cross jit boundaries, as `flax.struct` dataclasses (pytrees).

Shape glossary: ``B`` batch, ``T`` tokens (prompt + response), ``P`` prompt,
``R`` response, ``V`` vocab, ``D`` width, ``H`` heads, ``K`` head dim, ``L`` layers,
``N`` candidates per prompt (2 for a chosen/rejected pair, K for a ranking), ``M``
microbatches.

Token conventions used everywhere in the library:

* ``tokens[b, t]`` are token ids (int32). Padding may sit on either side: every model call
  takes explicit ``positions`` and an ``attn_mask`` so the forward is padding-invariant.
* ``attn_mask[b, t]`` is True for real tokens, False for padding.
* ``positions[b, t]`` is the RoPE / learned position of token t: ``cumsum(attn_mask) - 1``
  clipped at 0 (padding gets position 0; it is masked out anyway).
* ``loss_mask[b, t]`` is True when ``tokens[b, t]`` is a *target* (a response token,
  including the end-of-turn / EOS token). It is aligned with ``tokens``, not with the shifted
  logits: ``losses.logprobs.sequence_logprobs`` does the one-token shift.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct


def positions_from_mask(attn_mask: jax.Array) -> jax.Array:
    """Position ids ``[..., T] int32`` from an attention mask ``[..., T]`` (left or right padding).

    ``positions[..., t] = max(cumsum(mask)[..., t] - 1, 0)``: the first real token gets 0.
    """
    mask = attn_mask.astype(jnp.int32)
    return jnp.maximum(jnp.cumsum(mask, axis=-1) - 1, 0).astype(jnp.int32)


@struct.dataclass
class SFTBatch:
    """Demonstrations for supervised fine-tuning.

    Attributes:
      tokens: ``[B, T] int32`` prompt + response ids.
      attn_mask: ``[B, T] bool`` True for real tokens.
      positions: ``[B, T] int32`` see module docstring.
      loss_mask: ``[B, T] bool`` True where the token is a response target (every assistant
        turn of a chat, its end-of-turn token included).
    """

    tokens: jax.Array
    attn_mask: jax.Array
    positions: jax.Array
    loss_mask: jax.Array


@struct.dataclass
class PreferenceBatch:
    """N candidate responses per prompt, in preference order (index 0 is best).

    For a pairwise comparison N = 2 and ``[:, 0]`` is *chosen*, ``[:, 1]`` *rejected*. For an
    InstructGPT K-way ranking N = K, ranked best to worst.

    Attributes:
      tokens: ``[B, N, T] int32`` prompt + candidate response ids.
      attn_mask: ``[B, N, T] bool``.
      positions: ``[B, N, T] int32``.
      loss_mask: ``[B, N, T] bool`` True on response tokens (EOS included).
      valid: ``[B, N] bool`` False for candidate slots that are padding (rankings with fewer
        than N responses).
    """

    tokens: jax.Array
    attn_mask: jax.Array
    positions: jax.Array
    loss_mask: jax.Array
    valid: jax.Array


@struct.dataclass
class UnpairedBatch:
    """Single completions labelled desirable or undesirable (KTO, Ethayarajh et al. 2024), with
    the mismatched pairs that estimate KTO's KL reference point.

    Row ``i`` is prompt ``x_i`` + completion ``y_i``. KL row ``i`` is the same prompt ``x_i``
    followed by the completion ``y_{(i+1) mod B}`` of the *next* row of the batch (of this
    process's rows, when several processes each collate their own), as in §4 of the paper;
    with ``B = 1`` it is the row itself. Both use the same padded length ``T``.

    Attributes:
      tokens: ``[B, T] int32`` prompt + completion ids.
      attn_mask: ``[B, T] bool``.
      positions: ``[B, T] int32``.
      loss_mask: ``[B, T] bool`` True on the completion's tokens (EOS included).
      label: ``[B] bool`` True for a desirable completion.
      valid: ``[B] bool`` False for filler rows (``remainder="pad"``), which carry no loss.
      kl_tokens, kl_attn_mask, kl_positions, kl_loss_mask: ``[B, T]``, the same for the
        mismatched pairs ``(x_i, y_{(i+1) mod B})``.
    """

    tokens: jax.Array
    attn_mask: jax.Array
    positions: jax.Array
    loss_mask: jax.Array
    label: jax.Array
    valid: jax.Array
    kl_tokens: jax.Array
    kl_attn_mask: jax.Array
    kl_positions: jax.Array
    kl_loss_mask: jax.Array


@struct.dataclass
class PromptBatch:
    """Left-padded prompts for sampling (RL).

    Attributes:
      tokens: ``[B, P] int32`` left-padded prompt ids.
      attn_mask: ``[B, P] bool``.
      index: ``[B] int32`` the prompts' rows in their data set (to look up response prefixes
        and the record columns a reward function reads), or ``None``.
    """

    tokens: jax.Array
    attn_mask: jax.Array
    index: jax.Array | None = None
