"""Direct preference optimisation step (Rafailov et al. 2023) and its family.

Policy and frozen reference score the chosen and rejected responses of a ``PreferenceBatch``
(``N = 2``) with summed response log-probs; the loss of ``DPOConfig.loss_type`` is applied by
``rlhf_jax.losses.dpo.dpo_loss``, and what the loss needs (the reference, per-token averages)
is read from its entry in ``rlhf_jax.losses.dpo.DPO_LOSSES``. The reference log-probs come
either from the reference parameters inside the step (``dpo_step``: an extra forward, no
stored state) or precomputed once over the data set (``make_reference_logps`` +
``dpo_step_precomputed``: cheaper per step, as in TRL's ``precompute_ref_log_probs``).
Reference parameters are an explicit argument, never captured by closure. A reference-free
loss (``needs_reference`` False: SimPO, ORPO) runs no reference forward at all; its step
ignores the reference argument, which may be ``None``.

With frozen lower layers (``ModelConfig.frozen_layers``) and a reference that equals the
policy there (it is the policy's initialisation: ``DPOConfig.reference_shares_frozen_layers``),
the embeddings and frozen blocks run once per batch and feed both the policy's and the
reference's upper blocks (``Model.frozen_hidden``); the losses are unchanged.

With LoRA (``ModelConfig.lora``) and a reference that is the starting policy
(``DPOConfig.reference_is_base``), the reference is the policy's own parameters with the
adapters switched off (``Model.apply(..., adapters=False)``; Hu et al. 2021): no second copy
of the model exists, and the step's reference argument is unused (pass ``None``).

The loss is a mean over the valid pairs (``PreferenceBatch.valid``; filler rows of
``DataConfig.remainder="pad"`` carry no loss and do not dilute it), with the count of the
*whole* batch as denominator, so microbatching changes nothing. A loss that reads a statistic
of the whole batch (``DPOLoss.batch_statistics``: BCO's reward shift δ) gets it computed once
per step over the full batch, from one extra policy forward without gradient.

An *unpaired* loss (KTO, ``DPOLoss.unpaired``) trains on an ``UnpairedBatch`` instead: single
completions labelled desirable / undesirable. Each step first computes, without gradient, the
reference point ``z0`` from the batch's mismatched pairs ``(x_i, y_{(i+1) mod B})`` (a policy
and a reference forward over them, Ethayarajh et al. 2024 §4) and the reference log-probs, then
the loss as a mean over the valid rows. The same ``make_dpo_step`` builds it.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import optax

from rlhf_jax.losses.dpo import DPO_LOSSES, DPOLoss, LossType, dpo_loss, get_dpo_loss
from rlhf_jax.losses.kto import kto_reference_point
from rlhf_jax.models.model import Model, Params
from rlhf_jax.train.common import (add_router_aux_loss, flatten_candidates, rowwise_mean,
                                   sequence_logps)
from rlhf_jax.train.state import (TrainState, accumulate_gradients, apply_gradients, jit_step,
                                  lora_dropout_rng)
from rlhf_jax.types import PreferenceBatch, UnpairedBatch


@dataclasses.dataclass(frozen=True, kw_only=True)
class DPOConfig:
    """DPO-family step options.

    Attributes:
      beta: inverse temperature of the implicit reward ``beta * log(pi / pi_ref)``.
      loss_type: a key of ``rlhf_jax.losses.dpo.DPO_LOSSES`` (``"sigmoid"`` is DPO; for
        ``"orpo"`` ``beta`` is the odds-ratio weight lambda, as in TRL).
      label_smoothing: preference-noise rate ε, for the losses with that knob (cDPO as
        ``"sigmoid"``, ``"robust"``, and EXO's label smoothing for ``"exo_pair"``, where 0
        means 1e-3); must be 0 for the others.
      gamma: SimPO target reward margin (read only by ``"simpo"``).
      dpop_lambda: DPOP's penalty weight λ (read only by ``"dpop"``); 50 as in Pal et al.
        2024.
      desirable_weight: KTO's λ_D (read only by ``"kto"``).
      undesirable_weight: KTO's λ_U (read only by ``"kto"``). Both default to 1 (TRL's
        default): Ethayarajh et al. 2024 §4 recommend ``λ_D n_D / (λ_U n_U)`` in ``[1, 4/3]``
        for ``n_D`` desirable and ``n_U`` undesirable examples, and the built-in sentiment data
        is balanced (movie-review train split: 1,531 desirable and 1,572 undesirable snippets
        of the tiny preset, ratio 0.97), so equal weights sit at that range's edge without
        tuning a default to one data set. Set them for imbalanced data; the DPO stage logs
        the ratio.
      nll_coef: α >= 0: add α × the chosen response's per-token NLL to a pairwise loss (CPO,
        Xu et al. 2024 eq. 6; RPO, Pang et al. 2024); ``rlhf_jax.losses.dpo.dpo_loss``. Must
        be 0 for an unpaired loss.
      num_microbatches: gradient accumulation steps per update.
      reference_shares_frozen_layers: the reference equals the policy in the embeddings and the
        lowest ``model.cfg.frozen_layers`` blocks (check once with
        ``rlhf_jax.train.state.frozen_part_equal``): run that part of the forward once for
        both. The step cannot check it; a wrong True gives wrong reference log-probs.
      reference_is_base: the reference is the policy's frozen base: its own parameters with
        the LoRA adapters switched off (the policy started from fresh, zero-product adapters
        on the reference's weights). The reference argument of the steps is then ignored (pass
        ``None``) and no reference copy is held; the model must have ``cfg.lora``.
    """

    beta: float = 0.1
    loss_type: LossType = "sigmoid"
    label_smoothing: float = 0.0
    gamma: float = 0.5
    dpop_lambda: float = 50.0
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    nll_coef: float = 0.0
    num_microbatches: int = 1
    reference_shares_frozen_layers: bool = False
    reference_is_base: bool = False

    def __post_init__(self):
        if self.beta <= 0:
            raise ValueError(f"DPOConfig.beta must be > 0, got {self.beta}")
        if self.loss_type not in DPO_LOSSES:
            raise ValueError(f"DPOConfig.loss_type {self.loss_type!r} is not one of "
                             f"{sorted(DPO_LOSSES)}")
        if self.label_smoothing and not self.loss.uses_label_smoothing:
            with_it = sorted(k for k, v in DPO_LOSSES.items() if v.uses_label_smoothing)
            raise ValueError(f"DPOConfig.label_smoothing={self.label_smoothing} only applies to "
                             f"loss_type {with_it}, not {self.loss_type!r}")
        if not 0.0 <= self.label_smoothing < 0.5:
            raise ValueError(f"DPOConfig.label_smoothing must be in [0, 0.5), got {self.label_smoothing}")
        for name in ("dpop_lambda", "nll_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"DPOConfig.{name} must be >= 0, got {getattr(self, name)}")
        for name in ("desirable_weight", "undesirable_weight"):
            if getattr(self, name) <= 0:
                raise ValueError(f"DPOConfig.{name} must be > 0, got {getattr(self, name)}")
        if self.nll_coef and self.loss.unpaired:
            raise ValueError(f"DPOConfig.nll_coef={self.nll_coef} adds the chosen response's NLL "
                             f"to a pairwise loss; loss_type {self.loss_type!r} is unpaired")

    @property
    def loss(self) -> DPOLoss:
        """The registry entry of ``loss_type``."""
        return get_dpo_loss(self.loss_type)

    @property
    def needs_reference(self) -> bool:
        """Whether the loss uses the reference (``DPOLoss.needs_reference``)."""
        return self.loss.needs_reference

    @property
    def unpaired(self) -> bool:
        """Whether the loss trains on ``UnpairedBatch`` es (``DPOLoss.unpaired``: KTO)."""
        return self.loss.unpaired


def pair_logps(model: Model, params: Params, batch: PreferenceBatch,
               frozen_hidden: jax.Array | None = None, *, with_router_aux: bool = False,
               adapters: bool = True, dropout_rng: jax.Array | None = None):
    """Summed response log-probs ``[B, 2]`` and lengths ``[B, 2]`` in one forward over ``2B``
    (from ``frozen_hidden [B, 2, T, D]`` of ``pair_frozen_hidden`` when given);
    ``with_router_aux``: a third result, ``ModelOutput.router_aux_loss``; ``adapters`` /
    ``dropout_rng``: LoRA's switch and adapter dropout (``Model.apply``)."""
    b, n = batch.tokens.shape[:2]
    hidden = None if frozen_hidden is None else flatten_candidates(frozen_hidden)
    logps, lengths, aux = sequence_logps(
        model, params, flatten_candidates(batch.tokens), flatten_candidates(batch.positions),
        flatten_candidates(batch.attn_mask), flatten_candidates(batch.loss_mask),
        frozen_hidden=hidden, with_router_aux=True, adapters=adapters, dropout_rng=dropout_rng)
    out = logps.reshape(b, n), lengths.reshape(b, n)
    return (*out, aux) if with_router_aux else out


