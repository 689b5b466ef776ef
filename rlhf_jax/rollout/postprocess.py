"""After sampling: EOS truncation, training-side response log-probs, decoding to text.

``truncate_at_eos`` applies the sampler's stopping rule to responses produced elsewhere (a
host generator, a data set). ``response_logprobs`` is the training-side counterpart of
``SampleOutput.logprobs``: one full forward over ``[prompt; response]``, the same tempered
distribution, so the two agree to float rounding (the PPO ratio is exactly 1 at the first
minibatch step).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from rlhf_jax.losses.logprobs import sequence_logprobs
from rlhf_jax.models.model import Model, Params
from rlhf_jax.rollout.sampler import is_eos


def truncate_at_eos(tokens: jax.Array, eos_token_id: int | tuple[int, ...], pad_token_id: int
                    ) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Keep each row up to and including its first EOS; pad and mask the rest.

    Args:
      tokens: ``[B, R] int`` response ids.
      eos_token_id: one id or a tuple of ids.
      pad_token_id: id written after the first EOS.

    Returns:
      ``(tokens [B, R] int32, mask [B, R] bool, ended [B] bool)``: ``mask[b, r]`` is True iff
      no EOS occurs in ``tokens[b, :r]``; ``ended[b]`` iff the row contains an EOS.
    """
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    eos = is_eos(tokens, eos_token_id).astype(jnp.int32)
    eos_before = jnp.cumsum(eos, axis=-1) - eos  # EOS strictly before slot r
    mask = eos_before == 0
    return jnp.where(mask, tokens, pad_token_id), mask, jnp.any(eos > 0, axis=-1)


def response_logprobs(model: Model, params: Params, tokens: jax.Array, attn_mask: jax.Array,
                      positions: jax.Array, prompt_len: int, temperature: float = 1.0
                      ) -> jax.Array:
    """Training-side log-probs of the response tokens from one full forward.

    ``out[b, r] = log softmax(z[b, P+r-1] / tau)[tokens[b, P+r]]`` where ``z = model(tokens)``
    logits (the one-token shift is ``losses.logprobs.sequence_logprobs``): the distribution
    ``SampleOutput.logprobs`` reports (unfiltered, tempered; as in
    lm-human-preferences and TRL, which divide the training logits by the sampling temperature).
    It does not apply ``SamplingConfig.min_new_tokens``: for a sampler with that constraint,
    ``rlhf_jax.train.ppo.policy_forward(..., sampling=cfg)`` gives the matching log-probs.

    Args:
      model: an ``lm`` / ``lm_value`` ``Model`` (static under jit).
      params: its parameters.
      tokens: ``[B, P+R] int32`` left-padded prompt then response (``SampleOutput.tokens``).
      attn_mask: ``[B, P+R] bool`` (``SampleOutput.attn_mask``).
      positions: ``[B, P+R] int32`` (``SampleOutput.positions``).
      prompt_len: ``P`` (static int), the number of prompt columns.
      temperature: ``tau > 0`` (the sampling temperature; a Python float or a scalar array).

    Returns:
      ``[B, R] float32`` nats, 0 where ``attn_mask[:, P:]`` is False (after EOS).

    Raises:
      ValueError: ``prompt_len`` not in ``[1, T)``.
    """
    t = tokens.shape[-1]
    if not 1 <= prompt_len < t:
        raise ValueError(f"prompt_len must be in [1, {t}) for tokens of length {t}, "
                         f"got {prompt_len}")
    out = model.apply(params, tokens, positions, attn_mask)
    logp = sequence_logprobs(out.logits, tokens, temperature=temperature)[:, prompt_len:]
    return jnp.where(attn_mask[:, prompt_len:], logp, 0.0)


def decode(tokenizer: Any, response: jax.Array | np.ndarray, response_mask: jax.Array | np.ndarray,
           *, skip_special_tokens: bool = True) -> list[str]:
    """Host helper: the text of each response (masked-out slots dropped).

    Args:
      tokenizer: anything with ``decode(ids: list[int], skip_special_tokens=bool) -> str`` (an
        HF tokenizer, ``rlhf_jax.models`` tokenizer wrappers).
      response: ``[B, R] int`` ids (device or host array).
      response_mask: ``[B, R] bool``.
      skip_special_tokens: passed to the tokenizer (True drops the EOS text).

    Returns:
      ``B`` strings.

    Raises:
      ValueError: the shapes differ or are not 2-D.
    """
    ids = np.asarray(jax.device_get(response))
    mask = np.asarray(jax.device_get(response_mask)).astype(bool)
    if ids.ndim != 2 or ids.shape != mask.shape:
        raise ValueError(f"response and response_mask must both be [B, R]; got {ids.shape} and "
                         f"{mask.shape}")
    return [tokenizer.decode([int(i) for i in row[m]], skip_special_tokens=skip_special_tokens)
            for row, m in zip(ids, mask)]


def decode_ids(response: Sequence | np.ndarray, response_mask: Sequence | np.ndarray
               ) -> list[list[int]]:
    """Host helper: each row's kept ids as a Python list (for scorers that take ids)."""
    ids = np.asarray(jax.device_get(response))
    mask = np.asarray(jax.device_get(response_mask)).astype(bool)
    return [[int(i) for i in row[m]] for row, m in zip(ids, mask)]
