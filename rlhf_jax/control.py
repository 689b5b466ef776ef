"""KL-coefficient controllers and running statistics as pure ``(init, update)`` pairs.

States are ``NamedTuple`` pytrees of scalar arrays (never Python floats), so they live inside a
jitted train state and changing values never trigger a recompile.
"""

from __future__ import annotations

import dataclasses
from typing import Literal, NamedTuple

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import masked_count, masked_mean, masked_sum

# --------------------------------------------------------------------------------------------
# KL controllers
# --------------------------------------------------------------------------------------------


class KLState(NamedTuple):
    """KL controller state.

    Attributes:
      kl_coef: ``[] float32`` the current penalty coefficient β (reward units per nat of KL).
    """

    kl_coef: jax.Array


def fixed_kl_init(kl_coef: float | jax.Array) -> KLState:
    """State of a constant KL coefficient β (Ziegler et al. 2019 §2.2 "fixed β").

    Args:
      kl_coef: β >= 0.
    """
    return KLState(kl_coef=jnp.asarray(kl_coef, jnp.float32))


def fixed_kl_update(state: KLState, current_kl: jax.Array, n_steps: jax.Array | int) -> KLState:
    """Return ``state`` unchanged (same signature as :func:`adaptive_kl_update`)."""
    del current_kl, n_steps
    return state


def adaptive_kl_init(init_kl_coef: float | jax.Array) -> KLState:
    """State of the adaptive KL controller, starting at β₀ = ``init_kl_coef``."""
    return KLState(kl_coef=jnp.asarray(init_kl_coef, jnp.float32))


def adaptive_kl_update(
    state: KLState,
    current_kl: jax.Array | float,
    n_steps: jax.Array | int,
    *,
    target: float,
    horizon: float,
) -> KLState:
    """Proportional controller that drives the observed KL towards ``target``.

    ``e = clip(KL / target - 1, -0.2, 0.2)``, ``β ← β · (1 + e · n_steps / horizon)``.
    Ziegler et al. 2019 §2.2 (``K_β = n_steps / horizon``); lm-human-preferences
    ``AdaptiveKLController`` and TRL use the same rule, with ``n_steps`` the number of episodes
    (samples) in the batch that produced ``current_kl``.

    Args:
      state: current :class:`KLState`.
      current_kl: ``[]`` float observed KL, nats per sequence (``objective/kl``: the batch mean
        of the sequence sum of k1).
      n_steps: number of samples behind ``current_kl`` (int or int array).
      target: target KL (nats per sequence), > 0.
      horizon: controller time constant in samples, > 0.

    Returns:
      The new :class:`KLState`.

    Raises:
      ValueError: ``target <= 0`` or ``horizon <= 0``.
    """
    if not target > 0 or not horizon > 0:
        raise ValueError(
            f"adaptive_kl_update: target and horizon must be > 0, got target={target}, "
            f"horizon={horizon}"
        )
    kl = jnp.asarray(current_kl, jnp.float32)
    error = jnp.clip(kl / target - 1.0, -0.2, 0.2)
    mult = 1.0 + error * jnp.asarray(n_steps, jnp.float32) / horizon
    return KLState(kl_coef=(state.kl_coef * mult).astype(jnp.float32))


