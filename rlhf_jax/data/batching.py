"""Fixed-shape batches: length buckets, padding, collation, and a resumable shuffled iterator.

* **Buckets.** A batch is padded to the smallest bucket ``>=`` its longest sequence, so a jitted
  step sees only ``len(buckets)`` shapes and compiles once per bucket.
* **Padding side.** SFT and preference sequences are right-padded; RL prompts are
  left-padded, so that every prompt ends at column ``P - 1`` and sampling appends at the same
  column for all rows. ``positions`` follow ``rlhf_jax.types.positions_from_mask`` (computed
  here with its NumPy twin :func:`positions_from_mask_np`; a test holds them equal).
* **Fixed batch size.** Every batch has ``batch_size`` rows; the last ``n mod B`` rows of an
  epoch are padded with zero-loss repeats, dropped and counted, or wrapped into the next
  epoch (``BatchConfig.remainder``).
* **Order.** Epoch ``e`` visits the examples in ``permutation(SeedSequence([seed, e]))``;
  the data order has its own seed, independent of the model's RNG.
* **Resume.** :meth:`BatchIterator.state_dict` is a small dict of ints (epoch, index, ...)
  to store in a checkpoint; :meth:`BatchIterator.load_state_dict` continues exactly where
  it stopped.
* **Several processes.** All processes draw the same global batch (same order, same bucket)
  and each takes its contiguous ``batch_size / process_count`` rows.

All arrays are NumPy (``int32`` ids/positions, ``bool`` masks); the trainer moves them to
devices with its batch shardings.
"""

from __future__ import annotations

import collections
from collections.abc import Sequence
from typing import Any, Protocol

import numpy as np

from rlhf_jax.data.tokenize import PreferenceExample, SFTExample
from rlhf_jax.types import PreferenceBatch, PromptBatch, SFTBatch


def choose_bucket(length: int, buckets: Sequence[int]) -> int:
    """The smallest bucket ``>= length``.

    Raises:
      ValueError: ``length`` exceeds the largest bucket (names both numbers).
    """
    for b in buckets:
        if length <= b:
            return int(b)
    raise ValueError(f"sequence of {length} tokens does not fit the largest bucket "
                     f"{buckets[-1]}; expected at most {buckets[-1]}")


def positions_from_mask_np(attn_mask: np.ndarray) -> np.ndarray:
    """NumPy twin of ``rlhf_jax.types.positions_from_mask``: ``max(cumsum(mask) - 1, 0)``.

    Args:
      attn_mask: ``[..., T] bool``.

    Returns:
      ``[..., T] int32``; the first real token gets 0, padding gets 0 (left) or keeps
      counting from the last real token (right), as in the JAX version.
    """
    return np.maximum(np.cumsum(attn_mask.astype(np.int32), axis=-1) - 1, 0).astype(np.int32)


