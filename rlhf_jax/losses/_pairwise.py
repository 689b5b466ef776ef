"""Helpers shared by the DPO family (``dpo``, ``reference_free``, ``dpo_variants``, ``kto``):
the registry entry type :class:`DPOLoss`, argument checks, per-token averages, the
implicit-reward log-ratios and the metrics every member of the family reports."""

from __future__ import annotations

import dataclasses
import types
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import Metrics, _float, metric

#: The hyperparameters of the family, as ``rlhf_jax.losses.dpo.dpo_loss`` and the trainer's
#: ``DPOConfig`` name them.
_KNOBS = ("beta", "label_smoothing", "gamma", "dpop_lambda", "desirable_weight",
          "undesirable_weight")


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class DPOLoss:
    """One member of the DPO family, as ``rlhf_jax.losses.dpo.DPO_LOSSES`` lists it.

    Attributes:
      fn: the pure loss. Pairwise (``unpaired`` False): ``fn(policy_chosen_logps,
        policy_rejected_logps[, ref_chosen_logps, ref_rejected_logps], **knobs) -> (loss,
        metrics)``; the reference log-probs are positional arguments exactly when
        ``needs_reference``. Unpaired: ``fn(policy_logps, ref_logps, label, *,
        reference_point, **knobs)`` (see ``rlhf_jax.losses.kto``).
      needs_reference: the loss uses the frozen reference's log-probs. When False a trainer
        runs no reference forward at all.
      length_normalised: the loss is defined on per-token *average* log-likelihoods
        ``log π(y|x) / |y|``: ``fn`` takes ``chosen_lengths`` / ``rejected_lengths``.
      knobs: the hyperparameters this loss uses (a subset of ``beta``, ``label_smoothing``,
        ``gamma``, ``dpop_lambda``, ``desirable_weight``, ``undesirable_weight``), each mapped
        to ``fn``'s keyword for it (ORPO calls ``beta`` its λ, ``lam``). Stored read-only.
      description: one line: what the loss is.
      source: the paper and equation it implements.
      unpaired: the loss is defined on single completions labelled desirable / undesirable
        (``rlhf_jax.types.UnpairedBatch``), not on pairs (KTO); ``dpo_loss`` refuses it.
      batch_statistics: keyword of ``fn`` -> ``f(policy_chosen_logps, policy_rejected_logps,
        ref_chosen_logps, ref_rejected_logps, *, beta, weights) -> scalar``: a statistic of the
        *whole* batch the loss reads without gradient (BCO's reward shift δ). ``fn`` computes
        it from its own rows when the keyword is not given; a trainer that splits the batch
        (microbatches, the per-row masked mean) computes it once over the full batch's valid
        rows (``weights [B]``) and passes it, so the loss does not depend on the split.
    """

    fn: Callable[..., tuple[jax.Array, Metrics]]
    needs_reference: bool
    length_normalised: bool
    knobs: Mapping[str, str]
    description: str
    source: str
    unpaired: bool = False
    batch_statistics: Mapping[str, Callable[..., jax.Array]] = dataclasses.field(
        default_factory=dict)

    def __post_init__(self):
        for name in ("knobs", "batch_statistics"):
            object.__setattr__(self, name, types.MappingProxyType(dict(getattr(self, name))))
        unknown = set(self.knobs) - set(_KNOBS)
        if unknown:
            raise ValueError(f"DPOLoss({self.fn.__name__}): unknown knobs {sorted(unknown)}; "
                             f"dpo_loss has {list(_KNOBS)}")

    @property
    def uses_label_smoothing(self) -> bool:
        """Whether ``label_smoothing`` (a label-noise rate ε) means anything to this loss."""
        return "label_smoothing" in self.knobs


def _check_beta(name: str, beta) -> None:
    if isinstance(beta, (int, float)) and not beta > 0:
        raise ValueError(f"{name}: beta must be > 0, got {beta}")


def _check_shapes(name: str, *arrays) -> None:
    shapes = {jnp.shape(a) for a in arrays if a is not None}
    if len(shapes) > 1:
        raise ValueError(f"{name}: all log-prob inputs must have the same [B] shape, got {shapes}")


def _average(logps: jax.Array, lengths: jax.Array | None) -> jax.Array:
    logps = _float(logps)
    if lengths is None:
        return logps
    return logps / jnp.maximum(_float(lengths), 1.0)


def _metrics(
    loss_b: jax.Array,
    chosen_rewards: jax.Array,
    rejected_rewards: jax.Array,
    chosen_logps: jax.Array,
    rejected_logps: jax.Array,
) -> Metrics:
    margins = chosen_rewards - rejected_rewards
    acc = jnp.where(margins > 0, 1.0, jnp.where(margins == 0, 0.5, 0.0))
    return {
        "dpo/loss": metric(loss_b),
        "dpo/rewards/chosen": metric(chosen_rewards),
        "dpo/rewards/rejected": metric(rejected_rewards),
        "dpo/rewards/margins": metric(margins),
        "dpo/rewards/accuracies": metric(acc),
        "dpo/logps/chosen": metric(chosen_logps),
        "dpo/logps/rejected": metric(rejected_logps),
    }


def _logratios(pc, pr, rc, rr):
    pc, pr, rc, rr = (_float(x) for x in (pc, pr, rc, rr))
    return pc - rc, pr - rr


def _check_lengths(name, chosen_lengths, rejected_lengths) -> None:
    if (chosen_lengths is None) != (rejected_lengths is None):
        raise ValueError(f"{name}: pass both chosen_lengths and rejected_lengths, or neither")


def _check_nonneg(name: str, what: str, value) -> None:
    if isinstance(value, (int, float)) and not value >= 0:
        raise ValueError(f"{name}: {what} must be >= 0, got {value}")
