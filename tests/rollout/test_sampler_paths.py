"""Sampler fast paths: the sampling dtype (log-prob parity with the training forward at that
dtype, and the sampled-vs-trained mismatch metric), the unrolled per-layer decode loop, and
one compile per prompt bucket whatever the prompt widths inside it."""

from __future__ import annotations

import dataclasses
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.control import KLController
from rlhf_jax.rollout.sampler import (SamplingConfig, cast_params, logprob_mismatch, make_sampler,
                                      pad_prompts_to_bucket, rollout_model, sample)
from tests.rollout.test_sampler import (GAP, PAD, V, _jit_resp_logp, _jit_sample,
                                        _min_greedy_gap, _model, _prompts)


def _sampled(name, dtype, **kw):
    model, params = _model(name)
    tokens, mask = _prompts(b=6, p=7)
    cfg = SamplingConfig(max_new_tokens=10, temperature=0.8, eos_token_id=(3, 17), pad_token_id=PAD,
                         dtype=dtype, **kw)
    return model, params, _jit_sample(model, params, tokens, mask, jax.random.key(4), cfg)


def _train_logp(model, params, out, dtype):
    """The training forward's log-probs of ``out``'s responses with the model at ``dtype``."""
    return _jit_resp_logp(rollout_model(model, dtype), cast_params(params, dtype), out.tokens,
                          out.attn_mask, out.positions, prompt_len=7, temperature=0.8)


# ---- sampling dtype ---------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt2"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_sampler_logprobs_equal_training_forward_at_the_sampling_dtype(name, dtype):
    model, params, out = _sampled(name, dtype)
    m = np.asarray(out.response_mask)
    same = np.abs(np.asarray(_train_logp(model, params, out, dtype)) - np.asarray(out.logprobs))[m]
    master = np.abs(np.asarray(_train_logp(model, params, out, None)) - np.asarray(out.logprobs))[m]
    print(f"{name} {dtype}: |sampler - train@{dtype}| max {same.max():.3g} mean {same.mean():.3g}; "
          f"|sampler - train@float32| max {master.max():.3g} mean {master.mean():.3g}")
    if dtype == "float32":
        assert same.max() <= 1e-5
    else:
        # The same bfloat16 roundings on both paths (float32 accumulation order aside): far
        # closer than the bfloat16 sampler is to the float32 masters, which the test resolves.
        assert same.max() <= 1e-3
        assert master.max() > 3e-3 and master.mean() > 10 * max(same.mean(), 1e-6)
    assert out.logprobs.dtype == jnp.float32


def test_sampling_dtype_leaves_the_callers_params_and_model_alone():
    model, params = _model("llama")
    bf = cast_params(params, "bfloat16")
    assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(bf))
    assert all(x.dtype == jnp.float32 for x in jax.tree.leaves(params))
    assert cast_params(params, None) is params and rollout_model(model, None) is model
    assert rollout_model(model, "float32") is model
    assert rollout_model(model, "bfloat16").cfg.dtype == "bfloat16"
    with pytest.raises(ValueError, match="dtype"):
        SamplingConfig(max_new_tokens=2, eos_token_id=2, pad_token_id=0, dtype="float16")
    with pytest.raises(ValueError, match="unroll_layers"):
        SamplingConfig(max_new_tokens=2, eos_token_id=2, pad_token_id=0, unroll_layers=1)


# ---- the mismatch metric ----------------------------------------------------------------------

def test_logprob_mismatch_against_float64_numpy():
    rs = np.random.RandomState(0)
    s = -rs.exponential(2.0, size=(5, 9)).astype(np.float32)
    t = (s + 0.3 * rs.standard_normal((5, 9))).astype(np.float32)
    mask = rs.rand(5, 9) < 0.7
    got = {k: float(a) / float(b) for k, (a, b) in
           jax.jit(logprob_mismatch)(jnp.asarray(s), jnp.asarray(t), jnp.asarray(mask)).items()}
    d = (s.astype(np.float64) - t)[mask]
    np.testing.assert_allclose(got["rollout/logprob_mismatch"], np.abs(d).mean(), rtol=1e-5)
    np.testing.assert_allclose(got["rollout/logprob_mismatch_k3"], (np.exp(-d) - 1 + d).mean(),
                               rtol=1e-5)


def test_ppo_experience_reports_the_bfloat16_sampling_mismatch():
    from rlhf_jax.models.model import Model
    from rlhf_jax.rollout.postprocess import response_logprobs
    from rlhf_jax.train import ppo
    from rlhf_jax.train.state import OptimizerConfig, create_train_state, make_optimizer
    from tests.train._tiny import EOS, TINY, prompts

    policy = Model(TINY, kind="lm")
    b, p, r = 4, 6, 8
    cfg = ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=r, eos_token_id=EOS,
                                                pad_token_id=PAD, dtype="bfloat16"),
                        advantage="rloo", num_samples=2, kl_penalty="none",
                        kl=KLController(kind="fixed", init_kl_coef=0.0))
    params = policy.init(jax.random.key(0))
    tx = make_optimizer(OptimizerConfig(lr=1e-2), policy.abstract_params())
    state = ppo.init_ppo_state(create_train_state(params, tx, jax.random.key(1)), cfg.kl,
                               jax.random.key(2))
    tokens, mask = prompts(b, p, seed=3)
    out, toks, attn, pos = jax.jit(functools.partial(ppo.generate, policy_model=policy, cfg=cfg))(
        state, tokens, mask)
    scores = jnp.zeros((2 * b,), jnp.float32)
    _, metrics = jax.jit(functools.partial(ppo.make_experience, policy_model=policy,
                                           value_model=None, cfg=cfg))(
        state, toks, attn, pos, out.response_mask, out.ended, scores, None,
        sampler_logprobs=out.logprobs)
    got = {k: float(metrics[k][0]) / float(metrics[k][1])
           for k in ("rollout/logprob_mismatch", "rollout/logprob_mismatch_k3")}
    # independent: the float32 training forward of the same tokens, reduced in float64
    train = np.asarray(jax.jit(response_logprobs, static_argnames=("model", "prompt_len"))(
        policy, params, toks, attn, pos, prompt_len=p), np.float64)
    m = np.asarray(out.response_mask)
    d = (np.asarray(out.logprobs, np.float64) - train)[m]
    print(f"bfloat16 sampling vs float32 training: mean |d| {np.abs(d).mean():.3g}, "
          f"k3 {(np.exp(-d) - 1 + d).mean():.3g}")
    assert np.abs(d).mean() > 1e-4  # the bfloat16 sampler is measurably not the float32 policy
    np.testing.assert_allclose(got["rollout/logprob_mismatch"], np.abs(d).mean(), rtol=1e-4,
                               atol=1e-7)
    np.testing.assert_allclose(got["rollout/logprob_mismatch_k3"], (np.exp(-d) - 1 + d).mean(),
                               rtol=1e-3, atol=1e-8)


