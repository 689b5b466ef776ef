"""ppo.py: KL-shaped rewards, clipped policy/value losses and their sum, against NumPy loops."""
import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import ppo


def _jit(f, **kw):
    return jax.jit(functools.partial(f, **kw))


def _mean(m, k):
    return float(m[k][0]) / float(m[k][1])


def _rollout(B=4, R=6, seed=0):
    rng = np.random.default_rng(seed)
    logp = -rng.random((B, R)).astype(np.float32) * 3
    old = (logp + rng.normal(size=(B, R)) * 0.3).astype(np.float32)
    ref = (logp + rng.normal(size=(B, R)) * 0.5).astype(np.float32)
    advs = rng.normal(size=(B, R)).astype(np.float32)
    lengths = rng.integers(1, R + 1, size=B)
    mask = np.arange(R)[None] < lengths[:, None]
    return logp, old, ref, advs, mask


# ----------------------------------------------------------------------------- rewards


def test_kl_shaped_rewards_loop():
    logp, _, ref, _, mask = _rollout()
    mask[3] = False  # an empty response: no place for its score
    scores = np.array([1.0, -2.0, 0.5, 3.0], np.float32)
    beta = 0.05
    rewards, m = jax.jit(ppo.kl_shaped_rewards)(scores, logp, ref, mask, jnp.float32(beta))
    rewards = np.asarray(rewards)
    want = np.zeros(logp.shape)
    kls, nonscore = [], []
    for b in range(4):
        last = None
        for t in range(logp.shape[1]):
            if mask[b, t]:
                want[b, t] = -beta * (float(logp[b, t]) - float(ref[b, t]))
                last = t
        if last is not None:
            want[b, last] += scores[b]
        kls.append(sum(float(logp[b, t]) - float(ref[b, t]) for t in range(6) if mask[b, t]))
        nonscore.append(-beta * kls[-1])
    np.testing.assert_allclose(rewards, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_mean(m, "objective/kl"), np.mean(kls), rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "objective/score"), scores.mean(), rtol=1e-6)
    np.testing.assert_allclose(_mean(m, "objective/non_score_reward"), np.mean(nonscore), rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "objective/rlhf_reward"), np.mean(scores + np.array(nonscore)), rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "objective/kl_coef"), beta, rtol=1e-6)


def test_kl_shaped_rewards_k3_estimator_and_no_retrace_on_new_kl_coef():
    logp, _, ref, _, mask = _rollout(seed=1)
    scores = np.zeros(4, np.float32)
    @jax.jit
    @chex.assert_max_traces(n=1)
    def f(scores, logp, ref, mask, kl_coef):
        return ppo.kl_shaped_rewards(scores, logp, ref, mask, kl_coef, estimator="k3")

    r1, _ = f(scores, logp, ref, mask, jnp.float32(0.1))
    r2, _ = f(scores, logp, ref, mask, jnp.float32(0.2))  # a changed coefficient: no new trace
    d = logp.astype(np.float64) - ref
    k3 = np.exp(-d) - 1 + d
    np.testing.assert_allclose(r1, np.where(mask, -0.1 * k3, 0.0), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(r2, 2 * np.asarray(r1), rtol=1e-5, atol=1e-6)


def test_missing_eos_penalty_modes():
    s = np.array([1.0, 2.0, -1.0], np.float32)
    eos = np.array([True, False, False])
    np.testing.assert_allclose(ppo.missing_eos_penalty(s, eos, 1.5), [1.0, 0.5, -2.5])
    np.testing.assert_allclose(ppo.missing_eos_penalty(s, eos, 1.0, replace=True), [1.0, -1.0, -1.0])


# ----------------------------------------------------------------------------- policy


def _np_policy(logp, old, advs, mask, eps_low, eps_high, dual=None):
    """PPO objective as written in the papers (a max of the objective), negated; token-mean."""
    losses, clipped = [], []
    for b in range(logp.shape[0]):
        for t in range(logp.shape[1]):
            if not mask[b, t]:
                continue
            ratio = np.exp(np.float64(logp[b, t]) - np.float64(old[b, t]))
            A = np.float64(advs[b, t])
            unclipped = ratio * A
            clip_term = np.clip(ratio, 1 - eps_low, 1 + eps_high) * A
            obj = min(unclipped, clip_term)  # Schulman et al. 2017 eq. 7
            if dual is not None and A < 0:
                obj = max(obj, dual * A)  # Ye et al. 2020 dual clip
            losses.append(-obj)
            clipped.append(float(clip_term < unclipped))
    return np.mean(losses), np.mean(clipped)


@pytest.mark.parametrize("eps_high,dual", [(None, None), (0.28, None), (None, 3.0), (0.3, 2.0)])
def test_clipped_policy_loss_matches_paper_formula(eps_high, dual):
    logp, old, _, advs, mask = _rollout(seed=2)
    old = (logp + np.random.default_rng(3).normal(size=logp.shape) * 1.0).astype(np.float32)  # big ratios
    loss, m = _jit(ppo.clipped_policy_loss, clip_eps=0.2, clip_eps_high=eps_high, dual_clip=dual)(
        logp, old, advs, mask)
    want, clipfrac = _np_policy(logp, old, advs, mask, 0.2, 0.2 if eps_high is None else eps_high, dual)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "ppo/policy/clipfrac"), clipfrac, rtol=1e-6)
    d = (logp.astype(np.float64) - old)[mask]
    np.testing.assert_allclose(_mean(m, "ppo/policy/approxkl"), 0.5 * np.mean(d ** 2), rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "ppo/policy/approxkl_k3"), np.mean(np.exp(-d) - 1 + d), rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "ppo/policy/ratio"), np.mean(np.exp(d)), rtol=1e-5)


