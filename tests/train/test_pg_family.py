"""The on-policy trainer's critic-free family: group sampling (k responses per prompt in one
sampler call), exact group statistics on an 8-device mesh, training without a reference
model, and DAPO's dynamic-sampling selection on the host."""

from __future__ import annotations

import dataclasses
import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.control import KLController
from rlhf_jax.models.model import Model
from rlhf_jax.rewards import Reward, RewardFunctionError, RewardSum
from rlhf_jax.rollout.groups import concat_rounds, informative_groups, select_groups
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.sharding import MeshConfig, make_mesh, shard_batch
from rlhf_jax.train import ppo
from rlhf_jax.train.state import OptimizerConfig, create_train_state, make_optimizer
from tests.train._tiny import EOS, PAD, TINY, prompts, reduced

POLICY = Model(TINY, kind="lm")
TX = make_optimizer(OptimizerConfig(lr=1e-2), POLICY.abstract_params())
B, P, R, K = 8, 6, 8, 4
CFG = ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=R, eos_token_id=EOS, pad_token_id=PAD,
                                            stop_early=False),
                    advantage="grpo", num_samples=K, num_ppo_epochs=1, kl_penalty="loss",
                    kl_estimator="k3", loss_aggregation="sequence_mean",
                    kl=KLController(kind="fixed", init_kl_coef=0.05))


def _state(seed=0):
    params = POLICY.init(jax.random.key(seed))
    return ppo.init_ppo_state(create_train_state(params, TX, jax.random.key(1)), CFG.kl,
                              jax.random.key(2)), params


@functools.cache
def _rollout():
    state, params = _state()
    tokens, mask = prompts(B, P, seed=3)
    out, toks, attn, pos = jax.jit(functools.partial(ppo.generate, policy_model=POLICY, cfg=CFG))(
        state, tokens, mask)
    scores = np.asarray(jax.random.normal(jax.random.key(5), (B * K,)))
    return (tokens, mask), (toks, attn, pos, out.response_mask, out.ended, scores), params


def test_k_samples_per_prompt_in_one_call_with_distinct_noise():
    (tokens, mask), (toks, attn, _, response_mask, _, _), _ = _rollout()
    toks = np.asarray(toks)
    assert toks.shape == (B * K, P + R)
    np.testing.assert_array_equal(toks[:, :P], np.repeat(tokens, K, axis=0))  # rows g k + j
    responses = toks[:, P:].reshape(B, K, R)
    # temperature-1 samples of a random 64-token model: the k responses of a prompt differ
    distinct = [len({r.tobytes() for r in group}) for group in responses]
    assert min(distinct) > 1, distinct


def _experience(state, rollout, ref):
    fn = functools.partial(ppo.make_experience, policy_model=POLICY, value_model=None, cfg=CFG)
    return jax.jit(fn)(state, *rollout, ref)


def test_group_statistics_are_exact_on_8_devices_and_need_no_collective():
    if jax.device_count() < 8:
        pytest.skip("needs 8 (fake) devices")
    _, rollout, params = _rollout()
    state, _ = _state()
    want, _ = _experience(state, rollout, params)
    mesh = make_mesh(MeshConfig(data=8))
    with jax.set_mesh(mesh):
        placed = shard_batch({f"x{i}": x for i, x in enumerate(rollout)}, mesh)
        args = [placed[f"x{i}"] for i in range(len(rollout))]
        fn = jax.jit(functools.partial(ppo.make_experience, policy_model=POLICY, value_model=None,
                                       cfg=CFG))
        compiled = fn.lower(state, *args, params).compile()
        got, _ = compiled(state, *args, params)
        hlo = compiled.as_text()
    # each device holds 4 rows = one whole group: the group mean/std are local
    rows = re.compile(r"(all-gather|all-reduce|all-to-all|collective-permute)[^\n]*"
                      r"f32\[(8,4|32|32,8|4,8)\]")
    assert not rows.search(hlo), rows.search(hlo).group(0)
    np.testing.assert_allclose(np.asarray(got.advantages), np.asarray(want.advantages),
                               rtol=1e-5, atol=1e-5)
    a = np.asarray(want.advantages)[:, 0].reshape(B, K)
    np.testing.assert_allclose(a.mean(1), 0, atol=1e-5)  # GRPO: zero mean within each group


