"""Fixtures of the data-layer tests: tiny in-memory tokenizers."""

from __future__ import annotations

import pytest

from ._tok import CHATML_TEMPLATE, SMOLLM2_TEMPLATE, build_tokenizer


@pytest.fixture(scope="session")
def tok(tmp_path_factory):
    """Byte-level BPE (vocab 400) with a ChatML template; eos <|im_end|>, pad <|endoftext|>."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_chatml"), template=CHATML_TEMPLATE)


@pytest.fixture(scope="session")
def smol_tok(tmp_path_factory):
    """The same tokenizer with SmolLM2-Instruct's exact template (default system turn)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_smol"), template=SMOLLM2_TEMPLATE)


@pytest.fixture(scope="session")
def plain_tok(tmp_path_factory):
    """The same tokenizer without a chat template (plain concatenation path)."""
    return build_tokenizer(tmp_path_factory.mktemp("tok_plain"), template=None)
