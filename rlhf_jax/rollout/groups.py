"""Groups of samples per prompt on the host: DAPO's dynamic sampling.

A rollout with ``k`` samples per prompt holds groups of ``k`` consecutive rows. A group whose
rewards are all equal (every sample right, or every sample wrong) gets zero advantage from the
group estimators and only dilutes the batch; DAPO (Yu et al. 2025 §3.2, eq. 11) keeps sampling
until the batch is filled with groups whose rewards differ. These functions work on host
NumPy rows (one process's rows; groups never straddle processes, since each process holds
whole groups), between the sampler and the learner.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

Rows = Mapping[str, np.ndarray]

#: Row fields that are left-padded prompt + response token arrays (``[N, P + R]``); rounds
#: sampled from different prompt buckets are left-padded to the widest before concatenation.
TOKEN_FIELDS = ("tokens", "attn_mask")


def informative_groups(scores: np.ndarray, group_size: int) -> np.ndarray:
    """``[N / k] bool``: True for groups whose ``k`` scores are not all equal (DAPO eq. 11's
    ``0 < |{correct}| < G``, generalised to any reward).

    Raises:
      ValueError: ``N`` not a multiple of ``k``.
    """
    scores = np.asarray(scores)
    if scores.ndim != 1 or scores.shape[0] % group_size:
        raise ValueError(f"informative_groups: scores {scores.shape} are not whole groups of "
                         f"{group_size}")
    g = scores.reshape(-1, group_size)
    return g.max(axis=1) != g.min(axis=1)


def _left_pad(x: np.ndarray, width: int) -> np.ndarray:
    pad = width - x.shape[1]
    if pad == 0:
        return x
    return np.concatenate([np.zeros((x.shape[0], pad), x.dtype), x], axis=1)


def concat_rounds(rounds: Sequence[Rows], response_len: int) -> dict[str, np.ndarray]:
    """Concatenate rounds of rows; ``TOKEN_FIELDS`` are left-padded (with 0 / False) to the
    widest prompt, keeping the last ``response_len`` columns the response."""
    width = max(r["tokens"].shape[1] for r in rounds)
    out = {}
    for name in rounds[0]:
        parts = [np.asarray(r[name]) for r in rounds]
        if name in TOKEN_FIELDS:
            parts = [_left_pad(p, width) for p in parts]
        out[name] = np.concatenate(parts, axis=0)
    assert out["tokens"].shape[1] >= response_len
    return out


def select_groups(rows: Rows, group_size: int, num_groups: int
                  ) -> tuple[dict[str, np.ndarray], dict[str, float]]:
    """The first ``num_groups`` informative groups of ``rows`` (in order), topped up with the
    first uninformative ones when there are too few.

    Args:
      rows: ``name -> [N, ...]`` host arrays with a ``scores [N]`` entry; ``N = n k``.
      group_size: ``k``. num_groups: groups to return.

    Returns:
      ``(rows of num_groups * k, metrics)``: ``rollout/dynamic_sampling/kept_groups``
      (informative groups found), ``.../filler_groups`` (uninformative groups used to fill
      the batch) and ``.../sampled_groups``.

    Raises:
      ValueError: fewer than ``num_groups`` groups in all.
    """
    keep = informative_groups(rows["scores"], group_size)
    if keep.size < num_groups:
        raise ValueError(f"select_groups: {keep.size} groups sampled, {num_groups} needed")
    order = np.concatenate([np.flatnonzero(keep), np.flatnonzero(~keep)])[:num_groups]
    idx = (order[:, None] * group_size + np.arange(group_size)[None]).reshape(-1)
    out = {k: np.asarray(v)[idx] for k, v in rows.items()}
    kept = int(min(keep.sum(), num_groups))
    return out, {"rollout/dynamic_sampling/kept_groups": float(kept),
                 "rollout/dynamic_sampling/filler_groups": float(num_groups - kept),
                 "rollout/dynamic_sampling/sampled_groups": float(keep.size)}
