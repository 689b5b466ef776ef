"""reward.py: Bradley–Terry, K-way ranking, best-of-N and normalisation against NumPy / invariances."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import reward as rw

bradley_terry_loss = jax.jit(rw.bradley_terry_loss)
ranking_loss = jax.jit(rw.ranking_loss)
best_of_n_loss = jax.jit(rw.best_of_n_loss)
normalization_gain_bias = jax.jit(rw.normalization_gain_bias)


def _np_log_sigmoid(x):
    x = np.asarray(x, np.float64)
    return -np.logaddexp(0.0, -x)


def _mean(m, k):
    return float(m[k][0]) / float(m[k][1])


def test_bradley_terry_matches_formula_with_margin_and_centering():
    rng = np.random.default_rng(0)
    rc, rr, margin = (rng.normal(size=8).astype(np.float32) for _ in range(3))
    rr[0] = rc[0]  # a tie
    c = 0.01
    loss, m = bradley_terry_loss(rc, rr, margin=margin, center_coef=c)
    rc64, rr64 = rc.astype(np.float64), rr.astype(np.float64)
    want = np.mean(-_np_log_sigmoid(rc64 - rr64 - margin)) + c * np.mean((rc64 + rr64) ** 2)
    np.testing.assert_allclose(loss, want, rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "rm/loss"), want, rtol=1e-5)
    acc = np.mean([1.0 if a > b else 0.5 if a == b else 0.0 for a, b in zip(rc, rr)])
    np.testing.assert_allclose(_mean(m, "rm/accuracy"), acc)
    np.testing.assert_allclose(_mean(m, "rm/margin"), np.mean(rc64 - rr64), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_mean(m, "rm/chosen"), rc64.mean(), rtol=1e-5, atol=1e-6)


def test_bradley_terry_shift_invariant_without_centering_and_gradient():
    rng = np.random.default_rng(1)
    rc, rr = rng.normal(size=5).astype(np.float32), rng.normal(size=5).astype(np.float32)
    a, _ = bradley_terry_loss(rc, rr)
    b, _ = bradley_terry_loss(rc + 3.0, rr + 3.0)
    np.testing.assert_allclose(a, b, rtol=1e-5)
    # d/dr_c of mean(-log σ(r_c - r_r)) = -σ(r_r - r_c) / B
    g = jax.jit(jax.grad(lambda x: rw.bradley_terry_loss(x, jnp.asarray(rr))[0]))(jnp.asarray(rc))
    want = -1.0 / (1.0 + np.exp(rc.astype(np.float64) - rr)) / 5
    np.testing.assert_allclose(g, want, rtol=1e-5)


def test_bradley_terry_shape_mismatch_raises():
    with pytest.raises(ValueError, match="same shape"):
        rw.bradley_terry_loss(jnp.zeros(3), jnp.zeros(4))


def test_ranking_equals_mean_of_pairwise_bt_all_valid():
    rng = np.random.default_rng(2)
    B, K = 3, 4
    r = rng.normal(size=(B, K)).astype(np.float32)
    loss, m = ranking_loss(r, jnp.ones((B, K), bool))
    pairs = list(itertools.combinations(range(K), 2))
    assert len(pairs) == 6
    i, j = np.array(pairs).T
    bt, _ = bradley_terry_loss(r[:, i].reshape(-1), r[:, j].reshape(-1))
    np.testing.assert_allclose(loss, bt, rtol=1e-6)
    loss_default, _ = ranking_loss(r)
    np.testing.assert_allclose(loss_default, bt, rtol=1e-6)
    assert _mean(m, "rm/num_pairs") == 6


def test_ranking_with_padding_weights_each_prompt_once():
    rng = np.random.default_rng(3)
    r = rng.normal(size=(4, 4)).astype(np.float32)
    valid = np.array([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 1, 1], [1, 0, 0, 0]], bool)
    loss, m = ranking_loss(r, valid)
    per_prompt, n_correct, n_pairs = [], 0.0, 0
    for b in range(4):
        idx = np.flatnonzero(valid[b])
        pr = list(itertools.combinations(idx, 2))
        if not pr:
            continue  # the single-response prompt has no comparison
        i, j = np.array(pr).T
        bt, bm = bradley_terry_loss(r[b, i], r[b, j])
        per_prompt.append(float(bt))
        n_correct += float(bm["rm/accuracy"][0])
        n_pairs += len(pr)
    np.testing.assert_allclose(loss, np.mean(per_prompt), rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "rm/loss"), np.mean(per_prompt), rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "rm/accuracy"), n_correct / n_pairs)


def test_ranking_k2_is_bradley_terry_and_invalid_padding_is_ignored():
    rng = np.random.default_rng(4)
    r = rng.normal(size=(5, 2)).astype(np.float32)
    a, _ = ranking_loss(r, jnp.ones((5, 2), bool))
    b, _ = bradley_terry_loss(r[:, 0], r[:, 1])
    np.testing.assert_allclose(a, b, rtol=1e-6)
    # Padding a third, invalid slot with garbage (even NaN) changes nothing, value or gradient.
    r3 = np.concatenate([r, np.full((5, 1), np.nan, np.float32)], axis=1)
    v3 = np.concatenate([np.ones((5, 2), bool), np.zeros((5, 1), bool)], axis=1)
    c, _ = ranking_loss(r3, v3)
    np.testing.assert_allclose(c, b, rtol=1e-6)
    g = jax.jit(jax.grad(lambda x: rw.ranking_loss(x, jnp.asarray(v3))[0]))(jnp.asarray(r3))
    assert np.all(np.isfinite(np.asarray(g)))


def test_best_of_n_matches_softmax_cross_entropy():
    rng = np.random.default_rng(5)
    r = rng.normal(size=(4, 4)).astype(np.float32)
    best = np.array([0, 3, 1, 2], np.int32)
    valid = np.ones((4, 4), bool)
    valid[2, 3] = False
    valid[3] = False  # no valid candidate: excluded
    loss, m = best_of_n_loss(r, best, valid)
    ce, correct = [], []
    for b in range(3):
        x = r[b].astype(np.float64)[valid[b]]
        idx = np.flatnonzero(valid[b])
        ce.append(np.log(np.exp(x).sum()) - r[b, best[b]])
        correct.append(float(idx[np.argmax(x)] == best[b]))
    np.testing.assert_allclose(loss, np.mean(ce), rtol=1e-5)
    np.testing.assert_allclose(_mean(m, "rm/accuracy"), np.mean(correct))
    g = jax.jit(jax.grad(lambda x: rw.best_of_n_loss(x, jnp.asarray(best), jnp.asarray(valid))[0]))(r)
    g = np.asarray(g)
    assert np.all(np.isfinite(g)) and np.all(g[3] == 0) and g[2, 3] == 0


def test_best_of_n_two_candidates_is_bradley_terry():
    rng = np.random.default_rng(6)
    r = rng.normal(size=(6, 2)).astype(np.float32)
    a, _ = best_of_n_loss(r, jnp.zeros(6, jnp.int32), None)
    b, _ = bradley_terry_loss(r[:, 0], r[:, 1])
    np.testing.assert_allclose(a, b, rtol=1e-5)


def test_normalization_gain_bias_hits_target_moments():
    rng = np.random.default_rng(7)
    s = (rng.normal(size=64) * 3.0 + 2.0).astype(np.float32)
    gain, bias = normalization_gain_bias(s, 0.5, 2.0)
    y = float(gain) * s.astype(np.float64) + float(bias)
    np.testing.assert_allclose(y.mean(), 0.5, atol=1e-5)
    np.testing.assert_allclose(y.std(), 2.0, rtol=1e-5)
    mask = rng.random(64) < 0.5
    s_bad = np.where(mask, s, 1e6).astype(np.float32)  # masked-out values must not matter
    gain, bias = jax.jit(rw.normalization_gain_bias)(s_bad, mask=mask)
    y = float(gain) * s[mask].astype(np.float64) + float(bias)
    np.testing.assert_allclose(y.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(y.std(), 1.0, rtol=1e-5)
