"""Data layer: records -> validated, tokenised examples -> fixed-shape, resumable batches.

Modules:
  config     ``BatchConfig`` (buckets, batch size, seed, skip policy, remainder policy).
  records    record formats, validation, ``RecordError`` / ``SourceError`` and ``DataStats``
             (skip counts).
  sources    JSONL, Parquet, HF ``datasets.Dataset``, TFDS data sources, lists -> records.
  tokenize   chat templates, loss masks of assistant turns, generation prompts.
  batching   length buckets, right/left padding, collation, the resumable ``BatchIterator``.
  datasets   ``load_sft`` / ``load_preferences`` / ``load_prompts`` -> data sets -> batches;
             ``validate_source`` checks a source without keeping it.

Built-in data sets live with their tasks (``rlhf_jax.tasks``).

From a JSONL file to batches::

    cfg = BatchConfig(batch_size=16, buckets=(128, 256))
    it = load_sft("sft.jsonl", tokenizer, cfg).batches(cfg)   # yields SFTBatch
    state = it.state_dict()                                    # save with the checkpoint
    it = load_sft("sft.jsonl", tokenizer, cfg).batches(cfg, state=state)
"""

from rlhf_jax.data.batching import (
    BatchIterator,
    bucket_histogram,
    choose_bucket,
    collate_preferences,
    collate_prompts,
    collate_sft,
    epoch_order,
    pad_left,
    pad_right,
    positions_from_mask_np,
)
from rlhf_jax.data.config import DEFAULT_MAX_LINE_BYTES, BatchConfig
from rlhf_jax.data.datasets import (
    KINDS,
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    load_dataset,
    load_preferences,
    load_prompts,
    load_sft,
    validate_source,
)
from rlhf_jax.data.records import (
    REASONS,
    DataStats,
    PreferenceRecord,
    PromptRecord,
    RecordError,
    SFTRecord,
    SourceError,
    parse_preference,
    parse_prompt,
    parse_sft,
)
from rlhf_jax.data.sources import (
    TFDSSource,
    iter_hf_dataset,
    iter_jsonl,
    iter_parquet,
    iter_source,
    iter_tfds,
    write_jsonl,
)
from rlhf_jax.data.tokenize import (
    ChatTokenizer,
    PreferenceExample,
    SFTExample,
    chat_loss_mask,
    tokenize_preference,
    tokenize_prompt,
    tokenize_sft,
)

__all__ = [
    "DEFAULT_MAX_LINE_BYTES", "KINDS", "REASONS", "BatchConfig", "BatchIterator",
    "ChatTokenizer", "DataStats", "PreferenceDataset", "PreferenceExample", "PreferenceRecord",
    "PromptDataset", "PromptRecord", "RecordError", "SFTDataset", "SFTExample", "SFTRecord",
    "SourceError", "TFDSSource", "bucket_histogram", "chat_loss_mask", "choose_bucket",
    "collate_preferences", "collate_prompts", "collate_sft", "epoch_order", "iter_hf_dataset",
    "iter_jsonl", "iter_parquet", "iter_source", "iter_tfds", "load_dataset",
    "load_preferences", "load_prompts", "load_sft", "pad_left", "pad_right",
    "parse_preference", "parse_prompt", "parse_sft", "positions_from_mask_np",
    "tokenize_preference", "tokenize_prompt", "tokenize_sft", "validate_source", "write_jsonl",
]
