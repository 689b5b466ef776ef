"""Fixtures of the task tests: the tiny ChatML tokenizer of the data tests, the asset cache."""

from __future__ import annotations

import os
import pathlib

import pytest

from data._tok import CHATML_TEMPLATE, build_tokenizer  # tests/data/_tok.py (tests/ on sys.path)


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """Byte-level BPE (vocab 400) with a ChatML template; eos <|im_end|>, pad <|endoftext|>."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_chatml"), template=CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def sentiment_cache(tmp_path_factory) -> pathlib.Path:
    """``$RLHF_JAX_CACHE`` when set (shared between runs), else one temp dir per test run."""
    env = os.environ.get("RLHF_JAX_CACHE")
    if env:
        return pathlib.Path(env)
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):  # share one download between xdist workers
        root = root.parent
    path = root / "rlhf_jax_cache"
    path.mkdir(exist_ok=True)
    return path
