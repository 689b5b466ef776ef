"""Tokenizer loading (``transformers.AutoTokenizer``) with the checks RLHF code relies on.

The library pads batches itself (left for prompts, ``rlhf_jax.data``), so a tokenizer only
needs a pad *id*; when it has none, the EOS token is used (the usual choice for causal LMs,
harmless because padded positions are masked everywhere).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)


def load_tokenizer(path: str | os.PathLike, **kwargs):
    """``AutoTokenizer.from_pretrained(path)`` with a pad token guaranteed.

    Args:
      path: a local tokenizer / checkpoint directory (e.g. ``fetch_smollm2()``); hub names
        also work where a network is available.
      **kwargs: forwarded to ``from_pretrained``.

    Returns:
      The tokenizer; ``pad_token`` is set (to ``eos_token`` if the files had none, logged).

    Raises:
      FileNotFoundError: ``path`` looks local but does not exist.
      ValueError: the tokenizer has neither a pad nor an EOS token.
    """
    from transformers import AutoTokenizer

    p = Path(path).expanduser()
    if not p.exists() and (p.is_absolute() or str(path).startswith((".", "~"))):
        raise FileNotFoundError(f"tokenizer directory {p} does not exist")
    tok = AutoTokenizer.from_pretrained(str(p) if p.exists() else str(path), **kwargs)
    if tok.pad_token is None:
        if tok.eos_token is None:
            raise ValueError(f"tokenizer at {path} has neither a pad nor an EOS token; set one "
                             "(tokenizer.pad_token = ...)")
        tok.pad_token = tok.eos_token
        log.info("tokenizer at %s has no pad token; using its EOS token %r (id %d) for padding",
                 path, tok.eos_token, tok.pad_token_id)
    return tok


def eos_token_ids(tokenizer, generation_config: str | os.PathLike | None = None) -> tuple[int, ...]:
    """Token ids that end a response: the tokenizer's EOS plus any ``eos_token_id`` listed in
    a ``generation_config.json`` (a file or the directory holding it).

    Returns:
      Sorted unique ids (at least one).

    Raises:
      ValueError: no EOS id found anywhere.
    """
    ids = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    if generation_config is not None:
        g = Path(generation_config)
        g = g / "generation_config.json" if g.is_dir() else g
        if g.is_file():
            with open(g) as f:
                eos = json.load(f).get("eos_token_id")
            if eos is not None:
                ids.update(int(i) for i in (eos if isinstance(eos, list) else [eos]))
    if not ids:
        raise ValueError("no EOS token id: the tokenizer has no eos_token and no "
                         "generation_config eos_token_id was given")
    return tuple(sorted(ids))