def pair_frozen_hidden(model: Model, params: Params, batch: PreferenceBatch) -> jax.Array:
    """``Model.frozen_hidden`` of every candidate: ``[B, 2, T, D]`` (split with the batch)."""
    b, n = batch.tokens.shape[:2]
    h = model.frozen_hidden(params, flatten_candidates(batch.tokens),
                            flatten_candidates(batch.positions), flatten_candidates(batch.attn_mask))
    return h.reshape((b, n) + h.shape[1:])


def _shared_hidden(model: Model, params: Params, batch: PreferenceBatch, cfg: DPOConfig):
    """The policy's frozen hidden states when the reference shares them, else ``None``."""
    if cfg.reference_shares_frozen_layers and cfg.needs_reference:
        return pair_frozen_hidden(model, params, batch)
    return None


def reference_params(params: Params, ref_params: Params | None, cfg) -> Params | None:
    """The parameters the reference forward runs on: the policy's own ``params`` when
    ``cfg.reference_is_base`` (with the adapters off), else ``ref_params``."""
    return params if cfg.reference_is_base else ref_params


def _reference_logps(model: Model, ref_params: Params, batch: PreferenceBatch, hidden,
                     cfg: DPOConfig) -> jax.Array:
    """``[B, 2]`` reference log-probs, no gradient. A reference-free loss (``needs_reference``
    False) runs no forward: zeros, which its loss never reads; ``ref_params`` may be None.
    With ``cfg.reference_is_base`` ``ref_params`` are the policy's (``reference_params``) and
    the forward skips the adapters."""
    if not cfg.needs_reference:
        return jnp.zeros(batch.tokens.shape[:2], jnp.float32)
    if ref_params is None:
        raise ValueError(f"DPO loss_type {cfg.loss_type!r} needs the reference parameters, "
                         f"got None")
    return jax.lax.stop_gradient(pair_logps(model, ref_params, batch, hidden,
                                            adapters=not cfg.reference_is_base)[0])


