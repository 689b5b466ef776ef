"""Direct preference losses on sequence log-probabilities: DPO and its family.

Inputs are per-sequence log-likelihoods of a chosen (``y_w``) and a rejected (``y_l``)
response to the same prompt, shape ``[B]``, in nats:
``policy_chosen_logps[b] = Σ_t loss_mask[b, t] · logp[b, t] = log π_θ(y_w | x)`` (from
:func:`~rlhf_jax.losses.logprobs.sequence_logprobs`), and the same under the frozen reference
``π_ref`` for ``ref_*``.

The family is listed once, in :data:`DPO_LOSSES` (name -> :class:`DPOLoss`: the function,
whether it needs the reference, whether it is length-normalised, its source), and
:func:`dpo_loss` dispatches through it by name. The reference-free members (SimPO, ORPO) are
defined in ``rlhf_jax.losses.reference_free``, BCO / APO / NCA / DPOP / EXO / SPPO in
``dpo_variants``, the unpaired KTO in ``kto``; shared helpers in ``_pairwise``.

Any pairwise loss can add the NLL of the chosen response (CPO, Xu et al. 2024 eq. 6; RPO,
Pang et al. 2024): ``nll_coef = α > 0`` adds ``α · mean_b[-log π_θ(y_w|x) / |y_w|]``, the
per-token NLL of each chosen response averaged over the pairs (RPO's length normalisation).

Length-normalised losses work on per-token *average* log-likelihoods ``log π(y|x) / |y|``.
They take optional ``chosen_lengths`` / ``rejected_lengths`` (``[B]``,
number of response tokens): when given, the log-prob sums are divided by them; when None, the
caller must already pass per-token averages.

Every loss returns ``(loss, metrics)``, the loss being the mean over the B pairs. Metrics
(averaged over pairs): ``dpo/loss``, ``dpo/rewards/chosen``, ``dpo/rewards/rejected``
(the implicit reward ``β·(log π - log π_ref)``, or the method's own reference-free reward),
``dpo/rewards/margins`` (chosen - rejected), ``dpo/rewards/accuracies`` (chosen > rejected; a
tie counts 0.5), ``dpo/logps/chosen``, ``dpo/logps/rejected`` (policy inputs as passed).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from rlhf_jax.losses._pairwise import (DPOLoss, _average, _check_beta, _check_lengths,
                                       _check_nonneg, _check_shapes, _logratios, _metrics)
from rlhf_jax.losses.dpo_variants import (apo_down_loss, apo_zero_loss, bco_pair_loss,
                                          bco_reward_shift, dpop_loss, exo_pair_loss,
                                          nca_pair_loss, sppo_hard_loss)
from rlhf_jax.losses.kto import kto_loss
from rlhf_jax.losses.logprobs import Metrics, _float, metric
from rlhf_jax.losses.reference_free import orpo_loss, simpo_loss

#: The names of :data:`DPO_LOSSES`, as a ``Literal`` for command-line choices (tyro); an
#: import-time check keeps it equal to the registry's keys.
LossType = Literal["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo", "bco_pair", "apo_zero",
                   "apo_down", "nca_pair", "dpop", "exo_pair", "sppo_hard", "kto"]


def dpo_sigmoid_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """DPO, and conservative DPO (cDPO) when ``label_smoothing > 0``.

    ``h = (log π_θ(y_w) - log π_ref(y_w)) - (log π_θ(y_l) - log π_ref(y_l))``,
    ``L = -(1 - ε) log σ(β h) - ε log σ(-β h)``.
    ``ε = 0`` is DPO, Rafailov et al. 2023 eq. 7; ``ε > 0`` assumes each label is flipped with
    probability ε (cDPO, Mitchell 2023, "A note on DPO with noisy preferences").

    Args:
      policy_chosen_logps: ``[B]`` float ``log π_θ(y_w | x)`` (sum over response tokens, nats).
      policy_rejected_logps: ``[B]`` float ``log π_θ(y_l | x)``.
      ref_chosen_logps: ``[B]`` float ``log π_ref(y_w | x)`` (frozen reference).
      ref_rejected_logps: ``[B]`` float ``log π_ref(y_l | x)``.
      beta: β > 0, strength of the implicit KL constraint.
      label_smoothing: ε in ``[0, 0.5]``, assumed label-noise rate.

    Returns:
      ``(loss, metrics)``: mean over pairs; metrics as in the module docstring with implicit
      rewards ``β(log π_θ - log π_ref)``.

    Raises:
      ValueError: ``beta <= 0``, ``label_smoothing`` outside ``[0, 0.5]``, shape mismatch.
    """
    _check_beta("dpo_sigmoid_loss", beta)
    if not 0.0 <= label_smoothing <= 0.5:
        raise ValueError(f"dpo_sigmoid_loss: label_smoothing must be in [0, 0.5], got {label_smoothing}")
    _check_shapes(
        "dpo_sigmoid_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps,
    )
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = c - r
    loss_b = -(1.0 - label_smoothing) * jax.nn.log_sigmoid(beta * h) - label_smoothing * jax.nn.log_sigmoid(
        -beta * h
    )
    m = _metrics(loss_b, beta * c, beta * r, _float(policy_chosen_logps), _float(policy_rejected_logps))
    return jnp.mean(loss_b), m


def robust_dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    label_smoothing: float = 0.0,
) -> tuple[jax.Array, Metrics]:
    """Robust DPO (rDPO): an unbiased estimate of the clean DPO loss under label flips of rate ε.

    ``L = [-(1 - ε) log σ(β h) + ε log σ(-β h)] / (1 - 2ε)`` with ``h`` the DPO log-ratio
    difference. Chowdhury et al. 2024 ("Provably Robust DPO: Aligning Language Models with Noisy
    Feedback", ICML), the rDPO loss; TRL's ``loss_type="robust"``. Equals DPO at ε = 0.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float sequence log-probabilities (nats), as in :func:`dpo_sigmoid_loss`.
      beta: β > 0.
      label_smoothing: ε in ``[0, 0.5)`` (flip rate).

    Returns:
      ``(loss, metrics)`` as :func:`dpo_sigmoid_loss`.

    Raises:
      ValueError: ``beta <= 0``, ``label_smoothing`` outside ``[0, 0.5)``, shape mismatch.
    """
    _check_beta("robust_dpo_loss", beta)
    if not 0.0 <= label_smoothing < 0.5:
        raise ValueError(f"robust_dpo_loss: label_smoothing must be in [0, 0.5), got {label_smoothing}")
    _check_shapes(
        "robust_dpo_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps,
    )
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    h = c - r
    eps = label_smoothing
    loss_b = (-(1.0 - eps) * jax.nn.log_sigmoid(beta * h) + eps * jax.nn.log_sigmoid(-beta * h)) / (
        1.0 - 2.0 * eps
    )
    m = _metrics(loss_b, beta * c, beta * r, _float(policy_chosen_logps), _float(policy_rejected_logps))
    return jnp.mean(loss_b), m


def ipo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """IPO: squared regression of the log-ratio difference onto ``1 / (2β)``.

    ``L = (h - 1/(2β))²`` with ``h = (ℓ_θ(y_w) - ℓ_ref(y_w)) - (ℓ_θ(y_l) - ℓ_ref(y_l))`` and
    ``ℓ = log π(y|x) / |y|`` the per-token *average* log-likelihood. Azar et al. 2023 ("A
    General Theoretical Paradigm to Understand Learning from Human Preferences") eq. 17, β = τ;
    the per-token averaging follows the authors' reference setup and TRL.

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float; sequence sums (nats) if lengths are given, else per-token averages (nats/token).
      beta: τ > 0 (regularisation strength).
      chosen_lengths: optional ``[B]`` number of response tokens of ``y_w`` (same for policy and
        reference). Either both lengths or neither.
      rejected_lengths: optional ``[B]`` number of response tokens of ``y_l``.

    Returns:
      ``(loss, metrics)``; implicit rewards ``β(ℓ_θ - ℓ_ref)`` on the averaged log-probs.

    Raises:
      ValueError: ``beta <= 0``, only one of the lengths given, shape mismatch.
    """
    _check_beta("ipo_loss", beta)
    _check_lengths("ipo_loss", chosen_lengths, rejected_lengths)
    _check_shapes(
        "ipo_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps, chosen_lengths, rejected_lengths,
    )
    pc = _average(policy_chosen_logps, chosen_lengths)
    pr = _average(policy_rejected_logps, rejected_lengths)
    rc = _average(ref_chosen_logps, chosen_lengths)
    rr = _average(ref_rejected_logps, rejected_lengths)
    c, r = pc - rc, pr - rr
    loss_b = jnp.square(c - r - 1.0 / (2.0 * beta))
    return jnp.mean(loss_b), _metrics(loss_b, beta * c, beta * r, pc, pr)


def hinge_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array,
    ref_rejected_logps: jax.Array,
    *,
    beta: float | jax.Array = 0.1,
) -> tuple[jax.Array, Metrics]:
    """SLiC-style hinge loss on the DPO log-ratio difference.

    ``L = max(0, 1 - β h)``, ``h`` as in :func:`dpo_sigmoid_loss`. Zhao et al. 2023 ("SLiC-HF:
    Sequence Likelihood Calibration with Human Feedback"), the rank-calibration hinge
    ``max(0, δ - log π(y_w) + log π(y_l))`` scaled by β with margin δ = 1/β, on the
    reference-normalised log-likelihoods (the ``hinge`` loss of TRL / Liu et al. 2024 RSO).

    Args:
      policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps: ``[B]``
        float sequence log-probabilities (nats).
      beta: β > 0.

    Returns:
      ``(loss, metrics)`` with implicit rewards ``β(log π_θ - log π_ref)``.

    Raises:
      ValueError: ``beta <= 0`` or shape mismatch.
    """
    _check_beta("hinge_loss", beta)
    _check_shapes(
        "hinge_loss", policy_chosen_logps, policy_rejected_logps, ref_chosen_logps,
        ref_rejected_logps,
    )
    c, r = _logratios(policy_chosen_logps, policy_rejected_logps, ref_chosen_logps, ref_rejected_logps)
    loss_b = jax.nn.relu(1.0 - beta * (c - r))
    m = _metrics(loss_b, beta * c, beta * r, _float(policy_chosen_logps), _float(policy_rejected_logps))
    return jnp.mean(loss_b), m


#: Loss type name -> :class:`DPOLoss`. The one list of the DPO family: :func:`dpo_loss`
#: dispatches through it and the trainer (``rlhf_jax.train.dpo``) reads ``needs_reference``,
#: ``length_normalised``, ``unpaired`` and ``batch_statistics`` from it. Add a loss here and to
#: :data:`LossType` (the command-line choices; an import-time check keeps the two equal).
#: Below, ``c`` / ``r`` are the chosen / rejected log-ratios ``log π_θ - log π_ref`` and
#: ``h = c - r``.
DPO_LOSSES: dict[str, DPOLoss] = {
    "sigmoid": DPOLoss(
        fn=dpo_sigmoid_loss, needs_reference=True, length_normalised=False,
        knobs={"beta": "beta", "label_smoothing": "label_smoothing"},
        description="DPO: -log σ(β h) on the log-ratio difference h; cDPO when "
                    "label_smoothing > 0",
        source="Rafailov et al. 2023 eq. 7; cDPO: Mitchell 2023"),
    "robust": DPOLoss(
        fn=robust_dpo_loss, needs_reference=True, length_normalised=False,
        knobs={"beta": "beta", "label_smoothing": "label_smoothing"},
        description="rDPO: unbiased DPO under label flips of rate label_smoothing",
        source="Chowdhury et al. 2024 (Provably Robust DPO), the rDPO loss"),
    "ipo": DPOLoss(
        fn=ipo_loss, needs_reference=True, length_normalised=True,
        knobs={"beta": "beta"},
        description="IPO: (h - 1/(2β))² on per-token average log-ratios",
        source="Azar et al. 2023 eq. 17"),
    "hinge": DPOLoss(
        fn=hinge_loss, needs_reference=True, length_normalised=False,
        knobs={"beta": "beta"},
        description="SLiC hinge: max(0, 1 - β h)",
        source="Zhao et al. 2023 (SLiC-HF), rank-calibration loss"),
    "simpo": DPOLoss(
        fn=simpo_loss, needs_reference=False, length_normalised=True,
        knobs={"beta": "beta", "gamma": "gamma"},
        description="SimPO: -log σ(β ℓ(y_w) - β ℓ(y_l) - γ), reference-free, on per-token "
                    "averages ℓ",
        source="Meng et al. 2024 (SimPO) eq. 6"),
    "orpo": DPOLoss(
        fn=orpo_loss, needs_reference=False, length_normalised=True,
        knobs={"beta": "lam"},
        description="ORPO: chosen NLL + β · -log σ(log-odds ratio), reference-free, per-token "
                    "averages (beta is ORPO's λ)",
        source="Hong et al. 2024 (ORPO) §3, eq. 6-7"),
    "bco_pair": DPOLoss(
        fn=bco_pair_loss, needs_reference=True, length_normalised=False,
        knobs={"beta": "beta"}, batch_statistics={"delta": bco_reward_shift},
        description="BCO on pairs: -log σ(β c - δ) - log σ(δ - β r), δ the batch's mean "
                    "implicit reward (no gradient)",
        source="Jung et al. 2024 (BCO), the loss with reward shift δ; pairs as TRL bco_pair"),
    "apo_zero": DPOLoss(
        fn=apo_zero_loss, needs_reference=True, length_normalised=False,
        knobs={"beta": "beta"},
        description="APO-zero: -σ(β c) + σ(β r), chosen up and rejected down",
        source="D'Oosterlinck et al. 2024 (APO) eq. 4"),
    "apo_down": DPOLoss(
        fn=apo_down_loss, needs_reference=True, length_normalised=False,
        knobs={"beta": "beta"},
        description="APO-down: σ(β c) - σ(β (c - r)), both down, rejected more",
        source="D'Oosterlinck et al. 2024 (APO) eq. 5"),
    "nca_pair": DPOLoss(
        fn=nca_pair_loss, needs_reference=True, length_normalised=False,
        knobs={"beta": "beta"},
        description="NCA on pairs: -log σ(β c) - ½ log σ(-β c) - ½ log σ(-β r)",
        source="Chen et al. 2024 (NCA), the pairwise-preference loss"),
    "dpop": DPOLoss(
        fn=dpop_loss, needs_reference=True, length_normalised=False,
        knobs={"beta": "beta", "dpop_lambda": "lam"},
        description="DPO-Positive: -log σ(β (h - λ max(0, -c))), penalising a chosen "
                    "likelihood below the reference's",
        source="Pal et al. 2024 (Smaug) eq. 3"),
    "exo_pair": DPOLoss(
        fn=exo_pair_loss, needs_reference=True, length_normalised=False,
        knobs={"beta": "beta", "label_smoothing": "label_smoothing"},
        description="EXO on pairs: KL(Bern(σ(β h)) || Bern(1 - ε)), ε = label_smoothing "
                    "(0 means 1e-3)",
        source="Ji et al. 2024 (EXO), the pairwise loss with label smoothing ε"),
    "sppo_hard": DPOLoss(
        fn=sppo_hard_loss, needs_reference=True, length_normalised=False,
        knobs={"beta": "beta"},
        description="SPPO, hard labels: (c - 1/(2β))² + (r + 1/(2β))²",
        source="Wu et al. 2024 (SPPO), hard-label objective with η = 1/β"),
    "kto": DPOLoss(
        fn=kto_loss, needs_reference=True, length_normalised=False, unpaired=True,
        knobs={"beta": "beta", "desirable_weight": "desirable_weight",
               "undesirable_weight": "undesirable_weight"},
        description="KTO on unpaired labelled completions: λ_y - v(x, y) around the KL "
                    "reference point z0 of mismatched pairs",
        source="Ethayarajh et al. 2024 (KTO) eq. 8, z0 as in §4"),
}

if set(get_args(LossType)) != set(DPO_LOSSES):  # not ``assert``: it must hold under ``-O`` too
    raise ImportError(f"rlhf_jax.losses.dpo: LossType {sorted(get_args(LossType))} differs from "
                      f"DPO_LOSSES {sorted(DPO_LOSSES)}")


def get_dpo_loss(loss_type: str) -> DPOLoss:
    """The :class:`DPOLoss` named ``loss_type``.

    Raises:
      ValueError: ``loss_type`` is not a key of :data:`DPO_LOSSES` (the message lists them).
    """
    try:
        return DPO_LOSSES[loss_type]
    except (KeyError, TypeError):
        raise ValueError(f"unknown DPO loss_type {loss_type!r}; known: "
                         f"{sorted(DPO_LOSSES)}") from None


def dpo_loss(
    policy_chosen_logps: jax.Array,
    policy_rejected_logps: jax.Array,
    ref_chosen_logps: jax.Array | None = None,
    ref_rejected_logps: jax.Array | None = None,
    *,
    beta: float | jax.Array = 0.1,
    loss_type: LossType = "sigmoid",
    label_smoothing: float = 0.0,
    gamma: float | jax.Array = 0.5,
    dpop_lambda: float | jax.Array = 50.0,
    nll_coef: float | jax.Array = 0.0,
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
    batch_statistics: Mapping[str, jax.Array] | None = None,
) -> tuple[jax.Array, Metrics]:
    """Dispatch to the pairwise member of the DPO family named ``loss_type`` in
    :data:`DPO_LOSSES` (selected at trace time), plus ``nll_coef`` × the chosen NLL.

    A trainer can pass everything it has (sums, lengths and reference log-probs) whatever the
    loss type: each loss uses what its paper uses. Losses that are not ``length_normalised``
    ignore the lengths; those that do not ``need_reference`` ignore ``ref_*_logps``; ``gamma``
    is only read by SimPO and ``dpop_lambda`` by DPOP. A ``label_smoothing`` other than 0
    raises for a loss without that knob, since it would change the maths silently.

    Args:
      policy_chosen_logps: ``[B]`` float ``log π_θ(y_w|x)`` in nats (sum over response tokens;
        the per-token average for a length-normalised loss when no lengths are given).
      policy_rejected_logps: ``[B]`` float ``log π_θ(y_l|x)``.
      ref_chosen_logps: ``[B]`` float ``log π_ref(y_w|x)``; required when the loss
        ``needs_reference``.
      ref_rejected_logps: ``[B]`` float ``log π_ref(y_l|x)``; same.
      beta: β > 0 (ORPO's λ for ``"orpo"``, as TRL's ``ORPOConfig.beta``).
      loss_type: a key of :data:`DPO_LOSSES` whose entry is not ``unpaired``.
      label_smoothing: ε for the losses with that knob (``sigmoid``: cDPO, ``robust``,
        ``exo_pair``); must be 0 for the others.
      gamma: SimPO's target margin γ (reward units).
      dpop_lambda: DPOP's penalty weight λ >= 0.
      nll_coef: α >= 0: add ``α · mean_b[-log π_θ(y_w|x) / |y_w|]`` (CPO eq. 6 / RPO; per
        token, then over pairs); needs ``chosen_lengths`` when > 0. The metrics then carry
        ``dpo/nll`` and ``dpo/loss`` includes the term.
      chosen_lengths: optional ``[B]`` response token counts ``|y_w|``, used by the
        length-normalised losses (both lengths or neither) and by ``nll_coef``.
      rejected_lengths: optional ``[B]`` response token counts ``|y_l|``.
      batch_statistics: values of the loss's ``DPOLoss.batch_statistics`` computed over a
        larger batch than these B pairs (by a trainer that splits it); each one missing is
        computed by the loss from these B pairs.

    Returns:
      ``(loss, metrics)`` of the selected loss (mean over the B pairs).

    Raises:
      ValueError: unknown ``loss_type`` (listing ``sorted(DPO_LOSSES)``); an unpaired loss
        (KTO: call ``rlhf_jax.losses.kto.kto_loss``); missing reference log-probs for a loss
        that needs them; ``label_smoothing != 0`` for a loss without label smoothing; only
        one of the two lengths; ``nll_coef < 0``, or ``> 0`` without ``chosen_lengths``; an
        unknown key in ``batch_statistics``; plus the selected loss's own checks.
    """
    spec = get_dpo_loss(loss_type)
    if spec.unpaired:
        raise ValueError(f"dpo_loss: loss_type={loss_type!r} is defined on unpaired labelled "
                         f"completions, not on pairs: call {spec.fn.__module__}."
                         f"{spec.fn.__name__}")
    if spec.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"dpo_loss: loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    _check_lengths("dpo_loss", chosen_lengths, rejected_lengths)
    if not spec.uses_label_smoothing and label_smoothing != 0.0:
        with_it = sorted(k for k, v in DPO_LOSSES.items() if v.uses_label_smoothing)
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} is only used by {with_it}, "
                         f"not {loss_type!r}")
    _check_beta(f"dpo_loss({loss_type})", beta)
    _check_nonneg("dpo_loss", "nll_coef", nll_coef)
    if (not isinstance(nll_coef, (int, float)) or nll_coef > 0) and chosen_lengths is None:
        raise ValueError("dpo_loss: nll_coef > 0 needs chosen_lengths (the NLL is per token)")
    unknown = set(batch_statistics or {}) - set(spec.batch_statistics)
    if unknown:
        raise ValueError(f"dpo_loss: loss_type={loss_type!r} reads no batch statistic "
                         f"{sorted(unknown)}; it reads {sorted(spec.batch_statistics)}")
    values = dict(beta=beta, label_smoothing=label_smoothing, gamma=gamma,
                  dpop_lambda=dpop_lambda)
    kwargs = {fn_name: values[knob] for knob, fn_name in spec.knobs.items()}
    kwargs.update(batch_statistics or {})
    if spec.length_normalised:
        kwargs.update(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    args = (policy_chosen_logps, policy_rejected_logps)
    if spec.needs_reference:
        args += (ref_chosen_logps, ref_rejected_logps)
    loss, metrics = spec.fn(*args, **kwargs)
    if isinstance(nll_coef, (int, float)) and nll_coef == 0:
        return loss, metrics
    nll_b = -_average(policy_chosen_logps, chosen_lengths)
    s, n = metrics["dpo/loss"]
    metrics = {**metrics, "dpo/loss": (s + nll_coef * jnp.sum(nll_b), n), "dpo/nll": metric(nll_b)}
    return loss + nll_coef * jnp.mean(nll_b), metrics
