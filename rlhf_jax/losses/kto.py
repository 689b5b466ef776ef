"""KTO (Ethayarajh et al. 2024): preference optimisation from *unpaired* completions, each
labelled desirable or undesirable, with a prospect-theoretic value relative to a KL reference
point.

Inputs are per-completion sequence log-likelihoods ``[B]`` in nats,
``policy_logps[b] = Σ_t loss_mask[b, t] · logp[b, t] = log π_θ(y_b | x_b)`` and the same under
the frozen reference, and ``label [B] bool`` (True: desirable). The reference point ``z0`` is
estimated from *mismatched* pairs of the same batch: the prompt ``x_i`` followed by the
completion ``y_{(i+1) mod B}`` of the next row (``rlhf_jax.types.UnpairedBatch``'s ``kl_*``
fields), whose log-likelihoods are ``kl_policy_logps`` / ``kl_ref_logps``. Registered in
``rlhf_jax.losses.dpo.DPO_LOSSES`` as ``"kto"`` with ``unpaired=True``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from rlhf_jax.losses._pairwise import _check_beta, _check_shapes
from rlhf_jax.losses.logprobs import Metrics, _float, metric


def kto_reference_point(
    kl_policy_logps: jax.Array,
    kl_ref_logps: jax.Array,
    *,
    weights: jax.Array | None = None,
) -> jax.Array:
    """KTO's reference point: the mean log-ratio of the mismatched pairs, clamped at 0.

    ``z0 = max(0, mean_i [log π_θ(y_{i+1}|x_i) - log π_ref(y_{i+1}|x_i)])``.

    A biased but cheap estimate of ``KL(π_θ(y'|x) || π_ref(y'|x))`` from the mismatched pairs
    of the batch, clamped at 0, and held constant in the gradient (Ethayarajh et al. 2024 §4:
    z0 only sets the reference point of the value function).

    Args:
      kl_policy_logps: ``[B]`` float ``log π_θ(y_{(i+1) mod B} | x_i)`` (nats, summed over the
        completion's tokens).
      kl_ref_logps: ``[B]`` float, the same under ``π_ref``.
      weights: optional ``[B]`` {0, 1} rows to average over (valid rows); all when None.

    Returns:
      Scalar ``z0 >= 0`` (nats), ``stop_gradient``-ed.

    Raises:
      ValueError: shape mismatch.
    """
    _check_shapes("kto_reference_point", kl_policy_logps, kl_ref_logps, weights)
    d = _float(kl_policy_logps) - _float(kl_ref_logps)
    w = jnp.ones_like(d) if weights is None else _float(weights)
    mean = jnp.sum(w * d) / jnp.maximum(jnp.sum(w), 1.0)
    return jax.lax.stop_gradient(jnp.maximum(mean, 0.0))


def kto_loss(
    policy_logps: jax.Array,
    ref_logps: jax.Array,
    label: jax.Array,
    kl_policy_logps: jax.Array | None = None,
    kl_ref_logps: jax.Array | None = None,
    *,
    reference_point: jax.Array | float | None = None,
    beta: float | jax.Array = 0.1,
    desirable_weight: float | jax.Array = 1.0,
    undesirable_weight: float | jax.Array = 1.0,
) -> tuple[jax.Array, Metrics]:
    """KTO: ``L = E_{x,y}[λ_y - v(x, y)]`` over unpaired, labelled completions.

    With ``r = log π_θ(y|x) - log π_ref(y|x)``:
    ``v = λ_D σ(β (r - z0))`` for a desirable ``y`` and ``v = λ_U σ(β (z0 - r))`` for an
    undesirable one; ``λ_y`` is ``λ_D`` or ``λ_U`` accordingly, so a row's loss is
    ``λ_D (1 - σ(β (r - z0)))`` or ``λ_U (1 - σ(β (z0 - r)))``. Ethayarajh et al. 2024 ("KTO:
    Model Alignment as Prospect Theoretic Optimization") eq. 8; ``z0`` as in §4
    (:func:`kto_reference_point`). The paper recommends ``λ_D n_D / (λ_U n_U)`` in
    ``[1, 4/3]`` for ``n_D`` desirable and ``n_U`` undesirable examples, and β = 0.1.

    Args:
      policy_logps: ``[B]`` float ``log π_θ(y_b | x_b)`` (nats, summed over the completion).
      ref_logps: ``[B]`` float ``log π_ref(y_b | x_b)``.
      label: ``[B]`` bool, True for a desirable completion.
      kl_policy_logps: optional ``[B]`` ``log π_θ(y_{(b+1) mod B} | x_b)`` of the mismatched
        pairs; with ``kl_ref_logps``, gives ``z0`` when ``reference_point`` is None.
      kl_ref_logps: optional ``[B]``, the same under ``π_ref``.
      reference_point: ``z0`` (scalar, nats) computed elsewhere (a trainer that splits the
        batch computes it once over the whole batch); exclusive with the ``kl_*`` arguments.
      beta: β > 0.
      desirable_weight: λ_D > 0.
      undesirable_weight: λ_U > 0.

    Returns:
      ``(loss, metrics)``: the mean over the B completions; metrics ``dpo/loss``,
      ``dpo/rewards/desirable`` and ``dpo/rewards/undesirable`` (``β r``, averaged over the
      rows of each label), ``dpo/logps/desirable``, ``dpo/logps/undesirable``, and ``kto/kl``
      (``z0``).

    Raises:
      ValueError: ``beta <= 0``, a weight ``<= 0``, neither or both of ``reference_point`` and
        the ``kl_*`` log-probs, shape mismatch.
    """
    _check_beta("kto_loss", beta)
    for what, w in (("desirable_weight", desirable_weight),
                    ("undesirable_weight", undesirable_weight)):
        if isinstance(w, (int, float)) and not w > 0:
            raise ValueError(f"kto_loss: {what} must be > 0, got {w}")
    have_kl = kl_policy_logps is not None or kl_ref_logps is not None
    if reference_point is not None and have_kl:
        raise ValueError("kto_loss: pass reference_point or the kl_* log-probs, not both")
    if reference_point is None:
        if kl_policy_logps is None or kl_ref_logps is None:
            raise ValueError("kto_loss: pass reference_point, or both kl_policy_logps and "
                             "kl_ref_logps (the mismatched pairs that estimate it)")
        reference_point = kto_reference_point(kl_policy_logps, kl_ref_logps)
    _check_shapes("kto_loss", policy_logps, ref_logps, label, kl_policy_logps, kl_ref_logps)
    pl = _float(policy_logps)
    r = pl - _float(ref_logps)
    z0 = jax.lax.stop_gradient(jnp.asarray(reference_point, r.dtype))
    desirable = jnp.asarray(label).astype(bool)
    lam_d = jnp.asarray(desirable_weight, r.dtype)
    lam_u = jnp.asarray(undesirable_weight, r.dtype)
    loss_b = jnp.where(desirable, lam_d * (1.0 - jax.nn.sigmoid(beta * (r - z0))),
                       lam_u * (1.0 - jax.nn.sigmoid(beta * (z0 - r))))
    rewards = beta * r
    m = {
        "dpo/loss": metric(loss_b),
        "dpo/rewards/desirable": metric(rewards, desirable),
        "dpo/rewards/undesirable": metric(rewards, ~desirable),
        "dpo/logps/desirable": metric(pl, desirable),
        "dpo/logps/undesirable": metric(pl, ~desirable),
        "kto/kl": metric(jnp.broadcast_to(z0, r.shape)),
    }
    return jnp.mean(loss_b), m
