"""From a source and a tokenizer to tokenised data sets and iterators of typed batches.

Typical use::

    tok = AutoTokenizer.from_pretrained(model_dir)
    cfg = BatchConfig(batch_size=32, buckets=(128, 256, 512), seed=0)
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

Kinds. :data:`KINDS` names the four record formats; :func:`load_dataset` and
:func:`validate_source` dispatch on it, so a caller can open and check every source of a
multi-stage run before the first stage trains.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np
from tqdm.auto import tqdm

from rlhf_jax.data.batching import (
    BatchIterator,
    collate_preferences,
    collate_prompts,
    collate_sft,
)
from rlhf_jax.data.config import BatchConfig
from rlhf_jax.data.records import (
    DataStats,
    RecordError,
    SourceError,
    handle,
    parse_preference,
    parse_prompt,
    parse_sft,
    parse_unpaired,
)
from rlhf_jax.data.sources import iter_source, source_name
from rlhf_jax.data.unpaired import UnpairedExample, collate_unpaired, tokenize_unpaired
from rlhf_jax.data.tokenize import (
    ChatTokenizer,
    PreferenceExample,
    SFTExample,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)

log = logging.getLogger(__name__)

Kind = Literal["sft", "preferences", "prompts", "unpaired"]
#: The record formats a source can hold (``records`` module docstring).
KINDS: tuple[str, ...] = ("sft", "preferences", "prompts", "unpaired")


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

    def batches(self, cfg: BatchConfig, *, state: Mapping[str, Any] | None = None,
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
      num_candidates: ``N``, fixed for the data set (``BatchConfig.num_candidates`` or the
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


class UnpairedDataset(_Dataset):
    """Tokenised unpaired examples (KTO); ``collate`` gives ``UnpairedBatch`` es whose KL rows
    pair each prompt with the next row's completion (``rlhf_jax.data.unpaired``).

    Attributes:
      labels: ``[n] bool``, True for the desirable examples.
    """

    examples: list[UnpairedExample]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.labels = np.asarray([e.label for e in self.examples], dtype=bool)

    @property
    def num_desirable(self) -> int:
        """``n_D``, the desirable examples."""
        return int(self.labels.sum())

    @property
    def num_undesirable(self) -> int:
        """``n_U``, the undesirable examples."""
        return len(self.labels) - self.num_desirable

    def collate(self, indices: np.ndarray, valid: np.ndarray, length: int):
        """``UnpairedBatch`` ``[B, T]`` of the examples at ``indices`` (``T`` at least
        ``length``, raised to the bucket that fits the mismatched pairs)."""
        return collate_unpaired([self.examples[i] for i in indices], valid, length, self.pad_id,
                                self.buckets)


class PromptDataset(_Dataset):
    """Tokenised RL prompts; ``collate`` gives left-padded ``PromptBatch`` es.

    ``PromptBatch`` has no per-row mask, so a batch cannot carry filler rows: use
    ``remainder="wrap"`` (one stream of epochs, the default for prompts) or ``"drop"``.

    Attributes:
      prefixes: ``prefixes[i]`` is the response prefix of example ``i`` (text pre-filled as
        the start of the assistant's response, whose ids end ``examples[i]``), ``""`` when
        none. A sampled response continues it: the full response text is
        ``prefixes[i] + decode(response)``.
      columns: ``columns[name][i]``, the other fields of example ``i``'s record (``None``
        where a record lacks one), for host reward functions (``rlhf_jax.rewards``).
    """

    examples: list[np.ndarray]
    supports_invalid_rows = False

    def __init__(self, examples: list, locations: list[str], stats: DataStats,
                 buckets: tuple[int, ...], pad_id: int, prefixes: list[str] | None = None,
                 columns: list[Mapping[str, Any]] | None = None):
        super().__init__(examples, locations, stats, buckets, pad_id)
        rows = list(columns) if columns is not None else [{}] * len(examples)
        names = sorted({k for r in rows for k in r})
        self.columns: dict[str, list[Any]] = {k: [r.get(k) for r in rows] for k in names}
        self.prefixes: list[str] = list(prefixes) if prefixes is not None else \
            [""] * len(examples)
        if len(self.prefixes) != len(examples):
            raise ValueError(f"{len(self.prefixes)} prefixes for {len(examples)} prompts; "
                             "expected one per prompt")

    def collate(self, indices: np.ndarray, valid: np.ndarray, length: int):
        """``PromptBatch`` ``[B, P]`` (left-padded) of the prompts at ``indices`` (their rows
        in ``PromptBatch.index``)."""
        batch = collate_prompts([self.examples[i] for i in indices], length, self.pad_id)
        return batch.replace(index=np.asarray(indices, np.int32))

    def batches(self, cfg: BatchConfig, **kwargs) -> BatchIterator:
        """As :meth:`_Dataset.batches`; ``remainder="pad"`` is read as ``"wrap"`` for prompts."""
        if cfg.remainder == "pad":
            cfg = dataclasses.replace(cfg, remainder="wrap")
        return super().batches(cfg, **kwargs)


def _encoder(tokenizer: Any, cfg: BatchConfig) -> ChatTokenizer:
    if isinstance(tokenizer, ChatTokenizer):
        return tokenizer
    return ChatTokenizer(tokenizer, use_chat_template=cfg.use_chat_template,
                         end_of_turn_token=cfg.end_of_turn_token, add_bos=cfg.add_bos)


def _describe(source: Any, name: str) -> str:
    """``name``, followed by the source itself when the name does not already say it."""
    src = source_name(source)
    return name if src == name else f"{name} ({src})"


def _spec(kind: str, tok: ChatTokenizer, cfg: BatchConfig):
    """``(parse, tokenize, max_length, description)`` of a kind of record."""
    if kind == "sft":
        return parse_sft, lambda r, m: tokenize_sft(r, tok, m), cfg.max_length, "SFT"
    if kind == "preferences":
        return (_preference_parser(cfg), lambda r, m: tokenize_preference(r, tok, m),
                cfg.max_length, "preferences")
    if kind == "prompts":
        return (parse_prompt, lambda r, m: tokenize_prompt(r, tok, m), cfg.max_prompt_length,
                "prompts")
    if kind == "unpaired":
        return (parse_unpaired, lambda r, m: tokenize_unpaired(r, tok, m), cfg.max_length,
                "unpaired")
    raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")


def _load(source: Any, kind: str, tok: ChatTokenizer, cfg: BatchConfig, name: str | None,
          progress: bool | None, *, keep: bool = True,
          on_keep: Callable[[Any], None] | None = None):
    """Parse and tokenise every record of ``source``; ``keep=False`` only validates and counts.

    ``on_keep(record)`` is called with each parsed record that became an example.
    """
    parse, tokenize, max_length, desc = _spec(kind, tok, cfg)
    name = name or source_name(source)
    stats = DataStats(source=name)
    examples, locations = [], []
    records = iter_source(source, name=name, max_line_bytes=cfg.max_line_bytes)
    for loc, raw in tqdm(records, desc=f"{desc} {name}", unit=" rec",
                         disable=True if progress is False else None, leave=False):
        stats.seen += 1
        try:
            if isinstance(raw, RecordError):
                raise raw
            record = parse(raw, loc, cfg.field_map)
            example = tokenize(record, max_length)
        except RecordError as err:
            handle(err, stats, cfg.skip_invalid)
            continue
        stats.kept += 1
        if keep:
            examples.append(example)
            locations.append(loc)
        if on_keep is not None:
            on_keep(record)
    if stats.num_skipped:
        log.warning("skipped invalid records:\n%s", stats.summary())
    if stats.seen == 0:
        raise SourceError(_describe(source, name),
                          "the source holds no records; expected at least one")
    if stats.kept == 0:
        raise SourceError(_describe(source, name),
                          f"no usable records (all {stats.seen} invalid); expected at least "
                          f"one.\n{stats.summary()}")
    return examples, locations, stats


def _preference_parser(cfg: BatchConfig) -> Callable:
    """``parse_preference`` that also rejects more than ``cfg.num_candidates`` responses."""

    def parse(raw, loc, field_map):
        rec = parse_preference(raw, loc, field_map)
        if cfg.num_candidates is not None and len(rec.responses) > cfg.num_candidates:
            raise RecordError(loc, "bad_value",
                              f"{len(rec.responses)} responses, more than num_candidates="
                              f"{cfg.num_candidates}; expected at most num_candidates")
        return rec

    return parse


def load_sft(source: Any, tokenizer: Any, cfg: BatchConfig, *, name: str | None = None,
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
      FileNotFoundError: a missing file.
      SourceError: (a ``ValueError``) an unreadable, corrupt or empty file, or no record
        survived; the message names the file.
    """
    tok = _encoder(tokenizer, cfg)
    ex, locs, stats = _load(source, "sft", tok, cfg, name, progress)
    return SFTDataset(ex, locs, stats, cfg.buckets, tok.pad_id)


