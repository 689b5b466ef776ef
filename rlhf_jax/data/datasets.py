"""From a source and a tokenizer to tokenised data sets and iterators of typed batches.

Typical use::

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = DataConfig(batch_size=32, buckets=(128, 256, 512), seed=0)
    ds = load_sft("train.jsonl", tok, cfg)          # validates + tokenises everything once
    print(ds.stats.summary())                        # seen / kept / skipped per reason
    it = ds.batches(cfg)                             # BatchIterator of SFTBatch
    batch = next(it)
    ckpt["data"] = it.state_dict()                   # {"epoch": 0, "index": 32, ...}
    ...
    it = ds.batches(cfg, state=ckpt["data"])         # continues with the same next batch

Data sets are tokenised eagerly and held in host memory (ids are ``int32``; a million
512-token examples is 2 GB). Every process loads the whole set and
:class:`~rlhf_jax.data.batching.BatchIterator` hands each its slice of the global batch.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from rlhf_jax.data.batching import (
    BatchIterator,
    collate_preferences,
    collate_prompts,
    collate_sft,
)
from rlhf_jax.data.config import DataConfig
from rlhf_jax.data.records import (
    DataStats,
    RecordError,
    handle,
    parse_preference,
    parse_prompt,
    parse_sft,
)
from rlhf_jax.data.sources import iter_source, source_name
from rlhf_jax.data.tokenize import (
    ChatTokenizer,
    PreferenceExample,
    SFTExample,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)

log = logging.getLogger(__name__)


class _Dataset:
    """Tokenised examples, their locations, lengths and loading stats."""

    supports_invalid_rows = True

    def __init__(self, examples: list, locations: list[str], stats: DataStats,
                 buckets: tuple[int, ...], pad_id: int):
        self.examples = examples
        self.locations = locations
        self.stats = stats
        self.buckets = tuple(buckets)
        self.pad_id = int(pad_id)
        #: ``[n] int32`` tokens of each example's longest sequence (for bucketing).
        self.lengths = np.asarray([len(e) for e in examples], dtype=np.int32)

    def __len__(self) -> int:
        return len(self.examples)

    def __getitem__(self, i: int):
        return self.examples[i]

    def batches(self, cfg: DataConfig, *, state: Mapping[str, Any] | None = None,
                process_index: int = 0, process_count: int = 1) -> BatchIterator:
        """A :class:`BatchIterator` over this data set with ``cfg``'s batch size, seed, shuffle,
        remainder policy and epochs, optionally restored from ``state`` (see
        :meth:`BatchIterator.state_dict`)."""
        it = BatchIterator(self, batch_size=cfg.batch_size, seed=cfg.seed, shuffle=cfg.shuffle,
                           remainder=cfg.remainder, num_epochs=cfg.num_epochs,
                           process_index=process_index, process_count=process_count)
        if state is not None:
            it.load_state_dict(dict(state))
        return it


class SFTDataset(_Dataset):
    """Tokenised demonstrations; ``collate`` gives right-padded ``SFTBatch`` es."""

    examples: list[SFTExample]

    def collate(self, indices: np.ndarray, valid: np.ndarray, length: int):
        """``SFTBatch`` of the examples at ``indices`` padded to ``length`` (see collate_sft)."""
        return collate_sft([self.examples[i] for i in indices], valid, length, self.pad_id)


class PreferenceDataset(_Dataset):
    """Tokenised comparisons; ``collate`` gives ``PreferenceBatch`` es with ``N`` candidates.

    Attributes:
      num_candidates: ``N``, fixed for the data set (``DataConfig.num_candidates`` or the
        largest number of responses of any record).
    """

    examples: list[PreferenceExample]

    def __init__(self, *args, num_candidates: int, **kwargs):
        super().__init__(*args, **kwargs)
        self.num_candidates = int(num_candidates)

    def collate(self, indices: np.ndarray, valid: np.ndarray, length: int):
        """``PreferenceBatch`` ``[B, N, T]`` of the examples at ``indices``."""
        return collate_preferences([self.examples[i] for i in indices], valid, length,
                                   self.num_candidates, self.pad_id)


class PromptDataset(_Dataset):
    """Tokenised RL prompts; ``collate`` gives left-padded ``PromptBatch`` es.

    ``PromptBatch`` has no per-row mask, so a batch cannot carry filler rows: use
    ``remainder="wrap"`` (one stream of epochs, the default for prompts) or ``"drop"``.
    """

    examples: list[np.ndarray]
    supports_invalid_rows = False

    def collate(self, indices: np.ndarray, valid: np.ndarray, length: int):
        """``PromptBatch`` ``[B, P]`` (left-padded) of the prompts at ``indices``."""
        return collate_prompts([self.examples[i] for i in indices], length, self.pad_id)

    def batches(self, cfg: DataConfig, **kwargs) -> BatchIterator:
        """As :meth:`_Dataset.batches`; ``remainder="pad"`` is read as ``"wrap"`` for prompts."""
        if cfg.remainder == "pad":
            cfg = dataclasses.replace(cfg, remainder="wrap")
        return super().batches(cfg, **kwargs)


def _encoder(tokenizer: Any, cfg: DataConfig) -> ChatTokenizer:
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    return ChatTokenizer(tokenizer, use_chat_template=cfg.use_chat_template,
                         end_of_turn_token=cfg.end_of_turn_token, add_bos=cfg.add_bos)


def _load(source: Any, parse: Callable, tokenize: Callable, cfg: DataConfig, max_length: int,
          name: str | None, progress: bool | None, desc: str):
    name = name or source_name(source)
    stats = DataStats(source=name)
    examples, locations = [], []
    for loc, raw in tqdm(iter_source(source, name=name), desc=f"{desc} {name}", unit=" rec",
                         disable=True if progress is False else None, leave=False):
        stats.seen += 1
        try:
            if isinstance(raw, RecordError):
                raise raw
            examples.append(tokenize(parse(raw, loc, cfg.field_map), max_length))
            locations.append(loc)
            stats.kept += 1
        except RecordError as err:
            handle(err, stats, cfg.skip_invalid)
    if stats.num_skipped:
        log.warning("skipped invalid records:\n%s", stats.summary())
    if not examples:
        raise ValueError(f"{name}: no usable records; expected at least one.\n{stats.summary()}")
    return examples, locations, stats


def load_sft(source: Any, tokenizer: Any, cfg: DataConfig, *, name: str | None = None,
             progress: bool | None = None) -> SFTDataset:
    """Read, validate and tokenise SFT records (prompt/completion or chat ``messages``).

    Args:
      source: a ``.jsonl``/``.parquet`` path, ``datasets.Dataset``, ``TFDSSource``, TFDS data
        source or list of dicts (see ``sources.iter_source``).
      tokenizer: a ``transformers`` tokenizer (or a ``ChatTokenizer``).
      cfg: ``max_length = cfg.buckets[-1]``, chat template, skip policy, field names.
      name: name for locations and stats (default: the path / data set name).
      progress: show a tqdm bar (``None``: only on a terminal).

    Returns:
      An :class:`SFTDataset`; its ``stats`` count seen / kept / skipped records.

    Raises:
      RecordError: an invalid record (file and line in the message) unless
        ``cfg.skip_invalid``.
      ValueError: no record survived.
    """
    tok = _encoder(tokenizer, cfg)
    ex, locs, stats = _load(source, parse_sft, lambda r, m: tokenize_sft(r, tok, m), cfg,
                            cfg.max_length, name, progress, "SFT")
    return SFTDataset(ex, locs, stats, cfg.buckets, tok.pad_id)


def load_preferences(source: Any, tokenizer: Any, cfg: DataConfig, *, name: str | None = None,
                     progress: bool | None = None) -> PreferenceDataset:
    """Read, validate and tokenise preference records (pairs or best-first rankings).

    Args: as :func:`load_sft`; ``cfg.num_candidates`` fixes ``N`` (default: the largest
      number of responses in the data).

    Returns:
      A :class:`PreferenceDataset`.

    Raises:
      RecordError: an invalid record, unless ``cfg.skip_invalid``; a record with more than
        ``cfg.num_candidates`` responses is invalid (reason ``bad_value``).
      ValueError: no record survived.
    """
    tok = _encoder(tokenizer, cfg)

    def parse(raw, loc, field_map):
        rec = parse_preference(raw, loc, field_map)
        if cfg.num_candidates is not None and len(rec.responses) > cfg.num_candidates:
            raise RecordError(loc, "bad_value",
                              f"{len(rec.responses)} responses, more than num_candidates="
                              f"{cfg.num_candidates}; expected at most num_candidates")
        return rec

    ex, locs, stats = _load(source, parse, lambda r, m: tokenize_preference(r, tok, m), cfg,
                            cfg.max_length, name, progress, "preferences")
    n = cfg.num_candidates or max(len(e.responses) for e in ex)
    return PreferenceDataset(ex, locs, stats, cfg.buckets, tok.pad_id, num_candidates=n)


def load_prompts(source: Any, tokenizer: Any, cfg: DataConfig, *, name: str | None = None,
                 progress: bool | None = None) -> PromptDataset:
    """Read, validate and tokenise RL prompts (``max_length = cfg.prompt_buckets[-1]``).

    Args: as :func:`load_sft`. With ``cfg.use_chat_template=False`` and
      ``cfg.field_map={"prompt": "opening"}`` the sentiment prompt set gives raw openings
      for a base model to continue.

    Returns:
      A :class:`PromptDataset` (its ``buckets`` are ``cfg.prompt_buckets``).

    Raises:
      RecordError: an invalid record, unless ``cfg.skip_invalid``.
      ValueError: no record survived.
    """
    tok = _encoder(tokenizer, cfg)
    ex, locs, stats = _load(source, parse_prompt, lambda r, m: tokenize_prompt(r, tok, m), cfg,
                            cfg.max_prompt_length, name, progress, "prompts")
    return PromptDataset(ex, locs, stats, cfg.prompt_buckets, tok.pad_id)
