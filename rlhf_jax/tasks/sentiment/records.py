"""RLHF records derived from the human sentiment ratings of ``ratings`` (Hutto & Gilbert 2014).

The human ratings turned into RLHF data, as in the "positive continuation" task of Ziegler et
al. 2019, §4.1, but with human instead of classifier judgements:

* SFT (:func:`sentiment_sft_records`): ``{"prompt": instruction, "completion": snippet}`` with
  one neutral instruction per domain (:data:`INSTRUCTIONS`).
* Preferences (:func:`sentiment_preference_records`): two snippets of the same domain whose
  human means differ by at least ``margin``; the more positive one is ``chosen``, the prompt
  is the domain's (neutral) instruction, so the preference — write positive text — is
  learned from the comparisons alone. K-way rankings (:func:`sentiment_ranking_records`) sort
  K snippets by mean, best first, all pairwise gaps ``>= margin``.
* Unpaired (:func:`sentiment_unpaired_records`, KTO): ``{"prompt", "completion", "label"}``,
  each snippet labelled desirable when its human mean rating is positive and undesirable
  when it is negative (the sign of the same ratings the comparisons are drawn from).
* Prompts (:func:`sentiment_prompt_records`): the first words of held-out snippets, both as a
  chat instruction (``"Continue this movie review: <opening>"``, field ``prompt``, from
  :data:`CONTINUE`) and raw (field ``opening``, for a base model to continue).

Build them from one split of ``ratings.split_sentiment_ratings`` (held-out splits for prompts).
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence

import numpy as np

from rlhf_jax.tasks.sentiment.ratings import SentimentRating, _norm

#: Neutral writing instructions per domain (SFT and preference prompts).
INSTRUCTIONS: dict[str, str] = {
    "movie_reviews": "Write a sentence from a movie review.",
    "tweets": "Write a tweet.",
    "editorials": "Write a sentence from a newspaper editorial.",
    "product_reviews": "Write a sentence from a product review.",
}

#: Continuation instructions per domain (RL prompts): ``f"{CONTINUE[domain]} {opening}"``.
CONTINUE: dict[str, str] = {
    "movie_reviews": "Continue this movie review:",
    "tweets": "Continue this tweet:",
    "editorials": "Continue this newspaper editorial:",
    "product_reviews": "Continue this product review:",
}


def _filter(ratings: Iterable[SentimentRating], min_words: int, max_words: int,
            domains: Sequence[str] | None) -> list[SentimentRating]:
    return [r for r in ratings if min_words <= r.num_words <= max_words
            and (domains is None or r.domain in domains)]


def sentiment_sft_records(ratings: Sequence[SentimentRating], *, min_words: int = 4,
                          max_words: int = 40, min_mean: float | None = None,
                          domains: Sequence[str] | None = None) -> list[dict]:
    """SFT records: the snippet as the response to its domain's writing instruction.

    Args:
      ratings: sentences (usually one split).
      min_words, max_words: keep snippets with this many words (inclusive).
      min_mean: keep only snippets at least this positive (``None``: all, so the SFT policy
        is sentiment-neutral and RL/DPO has something to improve).
      domains: restrict to these domains.

    Returns:
      ``[{"prompt", "completion", "domain", "id", "mean"}, ...]`` in input order.
    """
    rs = _filter(ratings, min_words, max_words, domains)
    return [{"prompt": INSTRUCTIONS[r.domain], "completion": r.text, "domain": r.domain,
             "id": r.id, "mean": r.mean}
            for r in rs if min_mean is None or r.mean >= min_mean]


def _by_domain(rs: Sequence[SentimentRating]) -> dict[str, list[SentimentRating]]:
    out: dict[str, list[SentimentRating]] = {}
    for r in rs:
        out.setdefault(r.domain, []).append(r)
    return out


def sentiment_preference_records(ratings: Sequence[SentimentRating], *, margin: float = 1.0,
                                 pairs_per_snippet: int = 1, seed: int = 0, min_words: int = 4,
                                 max_words: int = 40,
                                 domains: Sequence[str] | None = None) -> list[dict]:
    """Pairwise human preferences: same-domain snippets whose means differ by ``>= margin``.

    Each snippet is paired with ``pairs_per_snippet`` partners drawn uniformly (seeded) among
    the snippets of its domain whose mean is at least ``margin`` away; duplicate pairs and
    pairs of identical texts are dropped. The more positive snippet is ``chosen``.

    Args:
      ratings: sentences (usually one split).
      margin: minimum difference of mean ratings (on the -4..4 scale).
      pairs_per_snippet: partners drawn per snippet.
      seed: sampling seed.
      min_words, max_words: keep snippets with this many words.
      domains: restrict to these domains.

    Returns:
      ``[{"prompt", "chosen", "rejected", "domain", "chosen_mean", "rejected_mean",
      "chosen_id", "rejected_id"}, ...]``, ``chosen_mean - rejected_mean >= margin``.
    """
    if margin <= 0:
        raise ValueError(f"margin={margin}, expected > 0")
    out = []
    for d, (domain, rs) in enumerate(sorted(_by_domain(_filter(ratings, min_words, max_words,
                                                                domains)).items())):
        order = sorted(range(len(rs)), key=lambda i: (rs[i].mean, rs[i].id))
        means = np.asarray([rs[i].mean for i in order])
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, d])))
        seen = set()
        for a in range(len(order)):
            m = means[a]
            n_low = int(np.searchsorted(means, m - margin, side="right"))
            hi_start = int(np.searchsorted(means, m + margin, side="left"))
            n_eligible = n_low + len(order) - hi_start
            for _ in range(pairs_per_snippet):
                if n_eligible == 0:
                    break
                u = int(rng.integers(n_eligible))
                b = u if u < n_low else hi_start + (u - n_low)
                hi, lo = (rs[order[a]], rs[order[b]]) if means[a] > means[b] else \
                    (rs[order[b]], rs[order[a]])
                key = (hi.id, lo.id)
                if key in seen or hi.mean - lo.mean < margin or _norm(hi.text) == _norm(lo.text):
                    continue
                seen.add(key)
                out.append({"prompt": INSTRUCTIONS[domain], "chosen": hi.text,
                            "rejected": lo.text, "domain": domain, "chosen_mean": hi.mean,
                            "rejected_mean": lo.mean, "chosen_id": hi.id, "rejected_id": lo.id})
    return out


def sentiment_ranking_records(ratings: Sequence[SentimentRating], *, k: int = 4,
                              margin: float = 1.0, num_rankings: int | None = None,
                              seed: int = 0, min_words: int = 4, max_words: int = 40,
                              domains: Sequence[str] | None = None) -> list[dict]:
    """K-way rankings (InstructGPT-style): K same-domain snippets sorted by mean, best first.

    Each ranking is drawn greedily: a random snippet, then repeatedly a random snippet whose
    mean is at least ``margin`` from every one already chosen; draws that cannot reach K are
    discarded. All pairwise gaps in a ranking are therefore ``>= margin``.

    Args:
      ratings: sentences (usually one split).
      k: snippets per ranking (``N`` of the preference batch).
      margin: minimum gap between any two means of a ranking.
      num_rankings: rankings to draw per domain (default: snippets in the domain // k).
      seed: sampling seed.
      min_words, max_words: keep snippets with this many words.
      domains: restrict to these domains.

    Returns:
      ``[{"prompt", "responses": [best..worst], "means": [...], "ids": [...], "domain"}]``.
    """
    if k < 2:
        raise ValueError(f"k={k}, expected >= 2")
    out = []
    for d, (domain, rs) in enumerate(sorted(_by_domain(_filter(ratings, min_words, max_words,
                                                                domains)).items())):
        order = sorted(range(len(rs)), key=lambda i: (rs[i].mean, rs[i].id))
        means = np.asarray([rs[i].mean for i in order])
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 1000 + d])))
        for _ in range(num_rankings if num_rankings is not None else len(rs) // k):
            avail = np.ones(len(order), dtype=bool)
            picked: list[int] = []
            for _ in range(k):
                cand = np.flatnonzero(avail)
                if len(cand) == 0:
                    break
                c = int(cand[rng.integers(len(cand))])
                picked.append(c)
                lo = np.searchsorted(means, means[c] - margin, side="right")
                hi = np.searchsorted(means, means[c] + margin, side="left")
                avail[lo:hi] = False
            if len(picked) < k:
                continue
            items = sorted((rs[order[c]] for c in picked), key=lambda r: -r.mean)
            gaps_ok = all(a.mean - b.mean >= margin for a, b in zip(items, items[1:]))
            texts = {_norm(r.text) for r in items}
            if not gaps_ok or len(texts) < k:
                continue
            out.append({"prompt": INSTRUCTIONS[domain], "responses": [r.text for r in items],
                        "means": [r.mean for r in items], "ids": [r.id for r in items],
                        "domain": domain})
    return out


def sentiment_unpaired_records(ratings: Sequence[SentimentRating], *, threshold: float = 0.0,
                               min_words: int = 4, max_words: int = 40,
                               domains: Sequence[str] | None = None) -> list[dict]:
    """Unpaired examples for KTO: each snippet as the completion of its domain's instruction,
    labelled by the sign of its human mean rating.

    Desirable: ``mean > threshold``; undesirable: ``mean < -threshold``; snippets in between
    (a mean of exactly 0 at the default) carry no binary signal and are left out.

    Args:
      ratings: sentences (usually one split).
      threshold: ``>= 0``, the dead zone around 0 on the -4..4 scale.
      min_words, max_words: keep snippets with this many words.
      domains: restrict to these domains.

    Returns:
      ``[{"prompt", "completion", "label", "domain", "id", "mean"}, ...]`` in input order.
    """
    if threshold < 0:
        raise ValueError(f"threshold={threshold}, expected >= 0")
    return [{"prompt": INSTRUCTIONS[r.domain], "completion": r.text, "label": r.mean > 0,
             "domain": r.domain, "id": r.id, "mean": r.mean}
            for r in _filter(ratings, min_words, max_words, domains) if abs(r.mean) > threshold]


_WORD = re.compile(r"\S+")


def sentiment_prompt_records(ratings: Sequence[SentimentRating], *, opening_words: int = 5,
                             min_words: int = 8, max_words: int = 40,
                             domains: Sequence[str] | None = None) -> list[dict]:
    """RL prompts: the opening words of snippets, to be continued (use held-out splits).

    Args:
      ratings: sentences (usually the validation or test split).
      opening_words: words kept as the opening (a verbatim prefix of the snippet).
      min_words: only snippets with at least this many words (so the opening is a prefix of
        a longer sentence), at most ``max_words``.
      domains: restrict to these domains.

    Returns:
      ``[{"prompt": "Continue this movie review: <opening>", "opening": "<opening>",
      "domain", "id", "mean"}, ...]``: ``prompt`` for chat models, ``opening`` for a base
      model (``field_map={"prompt": "opening"}``, ``use_chat_template=False``).
    """
    if opening_words < 1 or min_words <= opening_words:
        raise ValueError(f"need 1 <= opening_words={opening_words} < min_words={min_words}")
    out = []
    for r in _filter(ratings, min_words, max_words, domains):
        # the verbatim prefix of the snippet up to the end of its ``opening_words``-th word
        opening = r.text[: list(_WORD.finditer(r.text))[opening_words - 1].end()]
        out.append({"prompt": f"{CONTINUE[r.domain]} {opening}", "opening": opening,
                    "domain": r.domain, "id": r.id, "mean": r.mean})
    return out


def random_subset(records: Sequence[dict], n: int | None, *, seed: int = 0) -> list[dict]:
    """``n`` of ``records`` drawn uniformly without replacement (seeded), in their original
    order; all of them when ``n`` is ``None`` or not smaller than their number. (The
    preference records come sorted by domain and human mean, so their first ``n`` would be
    the most negative snippets' pairs, not a sample.)

    Raises:
      ValueError: ``n < 1``.
    """
    if n is None or n >= len(records):
        return list(records)
    if n < 1:
        raise ValueError(f"random_subset: n={n}, expected >= 1 or None")
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, 0x5EED])))
    keep = np.sort(rng.choice(len(records), size=n, replace=False))
    return [records[i] for i in keep]


__all__ = ["CONTINUE", "INSTRUCTIONS", "random_subset", "sentiment_preference_records",
           "sentiment_prompt_records", "sentiment_ranking_records", "sentiment_sft_records",
           "sentiment_unpaired_records"]
