"""Iterated RLHF's simulated raters (``rlhf_jax.pipeline.refresh``): Bradley-Terry labels on
the gold reward, and the comparison batches the refreshed reward model trains on. (The
refresh inside the RL stage, with resume mid-round, is tested in ``test_pipeline.py``.)"""

import numpy as np
import pytest

from rlhf_jax.pipeline.refresh import bradley_terry_labels, preference_batch


def test_labels_follow_the_bradley_terry_probability():
    rng = np.random.default_rng(0)
    n = 200_000
    gap = np.repeat([0.0, 0.05, 0.1, 0.3], n // 4)
    labels = bradley_terry_labels(gap, np.zeros_like(gap), 0.1, rng)
    for g in (0.0, 0.05, 0.1, 0.3):
        p = 1.0 / (1.0 + np.exp(-g / 0.1))  # closed form
        freq = labels[gap == g].mean()
        se = np.sqrt(p * (1 - p) / (n // 4))
        assert abs(freq - p) < 5 * se, (g, freq, p)


def test_labels_at_low_temperature_are_the_gold_preference_and_are_seeded():
    a = np.array([0.9, -0.2, 0.4, 0.0])
    b = np.array([0.1, 0.5, 0.39, 0.3])
    got = bradley_terry_labels(a, b, 1e-4, np.random.default_rng(1))
    np.testing.assert_array_equal(got, a > b)
    x = bradley_terry_labels(a, b, 1.0, np.random.default_rng(7))
    np.testing.assert_array_equal(x, bradley_terry_labels(a, b, 1.0, np.random.default_rng(7)))
    with pytest.raises(ValueError, match="temperature=0"):
        bradley_terry_labels(a, b, 0, np.random.default_rng(0))
    with pytest.raises(ValueError, match="shapes"):
        bradley_terry_labels(a, b[:2], 1.0, np.random.default_rng(0))


def test_preference_batch_positions_follow_left_padding():
    mask = np.array([[[0, 0, 1, 1, 1], [0, 1, 1, 1, 0]]], bool)
    tokens = np.arange(10).reshape(1, 2, 5) * mask
    batch = preference_batch(tokens, mask)
    np.testing.assert_array_equal(batch.positions[0, 0], [0, 0, 0, 1, 2])
    np.testing.assert_array_equal(batch.positions[0, 1], [0, 0, 1, 2, 2])
    assert batch.valid.all() and batch.tokens.dtype == np.int32
