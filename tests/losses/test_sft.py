"""sft.py: masked NLL against a float64 NumPy loop; masked == sliced; microbatches add up."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.losses.sft import sft_loss as _sft_loss

sft_loss = jax.jit(_sft_loss, static_argnames="reduction")


def _np_log_softmax(x):
    x = np.asarray(x, np.float64)
    m = x.max(-1, keepdims=True)
    return x - m - np.log(np.exp(x - m).sum(-1, keepdims=True))


def _batch(B=4, T=7, V=9, seed=0):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=(B, T, V)).astype(np.float32) * 2
    tokens = rng.integers(0, V, size=(B, T)).astype(np.int32)
    mask = rng.random((B, T)) < 0.6
    return logits, tokens, mask


def _np_nll(logits, tokens, mask):
    """Per-sequence lists of (nll, correct) over targets t >= 1."""
    out = []
    for b in range(tokens.shape[0]):
        row = []
        for t in range(1, tokens.shape[1]):
            if mask[b, t]:
                logq = _np_log_softmax(logits[b, t - 1])
                row.append((-logq[tokens[b, t]], float(np.argmax(logits[b, t - 1]) == tokens[b, t])))
        out.append(row)
    return out


def test_token_and_sequence_mean_match_numpy():
    logits, tokens, mask = _batch()
    mask[:, 0] = True  # column 0 can never be a target: it must be ignored
    mask[2] = False
    mask[2, 0] = True  # a row whose only "target" is column 0 has no targets
    rows = _np_nll(logits, tokens, mask)
    flat = [x for r in rows for x in r]
    loss, m = sft_loss(logits, tokens, mask)
    np.testing.assert_allclose(loss, np.mean([n for n, _ in flat]), rtol=1e-5)
    np.testing.assert_allclose(m["sft/loss"][0] / m["sft/loss"][1], loss, rtol=1e-6)
    np.testing.assert_allclose(m["sft/accuracy"][0] / m["sft/accuracy"][1], np.mean([c for _, c in flat]))
    assert float(m["sft/num_tokens"][0]) == len(flat) and float(m["sft/num_tokens"][1]) == 4
    seq, _ = sft_loss(logits, tokens, mask, reduction="sequence")
    np.testing.assert_allclose(seq, np.mean([np.mean([n for n, _ in r]) for r in rows if r]), rtol=1e-5)


def test_masked_equals_sliced_right_padding():
    logits, tokens, mask = _batch(B=3, T=6)
    extra = np.random.default_rng(1).normal(size=(3, 4, 9)).astype(np.float32)
    logits_p = np.concatenate([logits, extra], axis=1)
    tokens_p = np.concatenate([tokens, np.zeros((3, 4), np.int32)], axis=1)
    mask_p = np.concatenate([mask, np.zeros((3, 4), bool)], axis=1)
    for red in ("token", "sequence"):
        a, _ = sft_loss(logits, tokens, mask, reduction=red)
        b, _ = sft_loss(logits_p, tokens_p, mask_p, reduction=red)
        np.testing.assert_allclose(a, b, rtol=1e-6)


@pytest.mark.parametrize("reduction,kw", [("token", "num_targets"), ("sequence", "num_sequences")])
def test_microbatches_with_global_denominator_sum_to_full_batch(reduction, kw):
    logits, tokens, mask = _batch(B=6, T=5, seed=2)
    mask[3] = False
    full_loss, full_m = sft_loss(logits, tokens, mask, reduction=reduction)
    denom = full_m["sft/loss"][1]  # global #targets (token) or #sequences with targets
    grad = jax.jit(jax.grad(lambda lg, t, m, d: _sft_loss(lg, t, m, reduction=reduction, **{kw: d})[0]))
    full_grad = jax.jit(jax.grad(lambda lg: _sft_loss(lg, tokens, mask, reduction=reduction)[0]))(logits)
    total, grads = 0.0, []
    for i in range(0, 6, 2):
        sl = slice(i, i + 2)
        total += sft_loss(logits[sl], tokens[sl], mask[sl], reduction=reduction, **{kw: denom})[0]
        grads.append(grad(logits[sl], tokens[sl], mask[sl], denom))
    np.testing.assert_allclose(total, full_loss, rtol=1e-5)
    np.testing.assert_allclose(np.concatenate(grads), full_grad, rtol=1e-5, atol=1e-7)


def test_fully_masked_batch_is_zero_not_nan():
    logits, tokens, _ = _batch(B=2, T=4)
    mask = np.zeros((2, 4), bool)
    for red in ("token", "sequence"):
        loss, _ = sft_loss(logits, tokens, mask, reduction=red)
        assert float(loss) == 0.0
    g = jax.jit(jax.grad(lambda lg: _sft_loss(lg, tokens, mask)[0]))(logits)
    assert np.all(np.asarray(g) == 0)


def test_no_gradient_into_last_position_and_bf16_ok():
    logits, tokens, mask = _batch(B=2, T=5)
    g = jax.jit(jax.grad(lambda lg: _sft_loss(lg, tokens, mask)[0]))(jnp.asarray(logits))
    assert np.all(np.asarray(g)[:, -1] == 0)  # the last logits predict nothing
    loss16, _ = sft_loss(jnp.asarray(logits, jnp.bfloat16), tokens, mask)
    assert loss16.dtype == jnp.float32


def test_bad_shapes_raise():
    logits, tokens, mask = _batch()
    with pytest.raises(ValueError, match="loss_mask"):
        _sft_loss(logits, tokens, mask[:, :-1])
    with pytest.raises(ValueError, match="num_tokens"):
        _sft_loss(logits, tokens, mask, reduction="sequence", num_targets=3.0)
