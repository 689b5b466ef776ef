"""kl.py: estimator expectations computed exactly by enumerating small categoricals."""
import itertools

import jax
import numpy as np
import pytest

from rlhf_jax.losses import kl

kl_estimate = jax.jit(kl.kl_estimate, static_argnames="estimator")


def _categorical(V, seed):
    x = np.random.default_rng(seed).normal(size=V)
    return np.exp(x) / np.exp(x).sum()


def _expectation(p, q, estimator):
    """E_{y~p}[k(y)] by enumerating every y: the estimator evaluated at each outcome, p-weighted."""
    vals = np.asarray(kl_estimate(np.log(p).astype(np.float32), np.log(q).astype(np.float32),
                                  estimator=estimator), np.float64)
    return np.sum(p * vals)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_k1_and_k3_are_unbiased(seed):
    p, q = _categorical(6, seed), _categorical(6, seed + 10)
    exact = np.sum(p * np.log(p / q))
    np.testing.assert_allclose(_expectation(p, q, "k1"), exact, rtol=1e-5)
    np.testing.assert_allclose(_expectation(p, q, "k3"), exact, rtol=1e-5)


def test_k2_expectation_closed_form_and_second_order_accuracy():
    p, q = _categorical(5, 3), _categorical(5, 4)
    np.testing.assert_allclose(_expectation(p, q, "k2"), 0.5 * np.sum(p * np.log(p / q) ** 2), rtol=1e-5)
    # For q = p·exp(ε v) / Z, E_p[k2] - KL = O(ε³) while KL = O(ε²): the relative error is O(ε).
    v = np.random.default_rng(5).normal(size=5)
    rel = []
    for eps in (0.1, 0.01):
        q = p * np.exp(eps * v)
        q /= q.sum()
        exact = np.sum(p * np.log(p / q))
        e2 = _expectation(p, q, "k2")
        np.testing.assert_allclose(e2, 0.5 * np.sum(p * np.log(p / q) ** 2), rtol=1e-3)
        rel.append(abs(e2 - exact) / exact)
    assert rel[0] < 0.2 and rel[1] < rel[0] / 5


def test_signs_and_zero_at_equality():
    d = np.linspace(-5, 5, 41).astype(np.float32)
    zero = np.zeros_like(d)
    assert np.all(np.asarray(kl_estimate(d, zero, estimator="k2")) >= 0)
    assert np.all(np.asarray(kl_estimate(d, zero, estimator="k3")) >= 0)
    for e in ("k1", "k2", "k3"):
        assert np.all(np.asarray(kl_estimate(d, d, estimator=e)) == 0)
    with pytest.raises(ValueError, match="estimator"):
        kl.kl_estimate(d, d, "k4")


@pytest.mark.parametrize("estimator", ["k1", "k3"])
def test_sequence_kl_is_unbiased_for_the_sequence_kl(estimator):
    """Two-token sequences from a small autoregressive model: E_π[Σ_t k_t] = KL(π(y1,y2) || ρ(y1,y2))."""
    V = 3
    rng = np.random.default_rng(6)
    norm = lambda x: np.exp(x) / np.exp(x).sum(-1, keepdims=True)
    p1, q1 = norm(rng.normal(size=V)), norm(rng.normal(size=V))
    p2, q2 = norm(rng.normal(size=(V, V))), norm(rng.normal(size=(V, V)))  # [y1, y2]
    seqs = np.array(list(itertools.product(range(V), repeat=2)))
    logp = np.stack([np.log(p1[seqs[:, 0]]), np.log(p2[seqs[:, 0], seqs[:, 1]])], 1)
    ref = np.stack([np.log(q1[seqs[:, 0]]), np.log(q2[seqs[:, 0], seqs[:, 1]])], 1)
    prob = np.exp(logp.sum(1))
    # A padding column holding garbage must be masked out.
    logp_pad = np.concatenate([logp, np.full((len(seqs), 1), 7.0)], 1).astype(np.float32)
    ref_pad = np.concatenate([ref, np.full((len(seqs), 1), -9.0)], 1).astype(np.float32)
    mask = np.array([True, True, False])[None].repeat(len(seqs), 0)
    est = np.asarray(jax.jit(kl.sequence_kl, static_argnames="estimator")(
        logp_pad, ref_pad, mask, estimator=estimator), np.float64)
    exact = np.sum(prob * (logp.sum(1) - ref.sum(1)))
    np.testing.assert_allclose(np.sum(prob * est), exact, rtol=1e-5)


def test_kl_from_logits_exact():
    rng = np.random.default_rng(7)
    a, b = rng.normal(size=(2, 3, 6)).astype(np.float32), rng.normal(size=(2, 3, 6)).astype(np.float32)
    got = np.asarray(jax.jit(kl.kl_from_logits)(a, b))
    for i in range(2):
        for j in range(3):
            p = np.exp(a[i, j].astype(np.float64)); p /= p.sum()
            q = np.exp(b[i, j].astype(np.float64)); q /= q.sum()
            np.testing.assert_allclose(got[i, j], np.sum(p * np.log(p / q)), rtol=1e-4, atol=1e-6)
    # A banned token (-inf in both) contributes nothing.
    a[0, 0, 0] = b[0, 0, 0] = -np.inf
    assert np.all(np.isfinite(np.asarray(jax.jit(kl.kl_from_logits)(a, b))))
