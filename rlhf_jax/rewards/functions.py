"""Host reward sources: Python functions and verifiers of decoded text."""

from __future__ import annotations

import dataclasses
import importlib
from collections.abc import Callable, Sequence
from typing import Any, Literal

import numpy as np

RewardFn = Callable[..., Sequence[float]]


class RewardFunctionError(ValueError):
    """A reward function raised, or returned the wrong shape or a non-finite / non-0-1 value.
    The message names the function and the first bad sample."""


@dataclasses.dataclass(frozen=True)
class Reward:
    """A host reward source.

    Attributes:
      name: metric name (``reward/<name>/mean``).
      fn: ``fn(prompts, responses, **columns) -> [B]`` (see ``rlhf_jax.rewards``).
      weight: weight in the sum of sources.
      kind: ``"function"`` (any finite float) or ``"verifier"`` (values must be 0 or 1).
    """

    name: str
    fn: RewardFn
    weight: float = 1.0
    kind: Literal["function", "verifier"] = "function"

    def __call__(self, prompts: Sequence[str], responses: Sequence[str],
                 **columns: Sequence[Any]) -> np.ndarray:
        """The source's values ``[B]`` float64 (unweighted).

        Raises:
          RewardFunctionError: the function raised, returned a shape other than ``[B]``, a
            non-finite value, or (a verifier) a value other than 0/1; names the function and
            the sample.
        """
        n = len(responses)
        label = f"reward {self.name!r} ({_qualname(self.fn)})"
        try:
            out = self.fn(list(prompts), list(responses), **columns)
        except Exception as e:  # noqa: BLE001 - re-raised with the function named
            raise RewardFunctionError(f"{label} raised {type(e).__name__}: {e} on a batch of "
                                      f"{n} samples (first response {responses[0]!r})") from e
        values = checked_scores(out, label, prompts, responses, RewardFunctionError)
        if self.kind == "verifier":
            bad = np.flatnonzero((values != 0) & (values != 1))
            if bad.size:
                i = int(bad[0])
                raise RewardFunctionError(f"{label} is a verifier but returned {values[i]} for "
                                          f"sample {i} (response {responses[i]!r}); expected 0 or 1")
        return values


def checked_scores(out: Any, label: str, prompts: Sequence[str], responses: Sequence[str],
                   error: type[Exception] = ValueError) -> np.ndarray:
    """``out`` as ``[B]`` float64 scores of ``responses``, or ``error`` naming ``label`` and the
    first bad sample: not numbers, a shape other than ``[B]``, a non-finite value."""
    n = len(responses)
    try:
        values = np.asarray(out, np.float64)
    except (TypeError, ValueError) as e:
        raise error(f"{label} returned {type(out).__name__}, which is not a sequence of {n} "
                    f"numbers: {e}") from e
    if values.shape != (n,):
        raise error(f"{label} returned shape {values.shape} for {n} responses; expected ({n},)")
    bad = np.flatnonzero(~np.isfinite(values))
    if bad.size:
        i = int(bad[0])
        raise error(f"{label} returned {values[i]} for sample {i} (prompt {prompts[i]!r}, "
                    f"response {responses[i]!r})")
    return values


def verifier(fn: RewardFn) -> RewardFn:
    """Decorator: mark ``fn`` as a verifier (its values must be 0 or 1), so that
    ``--reward module:fn`` loads it with ``kind="verifier"``."""
    fn.reward_kind = "verifier"  # type: ignore[attr-defined]
    return fn


def _qualname(fn: Any) -> str:
    module = getattr(fn, "__module__", None)
    name = getattr(fn, "__qualname__", None) or type(fn).__name__
    return f"{module}:{name}" if module else name


def load_reward(spec: str) -> Reward:
    """A ``Reward`` from ``module:function[=weight]`` (``--reward`` on the command line).

    Raises:
      ValueError: malformed spec, a module or attribute that cannot be imported, or an
        attribute that is not callable (each names ``spec``).
    """
    target, _, weight = spec.partition("=")
    module_name, sep, attr = target.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"--reward {spec!r}: expected module:function[=weight]")
    try:
        w = float(weight) if weight else 1.0
    except ValueError as e:
        raise ValueError(f"--reward {spec!r}: weight {weight!r} is not a number") from e
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"--reward {spec!r}: cannot import module {module_name!r}: {e}") from e
    fn = getattr(module, attr, None)
    if isinstance(fn, Reward):
        return dataclasses.replace(fn, weight=w * fn.weight)
    if not callable(fn):
        raise ValueError(f"--reward {spec!r}: module {module_name!r} has no callable {attr!r}")
    kind = getattr(fn, "reward_kind", "function")
    return Reward(name=attr, fn=fn, weight=w, kind=kind)