def load_preferences(source: Any, tokenizer: Any, cfg: BatchConfig, *, name: str | None = None,
                     progress: bool | None = None) -> PreferenceDataset:
    """Read, validate and tokenise preference records (pairs or best-first rankings).

    Args: as :func:`load_sft`; ``cfg.num_candidates`` fixes ``N`` (default: the largest
      number of responses in the data).

    Returns:
      A :class:`PreferenceDataset`.

    Raises:
      RecordError: an invalid record, unless ``cfg.skip_invalid``; a record with more than
        ``cfg.num_candidates`` responses is invalid (reason ``bad_value``).
      FileNotFoundError: a missing file.
      SourceError: (a ``ValueError``) an unreadable, corrupt or empty file, or no record
        survived; the message names the file.
    """
    tok = _encoder(tokenizer, cfg)
    ex, locs, stats = _load(source, "preferences", tok, cfg, name, progress)
    n = cfg.num_candidates or max(len(e.responses) for e in ex)
    return PreferenceDataset(ex, locs, stats, cfg.buckets, tok.pad_id, num_candidates=n)


def load_prompts(source: Any, tokenizer: Any, cfg: BatchConfig, *, name: str | None = None,
                 progress: bool | None = None) -> PromptDataset:
    """Read, validate and tokenise RL prompts (``max_length = cfg.prompt_buckets[-1]``).

    A record's optional ``response_prefix`` is pre-filled as the start of the assistant's
    response: the prompt's ids are ``prompt_ids(prompt) + encode_text(response_prefix)`` (see
    ``ChatTokenizer``), and the data set's ``prefixes`` keep the text.

    Args: as :func:`load_sft`. With ``cfg.use_chat_template=False`` and
      ``cfg.field_map={"prompt": "opening"}`` the sentiment prompt set gives raw openings
      for a base model to continue.

    Returns:
      A :class:`PromptDataset` (its ``buckets`` are ``cfg.prompt_buckets``; ``prefixes[i]``
      the response prefix of example ``i``).

    Raises:
      RecordError: an invalid record, unless ``cfg.skip_invalid``.
      FileNotFoundError: a missing file.
      SourceError: (a ``ValueError``) an unreadable, corrupt or empty file, or no record
        survived; the message names the file.
    """
    tok = _encoder(tokenizer, cfg)
    prefixes: list[str] = []
    columns: list[Mapping[str, Any]] = []

    def keep(record):
        prefixes.append(record.response_prefix)
        columns.append(record.columns)

    ex, locs, stats = _load(source, "prompts", tok, cfg, name, progress, on_keep=keep)
    return PromptDataset(ex, locs, stats, cfg.prompt_buckets, tok.pad_id, prefixes=prefixes,
                         columns=columns)