# ---- unrolled per-layer decode == scanned decode ----------------------------------------------

@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_unrolled_and_scanned_layer_loops_agree(name):
    model, params = _model(name)
    tokens, mask = _prompts(b=5, p=6, seed=1)
    outs = {}
    for unroll in (True, False):
        cfg = SamplingConfig(max_new_tokens=8, greedy=True, eos_token_id=V - 1, pad_token_id=PAD,
                             temperature=0.9, unroll_layers=unroll)
        outs[unroll] = _jit_sample(model, params, tokens, mask, jax.random.key(0), cfg)
    a, b = outs[True], outs[False]
    assert _min_greedy_gap(model, params, tokens, mask, b.response, b.response_mask) > GAP
    np.testing.assert_array_equal(np.asarray(a.response), np.asarray(b.response))
    np.testing.assert_allclose(np.asarray(a.logprobs), np.asarray(b.logprobs), atol=1e-5)


def test_num_samples_repeats_a_per_layer_cache_like_a_stacked_one():
    model, params = _model("llama")
    tokens, mask = _prompts(b=3, p=6, seed=2)
    outs = {}
    for unroll in (True, False):
        cfg = SamplingConfig(max_new_tokens=6, eos_token_id=V - 1, pad_token_id=PAD,
                             unroll_layers=unroll)
        outs[unroll] = jax.jit(sample, static_argnames=("model", "cfg", "num_samples"))(
            model, params, tokens, mask, jax.random.key(3), cfg, num_samples=3)
    # the sampled tokens may differ only through a draw within float rounding of a CDF
    # boundary; compare the continuous log-probs of each path's own tokens with a training
    # forward instead
    for out in outs.values():
        assert out.response.shape == (9, 6)
        train = _jit_resp_logp(model, params, out.tokens, out.attn_mask, out.positions,
                               prompt_len=6)
        np.testing.assert_allclose(np.asarray(out.logprobs), np.asarray(train), atol=1e-5)


# ---- one compile per prompt bucket -------------------------------------------------------------

def test_no_retrace_across_prompt_widths_within_a_bucket():
    model, params = _model("gpt2")
    cfg = SamplingConfig(max_new_tokens=4, eos_token_id=3, pad_token_id=PAD)
    buckets = (8, 16)
    chex.clear_trace_counter()
    counted = jax.jit(chex.assert_max_traces(sample, n=2), static_argnames=("model", "cfg"))
    for width in (4, 5, 8, 9, 12, 16, 6, 11):  # two buckets: 8 and 16
        tokens, mask = _prompts(b=4, p=width, seed=width)
        tokens, mask = pad_prompts_to_bucket(tokens, mask, buckets, PAD)
        assert tokens.shape == (4, 8 if width <= 8 else 16)
        counted(model, params, tokens, mask, jax.random.key(width), cfg)

    sampler = make_sampler(model, cfg, prompt_buckets=buckets)
    for width in (4, 6, 8, 10, 16):
        tokens, mask = _prompts(b=4, p=width, seed=width)
        out = sampler(params, tokens, mask, jax.random.key(0))
        assert out.prompt_len == (8 if width <= 8 else 16)
    assert sampler.jitted._cache_size() == 2
    with pytest.raises(ValueError, match="largest bucket"):
        sampler(params, *_prompts(b=4, p=17, seed=0)[:2], jax.random.key(0))
    with pytest.raises(ValueError, match="prompt_buckets"):
        make_sampler(model, cfg, prompt_buckets=(16, 8))


def test_bucket_padding_does_not_change_the_continuation():
    model, params = _model("llama")
    tokens, mask = _prompts(b=5, p=6, seed=1)
    cfg = SamplingConfig(max_new_tokens=8, greedy=True, eos_token_id=V - 1, pad_token_id=PAD)
    plain = make_sampler(model, cfg)(params, tokens, mask, jax.random.key(0))
    padded = make_sampler(model, cfg, prompt_buckets=(16,))(params, tokens, mask,
                                                            jax.random.key(0))
    assert _min_greedy_gap(model, params, tokens, mask, plain.response) > GAP
    np.testing.assert_array_equal(np.asarray(padded.response), np.asarray(plain.response))
    np.testing.assert_allclose(np.asarray(padded.logprobs), np.asarray(plain.logprobs), atol=1e-5)
    np.testing.assert_array_equal(np.asarray(padded.prompt_mask[:, :10]), False)
