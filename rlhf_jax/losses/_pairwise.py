"""Helpers shared by the pairwise preference losses (``dpo``, ``reference_free``): argument
checks, per-token averages, the implicit-reward log-ratios and the metrics every member of the
family reports."""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses.logprobs import Metrics, _float, metric


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