def test_policy_gradient_is_zero_on_clipped_tokens_and_on_policy_value():
    A = np.array([[1.0, 1.0, -1.0, -1.0]], np.float32)
    old = np.zeros((1, 4), np.float32)
    logp = np.log(np.array([[1.5, 1.1, 0.5, 0.9]], np.float32))  # clipped, inside, clipped, inside
    mask = np.ones((1, 4), bool)
    g = jax.jit(jax.grad(lambda lp: ppo.clipped_policy_loss(lp, old, A, mask)[0]))(logp)
    ratio = np.exp(logp.astype(np.float64))
    np.testing.assert_allclose(g, [[0.0, -ratio[0, 1] / 4, 0.0, ratio[0, 3] / 4]], rtol=1e-5, atol=1e-7)
    # On-policy (ratio 1): loss = -mean(A) over the mask, nothing clipped.
    logp2, _, _, advs, mask2 = _rollout(seed=4)
    loss, m = _jit(ppo.clipped_policy_loss)(logp2, logp2, advs, mask2)
    np.testing.assert_allclose(loss, -advs[mask2].astype(np.float64).mean(), rtol=1e-5)
    assert _mean(m, "ppo/policy/clipfrac") == 0 and _mean(m, "ppo/policy/approxkl") == 0


def test_policy_masked_equals_sliced_and_garbage_padding():
    logp, old, _, advs, mask = _rollout(seed=5)
    R = logp.shape[1]
    pad = lambda x, v: np.concatenate([x, np.full((4, 3), v, x.dtype)], 1)
    f = _jit(ppo.clipped_policy_loss)
    a, _ = f(logp, old, advs, mask)
    b, _ = f(pad(logp, 80.0), pad(old, -80.0), pad(advs, np.nan), pad(mask, False))
    np.testing.assert_allclose(a, b, rtol=1e-6)
    g = jax.jit(jax.grad(lambda lp: ppo.clipped_policy_loss(lp, pad(old, -80.0), pad(advs, np.nan),
                                                            pad(mask, False))[0]))(pad(logp, 80.0))
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.all(g[:, R:] == 0)


