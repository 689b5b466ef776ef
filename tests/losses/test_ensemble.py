"""Ensemble aggregations and WARM weight averaging (``rlhf_jax.losses.ensemble``) against
float64 NumPy references."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses import ensemble as E


def _scores(k=5, b=7, seed=0):
    rng = np.random.default_rng(seed)
    s = rng.normal(size=(k, b)) * rng.uniform(0.1, 3.0, size=(1, b))
    s[:, 0] = 1.25  # members agree on sequence 0: std 0
    return s


def _ref(name, s, lam):
    mean = s.mean(axis=0)
    var = ((s - mean) ** 2).sum(axis=0) / s.shape[0]  # population variance, ddof 0
    return {"mean": mean, "min": s.min(axis=0), "mean_minus_std": mean - lam * np.sqrt(var),
            "mean_minus_var": mean - lam * var}[name]


@pytest.mark.parametrize("name", ["mean", "min", "mean_minus_std", "mean_minus_var"])
@pytest.mark.parametrize("lam", [0.0, 0.7])
def test_aggregations_match_float64_numpy(name, lam):
    s = _scores()
    out = E.aggregate(jnp.asarray(s, jnp.float32), name, lam)
    assert out.shape == (7,) and out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), _ref(name, s, lam), rtol=1e-5, atol=1e-5)
    # The registry holds the same functions, and they run under jit with lam as an array.
    jitted = jax.jit(E.AGGREGATIONS[name])(jnp.asarray(s, jnp.float32), jnp.asarray(lam))
    np.testing.assert_allclose(np.asarray(jitted), _ref(name, s, lam), rtol=1e-5, atol=1e-5)


def test_member_std_is_the_population_std_and_k1_is_the_identity():
    s = _scores()
    np.testing.assert_allclose(np.asarray(E.member_std(jnp.asarray(s))), s.std(axis=0, ddof=0),
                               rtol=1e-5, atol=1e-6)
    assert float(E.member_std(jnp.asarray(s))[0]) == 0.0
    one = _scores(k=1)
    for name in E.AGGREGATIONS:
        np.testing.assert_allclose(np.asarray(E.aggregate(jnp.asarray(one), name, 2.0)), one[0],
                                   rtol=1e-6)
    # Conservative aggregations never exceed the mean; min is the most conservative of mean/min.
    mean = E.aggregate(jnp.asarray(s), "mean")
    for name in ("min", "mean_minus_std", "mean_minus_var"):
        assert np.all(np.asarray(E.aggregate(jnp.asarray(s), name, 0.5)) <= np.asarray(mean) + 1e-6)


def test_aggregation_errors():
    assert set(E.AGGREGATIONS) == {"mean", "min", "mean_minus_std", "mean_minus_var"}
    with pytest.raises(ValueError, match=r"unknown ensemble aggregation 'median'; expected one of "
                                         r"mean, mean_minus_std, mean_minus_var, min"):
        E.aggregate(jnp.zeros((2, 3)), "median")
    with pytest.raises(ValueError, match=r"scores must be \[K, B\] with K >= 1 members, got shape "
                                         r"\(3,\)"):
        E.aggregate(jnp.zeros((3,)), "mean")
    with pytest.raises(ValueError, match=r"got shape \(0, 3\)"):
        E.member_std(jnp.zeros((0, 3)))


def _members(k=3, seed=0, dtype=np.float32):
    rng = np.random.default_rng(seed)
    return [{"trunk": {"w": rng.normal(size=(4, 3)).astype(dtype),
                       "blocks": {"b": rng.normal(size=(2, 5)).astype(dtype)}},
             "value_head": {"kernel": rng.normal(size=(3,)).astype(dtype),
                            "bias": np.asarray(rng.normal(), dtype)}} for _ in range(k)]


def test_warm_average_of_a_list_and_of_stacked_params_is_the_numpy_mean():
    members = _members()
    ref = jax.tree.map(lambda *xs: np.mean(np.stack(xs).astype(np.float64), axis=0), *members)
    for given in (members, tuple(members),
                  jax.tree.map(lambda *xs: jnp.stack(xs), *members)):  # stacked [K, ...]
        avg = E.warm_average(given)
        assert jax.tree.structure(avg) == jax.tree.structure(members[0])
        for a, r, m in zip(jax.tree.leaves(avg), jax.tree.leaves(ref), jax.tree.leaves(members[0])):
            assert a.shape == m.shape and a.dtype == m.dtype
            np.testing.assert_allclose(np.asarray(a), r, rtol=1e-6, atol=1e-6)
    # bfloat16 leaves: averaged in float32, returned in bfloat16.
    bf = [jax.tree.map(lambda x: jnp.asarray(x, jnp.bfloat16), m) for m in members]
    avg = E.warm_average(bf)
    for a, r in zip(jax.tree.leaves(avg), jax.tree.leaves(ref)):
        assert a.dtype == jnp.bfloat16
        np.testing.assert_allclose(np.asarray(a, np.float64), r, rtol=2e-2, atol=2e-2)
    # One member: itself.
    one = E.warm_average(members[:1])
    for a, m in zip(jax.tree.leaves(one), jax.tree.leaves(members[0])):
        np.testing.assert_array_equal(np.asarray(a), m)


def test_warm_average_errors():
    members = _members()
    with pytest.raises(ValueError, match="no member parameters given"):
        E.warm_average([])
    other = dict(members[1], extra={"x": np.zeros(2, np.float32)})
    with pytest.raises(ValueError, match="member 1's parameter tree differs from member 0's"):
        E.warm_average([members[0], other])
    wrong = jax.tree.map(lambda x: x, members[2])
    wrong["trunk"]["w"] = np.zeros((4, 4), np.float32)
    with pytest.raises(ValueError, match=r"\['trunk'\]\['w'\] is float32\[4, 3\] in member 0 but "
                                         r"float32\[4, 4\] in member 2"):
        E.warm_average(members[:2] + [wrong])
    with pytest.raises(ValueError, match=r"same leading member axis K; got leading sizes"):
        E.warm_average({"a": np.zeros((3, 2), np.float32), "b": np.zeros((2,), np.float32)})
    with pytest.raises(ValueError, match=r"\['n'\] has dtype int32; only float parameters"):
        E.warm_average([{"n": np.zeros(2, np.int32)}, {"n": np.ones(2, np.int32)}])