def _loss(policy_logps, lengths, ref_logps, cfg: DPOConfig, stats=None):
    """``dpo_loss`` with exactly the inputs ``cfg.loss_type`` is defined on (a mean over pairs):
    lengths when the loss is ``length_normalised`` or an NLL term is added (per token),
    reference log-probs when it ``needs_reference``, and the whole batch's ``stats``."""
    spec = cfg.loss
    kwargs = dict(beta=cfg.beta, loss_type=cfg.loss_type, label_smoothing=cfg.label_smoothing,
                  gamma=cfg.gamma, dpop_lambda=cfg.dpop_lambda, nll_coef=cfg.nll_coef,
                  batch_statistics=stats)
    if spec.length_normalised or cfg.nll_coef:  # per-token averages
        kwargs.update(chosen_lengths=lengths[:, 0], rejected_lengths=lengths[:, 1])
    refs = (ref_logps[:, 0], ref_logps[:, 1]) if spec.needs_reference else (None, None)
    return dpo_loss(policy_logps[:, 0], policy_logps[:, 1], *refs, **kwargs)


def pair_statistics(policy_logps, ref_logps, valid, cfg: DPOConfig) -> dict[str, jax.Array]:
    """The loss's ``DPOLoss.batch_statistics`` (e.g. BCO's δ) over the valid pairs of
    ``[B, 2]`` log-probs, without gradient; ``{}`` for a loss that reads none."""
    w = valid_pairs(valid).astype(jnp.float32)
    p, r = jax.lax.stop_gradient((policy_logps, ref_logps))
    return {name: f(p[:, 0], p[:, 1], r[:, 0], r[:, 1], beta=cfg.beta, weights=w)
            for name, f in cfg.loss.batch_statistics.items()}