@dataclasses.dataclass(frozen=True, kw_only=True)
class KLController:
    """A KL controller chosen by config; ``init``/``update`` dispatch to the pure functions.

    Hashable and static (safe as a ``jit`` static argument or closure constant); the changing
    coefficient lives in the :class:`KLState` it returns.

    Attributes:
      kind: ``"fixed"`` (constant β) or ``"adaptive"`` (Ziegler et al. 2019 §2.2).
      init_kl_coef: β₀ >= 0 (TRL default 0.2; InstructGPT uses 0.02 fixed).
      target: adaptive only: target KL in nats per sequence (> 0; TRL default 6).
      horizon: adaptive only: time constant in samples (> 0; TRL default 10000).
    """

    kind: Literal["fixed", "adaptive"] = "fixed"
    init_kl_coef: float = 0.2
    target: float | None = None
    horizon: float | None = None

    def __post_init__(self):
        if self.kind not in ("fixed", "adaptive"):
            raise ValueError(f"KLController.kind must be 'fixed' or 'adaptive', got {self.kind!r}")
        if not self.init_kl_coef >= 0:
            raise ValueError(f"KLController.init_kl_coef must be >= 0, got {self.init_kl_coef}")
        if self.kind == "adaptive":
            if self.target is None or not self.target > 0:
                raise ValueError(f"KLController(kind='adaptive').target must be > 0, got {self.target}")
            if self.horizon is None or not self.horizon > 0:
                raise ValueError(
                    f"KLController(kind='adaptive').horizon must be > 0, got {self.horizon}"
                )
        elif self.target is not None or self.horizon is not None:
            raise ValueError(
                f"KLController(kind='fixed') takes no target/horizon, got target={self.target}, "
                f"horizon={self.horizon}"
            )

    def init(self) -> KLState:
        """Initial :class:`KLState` with β = ``init_kl_coef``."""
        if self.kind == "fixed":
            return fixed_kl_init(self.init_kl_coef)
        return adaptive_kl_init(self.init_kl_coef)

    def update(self, state: KLState, current_kl: jax.Array, n_steps: jax.Array | int) -> KLState:
        """Next :class:`KLState` given the observed KL (nats/sequence) over ``n_steps`` samples."""
        if self.kind == "fixed":
            return fixed_kl_update(state, current_kl, n_steps)
        return adaptive_kl_update(
            state, current_kl, n_steps, target=self.target, horizon=self.horizon
        )


# --------------------------------------------------------------------------------------------
# Running moments
# --------------------------------------------------------------------------------------------


class RunningMoments(NamedTuple):
    """Running count, mean and sum of squared deviations of a scalar stream.

    Attributes:
      count: ``[] float32`` number of values seen (float32: exact up to 2**24).
      mean: ``[] float32`` their mean.
      m2: ``[] float32`` ``Σ (x - mean)²`` over them.
    """

    count: jax.Array
    mean: jax.Array
    m2: jax.Array


def running_moments_init() -> RunningMoments:
    """Empty :class:`RunningMoments` (count 0, mean 0, m2 0)."""
    z = jnp.zeros((), jnp.float32)
    return RunningMoments(count=z, mean=z, m2=z)


def running_moments_update(
    state: RunningMoments, x: jax.Array, mask: jax.Array | None = None
) -> RunningMoments:
    """Fold a batch into the running moments with the parallel (Chan et al.) combination.

    Batch moments are computed two-pass (``n_b``, ``mean_b``, ``m2_b = Σ (x - mean_b)²``), then
    ``n = n_a + n_b``, ``δ = mean_b - mean_a``, ``mean = mean_a + δ n_b / n``,
    ``m2 = m2_a + m2_b + δ² n_a n_b / n``. Any sequence of batched updates therefore equals one
    update on the concatenation (up to rounding). Chan, Golub & LeVeque 1979/1983
    ("Updating formulae and a pairwise algorithm for computing sample variances"); used for
    reward scaling as in TRL's ``RunningMoments``.

    Args:
      state: current :class:`RunningMoments`.
      x: any-shape float array; every (masked) entry is one value.
      mask: optional bool/{0,1} broadcastable to ``x``. An all-False mask leaves the state
        unchanged.

    Returns:
      The updated :class:`RunningMoments`.
    """
    x = jnp.asarray(x, jnp.float32)
    m = jnp.ones(x.shape, bool) if mask is None else mask
    n_b = masked_count(m, like=x)
    mean_b = masked_mean(x, m)
    m2_b = masked_sum(jnp.square(x - mean_b), m)
    n_a = state.count
    n = n_a + n_b
    inv_n = 1.0 / jnp.maximum(n, 1.0)
    delta = mean_b - state.mean
    mean = state.mean + delta * n_b * inv_n
    m2 = state.m2 + m2_b + jnp.square(delta) * n_a * n_b * inv_n
    return RunningMoments(count=n, mean=mean, m2=m2)


def running_moments_var(state: RunningMoments, *, unbiased: bool = True) -> jax.Array:
    """Variance of all values seen: ``m2 / (n - 1)`` (unbiased) or ``m2 / n``; 0 when too few."""
    denom = state.count - 1.0 if unbiased else state.count
    return state.m2 / jnp.maximum(denom, 1.0)


def running_moments_std(state: RunningMoments, *, unbiased: bool = True) -> jax.Array:
    """Standard deviation ``sqrt(running_moments_var(state))``."""
    return jnp.sqrt(running_moments_var(state, unbiased=unbiased))