def pad_right(seqs: Sequence[np.ndarray], length: int, pad_id: int,
              dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Right-pad 1-D sequences into ``[B, length]``.

    Returns:
      ``(values [B, length], attn_mask [B, length] bool)``.

    Raises:
      ValueError: a sequence is longer than ``length``.
    """
    out = np.full((len(seqs), length), pad_id, dtype=dtype)
    mask = np.zeros((len(seqs), length), dtype=bool)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"row {i} has {len(s)} tokens, more than the padded length {length}")
        out[i, : len(s)] = s
        mask[i, : len(s)] = True
    return out, mask


def pad_left(seqs: Sequence[np.ndarray], length: int, pad_id: int,
             dtype=np.int32) -> tuple[np.ndarray, np.ndarray]:
    """Left-pad 1-D sequences into ``[B, length]`` (each ends at column ``length - 1``).

    Returns:
      ``(values [B, length], attn_mask [B, length] bool)``.

    Raises:
      ValueError: a sequence is longer than ``length``.
    """
    out = np.full((len(seqs), length), pad_id, dtype=dtype)
    mask = np.zeros((len(seqs), length), dtype=bool)
    for i, s in enumerate(seqs):
        if len(s) > length:
            raise ValueError(f"row {i} has {len(s)} tokens, more than the padded length {length}")
        if len(s):
            out[i, length - len(s):] = s
            mask[i, length - len(s):] = True
    return out, mask


def collate_sft(examples: Sequence[SFTExample], valid: np.ndarray, length: int,
                pad_id: int) -> SFTBatch:
    """Right-padded SFT batch.

    Args:
      examples: ``B`` examples.
      valid: ``[B] bool``; False rows (remainder filler) get an all-False ``loss_mask``.
      length: padded length ``T`` (a bucket).
      pad_id: id written into padding.

    Returns:
      ``SFTBatch`` with ``tokens/positions [B, T] int32``, ``attn_mask/loss_mask [B, T] bool``.
    """
    tokens, attn = pad_right([e.tokens for e in examples], length, pad_id)
    loss, _ = pad_right([e.loss_mask for e in examples], length, False, dtype=bool)
    loss &= np.asarray(valid, dtype=bool)[:, None]
    return SFTBatch(tokens=tokens, attn_mask=attn, positions=positions_from_mask_np(attn),
                    loss_mask=loss)


def collate_preferences(examples: Sequence[PreferenceExample], valid: np.ndarray, length: int,
                        num_candidates: int, pad_id: int) -> PreferenceBatch:
    """Right-padded preference batch ``[B, N, T]``, candidates best first.

    A record with ``K < N`` responses fills slots ``K..N-1`` with a copy of its best candidate
    marked ``valid=False`` and ``loss_mask`` False (real tokens, so no row is all padding).
    Rows with ``valid[b]`` False (remainder filler) have every slot invalid.

    Args:
      examples: ``B`` examples.
      valid: ``[B] bool``.
      length: padded length ``T`` (a bucket).
      num_candidates: ``N``.
      pad_id: id written into padding.

    Returns:
      ``PreferenceBatch`` with ``tokens/positions [B, N, T] int32``, ``attn_mask/loss_mask
      [B, N, T] bool`` and ``valid [B, N] bool``.

    Raises:
      ValueError: a record has more than ``N`` responses.
    """
    b, n = len(examples), num_candidates
    seqs, losses = [], []
    valid_bn = np.zeros((b, n), dtype=bool)
    for i, ex in enumerate(examples):
        k = len(ex.responses)
        if k > n:
            raise ValueError(f"example {i} has {k} responses, more than num_candidates={n}")
        for j in range(n):
            r = ex.responses[j if j < k else 0]
            seqs.append(np.concatenate([ex.prompt, r]))
            m = np.zeros(len(ex.prompt) + len(r), dtype=bool)
            if j < k and valid[i]:
                m[len(ex.prompt):] = True
            losses.append(m)
        valid_bn[i, :k] = bool(valid[i])
    tokens, attn = pad_right(seqs, length, pad_id)
    loss, _ = pad_right(losses, length, False, dtype=bool)
    shape = (b, n, length)
    return PreferenceBatch(tokens=tokens.reshape(shape), attn_mask=attn.reshape(shape),
                           positions=positions_from_mask_np(attn).reshape(shape),
                           loss_mask=loss.reshape(shape), valid=valid_bn)


def collate_prompts(examples: Sequence[np.ndarray], length: int, pad_id: int) -> PromptBatch:
    """Left-padded prompt batch.

    Args:
      examples: ``B`` prompt id arrays.
      length: padded length ``P`` (a prompt bucket).
      pad_id: id written into padding.

    Returns:
      ``PromptBatch`` with ``tokens [B, P] int32`` and ``attn_mask [B, P] bool``; the sampler
      derives positions with ``positions_from_mask``.
    """
    tokens, attn = pad_left(examples, length, pad_id)
    return PromptBatch(tokens=tokens, attn_mask=attn)


class Batchable(Protocol):
    """What :class:`BatchIterator` needs from a data set (see ``rlhf_jax.data.datasets``)."""

    lengths: np.ndarray          # [n] int: tokens of the longest sequence of each example
    buckets: tuple[int, ...]
    supports_invalid_rows: bool  # can collate mark filler rows as carrying no loss

    def __len__(self) -> int: ...

    def collate(self, indices: np.ndarray, valid: np.ndarray, length: int) -> Any: ...


def epoch_order(num_examples: int, seed: int, epoch: int, shuffle: bool = True) -> np.ndarray:
    """The visiting order of epoch ``epoch``: ``[n] int64`` permutation (identity if no shuffle)."""
    if not shuffle:
        return np.arange(num_examples)
    rng = np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, epoch])))
    return rng.permutation(num_examples)


class BatchIterator:
    """Endless (or ``num_epochs``-long) iterator of fixed-shape batches with a resumable position.

    Args:
      dataset: an ``SFTDataset`` / ``PreferenceDataset`` / ``PromptDataset``.
      batch_size: global rows per batch ``B``.
      seed: data-order seed.
      shuffle: shuffle every epoch.
      remainder: ``"pad"`` / ``"drop"`` / ``"wrap"`` (see ``BatchConfig.remainder``).
      num_epochs: stop after this many epochs (``None``: never).
      process_index: this process's index (``jax.process_index()``).
      process_count: number of processes; ``batch_size`` must divide by it.

    Raises:
      ValueError: ``batch_size`` not divisible by ``process_count``; ``remainder="pad"`` for
        prompts (no mask to mark filler rows); ``remainder="drop"`` with fewer examples than
        ``batch_size`` (no batch could ever be formed).

    The position is ``(epoch, index)``: the next example is ``epoch_order(epoch)[index]``.
    ``stats`` counts batches, rows, filler rows (``padded_rows``), dropped rows and batches
    per bucket, and is saved along with the position.
    """

    def __init__(self, dataset: Batchable, *, batch_size: int, seed: int = 0,
                 shuffle: bool = True, remainder: str = "pad", num_epochs: int | None = None,
                 process_index: int = 0, process_count: int = 1):
        n = len(dataset)
        if batch_size <= 0 or batch_size % process_count:
            raise ValueError(f"batch_size={batch_size} must be a positive multiple of "
                             f"process_count={process_count}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index={process_index} not in [0, {process_count})")
        if remainder not in ("pad", "drop", "wrap"):
            raise ValueError(f"remainder must be 'pad', 'drop' or 'wrap', got {remainder!r}")
        if remainder == "pad" and not dataset.supports_invalid_rows:
            raise ValueError(f"remainder='pad' needs batches that can mark filler rows; "
                             f"{type(dataset).__name__} cannot: use 'wrap' or 'drop'")
        if remainder == "drop" and n < batch_size:
            raise ValueError(f"remainder='drop' with {n} examples < batch_size={batch_size} "
                             "would drop everything; expected at least batch_size examples")
        if n == 0:
            raise ValueError("the data set is empty")
        self.dataset = dataset
        self.batch_size, self.seed, self.shuffle = batch_size, seed, shuffle
        self.remainder, self.num_epochs = remainder, num_epochs
        self.process_index, self.process_count = process_index, process_count
        self.epoch, self.index = 0, 0
        self.stats: dict[str, Any] = self._zero_stats()
        self._orders: dict[int, np.ndarray] = {}

    @staticmethod
    def _zero_stats() -> dict[str, Any]:
        return {"batches": 0, "rows": 0, "padded_rows": 0, "dropped_rows": 0,
                "bucket_counts": {}}

    # ------------------------------------------------------------------ position

    def state_dict(self) -> dict[str, Any]:
        """The iterator position as a small JSON-able dict, to save in a checkpoint.

        Returns:
          ``{"epoch", "index", "seed", "num_examples", "batch_size", "stats"}``.
        """
        return {"epoch": int(self.epoch), "index": int(self.index), "seed": int(self.seed),
                "num_examples": len(self.dataset), "batch_size": int(self.batch_size),
                "stats": {**{k: int(v) for k, v in self.stats.items() if k != "bucket_counts"},
                          "bucket_counts": {str(k): int(v) for k, v in
                                            self.stats["bucket_counts"].items()}}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from a position saved by :meth:`state_dict`.

        Raises:
          ValueError: the state was saved for another data set size, seed or batch size
            (names both values), or its index is out of range.
        """
        for key, mine in (("num_examples", len(self.dataset)), ("seed", self.seed),
                          ("batch_size", self.batch_size)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"iterator state has {key}={state[key]} but this iterator has "
                                 f"{key}={mine}; expected the same data set and settings")
        epoch, index = int(state["epoch"]), int(state["index"])
        if epoch < 0 or not 0 <= index < len(self.dataset):
            raise ValueError(f"iterator state epoch={epoch}, index={index} out of range for "
                             f"{len(self.dataset)} examples")
        self.epoch, self.index = epoch, index
        stats = state.get("stats") or {}
        self.stats = self._zero_stats()
        for k in ("batches", "rows", "padded_rows", "dropped_rows"):
            self.stats[k] = int(stats.get(k, 0))
        self.stats["bucket_counts"] = {int(k): int(v) for k, v in
                                       (stats.get("bucket_counts") or {}).items()}

    # ------------------------------------------------------------------ iteration

    def _order(self, epoch: int) -> np.ndarray:
        if epoch not in self._orders:
            if len(self._orders) > 2:
                self._orders.pop(min(self._orders))
            self._orders[epoch] = epoch_order(len(self.dataset), self.seed, epoch, self.shuffle)
        return self._orders[epoch]

    def _advance(self, count: int) -> None:
        self.index += count
        if self.index >= len(self.dataset):
            self.epoch, self.index = self.epoch + 1, 0

    def _finished(self) -> bool:
        return self.num_epochs is not None and self.epoch >= self.num_epochs

    def next_indices(self) -> tuple[np.ndarray, np.ndarray]:
        """Advance by one global batch; return its ``(indices [B] int, valid [B] bool)``.

        Raises:
          StopIteration: after ``num_epochs`` epochs.
        """
        n, bsz = len(self.dataset), self.batch_size
        while True:
            if self._finished():
                raise StopIteration
            order = self._order(self.epoch)
            left = n - self.index
            if left >= bsz:
                idx = order[self.index: self.index + bsz]
                self._advance(bsz)
                return idx, np.ones(bsz, dtype=bool)
            if self.remainder == "drop":
                self.stats["dropped_rows"] += left
                self._advance(left)
                continue
            if self.remainder == "pad":
                idx = np.concatenate([order[self.index:], np.resize(order, bsz - left)])
                valid = np.arange(bsz) < left
                self.stats["padded_rows"] += bsz - left
                self._advance(left)
                return idx, valid
            # wrap: complete the batch from the following epochs' orders
            parts = []
            need = bsz
            while need:
                order = self._order(self.epoch)
                take = min(need, n - self.index)
                parts.append(order[self.index: self.index + take])
                need -= take
                self._advance(take)
            return np.concatenate(parts), np.ones(bsz, dtype=bool)

    def __iter__(self) -> BatchIterator:
        return self

    def __next__(self):
        idx, valid = self.next_indices()
        length = choose_bucket(int(self.dataset.lengths[idx].max()), self.dataset.buckets)
        per = self.batch_size // self.process_count
        local = slice(self.process_index * per, (self.process_index + 1) * per)
        self.stats["batches"] += 1
        self.stats["rows"] += int(valid.sum())
        counts = self.stats["bucket_counts"]
        counts[length] = counts.get(length, 0) + 1
        return self.dataset.collate(idx[local], valid[local], length)

    def batches_per_epoch(self) -> int:
        """Batches in one epoch: ``ceil(n / B)`` for pad, ``floor(n / B)`` for drop, ``n / B``
        (a float) for wrap."""
        n, b = len(self.dataset), self.batch_size
        if self.remainder == "pad":
            return -(-n // b)
        if self.remainder == "drop":
            return n // b
        return n / b  # type: ignore[return-value]


def bucket_histogram(lengths: np.ndarray, buckets: Sequence[int]) -> dict[int, int]:
    """How many examples fall in each bucket (for choosing buckets): ``{bucket: count}``."""
    counts = collections.Counter(choose_bucket(int(x), buckets) for x in lengths)
    return {int(b): counts.get(int(b), 0) for b in buckets}