def valid_pairs(valid: jax.Array) -> jax.Array:
    """``[B] bool`` pairs whose two candidates are valid (filler rows of ``remainder="pad"`` are
    not)."""
    valid = valid.astype(bool)
    return valid[:, 0] & valid[:, 1]


def num_valid_pairs(valid: jax.Array) -> jax.Array:
    """The global loss denominator: valid pairs of the whole batch (at least 1), float32."""
    return jnp.maximum(jnp.sum(valid_pairs(valid)), 1).astype(jnp.float32)


def masked_dpo_loss(policy_logps, lengths, ref_logps, valid, total_pairs, cfg: DPOConfig,
                    stats=None):
    """``_loss`` summed over the valid pairs and divided by ``total_pairs`` (the valid pairs of
    the whole batch). Invalid pairs get finite stand-in inputs first (a filler row has no
    response token: its ORPO log-odds would be ``log(1 - exp(0)) = -inf``). ``stats``: the
    whole batch's ``pair_statistics``; None computes them from these pairs."""
    ok = valid_pairs(valid)
    safe = lambda x, fill: jnp.where(ok[:, None], x, jnp.full_like(x, fill))
    policy_logps, ref_logps = safe(policy_logps, -1.0), safe(ref_logps, -1.0)
    if stats is None:
        stats = pair_statistics(policy_logps, ref_logps, valid, cfg)
    return rowwise_mean(functools.partial(_loss, cfg=cfg, stats=stats or None), ok, total_pairs,
                        policy_logps, safe(lengths, 1.0), ref_logps)


def dpo_loss_fn(params: Params, batch: PreferenceBatch, ref_logps: jax.Array, total_pairs,
                frozen_hidden: jax.Array | None = None, stats=None, *, model: Model,
                cfg: DPOConfig, dropout_rng: jax.Array | None = None):
    """Loss of one (micro)batch given reference log-probs ``[B, 2]``: summed over its valid
    pairs, divided by the full batch's valid pairs. ``frozen_hidden``: the policy's
    ``[B, 2, T, D]`` from ``pair_frozen_hidden``, or ``None``; ``stats``: the full batch's
    ``pair_statistics``. A mixture-of-experts policy adds its load-balancing loss, weighted
    by this microbatch's share of the valid pairs (``add_router_aux_loss``). ``dropout_rng``:
    LoRA's adapter dropout."""
    policy_logps, lengths, aux = pair_logps(model, params, batch, frozen_hidden,
                                            with_router_aux=True, dropout_rng=dropout_rng)
    loss, metrics = masked_dpo_loss(policy_logps, lengths, ref_logps, batch.valid, total_pairs,
                                    cfg, stats)
    share = jnp.sum(valid_pairs(batch.valid)) / total_pairs
    return add_router_aux_loss(loss, metrics, model, aux, share)


