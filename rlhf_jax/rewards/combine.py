"""A weighted sum of reward sources, with per-source metrics."""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from rlhf_jax.rewards.functions import Reward


class RewardSum:
    """``r = w_model · s_model + Σ_i w_i f_i(prompts, responses, **columns)``.

    The reward model's (normalised) scores are computed on device by the caller and passed
    in; the functions run here on the host, one batched call each, timed.

    Args:
      functions: host sources (``Reward``), in order.
      model_weight: weight of the reward model's score (0: no reward model).

    Raises:
      ValueError: no source at all, or two sources with one name.
    """

    def __init__(self, functions: Sequence[Reward] = (), model_weight: float = 0.0):
        self.functions = tuple(functions)
        self.model_weight = float(model_weight)
        names = [f.name for f in self.functions] + (["reward_model"] if self.model_weight else [])
        if not names:
            raise ValueError("no reward source: give a reward model weight, a task reward or "
                             "--reward module:function")
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"reward sources {dup} appear twice; give each a distinct name")

    @property
    def names(self) -> list[str]:
        """Source names, the reward model (if any) first."""
        return (["reward_model"] if self.model_weight else []) + [f.name for f in self.functions]

    @property
    def host_only(self) -> bool:
        """True when no reward model takes part."""
        return not self.model_weight

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 columns: Mapping[str, Sequence[Any]] | None = None,
                 model_scores: np.ndarray | None = None
                 ) -> tuple[np.ndarray, dict[str, tuple[float, float]]]:
        """The summed reward ``[B]`` float64 and ``(sum, count)`` metrics:
        ``reward/<name>/mean`` for every source (unweighted), ``reward/<name>/seconds`` (wall
        time of each function's call), ``reward/<name>/violation_rate`` for every rule
        (``kind="rule"``: the share of responses whose penalty is < 0) and
        ``reward/total/mean``.

        Raises:
          ValueError: ``model_scores`` missing (or shaped wrong) while the model has a weight.
          RewardFunctionError: a function raised or returned a bad value (see ``Reward``).
        """
        n = len(responses)
        total = np.zeros(n, np.float64)
        metrics: dict[str, tuple[float, float]] = {}
        if self.model_weight:
            if model_scores is None or np.shape(model_scores) != (n,):
                raise ValueError(f"RewardSum: reward-model scores of shape ({n},) needed, got "
                                 f"{None if model_scores is None else np.shape(model_scores)}")
            s = np.asarray(model_scores, np.float64)
            total += self.model_weight * s
            metrics["reward/reward_model/mean"] = (float(s.sum()), float(n))
        for f in self.functions:
            start = time.perf_counter()
            values = f(prompts, responses, **dict(columns or {}))
            metrics[f"reward/{f.name}/seconds"] = (time.perf_counter() - start, 1.0)
            metrics[f"reward/{f.name}/mean"] = (float(values.sum()), float(n))
            if f.kind == "rule":
                metrics[f"reward/{f.name}/violation_rate"] = (float((values < 0).sum()), float(n))
            total += f.weight * values
        metrics["reward/total/mean"] = (float(total.sum()), float(n))
        return total, metrics