def test_sequence_reduction():
    logp, old, _, advs, mask = _rollout(seed=6)
    loss, _ = _jit(ppo.clipped_policy_loss, reduction="sequence")(logp, old, advs, mask)
    per_seq = [_np_policy(logp[b:b + 1], old[b:b + 1], advs[b:b + 1], mask[b:b + 1], 0.2, 0.2)[0]
               for b in range(4)]
    np.testing.assert_allclose(loss, np.mean(per_seq), rtol=1e-5)


def test_policy_argument_checks():
    logp, old, _, advs, mask = _rollout()
    with pytest.raises(ValueError, match="dual_clip"):
        ppo.clipped_policy_loss(logp, old, advs, mask, dual_clip=1.0)
    with pytest.raises(ValueError, match="shape"):
        ppo.clipped_policy_loss(logp, old[:, :2], advs, mask)


# ----------------------------------------------------------------------------- value


def test_clipped_value_loss_and_explained_variance():
    rng = np.random.default_rng(7)
    _, _, _, _, mask = _rollout(seed=7)
    old_v = rng.normal(size=mask.shape).astype(np.float32)
    v = (old_v + rng.normal(size=mask.shape) * 0.4).astype(np.float32)
    ret = rng.normal(size=mask.shape).astype(np.float32)
    loss, m = _jit(ppo.clipped_value_loss, clip_eps_value=0.2)(v, old_v, ret, mask)
    terms, clipped = [], []
    for b, t in zip(*np.nonzero(mask)):
        V, O, G = np.float64(v[b, t]), np.float64(old_v[b, t]), np.float64(ret[b, t])
        vc = O + np.clip(V - O, -0.2, 0.2)
        terms.append(0.5 * max((V - G) ** 2, (vc - G) ** 2))
        clipped.append(float((vc - G) ** 2 > (V - G) ** 2))
    np.testing.assert_allclose(loss, np.mean(terms), rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "ppo/val/clipfrac"), np.mean(clipped), rtol=1e-6)
    G, V = ret[mask].astype(np.float64), v[mask].astype(np.float64)
    np.testing.assert_allclose(_mean(m, "ppo/val/error"), np.mean((V - G) ** 2), rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "ppo/val/explained_variance"), 1 - np.var(G - V) / np.var(G), rtol=1e-4)
    unclipped, _ = _jit(ppo.clipped_value_loss, clip_eps_value=None)(v, old_v, ret, mask)
    np.testing.assert_allclose(unclipped, 0.5 * np.mean((V - G) ** 2), rtol=1e-5)
    # Perfect predictions explain all the variance.
    _, m2 = _jit(ppo.clipped_value_loss)(ret, ret, ret, mask)
    np.testing.assert_allclose(_mean(m2, "ppo/val/explained_variance"), 1.0, rtol=1e-6)


# ----------------------------------------------------------------------------- total


def test_ppo_loss_is_the_weighted_sum_of_its_terms():
    logp, old, ref, advs, mask = _rollout(seed=8)
    rng = np.random.default_rng(9)
    v, old_v, ret, ent = (rng.normal(size=mask.shape).astype(np.float32) for _ in range(4))
    kw = dict(clip_eps=0.2, clip_eps_high=0.3, clip_eps_value=0.5)
    loss, m = _jit(ppo.ppo_loss, vf_coef=0.1, entropy_coef=0.01, kl_loss_coef=0.04, **kw)(
        logp, old, advs, mask, values=v, old_values=old_v, returns=ret, entropy=ent, ref_logp=ref)
    pg, _ = _jit(ppo.clipped_policy_loss, clip_eps=0.2, clip_eps_high=0.3)(logp, old, advs, mask)
    vf, _ = _jit(ppo.clipped_value_loss, clip_eps_value=0.5)(v, old_v, ret, mask)
    d = (logp.astype(np.float64) - ref)[mask]
    k3 = np.mean(np.exp(-d) - 1 + d)  # GRPO's KL term (Shao et al. 2024 eq. 4)
    want = float(pg) + 0.1 * float(vf) - 0.01 * ent[mask].astype(np.float64).mean() + 0.04 * k3
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "ppo/loss/total"), want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "ppo/policy/kl_loss"), k3, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "ppo/policy/loss"), pg, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "ppo/val/loss"), vf, rtol=1e-5)


