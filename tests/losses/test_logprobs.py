"""logprobs.py: the one-token shift, entropies, masked statistics, metric pairs.

References are float64 NumPy loops written independently of the library.
"""
import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import logprobs as lp

# Jitted once per module: exercises jit-ability and avoids op-by-op compilation in tests.
sequence_logprobs = jax.jit(lp.sequence_logprobs)
gather_logprobs = jax.jit(lp.gather_logprobs)
entropy_from_logits = jax.jit(lp.entropy_from_logits, static_argnames="shift")
masked_sum = jax.jit(lp.masked_sum, static_argnames="axis")
masked_mean = jax.jit(lp.masked_mean, static_argnames="axis")
masked_var = jax.jit(lp.masked_var, static_argnames=("unbiased", "axis"))
whiten = jax.jit(lp.whiten, static_argnames="shift_mean")
aggregate_loss = jax.jit(lp.aggregate_loss, static_argnames="reduction")


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _rand(shape, seed=0, scale=2.0):
    return np.random.default_rng(seed).normal(size=shape).astype(np.float32) * scale


def test_sequence_logprobs_matches_shifted_loop():
    B, T, V = 3, 6, 11
    logits = _rand((B, T, V))
    tokens = np.random.default_rng(1).integers(0, V, size=(B, T)).astype(np.int32)
    got = np.asarray(sequence_logprobs(jnp.asarray(logits), jnp.asarray(tokens)))
    want = np.zeros((B, T))
    for b in range(B):
        for t in range(1, T):
            want[b, t] = _np_log_softmax(logits[b, t - 1])[tokens[b, t]]
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
    assert np.all(got[:, 0] == 0)


def test_sequence_logprobs_leading_dims_and_temperature():
    B, N, T, V = 2, 3, 5, 7
    logits = _rand((B, N, T, V), seed=2)
    tokens = np.random.default_rng(3).integers(0, V, size=(B, N, T)).astype(np.int32)
    tau = 0.7
    got = np.asarray(sequence_logprobs(jnp.asarray(logits), jnp.asarray(tokens), temperature=tau))
    for b in range(B):
        for n in range(N):
            for t in range(1, T):
                want = _np_log_softmax(logits[b, n, t - 1] / tau)[tokens[b, n, t]]
                np.testing.assert_allclose(got[b, n, t], want, rtol=1e-5, atol=1e-5)


def test_sequence_logprobs_bf16_computed_in_float32():
    B, T, V = 2, 4, 9
    logits = jnp.asarray(_rand((B, T, V), seed=4)).astype(jnp.bfloat16)
    tokens = jnp.asarray(np.random.default_rng(5).integers(0, V, size=(B, T)), jnp.int32)
    got = sequence_logprobs(logits, tokens)
    assert got.dtype == jnp.float32
    got, tokens = np.asarray(got), np.asarray(tokens)
    ref = np.asarray(logits.astype(jnp.float32))  # the bf16 values, exactly
    for b in range(B):
        for t in range(1, T):
            want = _np_log_softmax(ref[b, t - 1])[tokens[b, t]]
            np.testing.assert_allclose(got[b, t], want, rtol=1e-6, atol=1e-6)


def test_gather_logprobs_no_shift_and_out_of_range_ids_are_finite():
    B, R, V = 2, 4, 5
    logits = _rand((B, R, V), seed=6)
    targets = np.array([[0, 4, 2, 1], [3, 3, -1, 99]], np.int32)  # -1 / 99: padding ids
    got = np.asarray(gather_logprobs(jnp.asarray(logits), jnp.asarray(targets)))
    for b in range(B):
        for r in range(R):
            if 0 <= targets[b, r] < V:
                want = _np_log_softmax(logits[b, r])[targets[b, r]]
                np.testing.assert_allclose(got[b, r], want, rtol=1e-5, atol=1e-5)
    assert np.all(np.isfinite(got))


def test_shape_mismatch_raises():
    with pytest.raises(ValueError, match="tokens shape"):
        lp.sequence_logprobs(jnp.zeros((2, 4, 3)), jnp.zeros((2, 5), jnp.int32))


def test_entropy_shifted_and_unshifted():
    B, T, V = 2, 5, 6
    logits = _rand((B, T, V), seed=7)
    logits[0, 1, 2] = -np.inf  # a banned vocabulary entry must not give NaN
    def ent(row):
        logq = _np_log_softmax(row)
        keep = np.isfinite(logq)
        return -np.sum(np.exp(logq[keep]) * logq[keep])

    un = np.asarray(entropy_from_logits(jnp.asarray(logits), shift=False))
    sh = np.asarray(entropy_from_logits(jnp.asarray(logits), shift=True))
    for b in range(B):
        for t in range(T):
            np.testing.assert_allclose(un[b, t], ent(logits[b, t]), rtol=1e-5, atol=1e-6)
            if t >= 1:
                np.testing.assert_allclose(sh[b, t], ent(logits[b, t - 1]), rtol=1e-5, atol=1e-6)
    assert np.all(sh[:, 0] == 0) and np.all(np.isfinite(un))
    # Uniform logits have entropy log V.
    np.testing.assert_allclose(entropy_from_logits(jnp.zeros((V,)), shift=False), np.log(V), rtol=1e-6)


