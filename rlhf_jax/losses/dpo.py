"""Direct preference losses on sequence log-probabilities: DPO and its family.

Inputs are per-sequence log-likelihoods of a chosen (``y_w``) and a rejected (``y_l``)
response to the same prompt, shape ``[B]``, in nats:
``policy_chosen_logps[b] = Σ_t loss_mask[b, t] · logp[b, t] = log π_θ(y_w | x)`` (from
:func:`~rlhf_jax.losses.logprobs.sequence_logprobs`), and the same under the frozen reference
``π_ref`` for ``ref_*``.

The family is listed once, in :data:`DPO_LOSSES` (name -> :class:`DPOLoss`: the function,
whether it needs the reference, whether it is length-normalised, its source), and
:func:`dpo_loss` dispatches through it by name. The reference-free members (SimPO, ORPO) are
defined in ``rlhf_jax.losses.reference_free``; shared helpers in ``_pairwise``.

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

import dataclasses
import types
from collections.abc import Callable, Mapping
from typing import Literal, get_args

import jax
import jax.numpy as jnp

from rlhf_jax.losses._pairwise import (_average, _check_beta, _check_lengths, _check_shapes,
                                       _logratios, _metrics)
from rlhf_jax.losses.logprobs import Metrics, _float
from rlhf_jax.losses.reference_free import orpo_loss, simpo_loss

#: The names of :data:`DPO_LOSSES`, as a ``Literal`` for command-line choices (tyro); an
#: import-time check keeps it equal to the registry's keys.
LossType = Literal["sigmoid", "robust", "ipo", "hinge", "simpo", "orpo"]


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


@dataclasses.dataclass(frozen=True, kw_only=True, eq=False)
class DPOLoss:
    """One member of the DPO family, as :data:`DPO_LOSSES` lists it.

    Attributes:
      fn: the pure loss, ``fn(policy_chosen_logps, policy_rejected_logps[, ref_chosen_logps,
        ref_rejected_logps], **knobs) -> (loss, metrics)``; the reference log-probs are
        positional arguments exactly when ``needs_reference``.
      needs_reference: the loss uses the frozen reference's log-probs. When False a trainer
        runs no reference forward at all.
      length_normalised: the loss is defined on per-token *average* log-likelihoods
        ``log π(y|x) / |y|``: ``fn`` takes ``chosen_lengths`` / ``rejected_lengths``.
      knobs: the :func:`dpo_loss` hyperparameters this loss uses (``beta``,
        ``label_smoothing``, ``gamma``), each mapped to ``fn``'s keyword for it (ORPO calls
        ``beta`` its λ, ``lam``). Stored read-only.
      description: one line: what the loss is.
      source: the paper and equation it implements.
    """

    fn: Callable[..., tuple[jax.Array, Metrics]]
    needs_reference: bool
    length_normalised: bool
    knobs: Mapping[str, str]
    description: str
    source: str

    def __post_init__(self):
        object.__setattr__(self, "knobs", types.MappingProxyType(dict(self.knobs)))
        unknown = set(self.knobs) - set(_KNOBS)
        if unknown:
            raise ValueError(f"DPOLoss({self.fn.__name__}): unknown knobs {sorted(unknown)}; "
                             f"dpo_loss has {list(_KNOBS)}")

    @property
    def uses_label_smoothing(self) -> bool:
        """Whether ``label_smoothing`` (a label-noise rate ε) means anything to this loss."""
        return "label_smoothing" in self.knobs


_KNOBS = ("beta", "label_smoothing", "gamma")

#: Loss type name -> :class:`DPOLoss`. The one list of the DPO family: :func:`dpo_loss`
#: dispatches through it and the trainer (``rlhf_jax.train.dpo``) reads ``needs_reference`` and
#: ``length_normalised`` from it. Add a loss here and to :data:`LossType` (the command-line
#: choices; an import-time check keeps the two equal).
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
    chosen_lengths: jax.Array | None = None,
    rejected_lengths: jax.Array | None = None,
) -> tuple[jax.Array, Metrics]:
    """Dispatch to the member of the DPO family named ``loss_type`` in :data:`DPO_LOSSES`
    (selected at trace time).

    A trainer can pass everything it has (sums, lengths and reference log-probs) whatever the
    loss type: each loss uses what its paper uses. Losses that are not ``length_normalised``
    ignore the lengths; those that do not ``need_reference`` ignore ``ref_*_logps``; ``gamma``
    is only read by SimPO. A ``label_smoothing`` other than 0 raises for a loss without that
    knob, since it would change the maths silently.

    Args:
      policy_chosen_logps: ``[B]`` float ``log π_θ(y_w|x)`` in nats (sum over response tokens;
        the per-token average for a length-normalised loss when no lengths are given).
      policy_rejected_logps: ``[B]`` float ``log π_θ(y_l|x)``.
      ref_chosen_logps: ``[B]`` float ``log π_ref(y_w|x)``; required when the loss
        ``needs_reference``.
      ref_rejected_logps: ``[B]`` float ``log π_ref(y_l|x)``; same.
      beta: β > 0 (ORPO's λ for ``"orpo"``, as TRL's ``ORPOConfig.beta``).
      loss_type: a key of :data:`DPO_LOSSES`.
      label_smoothing: ε for the losses with that knob (``sigmoid``: cDPO, ``robust``); must
        be 0 for the others.
      gamma: SimPO's target margin γ (reward units).
      chosen_lengths: optional ``[B]`` response token counts ``|y_w|``, used by the
        length-normalised losses (both lengths or neither).
      rejected_lengths: optional ``[B]`` response token counts ``|y_l|``.

    Returns:
      ``(loss, metrics)`` of the selected loss (mean over the B pairs).

    Raises:
      ValueError: unknown ``loss_type`` (listing ``sorted(DPO_LOSSES)``); missing reference
        log-probs for a loss that needs them; ``label_smoothing != 0`` for a loss without
        label smoothing; only one of the two lengths; plus the selected loss's own checks.
    """
    spec = get_dpo_loss(loss_type)
    if spec.needs_reference and (ref_chosen_logps is None or ref_rejected_logps is None):
        raise ValueError(f"dpo_loss: loss_type={loss_type!r} needs ref_chosen_logps and ref_rejected_logps")
    _check_lengths("dpo_loss", chosen_lengths, rejected_lengths)
    if not spec.uses_label_smoothing and label_smoothing != 0.0:
        with_it = sorted(k for k, v in DPO_LOSSES.items() if v.uses_label_smoothing)
        raise ValueError(f"dpo_loss: label_smoothing={label_smoothing} is only used by {with_it}, "
                         f"not {loss_type!r}")
    _check_beta(f"dpo_loss({loss_type})", beta)
    values = dict(beta=beta, label_smoothing=label_smoothing, gamma=gamma)
    kwargs = {fn_name: values[knob] for knob, fn_name in spec.knobs.items()}
    if spec.length_normalised:
        kwargs.update(chosen_lengths=chosen_lengths, rejected_lengths=rejected_lengths)
    args = (policy_chosen_logps, policy_rejected_logps)
    if spec.needs_reference:
        args += (ref_chosen_logps, ref_rejected_logps)
    return spec.fn(*args, **kwargs)
