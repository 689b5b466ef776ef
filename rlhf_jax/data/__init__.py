"""Data layer: records -> validated, tokenised examples -> fixed-shape, resumable batches.

Modules:
  config     ``DataConfig`` (buckets, batch size, seed, skip policy, remainder policy).
  records    record formats, validation, ``RecordError`` and ``DataStats`` (skip counts).
  sources    JSONL, Parquet, HF ``datasets.Dataset``, TFDS data sources, lists -> records.
  tokenize   chat templates, loss masks of assistant turns, generation prompts.
  batching   length buckets, right/left padding, collation, the resumable ``BatchIterator``.
  pipeline   ``load_sft`` / ``load_preferences`` / ``load_prompts`` -> data sets -> batches.
  sentiment  the built-in human sentiment ratings (Hutto & Gilbert 2014) and tasks from them.

From a JSONL file to batches::

    cfg = DataConfig(batch_size=16, buckets=(128, 256))
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
from rlhf_jax.data.config import DataConfig
from rlhf_jax.data.pipeline import (
    PreferenceDataset,
    PromptDataset,
    SFTDataset,
    load_preferences,
    load_prompts,
    load_sft,
)
from rlhf_jax.data.records import (
    REASONS,
    DataStats,
    PreferenceRecord,
    PromptRecord,
    RecordError,
    SFTRecord,
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
    "REASONS", "BatchIterator", "ChatTokenizer", "DataConfig", "DataStats",
    "PreferenceDataset", "PreferenceExample", "PreferenceRecord", "PromptDataset",
    "PromptRecord", "RecordError", "SFTDataset", "SFTExample", "SFTRecord", "TFDSSource",
    "bucket_histogram", "chat_loss_mask", "choose_bucket", "collate_preferences",
    "collate_prompts", "collate_sft", "epoch_order", "iter_hf_dataset", "iter_jsonl",
    "iter_parquet", "iter_source", "iter_tfds", "load_preferences", "load_prompts", "load_sft",
    "pad_left", "pad_right", "parse_preference", "parse_prompt", "parse_sft",
    "positions_from_mask_np", "tokenize_preference", "tokenize_prompt", "tokenize_sft",
    "write_jsonl",
]
