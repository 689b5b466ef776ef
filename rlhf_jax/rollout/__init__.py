"""Rollouts: KV-cached sampling (``sampler``, its logit filters in ``filters``) and what follows
it (``postprocess``)."""

from rlhf_jax.rollout.filters import select_tokens, suppress_eos, top_k_mask, top_p_mask
from rlhf_jax.rollout.postprocess import decode, decode_ids, response_logprobs, truncate_at_eos
from rlhf_jax.rollout.sampler import (SampleOutput, SamplingConfig, check_prompt_mask, is_eos,
                                      make_sampler, sample)

__all__ = [
    "SampleOutput", "SamplingConfig", "check_prompt_mask", "decode", "decode_ids", "is_eos",
    "make_sampler", "response_logprobs", "sample", "select_tokens", "suppress_eos", "top_k_mask",
    "top_p_mask",
    "truncate_at_eos",
]