def test_ppo_loss_critic_free_and_argument_checks():
    logp, old, ref, advs, mask = _rollout(seed=10)
    a, m = _jit(ppo.ppo_loss)(logp, old, advs, mask)
    b, _ = _jit(ppo.clipped_policy_loss)(logp, old, advs, mask)
    np.testing.assert_allclose(a, b, rtol=1e-6)
    assert "ppo/val/loss" not in m
    with pytest.raises(ValueError, match="values, old_values and returns"):
        ppo.ppo_loss(logp, old, advs, mask, values=logp)
    with pytest.raises(ValueError, match="entropy"):
        ppo.ppo_loss(logp, old, advs, mask, entropy_coef=0.01)
    with pytest.raises(ValueError, match="ref_logp"):
        ppo.ppo_loss(logp, old, advs, mask, kl_loss_coef=0.1)


def test_ppo_loss_microbatches_with_global_token_count_add_up():
    logp, old, ref, advs, mask = _rollout(B=6, seed=11)
    rng = np.random.default_rng(12)
    v, old_v, ret = (rng.normal(size=mask.shape).astype(np.float32) for _ in range(3))
    full, _ = _jit(ppo.ppo_loss, kl_loss_coef=0.1)(
        logp, old, advs, mask, values=v, old_values=old_v, returns=ret, ref_logp=ref)
    n = jnp.float32(mask.sum())
    f = _jit(ppo.ppo_loss, kl_loss_coef=0.1)
    parts = [f(logp[s], old[s], advs[s], mask[s], values=v[s], old_values=old_v[s], returns=ret[s],
               ref_logp=ref[s], num_tokens=n)[0] for s in (slice(0, 3), slice(3, 6))]
    np.testing.assert_allclose(sum(parts), full, rtol=1e-5)


@pytest.mark.parametrize("estimator", ["k1", "k2", "k3"])
def test_ppo_loss_kl_term_takes_an_array_coefficient_and_the_chosen_estimator(estimator):
    logp, old, ref, advs, mask = _rollout(seed=13)
    ref = np.where(mask, ref, 90.0).astype(np.float32)  # garbage under the mask stays out

    traces = []

    @jax.jit
    def f(coef):
        traces.append(1)
        return ppo.ppo_loss(logp, old, advs, mask, ref_logp=ref, kl_loss_coef=coef,
                            kl_loss_estimator=estimator)

    base, _ = _jit(ppo.clipped_policy_loss)(logp, old, advs, mask)
    d = (logp.astype(np.float64) - ref)[mask]
    kl = {"k1": d, "k2": 0.5 * d ** 2, "k3": np.exp(-d) - 1 + d}[estimator].mean()
    for coef in (0.1, 0.25):  # a new coefficient value: no new trace
        loss, m = f(jnp.float32(coef))
        np.testing.assert_allclose(loss, float(base) + coef * kl, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(_mean(m, "ppo/policy/kl_loss"), kl, rtol=1e-5, atol=1e-7)
    assert len(traces) == 1


def test_ppo_loss_entropy_is_a_metric_only_when_its_coefficient_is_zero():
    logp, old, _, advs, mask = _rollout(seed=14)
    ent = np.random.default_rng(15).random(mask.shape).astype(np.float32)

    def grad_wrt_entropy(coef):
        g, m = jax.jit(jax.grad(lambda e: ppo.ppo_loss(logp, old, advs, mask, entropy=e,
                                                       entropy_coef=coef), has_aux=True))(ent)
        return np.asarray(g), m

    g0, m0 = grad_wrt_entropy(0.0)
    assert np.all(g0 == 0)
    np.testing.assert_allclose(_mean(m0, "ppo/policy/entropy"), ent[mask].mean(), rtol=1e-6)
    g1, _ = grad_wrt_entropy(0.01)
    np.testing.assert_allclose(g1, np.where(mask, -0.01 / mask.sum(), 0.0), rtol=1e-5)
