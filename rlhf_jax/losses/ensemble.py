r"""Reward-model ensembles: aggregations of member scores, and WARM weight averaging.

An ensemble of K reward models scores every sequence K times: ``scores[k, b]`` is member k's
reward of sequence b (reward units, float). An aggregation turns the ``[K, B]`` scores into one
reward per sequence ``[B]`` for the policy to optimise; the conservative ones penalise
sequences on which the members disagree, which is where a policy that exploits one reward
model's errors goes (Coste et al. 2023, "Reward Model Ensembles Help Mitigate
Overoptimization", §3: mean optimisation, worst-case optimisation (WCO) and
uncertainty-weighted optimisation (UWO); Eisenstein et al. 2023 study the same aggregations).

Registered in ``AGGREGATIONS`` by config name, each ``fn(scores [K, B], coef) -> [B]``:

==================  ========================================================================
``mean``            ``r̄_b = (1/K) Σ_k s_kb``                                  (mean optimisation)
``min``             ``min_k s_kb``                                        (WCO: the worst case)
``mean_minus_std``  ``r̄_b - λ σ_b``, ``σ_b = sqrt((1/K) Σ_k (s_kb - r̄_b)²)`` (UWO with std)
``mean_minus_var``  ``r̄_b - λ σ_b²``                             (UWO exactly as Coste et al.)
==================  ========================================================================

``σ_b`` is the *population* standard deviation over the members (``ddof=0``: the K members
are the whole ensemble, not a sample of a larger one; it matches Coste et al.'s intra-ensemble
variance ``(1/K) Σ_k (s_kb - r̄_b)²``). ``λ = coef >= 0`` is in reward units per unit of std
(``mean_minus_std``) or per squared reward unit (``mean_minus_var``); ``mean`` and ``min``
ignore it. For K = 1 every aggregation returns the member's scores.

``warm_average`` is WARM (Ramé et al. 2024, "WARM: On the Benefits of Weight Averaged Reward
Models", §3): the K members' parameters averaged uniformly, ``φ_WARM = (1/K) Σ_k φ_k``, one
reward model of the cost of one. It is meaningful for members fine-tuned from one shared
initialisation (linear mode connectivity, WARM §3); with a linear head on a shared frozen
trunk, it equals the ``mean`` aggregation exactly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp

Aggregation = Callable[[jax.Array, "float | jax.Array"], jax.Array]


def _check(scores: jax.Array, name: str) -> jax.Array:
    if scores.ndim != 2 or scores.shape[0] < 1:
        raise ValueError(f"{name}: scores must be [K, B] with K >= 1 members, got shape "
                         f"{scores.shape}")
    return scores.astype(jnp.promote_types(scores.dtype, jnp.float32))


def member_mean(scores: jax.Array) -> jax.Array:
    """``(1/K) Σ_k scores[k, b]`` ``[B]`` (float32, or float64 for float64 input).

    Raises:
      ValueError: ``scores`` is not ``[K, B]`` with ``K >= 1``.
    """
    return jnp.mean(_check(scores, "member_mean"), axis=0)


def member_std(scores: jax.Array) -> jax.Array:
    """Between-member standard deviation ``[B]``, population (``ddof=0``):
    ``sqrt((1/K) Σ_k (scores[k, b] - mean_b)²)``; 0 for K = 1.

    Raises:
      ValueError: ``scores`` is not ``[K, B]`` with ``K >= 1``.
    """
    return jnp.std(_check(scores, "member_std"), axis=0, ddof=0)


def ensemble_mean(scores: jax.Array, coef: float | jax.Array = 0.0) -> jax.Array:
    """Mean optimisation: ``r_b = (1/K) Σ_k s_kb`` ``[B]`` (Coste et al. 2023 §3).

    Args:
      scores: ``[K, B]`` float member scores (reward units).
      coef: ignored (the common signature of ``AGGREGATIONS``).
    """
    del coef
    return member_mean(scores)


def ensemble_min(scores: jax.Array, coef: float | jax.Array = 0.0) -> jax.Array:
    """Worst-case optimisation (WCO): ``r_b = min_k s_kb`` ``[B]`` (Coste et al. 2023 §3).

    Args:
      scores: ``[K, B]`` float member scores (reward units).
      coef: ignored.
    """
    del coef
    return jnp.min(_check(scores, "ensemble_min"), axis=0)


def ensemble_mean_minus_std(scores: jax.Array, coef: float | jax.Array = 1.0) -> jax.Array:
    """Uncertainty-weighted with the standard deviation: ``r_b = mean_b - λ std_b`` ``[B]``,
    ``std`` the population std over members (``member_std``, ddof 0). A lower-confidence-bound
    form of Coste et al. 2023's UWO (which penalises the variance: ``mean_minus_var``); the
    penalty is in reward units, so ``λ`` does not depend on the reward scale.

    Args:
      scores: ``[K, B]`` float member scores (reward units).
      coef: ``λ >= 0`` (not checked inside jit).
    """
    return member_mean(scores) - coef * member_std(scores)


def ensemble_mean_minus_var(scores: jax.Array, coef: float | jax.Array = 1.0) -> jax.Array:
    """Uncertainty-weighted optimisation (UWO) as in Coste et al. 2023 §3:
    ``r_b = mean_b - λ (1/K) Σ_k (s_kb - mean_b)²`` ``[B]`` (population variance).

    Args:
      scores: ``[K, B]`` float member scores (reward units).
      coef: ``λ >= 0`` per squared reward unit (not checked inside jit).
    """
    return member_mean(scores) - coef * jnp.square(member_std(scores))


#: Aggregations by config name: ``fn(scores [K, B], coef) -> [B]`` (module docstring).
AGGREGATIONS: dict[str, Aggregation] = {
    "mean": ensemble_mean,
    "min": ensemble_min,
    "mean_minus_std": ensemble_mean_minus_std,
    "mean_minus_var": ensemble_mean_minus_var,
}


def get_aggregation(name: str) -> Aggregation:
    """The aggregation registered as ``name``.

    Raises:
      ValueError: unknown ``name`` (the registered names are listed).
    """
    if name not in AGGREGATIONS:
        raise ValueError(f"unknown ensemble aggregation {name!r}; expected one of "
                         f"{', '.join(sorted(AGGREGATIONS))}")
    return AGGREGATIONS[name]


def aggregate(scores: jax.Array, name: str = "mean", coef: float | jax.Array = 1.0) -> jax.Array:
    """``AGGREGATIONS[name](scores, coef)``: ``[K, B] -> [B]`` (module docstring).

    Raises:
      ValueError: unknown ``name``, or ``scores`` not ``[K, B]``.
    """
    return get_aggregation(name)(scores, coef)


def warm_average(params: Sequence[Any] | Any) -> Any:
    """WARM: the uniform average of K members' parameters, ``φ = (1/K) Σ_k φ_k``
    (Ramé et al. 2024 §3), leaf by leaf.

    Accumulates in float32 (or the leaf's wider float type) and casts back to each leaf's
    dtype. Valid for members fine-tuned from one shared initialisation (the trunk and, for the
    average to be a good model, the head too; see ``rlhf_jax.train.reward_ensemble``).

    Args:
      params: a list / tuple of K parameter pytrees of one structure and shapes, or one
        pytree whose every leaf is stacked on a leading member axis ``[K, ...]`` (the params
        of an ensemble ``TrainState``).

    Returns:
      One parameter pytree (the members' structure, leaves without the member axis).

    Raises:
      ValueError: an empty list, members whose structure / leaf shapes / dtypes differ, a
        stacked pytree whose leaves disagree on K, or a non-float leaf.
    """
    if isinstance(params, (list, tuple)):
        if not params:
            raise ValueError("warm_average: no member parameters given")
        tree = jax.tree.structure(params[0])
        for i, p in enumerate(params[1:], 1):
            if jax.tree.structure(p) != tree:
                raise ValueError(f"warm_average: member {i}'s parameter tree differs from member "
                                 f"0's:\n{jax.tree.structure(p)}\n{tree}")
            for (path, a), b in zip(jax.tree_util.tree_flatten_with_path(params[0])[0],
                                    jax.tree.leaves(p)):
                if jnp.shape(a) != jnp.shape(b) or jnp.result_type(a) != jnp.result_type(b):
                    raise ValueError(f"warm_average: {jax.tree_util.keystr(path)} is "
                                     f"{jnp.result_type(a)}{list(jnp.shape(a))} in member 0 but "
                                     f"{jnp.result_type(b)}{list(jnp.shape(b))} in member {i}")
        params = jax.tree.map(lambda *xs: jnp.stack(xs), *params)
    flat = jax.tree_util.tree_flatten_with_path(params)[0]
    if not flat:
        raise ValueError("warm_average: the parameter tree has no leaves")
    sizes = {jnp.shape(x)[0] if jnp.ndim(x) else None for _, x in flat}
    if len(sizes) != 1 or None in sizes:
        raise ValueError("warm_average: every leaf of stacked parameters needs the same leading "
                         f"member axis K; got leading sizes {sorted(map(str, sizes))}")

    def mean(path, x):
        dt = jnp.result_type(x)
        if not jnp.issubdtype(dt, jnp.floating):
            raise ValueError(f"warm_average: {jax.tree_util.keystr(path)} has dtype {dt}; only "
                             "float parameters can be averaged")
        acc = jnp.promote_types(dt, jnp.float32)
        return jnp.mean(jnp.asarray(x, acc), axis=0).astype(dt)

    return jax.tree_util.tree_map_with_path(mean, params)