def test_training_without_a_reference_model():
    (tokens, mask), _, _ = _rollout()
    cfg = dataclasses.replace(CFG, kl_penalty="none", advantage="rloo")
    stages = ppo.PPOStages(policy_model=POLICY, policy_tx=TX, cfg=cfg)
    state, params = _state()
    new_state, metrics = stages.iteration(
        state, tokens, mask, None,
        lambda p, r, m: np.asarray(m, np.float32).sum(1) / R)  # reward: response length / R
    m = reduced(metrics)
    assert "objective/kl" not in m and "ppo/policy/kl_loss" not in m
    assert np.isfinite(m["ppo/loss/total"]) and 0 <= m["rollout/equal_reward_groups"] <= 1
    moved = jax.tree.map(lambda a, b: float(jnp.max(jnp.abs(a - b))), new_state.policy.params,
                         params)
    assert max(jax.tree.leaves(moved)) > 0
    with pytest.raises(ValueError, match="needs ref_params"):
        ppo.make_experience(state, *_rollout()[1], None, policy_model=POLICY, value_model=None,
                            cfg=CFG)


# ---- dynamic sampling and reward sources (host) ------------------------------------------
def test_dynamic_sampling_keeps_informative_groups_and_fills_the_rest():
    scores = np.array([1, 1, 0, 1, 0, 0, 0.5, 0.2], np.float32)  # groups of 2: eq, mixed, eq, mixed
    np.testing.assert_array_equal(informative_groups(scores, 2), [False, True, False, True])
    r1 = {"tokens": np.arange(8 * 3).reshape(8, 3), "attn_mask": np.ones((8, 3), bool),
          "scores": scores}
    r2 = {"tokens": np.arange(4 * 5).reshape(4, 5) + 100, "attn_mask": np.ones((4, 5), bool),
          "scores": np.array([0, 1, 3, 3], np.float32)}
    rows = concat_rounds([r1, r2], response_len=2)
    assert rows["tokens"].shape == (12, 5)
    assert not rows["attn_mask"][:8, :2].any()  # the narrower round is left-padded
    picked, m = select_groups(rows, 2, 4)
    # informative groups in order (1, 3, 4), then the first uninformative one (0)
    np.testing.assert_array_equal(picked["scores"], np.float32([0, 1, 0.5, 0.2, 0, 1, 1, 1]))
    assert m["rollout/dynamic_sampling/kept_groups"] == 3
    assert m["rollout/dynamic_sampling/filler_groups"] == 1


def test_reward_sources_sum_with_weights_and_name_a_bad_sample():
    good = Reward("length", lambda p, r, **c: [len(x) for x in r], weight=0.5)
    answer = Reward("exact", lambda p, r, answer: [float(x == a) for x, a in zip(r, answer)],
                    kind="verifier")
    total, metrics = RewardSum([good, answer], model_weight=2.0)(
        ["p", "q"], ["ab", "c"], {"answer": ["ab", "x"]}, model_scores=np.array([1.0, -1.0]))
    np.testing.assert_allclose(total, [2 + 1 + 1, -2 + 0.5 + 0])
    assert metrics["reward/exact/mean"] == (1.0, 2.0) and "reward/length/seconds" in metrics
    cases = [(lambda p, r, **c: 1 / 0, r"raised ZeroDivisionError"),
             (lambda p, r, **c: [1.0], r"returned shape \(1,\) for 2 responses"),
             (lambda p, r, **c: [0.0, np.inf], r"returned inf for sample 1 .*response 'c'"),
             (lambda p, r, **c: [0.0, 0.5], r"verifier but returned 0.5 for sample 1")]
    for fn, msg in cases:
        kind = "verifier" if "verifier" in msg else "function"
        with pytest.raises(RewardFunctionError, match=r"reward 'bad' .*" + msg):
            Reward("bad", fn, kind=kind)(["p", "q"], ["ab", "c"])
    with pytest.raises(ValueError, match="no reward source"):
        RewardSum([], model_weight=0.0)


def test_shared_prefill_sampler_logprobs_equal_the_training_forward():
    """k samples per prompt from one prefill: each row's sampler log-probs are the training
    forward's on the same tokens (the cache repeated k times is the cache of each row)."""
    (tokens, mask), (toks, attn, pos, response_mask, _, _), params = _rollout()
    out = jax.jit(functools.partial(ppo.generate, policy_model=POLICY, cfg=CFG))(
        _state()[0], tokens, mask)[0]
    logp, _, _ = jax.jit(ppo.policy_forward, static_argnames=("model", "prompt_len", "sampling"))(
        POLICY, params, toks, pos, attn, prompt_len=P, sampling=CFG.sampling)
    m = np.asarray(response_mask)
    np.testing.assert_allclose(np.asarray(out.logprobs)[m], np.asarray(logp)[m], atol=2e-5)
