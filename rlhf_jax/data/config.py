"""``BatchConfig``: how records become fixed-shape batches (validation policy, tokenisation,
length buckets, batching).

Kept in ``rlhf_jax.data`` (rather than ``rlhf_jax/config.py``) so the data layer can be used on
its own; it follows the same conventions (frozen, keyword-only, ``ValueError`` naming both
numbers in ``__post_init__``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Literal

Remainder = Literal["pad", "drop", "wrap"]

#: Default longest JSONL line, in bytes (1 MiB): about 250k tokens of English text, far beyond
#: any bucket, so only a broken file (a missing newline, a blob) hits it.
DEFAULT_MAX_LINE_BYTES = 1 << 20


@dataclasses.dataclass(frozen=True, kw_only=True)
class BatchConfig:
    """How records become fixed-shape batches.

    Attributes:
      batch_size: global batch size ``B`` (rows per step, summed over processes). Every batch
        has exactly this many rows; see ``remainder`` for the last partial batch of an epoch.
      buckets: allowed sequence lengths ``T`` (tokens, strictly increasing) for SFT and
        preference batches. A batch is right-padded to the smallest bucket that fits its
        longest sequence, so a jitted step compiles once per bucket. The last bucket is the
        maximum length: a longer record is an error (or skipped and counted), never truncated.
      prompt_buckets: allowed prompt lengths ``P`` for (left-padded) prompt batches; the last
        one is the maximum prompt length.
      use_chat_template: render records with the tokenizer's chat template (ChatML etc.).
        ``None`` means: when the tokenizer has one. With ``False``, SFT records are the plain
        concatenation ``[bos] + prompt + completion + eos`` and chat (``messages``) records are
        an error.
      end_of_turn_token: the token that closes an assistant turn and is part of the loss
        (``<|im_end|>`` for ChatML, ``<|eot_id|>`` for Llama 3). ``None`` means the
        tokenizer's ``eos_token``.
      add_bos: plain (non-chat) path only: prepend the tokenizer's ``bos_token``. ``None``
        means: when the tokenizer itself adds it (``tokenizer("a")`` starts with it).
      skip_invalid: skip invalid records (missing field, wrong type, empty text, too long,
        bad JSON, ...) and count them per reason in the dataset's ``stats`` instead of raising.
      seed: seed of the data order (independent of the model's RNG). Epoch ``e`` uses the
        permutation drawn from ``SeedSequence([seed, e])``.
      shuffle: shuffle each epoch; ``False`` keeps the source order.
      remainder: what happens to the last ``n mod B`` rows of an epoch:
        ``"pad"``: the last batch is filled up with repeats of real rows that carry no loss
        (``loss_mask`` all False; preference ``valid`` all False), nothing is dropped (SFT and
        preference batches only: ``PromptBatch`` has no mask to mark such rows).
        ``"drop"``: the rows are dropped for this epoch and counted in the iterator's
        ``stats["dropped_rows"]`` (a different subset every epoch because of the shuffle).
        ``"wrap"``: the batch is completed with the first rows of the next epoch's order: the
        data is one stream of epochs (the usual choice for RL prompts).
      num_epochs: stop after this many epochs; ``None`` iterates forever.
      num_candidates: ``N`` of ``PreferenceBatch`` (2 for pairs, K for rankings). ``None``
        means the largest number of responses of any record in the data set.
      field_map: rename fields: canonical name -> name in the source, e.g.
        ``{"prompt": "opening"}`` reads the prompt from the field ``opening``.
      max_line_bytes: longest accepted JSONL line in bytes (newline excluded). A longer line
        is rejected before it is parsed (reason ``too_long``, raised or skipped and counted)
        and is read past in chunks, never held in memory whole.
    """

    batch_size: int
    buckets: tuple[int, ...] = (64, 128, 256, 512)
    prompt_buckets: tuple[int, ...] = (32, 64, 128)
    use_chat_template: bool | None = None
    end_of_turn_token: str | None = None
    add_bos: bool | None = None
    skip_invalid: bool = False
    seed: int = 0
    shuffle: bool = True
    remainder: Remainder = "pad"
    num_epochs: int | None = None
    num_candidates: int | None = None
    field_map: Mapping[str, str] = dataclasses.field(default_factory=dict)
    max_line_bytes: int = DEFAULT_MAX_LINE_BYTES

    def __post_init__(self):
        if self.batch_size <= 0:
            raise ValueError(f"BatchConfig.batch_size must be positive, got {self.batch_size}")
        for name in ("buckets", "prompt_buckets"):
            b = tuple(getattr(self, name))
            object.__setattr__(self, name, b)
            if not b or b[0] <= 0:
                raise ValueError(f"BatchConfig.{name} must be non-empty and positive, got {b}")
            for lo, hi in zip(b, b[1:]):
                if hi <= lo:
                    raise ValueError(
                        f"BatchConfig.{name} must be strictly increasing, got {lo} then {hi}")
        if self.remainder not in ("pad", "drop", "wrap"):
            raise ValueError(
                f"BatchConfig.remainder must be 'pad', 'drop' or 'wrap', got {self.remainder!r}")
        if self.num_epochs is not None and self.num_epochs <= 0:
            raise ValueError(f"BatchConfig.num_epochs must be positive, got {self.num_epochs}")
        if self.max_line_bytes <= 0:
            raise ValueError(f"BatchConfig.max_line_bytes must be positive, got "
                             f"{self.max_line_bytes}")
        if self.num_candidates is not None and self.num_candidates < 2:
            raise ValueError(f"BatchConfig.num_candidates must be >= 2, got {self.num_candidates}")

    @property
    def max_length(self) -> int:
        """Longest allowed SFT / preference sequence ``T`` (the last bucket), in tokens."""
        return self.buckets[-1]

    @property
    def max_prompt_length(self) -> int:
        """Longest allowed prompt ``P`` (the last prompt bucket), in tokens."""
        return self.prompt_buckets[-1]
