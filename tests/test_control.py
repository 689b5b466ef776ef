"""control.py: KL controllers (closed form, direction, clipping, closed loop) and running moments."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax import control


def test_fixed_controller_never_moves():
    s = control.fixed_kl_init(0.05)
    assert s.kl_coef.dtype == jnp.float32
    s2 = control.fixed_kl_update(s, jnp.float32(100.0), 256)
    assert float(s2.kl_coef) == pytest.approx(0.05)
    c = control.KLController(kind="fixed", init_kl_coef=0.05)
    assert float(c.update(c.init(), 100.0, 256).kl_coef) == pytest.approx(0.05)


@pytest.mark.parametrize("kl,expected_error", [
    (7.0, 7.0 / 6.0 - 1.0),   # inside the band
    (5.0, 5.0 / 6.0 - 1.0),
    (60.0, 0.2),              # far above target: error clipped at +0.2
    (0.0, -0.2),              # far below target: clipped at -0.2
])
def test_adaptive_update_closed_form(kl, expected_error):
    target, horizon, n = 6.0, 10000.0, 512
    s = control.adaptive_kl_init(0.2)
    upd = jax.jit(functools.partial(control.adaptive_kl_update, target=target, horizon=horizon))
    s2 = upd(s, jnp.float32(kl), jnp.int32(n))
    np.testing.assert_allclose(s2.kl_coef, 0.2 * (1 + expected_error * n / horizon), rtol=1e-6)
    if kl > target:
        assert float(s2.kl_coef) > 0.2
    elif kl < target:
        assert float(s2.kl_coef) < 0.2


def test_adaptive_closed_loop_converges_to_target():
    """A toy policy whose KL falls as β rises (KL = 1/β): the controller settles at β = 1/target."""
    c = control.KLController(kind="adaptive", init_kl_coef=0.05, target=2.0, horizon=100.0)

    @jax.jit
    def run(state):
        def body(s, _):
            return c.update(s, 1.0 / s.kl_coef, 20), None
        return jax.lax.scan(body, state, None, length=300)[0]

    final = run(c.init())
    np.testing.assert_allclose(final.kl_coef, 0.5, rtol=1e-3)


def test_controller_validation_and_hashability():
    with pytest.raises(ValueError, match="target"):
        control.KLController(kind="adaptive", init_kl_coef=0.1, horizon=10.0)
    with pytest.raises(ValueError, match="horizon"):
        control.KLController(kind="adaptive", init_kl_coef=0.1, target=6.0, horizon=0.0)
    with pytest.raises(ValueError, match="kind"):
        control.KLController(kind="pid")
    with pytest.raises(ValueError, match="no target"):
        control.KLController(kind="fixed", target=6.0)
    with pytest.raises(ValueError, match="target"):
        control.adaptive_kl_update(control.adaptive_kl_init(0.1), 1.0, 1, target=0.0, horizon=1.0)
    c = control.KLController(kind="adaptive", init_kl_coef=0.1, target=6.0, horizon=1e4)
    assert hash(c) == hash(control.KLController(kind="adaptive", init_kl_coef=0.1, target=6.0, horizon=1e4))


def test_running_moments_batches_equal_one_shot():
    rng = np.random.default_rng(0)
    batches = [rng.normal(loc=3.0, scale=2.0, size=(n,)).astype(np.float32) for n in (5, 17, 1, 40)]
    masks = [rng.random(b.shape) < 0.7 for b in batches]
    masks[2][:] = False  # an empty batch leaves the state unchanged
    upd = jax.jit(control.running_moments_update)
    s = control.running_moments_init()
    seen = []
    for x, m in zip(batches, masks):
        s = upd(s, x, m)
        seen.append(x[m].astype(np.float64))
        allx = np.concatenate(seen)
        np.testing.assert_allclose(s.count, len(allx))
        np.testing.assert_allclose(s.mean, allx.mean(), rtol=1e-5)
        s64 = control.RunningMoments(*(np.float64(v) for v in s))  # accessors work on NumPy too
        np.testing.assert_allclose(control.running_moments_var(s64), allx.var(ddof=1), rtol=1e-4)
        np.testing.assert_allclose(control.running_moments_std(s64, unbiased=False), allx.std(), rtol=1e-4)


def test_running_moments_large_offset_is_stable_and_2d_input():
    rng = np.random.default_rng(1)
    x = (rng.normal(size=(6, 50)) + 1e4).astype(np.float32)  # large mean, unit variance
    s = control.running_moments_init()
    upd = jax.jit(control.running_moments_update)
    for i in range(0, 6, 2):
        s = upd(s, x[i:i + 2])  # [2, 50] batches, no mask
    ref = x.astype(np.float64)
    np.testing.assert_allclose(s.mean, ref.mean(), rtol=1e-6)
    np.testing.assert_allclose(control.running_moments_var(s), ref.var(ddof=1), rtol=1e-2)