def _update(state, batch, ref_logps, hidden=None, *, model, tx, cfg):
    total = num_valid_pairs(batch.valid)
    stats = {}
    if cfg.loss.batch_statistics:  # over the whole batch, whatever the microbatching
        policy = jax.lax.stop_gradient(pair_logps(model, state.params, batch, hidden)[0])
        stats = pair_statistics(policy, ref_logps, batch.valid, cfg)
    loss_fn = functools.partial(dpo_loss_fn, model=model, cfg=cfg)
    # Reference log-probs and frozen hidden states travel with the batch so that microbatches
    # split them alike.
    fn = lambda p, joint, t, s, **kw: loss_fn(p, *joint[:2], t, joint[2], s, **kw)
    _, grads, metrics = accumulate_gradients(fn, state.params, (batch, ref_logps, hidden),
                                             cfg.num_microbatches, total, stats,
                                             dropout_rng=lora_dropout_rng(state, model))
    metrics = dict(metrics)
    metrics["train/grad_norm"] = (optax.global_norm(grads), jnp.ones((), jnp.float32))
    return apply_gradients(state, grads, tx), metrics


def dpo_step(state: TrainState, batch: PreferenceBatch, ref_params: Params, *, model: Model,
             tx: optax.GradientTransformation, cfg: DPOConfig):
    """One DPO update with the reference forward inside the step (pure).

    Args:
      state: policy ``TrainState``.
      batch: ``PreferenceBatch`` with ``N = 2`` (chosen, rejected).
      ref_params: frozen reference parameters (same architecture as the policy); unused, and
        may be ``None``, for a reference-free loss (no reference forward runs) and with
        ``cfg.reference_is_base`` (the policy's parameters with the adapters off are used).
    """
    hidden = _shared_hidden(model, state.params, batch, cfg)
    ref_logps = _reference_logps(model, reference_params(state.params, ref_params, cfg), batch,
                                 hidden, cfg)
    return _update(state, batch, ref_logps, hidden, model=model, tx=tx, cfg=cfg)


def dpo_step_precomputed(state: TrainState, batch: PreferenceBatch, ref_logps: jax.Array, *,
                         model: Model, tx: optax.GradientTransformation, cfg: DPOConfig):
    """One DPO update with reference log-probs ``[B, 2]`` precomputed over the data set
    (``None`` for a reference-free loss)."""
    if not cfg.needs_reference:
        ref_logps = _reference_logps(model, None, batch, None, cfg)
    elif ref_logps is None:
        raise ValueError(f"DPO loss_type {cfg.loss_type!r} needs reference log-probs, got None")
    return _update(state, batch, ref_logps, model=model, tx=tx, cfg=cfg)


# ---- unpaired losses (KTO) ------------------------------------------------------------------
def _logps(model: Model, params: Params, batch: UnpairedBatch, kl: bool, hidden=None, *,
           adapters: bool = True, dropout_rng: jax.Array | None = None):
    """Summed completion log-probs ``[B]`` of the examples, or of the KL pairs (``kl``)."""
    f = ("kl_tokens", "kl_positions", "kl_attn_mask", "kl_loss_mask") if kl else \
        ("tokens", "positions", "attn_mask", "loss_mask")
    return sequence_logps(model, params, *(getattr(batch, k) for k in f), frozen_hidden=hidden,
                          adapters=adapters, dropout_rng=dropout_rng)[0]


def _unpaired_hidden(model: Model, params: Params, batch: UnpairedBatch, cfg: DPOConfig):
    """The policy's frozen hidden states of the examples and of the KL pairs when the
    reference shares them, else ``(None, None)``."""
    if not cfg.reference_shares_frozen_layers:
        return None, None
    return tuple(model.frozen_hidden(params, *(getattr(batch, p + k) for k in
                                               ("tokens", "positions", "attn_mask")))
                 for p in ("", "kl_"))


