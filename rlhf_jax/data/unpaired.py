"""Unpaired examples (KTO): tokenisation and collation into ``UnpairedBatch`` es.

An :class:`~rlhf_jax.data.records.UnpairedRecord` is tokenised like one candidate of a
preference record: the prompt rendered as a generation prompt (plain: ``[bos] + ids(prompt)``),
then ``ids(completion) + [end-of-turn]``, the completion being the target. Prompt and completion
ids are kept apart so that a batch can also hold the *mismatched* pairs KTO estimates its KL
reference point from (Ethayarajh et al. 2024 §4): the prompt of row ``i`` followed by the
completion of row ``(i + 1) mod B`` — the same tokens a sampler would score for that prompt.

A mismatched pair can be longer than either of its two examples. The batch is padded to the
smallest bucket that fits the examples *and* their mismatched pairs, so a jitted step still
sees only the data set's buckets; a mismatched pair longer than the largest bucket keeps the
first tokens of its completion (it only enters the KL estimate, which is a batch mean; the
examples themselves are never truncated).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np

from rlhf_jax.data.batching import choose_bucket, pad_right, positions_from_mask_np
from rlhf_jax.data.records import UnpairedRecord
from rlhf_jax.data.tokenize import ChatTokenizer, _check_length
from rlhf_jax.types import UnpairedBatch


@dataclasses.dataclass(frozen=True)
class UnpairedExample:
    """One tokenised unpaired example.

    Attributes:
      prompt: ``[P] int32`` prompt ids (generation prompt included).
      completion: ``[R] int32`` completion ids ending with the end-of-turn token.
      label: True for a desirable completion.
    """

    prompt: np.ndarray
    completion: np.ndarray
    label: bool

    def __len__(self) -> int:
        """``P + R`` tokens."""
        return len(self.prompt) + len(self.completion)


def tokenize_unpaired(record: UnpairedRecord, tok: ChatTokenizer,
                      max_length: int) -> UnpairedExample:
    """Tokenise an unpaired example: the generation prompt, then the completion + end-of-turn.

    Args:
      record: a validated :class:`UnpairedRecord`.
      tok: the tokenizer.
      max_length: maximum ``P + R`` in tokens.

    Returns:
      :class:`UnpairedExample`.

    Raises:
      RecordError: ``too_long``; ``wrong_type`` for a chat prompt without a chat template.
    """
    prompt = tok.prompt_ids(record.prompt, record.location)
    completion = tok.response_ids(record.completion)
    _check_length(len(prompt) + len(completion), max_length, record.location,
                  "prompt + completion")
    return UnpairedExample(prompt=np.asarray(prompt, np.int32),
                           completion=np.asarray(completion, np.int32), label=bool(record.label))


def _sequences(prompts, completions, valid):
    seqs, masks = [], []
    for p, c, v in zip(prompts, completions, valid):
        seqs.append(np.concatenate([p, c]))
        m = np.zeros(len(p) + len(c), dtype=bool)
        m[len(p):] = bool(v)
        masks.append(m)
    return seqs, masks


def collate_unpaired(examples: Sequence[UnpairedExample], valid: np.ndarray, length: int,
                     pad_id: int, buckets: Sequence[int]) -> UnpairedBatch:
    """Right-padded unpaired batch with its mismatched pairs (module docstring).

    Args:
      examples: ``B`` examples, in batch order (row ``i``'s KL pair takes the completion of
        row ``(i + 1) mod B``).
      valid: ``[B] bool``; False rows (remainder filler) get all-False loss masks, their KL
        pairs too.
      length: padded length for the examples alone (a bucket); raised to the bucket that also
        fits the mismatched pairs.
      pad_id: id written into padding.
      buckets: the data set's buckets; the last one caps a mismatched pair.

    Returns:
      ``UnpairedBatch`` with ``[B, T]`` token fields, ``label`` and ``valid`` ``[B] bool``.
    """
    b, cap = len(examples), int(buckets[-1])
    valid = np.asarray(valid, dtype=bool)
    prompts = [e.prompt for e in examples]
    mismatched = [examples[(i + 1) % b].completion[: cap - len(examples[i].prompt)]
                  for i in range(b)]
    seqs, masks = _sequences(prompts, [e.completion for e in examples], valid)
    kl_seqs, kl_masks = _sequences(prompts, mismatched, valid)
    longest = max(length, max(len(s) for s in kl_seqs))
    t = choose_bucket(longest, buckets)
    tokens, attn = pad_right(seqs, t, pad_id)
    loss, _ = pad_right(masks, t, False, dtype=bool)
    kl_tokens, kl_attn = pad_right(kl_seqs, t, pad_id)
    kl_loss, _ = pad_right(kl_masks, t, False, dtype=bool)
    return UnpairedBatch(tokens=tokens, attn_mask=attn, positions=positions_from_mask_np(attn),
                         loss_mask=loss, label=np.asarray([e.label for e in examples], bool),
                         valid=valid.copy(), kl_tokens=kl_tokens, kl_attn_mask=kl_attn,
                         kl_positions=positions_from_mask_np(kl_attn), kl_loss_mask=kl_loss)