def test_masked_stats_equal_numpy_on_selected_entries():
    x = _rand((4, 7), seed=8).astype(np.float64)
    mask = np.random.default_rng(9).random((4, 7)) < 0.6
    mask[2] = False  # a fully masked row
    sel = x[mask]
    np.testing.assert_allclose(masked_sum(x, mask), sel.sum(), rtol=1e-5)
    np.testing.assert_allclose(masked_mean(x, mask), sel.mean(), rtol=1e-5)
    np.testing.assert_allclose(masked_var(x, mask), sel.var(ddof=1), rtol=1e-5)
    np.testing.assert_allclose(masked_var(x, mask, unbiased=False), sel.var(), rtol=1e-5)
    rows = np.asarray(masked_mean(x, mask, axis=1))
    for b in range(4):
        np.testing.assert_allclose(rows[b], x[b][mask[b]].mean() if mask[b].any() else 0.0, rtol=1e-5)
    row_var = np.asarray(masked_var(x, mask, axis=1))
    for b in range(4):
        want = x[b][mask[b]].var(ddof=1) if mask[b].sum() > 1 else 0.0
        np.testing.assert_allclose(row_var[b], want, rtol=1e-5, atol=1e-7)


def test_masked_stats_ignore_nan_in_masked_slots_and_empty_mask():
    x = jnp.array([1.0, jnp.nan, 3.0, jnp.inf])
    mask = jnp.array([True, False, True, False])
    assert float(masked_mean(x, mask)) == 2.0
    assert float(masked_var(x, mask)) == 2.0
    none = jnp.zeros(4, bool)
    for v in (masked_sum(x, none), masked_mean(x, none), masked_var(x, none)):
        assert float(v) == 0.0
    g = jax.grad(lambda y: lp.masked_mean(y, mask))(x)
    assert np.all(np.isfinite(np.asarray(g)))


def test_whiten_mean_zero_var_one_over_masked_entries():
    x = _rand((3, 8), seed=10) + 5.0
    mask = np.random.default_rng(11).random((3, 8)) < 0.7
    y = np.asarray(whiten(jnp.asarray(x), jnp.asarray(mask)), np.float64)
    np.testing.assert_allclose(y[mask].mean(), 0.0, atol=1e-6)
    np.testing.assert_allclose(y[mask].var(ddof=1), 1.0, rtol=1e-5)
    assert np.all(y[~mask] == 0)
    # shift_mean=False keeps the mean and still rescales to unit variance.
    z = np.asarray(whiten(jnp.asarray(x), jnp.asarray(mask), shift_mean=False), np.float64)
    np.testing.assert_allclose(z[mask].mean(), x[mask].astype(np.float64).mean(), rtol=1e-5)
    np.testing.assert_allclose(z[mask].var(ddof=1), 1.0, rtol=1e-5)


def test_aggregate_loss_token_and_sequence_against_numpy():
    loss = _rand((4, 6), seed=12).astype(np.float64) ** 2
    mask = np.random.default_rng(13).random((4, 6)) < 0.5
    mask[1] = False
    tok, (s, c) = aggregate_loss(loss, mask, reduction="token")
    np.testing.assert_allclose(tok, loss[mask].mean(), rtol=1e-5)
    np.testing.assert_allclose(float(s) / float(c), loss[mask].mean(), rtol=1e-5)
    seq, (s2, c2) = aggregate_loss(loss, mask, reduction="sequence")
    per_seq = [loss[b][mask[b]].mean() for b in range(4) if mask[b].any()]
    np.testing.assert_allclose(seq, np.mean(per_seq), rtol=1e-5)
    assert float(c2) == len(per_seq)
    with pytest.raises(ValueError, match="reduction"):
        lp.aggregate_loss(loss, mask, reduction="batch")
    with pytest.raises(ValueError, match="num_sequences"):
        lp.aggregate_loss(loss, mask, reduction="token", num_sequences=3)


def test_aggregate_loss_global_denominators_make_microbatches_add_up():
    loss = _rand((6, 5), seed=14) ** 2
    mask = np.random.default_rng(15).random((6, 5)) < 0.6
    mask[0] = False
    for red, kw in (("token", "num_tokens"), ("sequence", "num_sequences")):
        full, (_, count) = aggregate_loss(loss, mask, reduction=red)
        parts = [aggregate_loss(loss[i:i + 2], mask[i:i + 2], reduction=red, **{kw: count})[0]
                 for i in range(0, 6, 2)]
        np.testing.assert_allclose(sum(parts), full, rtol=1e-5)


def test_metrics_pairs_add_and_reduce():
    a = {"x": lp.metric(jnp.array([1.0, 2.0, 3.0])), "y": lp.metric(jnp.array(4.0))}
    b = {"x": lp.metric(jnp.array([10.0, 20.0]), jnp.array([True, False])), "z": (jnp.array(1.0), jnp.array(0.0))}
    out = lp.reduce_metrics(lp.add_metrics(a, b))
    np.testing.assert_allclose(out["x"], (1 + 2 + 3 + 10) / 4)
    np.testing.assert_allclose(out["y"], 4.0)
    np.testing.assert_allclose(out["z"], 1.0)  # count clamps at 1


def test_jit_traces_once_per_shape():
    f = jax.jit(chex.assert_max_traces(lp.sequence_logprobs, n=1))
    t = jnp.zeros((2, 4), jnp.int32)
    f(jnp.zeros((2, 4, 3)), t)
    f(jnp.ones((2, 4, 3)), t + 1)


def test_gradients_ignore_nan_in_masked_slots():
    x = jnp.array([[1.0, jnp.nan, 3.0], [0.5, 2.0, jnp.inf]])
    mask = jnp.array([[True, False, True], [True, True, False]])
    for f in (lambda y: lp.masked_var(y, mask), lambda y: jnp.sum(lp.whiten(y, mask) ** 3)):
        g = np.asarray(jax.jit(jax.grad(f))(x))
        assert np.all(np.isfinite(g)) and np.all(g[~np.asarray(mask)] == 0)