def unpaired_reference(model: Model, params: Params, ref_params: Params, batch: UnpairedBatch,
                       cfg: DPOConfig, hidden=(None, None)):
    """``(ref_logps [B], z0)`` without gradient: the reference's log-probs of the examples and
    the reference point ``z0 = max(0, mean over valid rows of log π_θ - log π_ref)`` on the
    mismatched pairs (``rlhf_jax.losses.kto.kto_reference_point``; Ethayarajh et al. 2024 §4).

    With ``cfg.reference_is_base`` the reference is ``params`` with the adapters off and
    ``ref_params`` is ignored.

    Raises:
      ValueError: ``ref_params`` is None (and the reference is not the base).
    """
    ref_params = reference_params(params, ref_params, cfg)
    if ref_params is None:
        raise ValueError(f"DPO loss_type {cfg.loss_type!r} needs the reference parameters, "
                         "got None")
    base = not cfg.reference_is_base
    ref = _logps(model, ref_params, batch, False, hidden[0], adapters=base)
    kl_policy = _logps(model, params, batch, True, hidden[1])
    kl_ref = _logps(model, ref_params, batch, True, hidden[1], adapters=base)
    z0 = kto_reference_point(*jax.lax.stop_gradient((kl_policy, kl_ref)), weights=batch.valid)
    return jax.lax.stop_gradient(ref), z0


def num_valid_rows(valid: jax.Array) -> jax.Array:
    """The global loss denominator of an unpaired batch: its valid rows (at least 1), float32."""
    return jnp.maximum(jnp.sum(valid.astype(jnp.int32)), 1).astype(jnp.float32)


def masked_unpaired_loss(policy_logps, ref_logps, label, valid, total_rows, reference_point,
                         cfg: DPOConfig):
    """The unpaired loss (``cfg.loss.fn``, with the knobs its entry names) summed over the valid
    rows and divided by ``total_rows`` (the valid rows of the whole batch), with the whole
    batch's reference point."""
    spec = cfg.loss
    knobs = {fn_name: getattr(cfg, knob) for knob, fn_name in spec.knobs.items()}
    fn = lambda p, r, lab: spec.fn(p, r, lab, reference_point=reference_point, **knobs)
    ok = valid.astype(bool)
    safe = lambda x: jnp.where(ok, x, jnp.full_like(x, -1.0))
    return rowwise_mean(fn, ok, total_rows, safe(policy_logps), safe(ref_logps), label)


def unpaired_loss_fn(params: Params, batch: UnpairedBatch, ref_logps: jax.Array, total_rows,
                     hidden, reference_point, *, model: Model, cfg: DPOConfig,
                     dropout_rng: jax.Array | None = None):
    """Loss of one (micro)batch of an ``UnpairedBatch`` given its reference log-probs ``[B]``,
    the full batch's valid-row count and reference point ``z0``."""
    policy = _logps(model, params, batch, False, hidden, dropout_rng=dropout_rng)
    return masked_unpaired_loss(policy, ref_logps, batch.label, batch.valid, total_rows,
                                reference_point, cfg)


def unpaired_step(state: TrainState, batch: UnpairedBatch, ref_params: Params, *, model: Model,
                  tx: optax.GradientTransformation, cfg: DPOConfig):
    """One update of an unpaired loss (KTO) on an ``UnpairedBatch`` (pure): reference log-probs
    and ``z0`` over the whole batch without gradient (:func:`unpaired_reference`), then the
    loss over (micro)batches."""
    hidden, kl_hidden = _unpaired_hidden(model, state.params, batch, cfg)
    ref, z0 = unpaired_reference(model, state.params, ref_params, batch, cfg, (hidden, kl_hidden))
    total = num_valid_rows(batch.valid)
    loss_fn = functools.partial(unpaired_loss_fn, model=model, cfg=cfg)
    fn = lambda p, joint, t, z, **kw: loss_fn(p, joint[0], joint[1], t, joint[2], z, **kw)
    _, grads, metrics = accumulate_gradients(fn, state.params, (batch, ref, hidden),
                                             cfg.num_microbatches, total, z0,
                                             dropout_rng=lora_dropout_rng(state, model))
    metrics = dict(metrics)
    metrics["train/grad_norm"] = (optax.global_norm(grads), jnp.ones((), jnp.float32))
    return apply_gradients(state, grads, tx), metrics


