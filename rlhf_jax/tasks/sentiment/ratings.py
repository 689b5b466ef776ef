"""Built-in real data: 23,703 sentences with human sentiment ratings (Hutto & Gilbert 2014).

Provenance. The ICWSM-2014 VADER data set ships inside the source distribution of the PyPI
package ``vaderSentiment==3.3.2`` as ``additional_resources/hutto_ICWSM_2014.tar.gz``. It is
fetched with the ordinary package client (``pip download --no-deps --no-binary :all:``) into a
cache directory (``$RLHF_JAX_CACHE`` or ``~/.cache/rlhf_jax``), checked against a pinned
SHA-256, and read from the archive in memory: nothing from the data is written into the
repository or unpacked on disk.

Licence and citation. MIT licence (the vaderSentiment package, © C.J. Hutto). Cite:
C.J. Hutto and E. Gilbert, "VADER: A Parsimonious Rule-based Model for Sentiment Analysis of
Social Media Text", Eighth International AAAI Conference on Weblogs and Social Media
(ICWSM-14), Ann Arbor, MI, June 2014.

Contents (four domains, each a ``*_GroundTruth.txt`` with ``id \\t mean \\t text`` and a
``*_anonDataRatings.txt`` with ``id \\t mean \\t std \\t [raw ratings]``; tab-separated, CRLF,
UTF-8, ``amazonReviewSnippets_anonDataRatings.txt`` starts with a BOM and lists its ids in a
different order, so the files are joined by id):

=================  ==============================  =========  =========================
domain             file prefix                     sentences  ratings per sentence
=================  ==============================  =========  =========================
movie_reviews      movieReviewSnippets             10,605     15-29 (Rotten Tomatoes)
tweets             tweets                           4,200     20, or 92-99 for 1,000
editorials         nytEditorialSnippets             5,190     20 (NYT opinion)
product_reviews    amazonReviewSnippets             3,708     20 (Hu & Liu 2004)
=================  ==============================  =========  =========================

Each rating is an integer on -4 (extremely negative) .. +4 (extremely positive). ``mean`` is
the published ground-truth mean (``*_GroundTruth.txt``). It equals the mean of the raw ratings
except for 199 of the 1,000 heavily rated tweets, whose ground truth differs from the mean of
the listed ratings; ``ratings`` keeps the raw list unchanged.

Splits (:func:`split_sentiment_ratings`): 80 / 10 / 10 % train / validation / test per domain,
drawn with a fixed seed over *groups* so that no source document and no duplicated text spans
two splits: a group is one editorial or one product review (the id prefix before ``_``) or one
snippet (movies, tweets), merged with every group sharing an identical (case- and
whitespace-normalised) text. Groups are assigned in a seeded random order until each split
holds its share of sentences.

Derived RLHF records (SFT, preferences, rankings, prompts) are built by
``rlhf_jax.tasks.sentiment.records``.

The VADER rule-based analyser (the ``vaderSentiment`` package itself) is an independent judge
of generated text that reward models never see.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import json
import os
import pathlib
import tarfile
from collections.abc import Sequence

import numpy as np

from rlhf_jax.assets import PinnedAsset, fetch

PACKAGE = "vaderSentiment"
VERSION = "3.3.2"
SDIST_NAME = f"{PACKAGE}-{VERSION}.tar.gz"
#: SHA-256 of the PyPI sdist (checked after every download and before every read).
SDIST_SHA256 = "5d7c06e027fc8b99238edb0d53d970cf97066ef97654009890b83703849632f9"
ARCHIVE_MEMBER = f"{PACKAGE}-{VERSION}/additional_resources/hutto_ICWSM_2014.tar.gz"

#: domain -> (file prefix inside the archive, expected number of sentences)
DOMAINS: dict[str, tuple[str, int]] = {
    "movie_reviews": ("movieReviewSnippets", 10_605),
    "tweets": ("tweets", 4_200),
    "editorials": ("nytEditorialSnippets", 5_190),
    "product_reviews": ("amazonReviewSnippets", 3_708),
}
TOTAL_SENTENCES = 23_703

SPLITS = ("train", "validation", "test")


@dataclasses.dataclass(frozen=True)
class SentimentRating:
    """One rated sentence.

    Attributes:
      id: the sentence id within its domain (``"17"``, or ``"<document>_<sentence>"`` for
        editorials and product reviews).
      domain: ``movie_reviews``, ``tweets``, ``editorials`` or ``product_reviews``.
      text: the sentence.
      mean: the published mean human rating, on -4 (negative) .. +4 (positive).
      ratings: the raw integer ratings of the individual raters.
    """

    id: str
    domain: str
    text: str
    mean: float
    ratings: tuple[int, ...]

    @property
    def group(self) -> str:
        """Source document: the id prefix before ``_`` for editorials / product reviews."""
        if self.domain in ("editorials", "product_reviews") and "_" in self.id:
            return self.id.split("_", 1)[0]
        return self.id

    @property
    def num_words(self) -> int:
        """Whitespace-separated words."""
        return len(self.text.split())


# --------------------------------------------------------------------------- fetching


#: The sdist that carries the ratings (fetched, never installed).
SDIST = PinnedAsset(package=PACKAGE, version=VERSION, kind="sdist", filename=SDIST_NAME,
                    sha256=SDIST_SHA256, description="Hutto & Gilbert 2014 ratings, 2.5 MB")


def fetch_sdist(cache_dir: str | os.PathLike | None = None) -> pathlib.Path:
    """Path of the cached ``vaderSentiment-3.3.2.tar.gz``, downloading it with pip if needed.

    ``rlhf_jax.assets.fetch(SDIST, cache_dir)``: ``python -m pip download --no-deps
    --no-binary :all: vaderSentiment==3.3.2`` (the package index is the only network access),
    SHA-256 checked, under an inter-process lock.

    Args:
      cache_dir: cache root (default ``$RLHF_JAX_CACHE`` or ``~/.cache/rlhf_jax``).

    Returns:
      ``<cache_dir>/vaderSentiment-3.3.2/vaderSentiment-3.3.2.tar.gz``.

    Raises:
      RuntimeError: pip failed (its output is included) or the file's SHA-256 differs.
    """
    return fetch(SDIST, cache_dir)


def _read_lines(data: bytes) -> list[list[str]]:
    """Tab-split lines of a CRLF, UTF-8 (optionally BOM-prefixed) file."""
    text = data.decode("utf-8-sig")
    lines = text.split("\n")
    if lines and lines[-1].strip() == "":
        lines.pop()
    return [line.rstrip("\r").split("\t") for line in lines]


def parse_archive(sdist_path: str | os.PathLike) -> list[SentimentRating]:
    """Parse the ratings out of the vaderSentiment sdist (no files are extracted to disk).

    Args:
      sdist_path: the ``vaderSentiment-3.3.2.tar.gz`` from :func:`fetch_sdist`.

    Returns:
      All 23,703 :class:`SentimentRating`, domain by domain (order of :data:`DOMAINS`),
      in each domain in ground-truth file order.

    Raises:
      ValueError: the archive's layout or contents differ from what is expected (a line
        with the wrong number of fields, ids that do not match between the two files of a
        domain, unexpected counts), naming the file and line.
    """
    with tarfile.open(sdist_path, "r:gz") as outer:
        inner_bytes = outer.extractfile(ARCHIVE_MEMBER).read()
    out: list[SentimentRating] = []
    with tarfile.open(fileobj=io.BytesIO(inner_bytes), mode="r:gz") as inner:
        names = {pathlib.PurePosixPath(m.name).name: m for m in inner.getmembers() if m.isfile()}
        for domain, (prefix, expected) in DOMAINS.items():
            gt_name, raw_name = f"{prefix}_GroundTruth.txt", f"{prefix}_anonDataRatings.txt"
            for n in (gt_name, raw_name):
                if n not in names:
                    raise ValueError(f"{sdist_path}: {n} missing from hutto_ICWSM_2014.tar.gz")
            gt = _read_lines(inner.extractfile(names[gt_name]).read())
            raw = _read_lines(inner.extractfile(names[raw_name]).read())
            ratings: dict[str, tuple[int, ...]] = {}
            for i, fields in enumerate(raw, start=1):
                if len(fields) != 4:
                    raise ValueError(f"{raw_name}:{i}: {len(fields)} tab-separated fields, "
                                     "expected 4 (id, mean, std, [ratings])")
                r = json.loads(fields[3])
                if not r or not all(isinstance(x, int) and -4 <= x <= 4 for x in r):
                    raise ValueError(f"{raw_name}:{i}: ratings {fields[3][:60]!r}, expected a "
                                     "list of integers in -4..4")
                ratings[fields[0]] = tuple(r)
            seen = set()
            for i, fields in enumerate(gt, start=1):
                if len(fields) != 3:
                    raise ValueError(f"{gt_name}:{i}: {len(fields)} tab-separated fields, "
                                     "expected 3 (id, mean, text)")
                sid, mean, text = fields
                if sid not in ratings:
                    raise ValueError(f"{gt_name}:{i}: id {sid!r} has no raw ratings in "
                                     f"{raw_name}")
                seen.add(sid)
                out.append(SentimentRating(id=sid, domain=domain, text=text.strip(),
                                           mean=float(mean), ratings=ratings[sid]))
            if len(gt) != expected or seen != set(ratings):
                raise ValueError(f"{gt_name}: {len(gt)} sentences ({len(ratings)} rated), "
                                 f"expected {expected} in both files")
    if len(out) != TOTAL_SENTENCES:
        raise ValueError(f"{sdist_path}: {len(out)} sentences, expected {TOTAL_SENTENCES}")
    return out


@functools.lru_cache(maxsize=4)
def _parse_cached(path: str, mtime: float) -> tuple[SentimentRating, ...]:
    return tuple(parse_archive(path))


def fetch_sentiment_ratings(cache_dir: str | os.PathLike | None = None) -> list[SentimentRating]:
    """Fetch (once) and parse the Hutto & Gilbert (2014) sentiment ratings.

    Args:
      cache_dir: cache root (default ``$RLHF_JAX_CACHE`` or ``~/.cache/rlhf_jax``).

    Returns:
      The 23,703 :class:`SentimentRating` (see the module docstring for the layout).

    Raises:
      RuntimeError: the download failed or the file's checksum is wrong.
      ValueError: the archive's contents are not as expected.
    """
    path = fetch_sdist(cache_dir)
    return list(_parse_cached(str(path), path.stat().st_mtime))


# --------------------------------------------------------------------------- splits


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def split_sentiment_ratings(ratings: Sequence[SentimentRating], *, seed: int = 0,
                            fractions: tuple[float, float, float] = (0.8, 0.1, 0.1)
                            ) -> dict[str, list[SentimentRating]]:
    """Disjoint train / validation / test splits, per domain, by document and duplicate text.

    Args:
      ratings: the output of :func:`fetch_sentiment_ratings`.
      seed: split seed (the default 0 defines the library's standard splits).
      fractions: shares of sentences per domain for ``train``, ``validation``, ``test``.

    Returns:
      ``{"train": [...], "validation": [...], "test": [...]}``, each in input order.

    Raises:
      ValueError: fractions that are negative or do not sum to 1.
    """
    if len(fractions) != 3 or min(fractions) < 0 or abs(sum(fractions) - 1) > 1e-9:
        raise ValueError(f"fractions={fractions}: expected 3 non-negative numbers summing to 1")
    assignment: dict[int, str] = {}
    for d, domain in enumerate(DOMAINS):
        idx = [i for i, r in enumerate(ratings) if r.domain == domain]
        # union-find over (document group, normalised text)
        parent = list(range(len(idx)))

        def find(a):
            while parent[a] != a:
                parent[a] = parent[parent[a]]
                a = parent[a]
            return a

        first: dict[str, int] = {}
        for local, i in enumerate(idx):
            for key in ("g:" + ratings[i].group, "t:" + _norm(ratings[i].text)):
                if key in first:
                    ra, rb = find(first[key]), find(local)
                    if ra != rb:
                        parent[max(ra, rb)] = min(ra, rb)
                else:
                    first[key] = local
        groups: dict[int, list[int]] = {}
        for local in range(len(idx)):
            groups.setdefault(find(local), []).append(local)
        roots = sorted(groups)
        rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, d])))
        targets = np.cumsum(fractions) * len(idx)
        count, s = 0, 0
        for g in rng.permutation(len(roots)):
            members = groups[roots[g]]
            while s < 2 and count >= targets[s] - 1e-9:
                s += 1
            for local in members:
                assignment[idx[local]] = SPLITS[s]
            count += len(members)
    out: dict[str, list[SentimentRating]] = {s: [] for s in SPLITS}
    for i, r in enumerate(ratings):
        out[assignment[i]].append(r)
    return out


def load_sentiment_split(split: str, *, cache_dir: str | os.PathLike | None = None,
                         seed: int = 0) -> list[SentimentRating]:
    """One split (``train`` / ``validation`` / ``test``) of the ratings, fetching if needed."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}, expected one of {SPLITS}")
    return split_sentiment_ratings(fetch_sentiment_ratings(cache_dir), seed=seed)[split]
