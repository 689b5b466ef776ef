"""The LM head's matmul in a bfloat16 compute dtype (``rlhf_jax.models.model.lm_head_matmul``):
float32 logits, gradients within bfloat16 rounding of a float64 reference, and a backward
whose matmuls take bfloat16 operands (the point of it: no float32 GEMM over ``[tokens, V]``)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.models.model import lm_head_matmul


def _inputs(w_axes, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(2, 5, 16))
    w = rng.normal(size=(40, 16) if w_axes == "vd" else (16, 40)) / 4
    target = rng.integers(0, 40, size=(2, 5))
    return x, w, target


def _loss(logits, target):
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, target[..., None], axis=-1))


def _dot_operand_dtypes(fn, *args):
    """dtypes of the operands of every dot_general in ``fn``'s jaxpr (nested jaxprs too)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if eqn.primitive.name == "dot_general":
                found.append(tuple(v.aval.dtype for v in eqn.invars))
            for p in eqn.params.values():
                inner = getattr(p, "jaxpr", None)
                if inner is not None:
                    walk(getattr(inner, "jaxpr", inner))
    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


@pytest.mark.parametrize("w_axes", ["vd", "dv"])
def test_bfloat16_head_matches_float64_and_its_backward_stays_in_bfloat16(w_axes):
    x, w, target = _inputs(w_axes)
    xb, wb = jnp.asarray(x, jnp.bfloat16), jnp.asarray(w, jnp.bfloat16)

    def loss(xx, ww):
        return _loss(lm_head_matmul(xx, ww, w_axes), target)

    logits = lm_head_matmul(xb, wb, w_axes)
    assert logits.dtype == jnp.float32
    gx, gw = jax.grad(loss, argnums=(0, 1))(xb, wb)
    assert gx.dtype == jnp.bfloat16 and gw.dtype == jnp.bfloat16

    # float64 reference on the same (bfloat16-rounded) inputs
    x64, w64 = np.asarray(xb, np.float64), np.asarray(wb, np.float64)
    z = np.einsum("btd,vd->btv", x64, w64) if w_axes == "vd" else np.einsum("btd,dv->btv",
                                                                            x64, w64)
    np.testing.assert_allclose(np.asarray(logits), z, rtol=1e-5, atol=1e-5)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    dz = p.copy()
    np.put_along_axis(dz, target[..., None], np.take_along_axis(p, target[..., None], -1) - 1, -1)
    dz /= target.size
    if w_axes == "vd":
        ref_gx, ref_gw = np.einsum("btv,vd->btd", dz, w64), np.einsum("btv,btd->vd", dz, x64)
    else:
        ref_gx, ref_gw = np.einsum("btv,dv->btd", dz, w64), np.einsum("btd,btv->dv", x64, dz)
    for got, ref in ((gx, ref_gx), (gw, ref_gw)):
        err = np.abs(np.asarray(got, np.float64) - ref).max() / np.abs(ref).max()
        assert err < 2e-2, err  # bfloat16 has 8 mantissa bits: ~4e-3 relative per rounding

    dtypes = _dot_operand_dtypes(jax.grad(loss, argnums=(0, 1)), xb, wb)
    assert len(dtypes) == 3  # forward, dx, dw
    assert all(d == (jnp.bfloat16, jnp.bfloat16) for d in dtypes), dtypes


@pytest.mark.parametrize("w_axes", ["vd", "dv"])
def test_float32_head_is_the_plain_einsum(w_axes):
    x, w, target = _inputs(w_axes, seed=1)
    xf, wf = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    spec = "...d,vd->...v" if w_axes == "vd" else "...d,dv->...v"

    def ours(xx, ww):
        return _loss(lm_head_matmul(xx, ww, w_axes), target)

    def plain(xx, ww):
        return _loss(jnp.einsum(spec, xx, ww), target)

    for a, b in zip(jax.grad(ours, argnums=(0, 1))(xf, wf), jax.grad(plain, argnums=(0, 1))(xf, wf)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
