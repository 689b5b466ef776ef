"""Padding sides, buckets, fixed batch size, deterministic order and exact resume."""

from __future__ import annotations

import json

import jax.numpy as jnp
import numpy as np
import pytest

from rlhf_jax.data import (
    BatchConfig,
    BatchIterator,
    bucket_histogram,
    choose_bucket,
    epoch_order,
    load_preferences,
    load_prompts,
    load_sft,
    pad_left,
    pad_right,
    positions_from_mask_np,
)
from rlhf_jax.types import PreferenceBatch, PromptBatch, SFTBatch, positions_from_mask

WORDS = "the quick brown fox jumps over the lazy dog and the film is a delight".split()


def _sft_records(n: int, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng(seed)
    return [{"prompt": " ".join(rng.choice(WORDS, rng.integers(1, 6))),
             "completion": f"{i} " + " ".join(rng.choice(WORDS, rng.integers(1, 20)))}
            for i in range(n)]


def _same(a, b) -> bool:
    return all(np.array_equal(x, y) for x, y in zip(
        (a.tokens, a.attn_mask, a.positions, a.loss_mask), (b.tokens, b.attn_mask, b.positions,
                                                            b.loss_mask)))


def test_choose_bucket_and_histogram():
    buckets = (16, 32, 64)
    assert [choose_bucket(n, buckets) for n in (1, 16, 17, 32, 33, 64)] == [16, 16, 32, 32, 64,
                                                                           64]
    with pytest.raises(ValueError, match="65 tokens.*largest bucket 64"):
        choose_bucket(65, buckets)
    assert bucket_histogram(np.array([3, 20, 20, 64]), buckets) == {16: 1, 32: 2, 64: 1}


def test_pad_sides_and_positions_match_types():
    seqs = [np.array([5, 6, 7]), np.array([8])]
    tok_r, m_r = pad_right(seqs, 5, 0)
    tok_l, m_l = pad_left(seqs, 5, 0)
    assert tok_r.tolist() == [[5, 6, 7, 0, 0], [8, 0, 0, 0, 0]]
    assert tok_l.tolist() == [[0, 0, 5, 6, 7], [0, 0, 0, 0, 8]]
    assert m_l.tolist() == [[False, False, True, True, True], [False] * 4 + [True]]
    for m in (m_r, m_l):
        np.testing.assert_array_equal(positions_from_mask_np(m),
                                      np.asarray(positions_from_mask(jnp.asarray(m))))
    assert positions_from_mask_np(m_l).tolist() == [[0, 0, 0, 1, 2], [0, 0, 0, 0, 0]]


def test_sft_batches_are_right_padded_to_the_smallest_bucket(tok):
    cfg = BatchConfig(batch_size=4, buckets=(32, 48, 64, 128), shuffle=False)
    ds = load_sft(_sft_records(10), tok, cfg)
    for b, batch in enumerate(ds.batches(dataclass_replace(cfg, num_epochs=1))):
        assert isinstance(batch, SFTBatch)
        rows = np.arange(b * 4, min(b * 4 + 4, 10))
        longest = ds.lengths[rows].max()
        assert batch.tokens.shape == (4, choose_bucket(longest, cfg.buckets))
        assert batch.tokens.dtype == np.int32 and batch.attn_mask.dtype == bool
        for r, i in enumerate(rows):
            n = ds.lengths[i]
            np.testing.assert_array_equal(batch.tokens[r, :n], ds.examples[i].tokens)
            assert batch.attn_mask[r, :n].all() and not batch.attn_mask[r, n:].any()
            assert (batch.tokens[r, n:] == tok.pad_token_id).all()
            np.testing.assert_array_equal(batch.loss_mask[r, :n], ds.examples[i].loss_mask)
            assert not batch.loss_mask[r, n:].any()
            assert batch.positions[r, :n].tolist() == list(range(n))


def dataclass_replace(cfg, **kw):
    import dataclasses
    return dataclasses.replace(cfg, **kw)


def test_prompts_are_left_padded(tok):
    cfg = BatchConfig(batch_size=3, prompt_buckets=(16, 32, 64), shuffle=False, num_epochs=1,
                     remainder="drop")
    recs = [{"prompt": "Hi"}, {"prompt": "Tell me about the quick brown fox, please."},
            {"prompt": "The film"}]
    ds = load_prompts(recs, tok, cfg)
    (batch,) = list(ds.batches(cfg))
    assert isinstance(batch, PromptBatch)
    assert batch.tokens.shape == (3, choose_bucket(int(ds.lengths.max()), cfg.prompt_buckets))
    for r, ex in enumerate(ds.examples):
        n = len(ex)
        np.testing.assert_array_equal(batch.tokens[r, -n:], ex)
        assert batch.attn_mask[r, -n:].all() and not batch.attn_mask[r, :-n].any()
        # every prompt ends at the last column with the generation prompt
        assert tok.decode(batch.tokens[r, -5:]).endswith("<|im_start|>assistant\n")
    with pytest.raises(ValueError, match="remainder='pad'"):
        BatchIterator(ds, batch_size=2, remainder="pad")


def test_preference_batches(tok):
    recs = [{"prompt": "Say hi", "chosen": "Hello there!", "rejected": "No."},
            {"prompt": "Rank these", "responses": ["Great", "Fine", "Bad"]}]
    cfg = BatchConfig(batch_size=2, buckets=(16, 32, 64), shuffle=False)
    ds = load_preferences(recs, tok, cfg)
    batch = next(ds.batches(cfg))
    assert isinstance(batch, PreferenceBatch)
    assert batch.tokens.shape == (2, 3, choose_bucket(int(ds.lengths.max()), cfg.buckets))
    assert batch.valid.tolist() == [[True, True, False], [True, True, True]]
    for b, ex in enumerate(ds.examples):
        p = len(ex.prompt)
        for k, resp in enumerate(ex.responses):
            n = p + len(resp)
            np.testing.assert_array_equal(batch.tokens[b, k, :n],
                                          np.concatenate([ex.prompt, resp]))
            assert batch.loss_mask[b, k, p:n].all() and not batch.loss_mask[b, k, :p].any()
            assert not batch.loss_mask[b, k, n:].any() and not batch.attn_mask[b, k, n:].any()
            assert tok.decode(batch.tokens[b, k, p:n]) == recs[b].get(
                "responses", [recs[b].get("chosen"), recs[b].get("rejected")])[k] + "<|im_end|>"
    # the padding candidate of the pair: real tokens, no loss
    assert batch.attn_mask[0, 2].any() and not batch.loss_mask[0, 2].any()
    np.testing.assert_array_equal(batch.positions,
                                  np.asarray(positions_from_mask(jnp.asarray(batch.attn_mask))))


def _take(it, k):
    return [next(it) for _ in range(k)]


@pytest.mark.parametrize("remainder", ["pad", "drop", "wrap"])
def test_deterministic_shuffle_and_exact_resume(tok, remainder):
    cfg = BatchConfig(batch_size=4, buckets=(32, 64, 128), seed=7, remainder=remainder)
    ds = load_sft(_sft_records(10), tok, cfg)
    full = _take(ds.batches(cfg), 12)                       # crosses several epochs
    again = _take(ds.batches(cfg), 12)
    assert all(_same(a, b) for a, b in zip(full, again))    # deterministic
    other = _take(ds.batches(dataclass_replace(cfg, seed=8)), 3)
    assert not all(_same(a, b) for a, b in zip(full, other))
    for k in (1, 2, 3, 5):
        it = ds.batches(cfg)
        _take(it, k)
        state = json.loads(json.dumps(it.state_dict()))     # survives a JSON checkpoint
        assert set(state) >= {"epoch", "index"}
        resumed = ds.batches(cfg, state=state)
        rest = _take(resumed, 12 - k)
        assert all(_same(a, b) for a, b in zip(full[k:], rest)), (remainder, k)
        assert resumed.stats["batches"] == 12


def test_epoch_orders_differ_and_cover_everything():
    a, b = epoch_order(100, 0, 0), epoch_order(100, 0, 1)
    assert sorted(a) == list(range(100)) and not np.array_equal(a, b)
    np.testing.assert_array_equal(a, epoch_order(100, 0, 0))
    np.testing.assert_array_equal(epoch_order(5, 0, 3, shuffle=False), np.arange(5))


def _rows(ds, batch):
    """Map each row of an SFT batch back to its example index (tokens are unique here)."""
    out = []
    for r in range(batch.tokens.shape[0]):
        n = int(batch.attn_mask[r].sum())
        out.append(next(i for i, e in enumerate(ds.examples)
                        if len(e.tokens) == n and np.array_equal(e.tokens, batch.tokens[r, :n])))
    return out


def test_remainder_policies_are_counted(tok):
    cfg = BatchConfig(batch_size=4, buckets=(64, 128), seed=3, num_epochs=2)
    ds = load_sft(_sft_records(10), tok, cfg)
    # pad: 3 batches per epoch; the last one has 2 real rows and 2 zero-loss repeats
    it = ds.batches(cfg)
    batches = list(it)
    assert len(batches) == 6 == 2 * it.batches_per_epoch()
    for e in range(2):
        seen = [i for b in batches[3 * e: 3 * e + 2] for i in _rows(ds, b)]
        last = batches[3 * e + 2]
        seen += _rows(ds, last)[:2]
        assert sorted(seen) == list(range(10))               # every example once per epoch
        assert last.loss_mask[:2].any(axis=1).all() and not last.loss_mask[2:].any()
    assert it.stats["padded_rows"] == 4 and it.stats["rows"] == 20
    # drop: 2 batches per epoch, 2 rows dropped (and counted) per epoch
    it = ds.batches(dataclass_replace(cfg, remainder="drop"))
    batches = list(it)
    assert len(batches) == 4 and it.stats["dropped_rows"] == 4
    assert all(b.loss_mask.any(axis=1).all() for b in batches)
    # wrap: one stream; 20 rows = 5 batches, each example exactly twice
    it = ds.batches(dataclass_replace(cfg, remainder="wrap"))
    batches = list(it)
    rows = [i for b in batches for i in _rows(ds, b)]
    assert len(batches) == 5 and sorted(rows) == sorted(list(range(10)) * 2)
    assert it.stats["padded_rows"] == 0 and it.stats["dropped_rows"] == 0


def test_processes_split_the_global_batch(tok):
    cfg = BatchConfig(batch_size=4, buckets=(32, 64, 128), seed=1)
    ds = load_sft(_sft_records(9), tok, cfg)
    whole = _take(ds.batches(cfg), 5)
    parts = [_take(ds.batches(cfg, process_index=p, process_count=2), 5) for p in range(2)]
    for b in range(5):
        for field in ("tokens", "attn_mask", "positions", "loss_mask"):
            glued = np.concatenate([getattr(parts[0][b], field), getattr(parts[1][b], field)])
            np.testing.assert_array_equal(glued, getattr(whole[b], field))
    with pytest.raises(ValueError, match="multiple of process_count=3"):
        ds.batches(cfg, process_count=3)


def test_state_from_another_dataset_is_rejected(tok):
    cfg = BatchConfig(batch_size=2, buckets=(64, 128))
    it = load_sft(_sft_records(6), tok, cfg).batches(cfg)
    next(it)
    with pytest.raises(ValueError, match="num_examples=6 but this iterator has num_examples=7"):
        load_sft(_sft_records(7), tok, cfg).batches(cfg, state=it.state_dict())


def test_config_validation():
    with pytest.raises(ValueError, match="strictly increasing, got 128 then 64"):
        BatchConfig(batch_size=2, buckets=(128, 64))
    with pytest.raises(ValueError, match="batch_size must be positive, got 0"):
        BatchConfig(batch_size=0)
    with pytest.raises(ValueError, match="remainder"):
        BatchConfig(batch_size=2, remainder="truncate")
    cfg = BatchConfig(batch_size=2, buckets=[16, 32], prompt_buckets=(8,))
    assert cfg.buckets == (16, 32) and cfg.max_length == 32 and cfg.max_prompt_length == 8
