"""PPO's KL term in both places (reward and loss) under an adaptive controller, and the
trainer's minibatch loss against the shipped ``losses.ppo.ppo_loss``.

The learn phase (``PPOStages.learn``: experience -> update -> controller) runs on one fixed,
hand-built rollout (no sampling, EOS placed by hand), so two iterations see the same tokens
and the only thing that changes between them is the policy and the KL coefficient.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.control import KLController, KLState
from rlhf_jax.losses.ppo import ppo_loss
from rlhf_jax.models.model import Model
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.train import ppo
from rlhf_jax.train.state import OptimizerConfig, create_train_state, make_optimizer
from tests.train._tiny import EOS, PAD, TINY, host_params, on_device, perturbed, prompts, reduced

POLICY = Model(TINY, kind="lm_value")
TX = make_optimizer(OptimizerConfig(lr=3e-2, eps=1e-3, max_grad_norm=1.0),
                    POLICY.abstract_params())
B, P, R = 8, 6, 8
# horizon = B: one iteration moves beta by up to 20 % (Ziegler et al. 2019 §2.2)
KL = KLController(kind="adaptive", init_kl_coef=0.05, target=1.0, horizon=float(B))
BASE = ppo.PPOConfig(sampling=SamplingConfig(max_new_tokens=R, eos_token_id=EOS, pad_token_id=PAD),
                     num_ppo_epochs=1, num_minibatches=1, vf_coef=0.5, kl=KL)
CFGS = {True: dataclasses.replace(BASE, kl_penalty="reward", kl_estimator="k1"),
        False: dataclasses.replace(BASE, kl_penalty="loss", kl_estimator="k3")}


@functools.cache
def rollout():
    """``(tokens, attn_mask, positions, response_mask, ended, scores)`` of a fixed rollout:
    random non-special response tokens, EOS at a chosen length for six rows, two rows cut at
    ``R`` without EOS."""
    rng = np.random.default_rng(4)
    prompt, prompt_mask = prompts(B, P, seed=0)
    lengths = np.array([1, 3, 5, 8, 2, 8, 6, 4])
    ended = np.array([True, True, True, False, True, False, True, True])
    response = rng.integers(3, TINY.vocab_size, (B, R)).astype(np.int32)
    mask = np.arange(R)[None] < lengths[:, None]
    response[np.arange(B)[ended], lengths[ended] - 1] = EOS
    response = np.where(mask, response, PAD).astype(np.int32)
    tokens = np.concatenate([prompt, response], 1)
    attn = np.concatenate([prompt_mask, mask], 1)
    positions = np.asarray(np.maximum(np.cumsum(attn, 1) - 1, 0), np.int32)
    scores = rng.normal(size=B).astype(np.float32)
    return tokens, attn, positions, mask, ended, scores


@functools.cache
def reference():
    return on_device(perturbed(host_params("lm_value"), scale=0.3, seed=11))


def fresh_state() -> ppo.PPOState:
    return ppo.init_ppo_state(create_train_state(on_device(host_params("lm_value")), TX,
                                                 jax.random.key(5)), KL, jax.random.key(6))


@functools.cache
def stages(kl_in_reward: bool) -> ppo.PPOStages:
    return ppo.PPOStages(policy_model=POLICY, policy_tx=TX, cfg=CFGS[kl_in_reward])


@functools.cache
def experience_fn(kl_in_reward: bool):
    return jax.jit(functools.partial(ppo.make_experience, policy_model=POLICY, value_model=None,
                                     cfg=CFGS[kl_in_reward]))


_ppo_loss = jax.jit(ppo_loss, static_argnames=("kl_loss_estimator", "clip_eps", "clip_eps_value",
                                               "vf_coef", "entropy_coef"))


def first_update_loss(exp: ppo.Experience, cfg: ppo.PPOConfig, kl_coef) -> tuple[float, dict]:
    """``ppo_loss`` of the first minibatch of an iteration on ``exp`` (one minibatch, one
    epoch): the policy is still the rollout policy, so its log-probs and values are the
    experience's own (entropy_coef is 0: the entropy does not enter the loss)."""
    kl = {} if cfg.kl_penalty == "reward" else dict(ref_logp=exp.ref_logp, kl_loss_coef=kl_coef,
                                          kl_loss_estimator=cfg.kl_estimator)
    loss, metrics = _ppo_loss(exp.old_logp, exp.old_logp, exp.advantages, exp.response_mask,
                              values=exp.old_values, old_values=exp.old_values,
                              returns=exp.returns, clip_eps=cfg.clip_eps,
                              clip_eps_value=cfg.clip_eps_value, vf_coef=cfg.vf_coef, **kl)
    return float(loss), reduced(metrics)