def load_unpaired(source: Any, tokenizer: Any, cfg: BatchConfig, *, name: str | None = None,
                  progress: bool | None = None) -> UnpairedDataset:
    """Read, validate and tokenise unpaired records ``{"prompt", "completion", "label"}``
    (KTO's desirable / undesirable examples).

    Args: as :func:`load_sft`.

    Returns:
      An :class:`UnpairedDataset` (``num_desirable`` / ``num_undesirable`` count the labels).

    Raises:
      RecordError: an invalid record (file and line in the message; e.g. a ``label`` that is
        not ``true`` / ``false``), unless ``cfg.skip_invalid``.
      FileNotFoundError: a missing file.
      SourceError: (a ``ValueError``) an unreadable, corrupt or empty file, or no record
        survived; the message names the file.
    """
    tok = _encoder(tokenizer, cfg)
    ex, locs, stats = _load(source, "unpaired", tok, cfg, name, progress)
    return UnpairedDataset(ex, locs, stats, cfg.buckets, tok.pad_id)


#: kind -> loader (``load_sft`` / ``load_preferences`` / ``load_prompts`` / ``load_unpaired``).
LOADERS: dict[str, Callable[..., _Dataset]] = {
    "sft": load_sft, "preferences": load_preferences, "prompts": load_prompts,
    "unpaired": load_unpaired,
}


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown data kind {kind!r}; expected one of {KINDS}")


def load_dataset(source: Any, kind: Kind, tokenizer: Any, cfg: BatchConfig, *,
                 name: str | None = None, progress: bool | None = None) -> _Dataset:
    """``load_sft`` / ``load_preferences`` / ``load_prompts`` / ``load_unpaired`` of
    ``source``, chosen by ``kind``.

    Raises:
      ValueError: an unknown ``kind``; otherwise what the loader raises.
    """
    _check_kind(kind)
    return LOADERS[kind](source, tokenizer, cfg, name=name, progress=progress)


def validate_source(source: Any, kind: Kind, tokenizer: Any, cfg: BatchConfig, *,
                    name: str | None = None, progress: bool | None = None) -> DataStats:
    """Open, parse and tokenise every record of ``source`` as ``kind`` would be loaded, keep
    nothing, and return the counts: a dry run of :func:`load_dataset`.

    It raises exactly what loading would raise (a missing / unreadable / corrupt / empty file,
    an invalid record unless ``cfg.skip_invalid``, no usable record), so a multi-stage run can
    check the sources of all its stages before the first one trains. It costs one
    tokenisation pass but holds no examples in memory; when memory allows, loading the data
    sets up front with :func:`load_dataset` and keeping them avoids the second pass.

    Args:
      source: as :func:`load_sft`.
      kind: ``"sft"``, ``"preferences"``, ``"prompts"`` or ``"unpaired"`` (:data:`KINDS`).
      tokenizer, cfg, name, progress: as :func:`load_sft`.

    Returns:
      The :class:`DataStats` (seen / kept / skipped per reason) the loader would report.

    Raises:
      ValueError: an unknown ``kind``.
      FileNotFoundError, SourceError, RecordError: as :func:`load_sft`.
    """
    _check_kind(kind)
    _, _, stats = _load(source, kind, _encoder(tokenizer, cfg), cfg, name, progress, keep=False)
    return stats
