"""advantages.py: GAE against a reversed Python loop; RLOO/GRPO against per-group NumPy loops."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import advantages as adv

gae = jax.jit(adv.gae)


def _np_gae(r, v, gamma, lam):
    """Textbook GAE over one episode of length L (bootstrap 0 after the last step), float64."""
    L = len(r)
    a = np.zeros(L)
    last = 0.0
    for t in reversed(range(L)):
        next_v = v[t + 1] if t + 1 < L else 0.0
        delta = r[t] + gamma * next_v - v[t]
        last = delta + gamma * lam * last
        a[t] = last
    return a, a + np.asarray(v, np.float64)


def _data(B=4, R=7, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(B, R)).astype(np.float32), rng.normal(size=(B, R)).astype(np.float32)


@pytest.mark.parametrize("gamma,lam", [(1.0, 0.95), (0.9, 0.8), (1.0, 1.0), (0.99, 0.0)])
def test_gae_right_padded_matches_reverse_loop(gamma, lam):
    r, v = _data()
    lengths = [7, 4, 1, 0]
    mask = np.arange(7)[None] < np.array(lengths)[:, None]
    r_pad = np.where(mask, r, np.nan).astype(np.float32)  # padding garbage must not leak
    v_pad = np.where(mask, v, np.nan).astype(np.float32)
    a, ret = gae(r_pad, v_pad, mask, gamma=gamma, lam=lam)
    a, ret = np.asarray(a), np.asarray(ret)
    for b, L in enumerate(lengths):
        wa, wr = _np_gae(r[b, :L].astype(np.float64), v[b, :L].astype(np.float64), gamma, lam)
        np.testing.assert_allclose(a[b, :L], wa, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[b, :L], wr, rtol=1e-5, atol=1e-5)
        assert np.all(a[b, L:] == 0) and np.all(ret[b, L:] == 0)


def test_gae_closed_forms():
    r, v = _data(B=2, R=5, seed=1)
    mask = np.ones((2, 5), bool)
    # λ = 1, γ = 1: A_t = Σ_{s>=t} r_s - V_t (Monte Carlo return minus baseline).
    a, ret = gae(r, v, mask, gamma=1.0, lam=1.0)
    mc = np.cumsum(r[:, ::-1].astype(np.float64), axis=1)[:, ::-1]
    np.testing.assert_allclose(a, mc - v, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(ret, mc, rtol=1e-5, atol=1e-5)
    # λ = 0: A_t = δ_t.
    a0, _ = gae(r, v, mask, gamma=0.9, lam=0.0)
    v_next = np.concatenate([v[:, 1:], np.zeros((2, 1))], 1)
    np.testing.assert_allclose(a0, r + 0.9 * v_next - v, rtol=1e-5, atol=1e-5)


def test_gae_masked_equals_sliced_for_holes_and_left_padding():
    """Masked positions are absent: the result equals GAE of the row with them deleted."""
    r, v = _data(B=3, R=8, seed=2)
    mask = np.array([
        [0, 0, 1, 1, 1, 1, 1, 1],  # left padding
        [1, 1, 0, 0, 1, 1, 0, 0],  # an interior hole (e.g. a masked tool output) + right padding
        [1, 0, 1, 0, 1, 0, 1, 0],
    ], bool)
    a, ret = gae(r, v, mask, gamma=0.95, lam=0.9)
    a, ret = np.asarray(a), np.asarray(ret)
    for b in range(3):
        idx = np.flatnonzero(mask[b])
        wa, wr = _np_gae(r[b, idx].astype(np.float64), v[b, idx].astype(np.float64), 0.95, 0.9)
        np.testing.assert_allclose(a[b, idx], wa, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ret[b, idx], wr, rtol=1e-5, atol=1e-5)
        assert np.all(a[b, ~mask[b]] == 0)


def test_gae_gamma_as_array_and_shape_check():
    r, v = _data(B=2, R=3)
    mask = np.ones((2, 3), bool)
    a1, _ = gae(r, v, mask, gamma=jnp.float32(0.9), lam=jnp.float32(0.5))
    a2, _ = gae(r, v, mask, gamma=0.9, lam=0.5)
    np.testing.assert_allclose(a1, a2, rtol=1e-6)
    with pytest.raises(ValueError, match="same"):
        adv.gae(r, v[:, :2], mask)


def test_whiten_advantages():
    a = np.random.default_rng(3).normal(size=(4, 6)).astype(np.float32) * 3 + 1
    mask = np.random.default_rng(4).random((4, 6)) < 0.7
    w = np.asarray(jax.jit(adv.whiten_advantages)(a, mask), np.float64)
    np.testing.assert_allclose(w[mask].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(w[mask].std(ddof=1), 1.0, rtol=1e-5)
    assert np.all(w[~mask] == 0)


def test_reinforce_baseline():
    s = np.array([1.0, 2.0, 4.0], np.float32)
    np.testing.assert_allclose(adv.reinforce_baseline_advantages(s, 2.0), [-1.0, 0.0, 2.0])


def test_rloo_leave_one_out_loop():
    rng = np.random.default_rng(5)
    s = rng.normal(size=(4, 5)).astype(np.float32)
    valid = np.ones((4, 5), bool)
    valid[1, 3:] = False
    valid[2, 1:] = False  # a single sample: no baseline, advantage 0
    s_garbage = np.where(valid, s, np.nan).astype(np.float32)
    got = np.asarray(jax.jit(adv.rloo_advantages)(s_garbage, valid))
    for b in range(4):
        for i in range(5):
            others = [s[b, j] for j in range(5) if j != i and valid[b, j]]
            if not valid[b, i] or not others:
                assert got[b, i] == 0
            else:
                np.testing.assert_allclose(got[b, i], s[b, i] - np.mean(np.float64(others)), rtol=1e-5, atol=1e-6)
    full = np.asarray(jax.jit(adv.rloo_advantages)(s))
    np.testing.assert_allclose(full.sum(1), 0.0, atol=1e-5)  # LOO advantages sum to zero per group
    with pytest.raises(ValueError, match="N >= 2"):
        adv.rloo_advantages(s[:, :1])


def test_grpo_group_normalisation():
    rng = np.random.default_rng(6)
    s = rng.normal(size=(3, 6)).astype(np.float32)
    s[2] = 1.0  # all samples equal: advantages 0 (no NaN)
    valid = np.ones((3, 6), bool)
    valid[1, 4:] = False
    got = np.asarray(jax.jit(adv.grpo_advantages)(s, valid=valid))
    for b in range(3):
        g = s[b][valid[b]].astype(np.float64)
        want = (g - g.mean()) / (g.std(ddof=1) + 1e-4)
        np.testing.assert_allclose(got[b][valid[b]], want, rtol=1e-4, atol=1e-5)
        assert np.all(got[b][~valid[b]] == 0)
    unscaled = np.asarray(jax.jit(adv.grpo_advantages, static_argnames="scale_std")(s, scale_std=False))
    np.testing.assert_allclose(unscaled, s - s.mean(1, keepdims=True), rtol=1e-5, atol=1e-6)


def test_broadcast_sequence_advantages():
    a = np.array([[1.0, -2.0], [0.5, 3.0]], np.float32)  # [B, N]
    mask = np.random.default_rng(7).random((2, 2, 4)) < 0.5
    got = np.asarray(adv.broadcast_sequence_advantages(a, mask))
    np.testing.assert_array_equal(got, np.where(mask, a[..., None], 0.0))
    with pytest.raises(ValueError, match="advantages"):
        adv.broadcast_sequence_advantages(a, mask[0])