@pytest.mark.parametrize("kl_in_reward", [True, False], ids=["kl_in_reward", "kl_in_loss"])
def test_iteration_two_uses_the_coefficient_the_controller_set_in_iteration_one(kl_in_reward):
    cfg = CFGS[kl_in_reward]
    batch, ref = rollout(), reference()
    state0 = fresh_state()
    exp1, _ = experience_fn(kl_in_reward)(state0, *batch, ref)
    state1, metrics1 = stages(kl_in_reward).learn(state0, *batch, ref)  # state0 donated
    m1 = reduced(metrics1)
    beta0, beta1 = KL.init_kl_coef, float(state1.kl.kl_coef)
    assert m1["objective/kl_coef"] == pytest.approx(beta0, rel=1e-6)
    np.testing.assert_allclose(m1["ppo/loss/total"], first_update_loss(exp1, cfg, beta0)[0],
                               rtol=1e-4, atol=1e-6)
    # The controller: KL far above the target -> the error clips at +0.2, beta *= 1 + 0.2 B / H.
    assert m1["objective/kl"] > 1.2 * KL.target
    assert beta1 == pytest.approx(beta0 * (1 + 0.2 * B / KL.horizon), rel=1e-6)

    exp2, _ = experience_fn(kl_in_reward)(state1, *batch, ref)
    want, want_metrics = first_update_loss(exp2, cfg, beta1)
    # what the loss would be with the initial coefficient (in the reward or in the loss)
    exp2_beta0, _ = experience_fn(kl_in_reward)(state1.replace(kl=KLState(jnp.float32(beta0))),
                                                *batch, ref)
    stale, _ = first_update_loss(exp2_beta0, cfg, beta0)
    assert abs(want - stale) > 10 * 1e-4 * abs(want), (want, stale)  # 10x the tolerance below

    state2, metrics2 = stages(kl_in_reward).learn(state1, *batch, ref)
    m2 = reduced(metrics2)
    assert m2["objective/kl_coef"] == pytest.approx(beta1, rel=1e-6)  # reported == used
    np.testing.assert_allclose(m2["ppo/loss/total"], want, rtol=1e-4, atol=1e-6)
    if kl_in_reward:
        # rewards -beta1 * k1 per token: the non-score reward is -beta1 x the KL penalty
        np.testing.assert_allclose(m2["objective/non_score_reward"],
                                   -beta1 * m2["objective/kl_penalty"], rtol=1e-5)
        assert "ppo/policy/kl_loss" not in m2
    else:
        assert m2["objective/non_score_reward"] == 0.0
        np.testing.assert_allclose(m2["ppo/policy/kl_loss"], want_metrics["ppo/policy/kl_loss"],
                                   rtol=1e-4)
    assert float(state2.kl.kl_coef) == pytest.approx(beta1 * (1 + 0.2 * B / KL.horizon), rel=1e-5)


@pytest.mark.parametrize("kl_in_reward,entropy_coef,estimator",
                         [(True, 0.0, "k1"), (False, 0.01, "k2")],
                         ids=["kl_in_reward", "kl_in_loss_k2+entropy"])
def test_minibatch_loss_is_ppo_loss_of_the_same_arrays(kl_in_reward, entropy_coef, estimator):
    cfg = dataclasses.replace(CFGS[kl_in_reward], entropy_coef=entropy_coef, clip_eps_high=0.3,
                              kl_estimator=estimator)
    exp, _ = experience_fn(kl_in_reward)(fresh_state(), *rollout(), reference())
    params = on_device(perturbed(host_params("lm_value"), scale=0.05, seed=2))  # ratio != 1
    kl_coef = jnp.float32(0.3)
    loss_fn = jax.jit(functools.partial(ppo.minibatch_loss, policy_model=POLICY, value_model=None,
                                        cfg=cfg))
    loss, metrics = loss_fn((params, None), exp, kl_coef)

    forward = jax.jit(ppo.policy_forward, static_argnames=("model", "prompt_len", "sampling"))
    logp, entropy, values = forward(POLICY, params, exp.tokens, exp.positions, exp.attn_mask,
                                    prompt_len=P, sampling=cfg.sampling)
    kl = {} if kl_in_reward else dict(ref_logp=exp.ref_logp, kl_loss_coef=kl_coef,
                                      kl_loss_estimator=cfg.kl_estimator)
    want, want_metrics = ppo_loss(logp, exp.old_logp, exp.advantages, exp.response_mask,
                                  values=values, old_values=exp.old_values, returns=exp.returns,
                                  clip_eps=cfg.clip_eps, clip_eps_high=cfg.clip_eps_high,
                                  clip_eps_value=cfg.clip_eps_value, vf_coef=cfg.vf_coef,
                                  entropy=entropy, entropy_coef=cfg.entropy_coef, **kl)
    np.testing.assert_allclose(float(loss), float(want), rtol=1e-5, atol=1e-7)
    m, w = reduced(metrics), reduced(want_metrics)
    assert m.keys() == w.keys()
    assert ("ppo/policy/kl_loss" in m) == (not kl_in_reward)
    for k in w:
        if "clipfrac" not in k:  # discontinuous: two compilations may round a ratio apart
            np.testing.assert_allclose(m[k], w[k], rtol=1e-5, atol=1e-6, err_msg=k)
    assert m["ppo/policy/ratio"] != pytest.approx(1.0, abs=1e-3)  # the policy moved