def make_dpo_step(model: Model, tx: optax.GradientTransformation, cfg: DPOConfig = DPOConfig(), *,
                  precomputed: bool = False, state_sharding=None, batch_sharding=None,
                  frozen_sharding=None):
    """Jitted ``step(state, batch, ref_params_or_ref_logps)`` with the state donated: on
    ``PreferenceBatch`` es, or on ``UnpairedBatch`` es for an unpaired loss (KTO).

    Raises:
      ValueError: ``precomputed`` with an unpaired loss (its reference point needs the
        current policy on the mismatched pairs, every step); ``cfg.reference_is_base`` with a
        model without LoRA.
    """
    check_reference_is_base(cfg, model)
    if cfg.unpaired and precomputed:
        raise ValueError(f"DPO loss_type {cfg.loss_type!r} is unpaired: it has no "
                         "precomputed-reference step; use precomputed=False")
    fn = unpaired_step if cfg.unpaired else dpo_step_precomputed if precomputed else dpo_step
    return jit_step(functools.partial(fn, model=model, tx=tx, cfg=cfg), state_sharding=state_sharding,
                    batch_sharding=batch_sharding, frozen_shardings=(frozen_sharding,))


def make_reference_logps(model: Model, *, adapters: bool = True):
    """Jitted ``(ref_params, batch) -> [B, 2]`` summed reference log-probs (for precomputation).
    ``adapters=False``: the reference is the LoRA policy's frozen base, so pass the policy's
    own parameters (no copy; ``DPOConfig.reference_is_base``)."""
    return jax.jit(lambda ref_params, batch: pair_logps(model, ref_params, batch,
                                                        adapters=adapters)[0])


def check_reference_is_base(cfg, model: Model) -> None:
    """Raise ``ValueError`` when ``cfg.reference_is_base`` (a ``DPOConfig`` or ``PPOConfig``)
    is set for a model without LoRA (whose adapters-off forward would be the policy itself)."""
    if cfg.reference_is_base and model.cfg.lora is None:
        raise ValueError(f"{type(cfg).__name__}.reference_is_base needs a model with LoRA "
                         "adapters (ModelConfig.lora); without them the policy's base is the "
                         "policy itself")


def make_dpo_eval(model: Model, cfg: DPOConfig = DPOConfig()):
    """Jitted ``(params, ref_params, batch) -> metrics`` on a ``PreferenceBatch`` without an
    update (``ref_params`` may be ``None`` for a reference-free loss).

    An unpaired loss (KTO) has no loss on pairs: held-out pairs then give the implicit-reward
    metrics ``β (log π_θ - log π_ref)`` of the chosen and rejected responses (margins,
    accuracies, ...), the same quantities every reference-based member of the family reports,
    and no ``dpo/loss``. With ``cfg.reference_is_base`` ``ref_params`` is ignored (``None``):
    the reference is ``params`` with the adapters off."""
    check_reference_is_base(cfg, model)
    pair_cfg = cfg
    if cfg.unpaired:
        pair_cfg = dataclasses.replace(cfg, loss_type="sigmoid", label_smoothing=0.0,
                                       nll_coef=0.0)

    def evaluate(params, ref_params, batch):
        hidden = _shared_hidden(model, params, batch, pair_cfg)
        ref = _reference_logps(model, reference_params(params, ref_params, pair_cfg), batch,
                               hidden, pair_cfg)
        policy, lengths = pair_logps(model, params, batch, hidden)
        metrics = masked_dpo_loss(policy, lengths, ref, batch.valid,
                                  num_valid_pairs(batch.valid), pair_cfg)[1]
        if cfg.unpaired:
            metrics = {k: v for k, v in metrics.items() if k != "dpo/loss"}
        return metrics
    return jax.jit(evaluate)
