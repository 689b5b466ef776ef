"""The critic-free advantage estimators, the policy surrogates (PPO clip, GSPO, CISPO), the
loss aggregations and DAPO's overlong penalty, against float64 NumPy references written from
the papers' formulas, and the invariances between them."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import advantages as adv
from rlhf_jax.losses.policy_gradient import POLICY_LOSSES
from rlhf_jax.losses.ppo import overlong_penalty, ppo_loss
from rlhf_jax.rollout.sampler import SamplingConfig
from rlhf_jax.train.ppo import PPOConfig

K = 4  # samples per prompt
# Two prompts' groups of four: rewards on the last valid token; lengths vary, one row empty.
SCORES = np.array([1.0, 0.0, 0.0, 1.0, 0.3, -1.2, 2.5, 0.4])
LENGTHS = np.array([3, 5, 1, 4, 5, 2, 4, 3])
R = 5
MASK = np.arange(R)[None] < LENGTHS[:, None]


def _token_rewards(kl=None):
    """Score on the last valid token, minus an optional per-token KL penalty."""
    r = np.zeros((8, R))
    r[np.arange(8), LENGTHS - 1] = SCORES
    if kl is not None:
        r = r - np.where(MASK, kl, 0.0)
    return r


def _estimate(name, rewards, **kw):
    a, ret = adv.estimate_advantages(name, jnp.asarray(rewards, jnp.float32), jnp.asarray(MASK),
                                     group_size=K, **kw)
    return np.asarray(a, np.float64), ret


def _broadcast(seq):
    return np.where(MASK, np.asarray(seq)[:, None], 0.0)


def test_rloo_grpo_dr_grpo_reinforce_match_their_formulas():
    kl = np.random.default_rng(0).normal(scale=0.1, size=(8, R))
    rewards = _token_rewards(kl)
    ret = np.where(MASK, rewards, 0.0).sum(1)  # R_i = score - beta sum_t KL_t
    groups = ret.reshape(2, K)
    rloo = np.stack([[g[i] - (g.sum() - g[i]) / (K - 1) for i in range(K)] for g in groups])
    grpo = np.stack([(g - g.mean()) / (g.std(ddof=1) + 1e-4) for g in groups])
    dr = np.stack([g - g.mean() for g in groups])
    want = {"rloo": rloo.reshape(-1), "grpo": grpo.reshape(-1), "dr_grpo": dr.reshape(-1),
            "reinforce": ret - ret.mean()}
    for name, w in want.items():
        got, returns = _estimate(name, rewards)
        assert returns is None
        np.testing.assert_allclose(got, _broadcast(w), rtol=2e-5, atol=2e-6, err_msg=name)


def test_reinforce_pp_is_the_whitened_discounted_return_of_each_token():
    rng = np.random.default_rng(1)
    rewards = _token_rewards(rng.normal(scale=0.2, size=(8, R)))
    gamma = 0.9
    g = np.zeros((8, R))
    for b in range(8):
        run = 0.0
        for t in reversed(range(LENGTHS[b])):
            run = rewards[b, t] + gamma * run
            g[b, t] = run
    vals = g[MASK]
    want = np.where(MASK, (g - vals.mean()) / np.sqrt(vals.var(ddof=1) + 1e-8), 0.0)
    got, _ = _estimate("reinforce_pp", rewards, gamma=gamma)
    np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


def test_rloo_equals_reinforce_with_the_leave_one_out_baseline():
    seq = SCORES.reshape(2, K)
    loo = np.stack([(g.sum() - g) / (K - 1) for g in seq])
    np.testing.assert_allclose(adv.reinforce_baseline_advantages(jnp.asarray(seq), loo),
                               adv.rloo_advantages(jnp.asarray(seq)), rtol=1e-6, atol=1e-6)


def test_grpo_with_one_sample_per_prompt_is_refused():
    with pytest.raises(ValueError, match="at least 2 samples"):
        adv.estimate_advantages("grpo", jnp.zeros((4, R)), jnp.ones((4, R), bool), group_size=1)
    with pytest.raises(ValueError, match="needs num_samples >= 2"):
        PPOConfig(sampling=SamplingConfig(max_new_tokens=R), advantage="grpo", num_samples=1)
    with pytest.raises(ValueError, match="unknown advantage estimator"):
        PPOConfig(sampling=SamplingConfig(max_new_tokens=R), advantage="vtrace")


def test_gae_needs_values_and_whitening_defaults_follow_the_estimator():
    with pytest.raises(ValueError, match="needs the critic"):
        adv.estimate_advantages("gae", jnp.zeros((8, R)), jnp.asarray(MASK))
    raw, _ = _estimate("grpo", _token_rewards())
    whitened, _ = _estimate("grpo", _token_rewards(), whiten_advantages=True)
    vals = raw[MASK]
    np.testing.assert_allclose(whitened[MASK], (vals - vals.mean()) / np.sqrt(vals.var(ddof=1)),
                               rtol=1e-4, atol=1e-5)


# ---- surrogates ----------------------------------------------------------------------------
def _surrogate_inputs(seed=0, r=R):
    rng = np.random.default_rng(seed)
    old = rng.normal(-2.0, 0.5, size=(8, r))
    logp = old + rng.normal(0, 0.3, size=(8, r))
    a = rng.normal(size=(8,))
    mask = np.arange(r)[None] < np.minimum(LENGTHS, r)[:, None]
    return logp, old, np.where(mask, a[:, None], 0.0), mask


def _loss(name, logp, old, a, mask, **kw):
    return ppo_loss(jnp.asarray(logp, jnp.float32), jnp.asarray(old, jnp.float32),
                    jnp.asarray(a, jnp.float32), jnp.asarray(mask), policy_loss=name, **kw)


def _value_and_grad(name, logp, old, a, mask, **kw):
    fn = lambda lp: _loss(name, lp, old, a, mask, **kw)[0]  # noqa: E731
    v, g = jax.value_and_grad(fn)(jnp.asarray(logp, jnp.float32))
    return float(v), np.asarray(g, np.float64)


def test_gspo_matches_the_sequence_level_objective_and_its_gradient():
    """GSPO eq. 5-7: per sequence ``max(-A s, -A clip(s))`` with ``s = exp(mean_t log ρ)``,
    averaged over sequences; its gradient w.r.t. ``logp[i, t]`` is ``-A s / |y_i|`` where the
    unclipped term is active, else 0."""
    logp, old, a, mask = _surrogate_inputs()
    eps = 0.05
    n = mask.sum(1)
    s = np.exp(np.where(mask, logp - old, 0.0).sum(1) / n)
    a_seq = a[:, 0]
    unclipped, clipped = -a_seq * s, -a_seq * np.clip(s, 1 - eps, 1 + eps)
    want = np.maximum(unclipped, clipped).mean()
    active = unclipped >= clipped
    want_grad = np.where(mask, np.where(active, -a_seq * s / n, 0.0)[:, None], 0.0) / 8
    v, g = _value_and_grad("gspo", logp, old, a, mask, clip_eps=eps, reduction="sequence")
    np.testing.assert_allclose(v, want, rtol=1e-5)
    np.testing.assert_allclose(g, want_grad, rtol=1e-4, atol=1e-7)


def test_gspo_with_one_token_per_sequence_is_ppo():
    logp, old, a, mask = _surrogate_inputs(seed=2, r=1)
    mask = np.ones_like(mask)
    for kw in (dict(clip_eps=0.2), dict(clip_eps=0.1, clip_eps_high=0.3, dual_clip=3.0)):
        v_g, g_g = _value_and_grad("gspo", logp, old, a, mask, **kw)
        v_p, g_p = _value_and_grad("ppo", logp, old, a, mask, **kw)
        np.testing.assert_allclose(v_g, v_p, rtol=1e-6)
        np.testing.assert_allclose(g_g, g_p, rtol=1e-5, atol=1e-8)


def test_cispo_is_reinforce_weighted_by_the_clipped_stopped_ratio():
    """MiniMax-M1 eq. 4: loss ``-sg(clip(ρ, 1-ε_l, 1+ε_h)) A log π`` (token mean); gradient
    ``-clip(ρ) A / N_tokens`` on every token, clipped or not."""
    logp, old, a, mask = _surrogate_inputs(seed=3)
    lo, hi = 0.5, 0.2
    w = np.clip(np.exp(logp - old), 1 - lo, 1 + hi)
    n = mask.sum()
    want = np.where(mask, -w * a * logp, 0.0).sum() / n
    want_grad = np.where(mask, -w * a, 0.0) / n
    v, g = _value_and_grad("cispo", logp, old, a, mask, clip_eps=lo, clip_eps_high=hi)
    np.testing.assert_allclose(v, want, rtol=1e-5)
    np.testing.assert_allclose(g, want_grad, rtol=1e-5, atol=1e-8)
    with pytest.raises(ValueError, match="dual_clip"):
        _loss("cispo", logp, old, a, mask, dual_clip=3.0)


def test_every_registered_surrogate_is_tested_here():
    assert set(POLICY_LOSSES) == {"ppo", "gspo", "cispo"}
    assert set(adv.ADVANTAGE_ESTIMATORS) == {"gae", "rloo", "grpo", "dr_grpo", "reinforce",
                                             "reinforce_pp"}


# ---- aggregation and the overlong penalty --------------------------------------------------
def test_the_three_aggregations():
    logp, old, a, mask = _surrogate_inputs(seed=4)
    cfg = PPOConfig(sampling=SamplingConfig(max_new_tokens=R), advantage="grpo", num_samples=2)
    per_token = -np.exp(logp - old) * a  # the unclipped surrogate -ρ A
    ratio = np.exp(logp - old)
    ref_tok = np.where(mask, np.maximum(per_token, -a * np.clip(ratio, 0.8, 1.2)), 0.0)
    want = {"token_mean": ref_tok.sum() / mask.sum(),
            "sequence_mean": np.mean([ref_tok[b, mask[b]].mean() for b in range(8)]),
            "constant": ref_tok.sum() / (8 * R)}
    for name, w in want.items():
        agg = dataclasses.replace(cfg, loss_aggregation=name).aggregation(8, R)
        got = float(_loss("ppo", logp, old, a, mask, **agg)[0])
        np.testing.assert_allclose(got, w, rtol=1e-5, err_msg=name)


def test_overlong_penalty_is_dapo_eq_13():
    lengths = np.array([0, 10, 11, 12, 14, 16])
    got = np.asarray(overlong_penalty(jnp.asarray(lengths), 16, 4, 0.5))
    # L_max 16, buffer 4: free up to 12 tokens, then linear down to -1 at 16 (times 0.5)
    np.testing.assert_allclose(got, [0, 0, 0, 0, -0.25, -0.5], atol=1e-7)
    with pytest.raises(ValueError, match="buffer"):
        overlong_penalty(jnp.asarray(lengths), 16, 0)
