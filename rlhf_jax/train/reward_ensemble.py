r"""Reward-model ensembles trained in one jitted step (Coste et al. 2023; Ramé et al. 2024).

K reward models are trained together: their parameters and optimizer states are stacked on a
leading *member* axis of one ``TrainState`` (``params[...]: [K, ...]``; ``step`` and ``rng``
are shared scalars), the forward over the batch is ``jax.vmap``-ed over that axis, and the
optimizer update too (each member is clipped and updated on its own, exactly as if trained
alone). Members differ by

* **initialisation**: every member gets its own scalar head, initialised from
  ``fold_in(rng, k)`` (``shared_head_init=True``: one head init for all, as WARM's shared
  initialisation wants); the trunk is the shared SFT / base trunk, optionally plus
  per-member Gaussian noise of std ``trunk_noise`` (absolute, in parameter units);
* **data**: a bootstrap of the comparisons. Each step draws per-member weights
  ``w[k, b] ~ Poisson(1)`` i.i.d. (the Poisson bootstrap: the large-B limit of the
  multinomial resampling counts, independent across rows, so it needs no fixed dataset size;
  Oza & Russell 2001; Osband et al. 2016 §3 use per-member bootstrap masks for the same
  purpose). Member k's loss is the bootstrap-weighted mean over the counted prompts
  ``L_k = Σ_b w_kb c_b ℓ_kb / max(Σ_b w_kb c_b, 1)`` (``c_b``: the prompt carries loss,
  ``counted_prompts``), i.e. the plain loss on a batch where row b appears ``w_kb`` times.
  ``bootstrap="none"`` uses ``w = 1`` (members differ by their init only).

The per-row loss is the reward trainer's own (``preference_loss``: Bradley-Terry, K-way
ranking or best-of-N, through ``rowwise_mean``), so every loss of ``RewardConfig`` works.

**Shared-trunk variant** (``multihead_*``): K scalar heads on one frozen trunk. The trunk runs
once per batch (``Model.frozen_hidden`` with every layer frozen) and only the ``[K]`` heads,
``vmap``-ed, are trained; the trunk is a frozen explicit argument of the step. K times cheaper
than K full members, at the cost of diversity in the heads only.

**Metrics** (``(sum, count)`` pairs): ``rm/member{k}/loss|accuracy|...`` per member (training:
bootstrap-weighted; evaluation: unweighted), ``rm/loss`` / ``rm/accuracy`` over all members,
``rm/ensemble/loss|accuracy|...`` of the *aggregated* score (``EnsembleConfig.aggregation``,
``rlhf_jax.losses.ensemble``), ``rm/ensemble/std`` the between-member std of the scores of
valid candidates, ``train/grad_norm`` (member mean) and ``train/member{k}/grad_norm``.

**Sharding.** The member axis is replicated by default (every device holds every member,
each sharded over the mesh like a single model: ``ensemble_param_shardings``); the batch is
sharded as for one model. ``member_axis`` may name a mesh axis that neither the parameter
rules nor the batch use, to split members across devices.

**WARM**: ``rlhf_jax.losses.ensemble.warm_average(state.params)`` turns the trained members
into one reward model (pass ``shared_head_init=True`` so the heads share an init too).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from typing import Literal

import jax
import jax.numpy as jnp
import optax
from jax.sharding import NamedSharding, PartitionSpec as P

from rlhf_jax.losses.ensemble import AGGREGATIONS, aggregate, member_std
from rlhf_jax.models.model import Model, Params, with_head
from rlhf_jax.train.common import (flatten_candidates, last_token_index, rowwise_mean,
                                   sequence_scores)
from rlhf_jax.train.reward import (RewardConfig, candidate_scores, counted_prompts,
                                   masked_preference_loss, num_counted_prompts, preference_loss)
from rlhf_jax.train.state import TrainState, accumulate_gradients, jit_step
from rlhf_jax.types import PreferenceBatch

#: ``fold_in`` constant of the bootstrap draw (the step key's purpose).
_BOOTSTRAP = 0


@dataclasses.dataclass(frozen=True, kw_only=True)
class EnsembleConfig:
    """Ensemble reward-model step options.

    Attributes:
      reward: the members' loss and microbatching (``RewardConfig``).
      num_members: K, the number of members (the leading axis of the state's params).
      bootstrap: ``"poisson"`` (weights ``w[k, b] ~ Poisson(1)`` per step) or ``"none"``
        (all weights 1).
      aggregation: how member scores combine for the ensemble metrics and rollouts, a key of
        ``rlhf_jax.losses.ensemble.AGGREGATIONS`` (``mean``, ``min``, ``mean_minus_std``,
        ``mean_minus_var``).
      uncertainty_coef: ``λ >= 0`` of the ``mean_minus_*`` aggregations.

    Raises:
      ValueError: ``num_members < 1``, an unknown bootstrap or aggregation, ``λ < 0``.
    """

    reward: RewardConfig = RewardConfig()
    num_members: int = 4
    bootstrap: Literal["poisson", "none"] = "poisson"
    aggregation: str = "mean"
    uncertainty_coef: float = 1.0

    def __post_init__(self):
        if self.num_members < 1:
            raise ValueError(f"EnsembleConfig.num_members must be >= 1, got {self.num_members}")
        if self.bootstrap not in ("poisson", "none"):
            raise ValueError(f"EnsembleConfig.bootstrap must be 'poisson' or 'none', got "
                             f"{self.bootstrap!r}")
        if self.aggregation not in AGGREGATIONS:
            raise ValueError(f"EnsembleConfig.aggregation {self.aggregation!r} is not one of "
                             f"{', '.join(sorted(AGGREGATIONS))}")
        if self.uncertainty_coef < 0:
            raise ValueError(f"EnsembleConfig.uncertainty_coef must be >= 0, got "
                             f"{self.uncertainty_coef}")


# ---- members: parameters and state --------------------------------------------------------
def num_members(params: Params) -> int:
    """K, the leading axis of stacked member parameters."""
    return int(jax.tree.leaves(params)[0].shape[0])


def member(params: Params, k: int) -> Params:
    """Member ``k``'s parameters (a single model's tree) from stacked ``[K, ...]`` params."""
    return jax.tree.map(lambda x: x[k], params)


def stack_members(members: list[Params]) -> Params:
    """``[K, ...]`` stacked parameters from K single-model trees of one structure."""
    return jax.tree.map(lambda *xs: jnp.stack(xs), *members)


def ensemble_param_shardings(model: Model, mesh, member_axis: str | None = None):
    """``NamedSharding`` tree of stacked ``[K, ...]`` params: each member sharded like
    ``model.param_shardings(mesh)``, the member axis replicated (``member_axis=None``) or split
    over the named mesh axis (one the parameter rules do not use for that leaf)."""
    return jax.tree.map(lambda s: NamedSharding(mesh, P(member_axis, *s.spec)),
                        model.param_shardings(mesh))


def _member_init(model: Model, trunk: Params, rng: jax.Array, num: int, *, trunk_noise: float,
                 shared_head_init: bool) -> Params:
    """Stacked ``[K, ...]`` ``{**trunk, "value_head"}``, traced once (``vmap`` over k); under
    jit, the trunk part of ``model.init`` (only its head is kept) is dead code and removed."""
    def one(k):
        out = dict(trunk)
        if trunk_noise:
            leaves, tree = jax.tree.flatten(trunk)
            keys = jax.random.split(jax.random.fold_in(jax.random.fold_in(rng, k), 1), len(leaves))
            out = jax.tree.unflatten(tree, [
                x + (trunk_noise * jax.random.normal(key, x.shape, jnp.float32)).astype(x.dtype)
                for x, key in zip(leaves, keys)])
        head_key = rng if shared_head_init else jax.random.fold_in(rng, k)
        return {**out, "value_head": model.init(head_key)["value_head"]}

    return jax.vmap(one)(jnp.arange(num))  # outputs independent of k are broadcast to [K, ...]


def init_ensemble_params(model: Model, base_params: Params, num: int, rng: jax.Array, *,
                         trunk_noise: float = 0.0, shared_head_init: bool = False,
                         out_shardings=None) -> Params:
    """Stacked ``[K, ...]`` parameters of K scalar reward models on ``base_params``' trunk.

    Member k: the trunk of ``base_params`` (an SFT policy, a base model or a reward model;
    any heads it has are ignored) plus, when ``trunk_noise > 0``, i.i.d. Gaussian noise of that
    std (absolute, in parameter units) on every trunk leaf drawn from
    ``fold_in(fold_in(rng, k), 1)``; and a fresh ``value_head`` from ``fold_in(rng, k)``
    (``shared_head_init``: from ``rng`` for every member, WARM's shared initialisation).
    Jitted, with ``out_shardings`` when given (``ensemble_param_shardings``).

    Args:
      model: a ``kind="scalar"`` model.
      base_params: a tree with a ``"trunk"`` matching ``model.cfg``.
      num: K >= 1.
      rng: typed key.

    Raises:
      ValueError: ``model`` is not scalar, ``num < 1``, ``trunk_noise < 0``, no ``"trunk"``,
        or the trunk's shapes do not match ``model.cfg`` (naming the first mismatch).
    """
    if model.kind != "scalar":
        raise ValueError(f"init_ensemble_params: needs a kind='scalar' model, got {model.kind!r}")
    if num < 1 or trunk_noise < 0:
        raise ValueError(f"init_ensemble_params: num={num} must be >= 1 and trunk_noise="
                         f"{trunk_noise} >= 0")
    if "trunk" not in base_params:
        raise ValueError(f"init_ensemble_params: base_params has no 'trunk' (keys "
                         f"{sorted(base_params)})")
    trunk = {"trunk": base_params["trunk"]}
    jax.eval_shape(lambda p, r: with_head(p, model, r), trunk, rng)  # shape check, no allocation
    build = functools.partial(_member_init, model, num=num, trunk_noise=float(trunk_noise),
                              shared_head_init=shared_head_init)
    return jax.jit(build, out_shardings=out_shardings)(trunk, rng)


def create_ensemble_state(params: Params, tx: optax.GradientTransformation,
                          rng: jax.Array) -> TrainState:
    """A ``TrainState`` at step 0 owning a copy of stacked ``[K, ...]`` ``params``, with the
    optimizer state of every member stacked too (``vmap(tx.init)``).

    Build ``tx`` for ONE member (e.g. ``make_optimizer(cfg, model.abstract_params())``): its
    masks are per-member trees, applied inside the ``vmap``. ``step`` and ``rng`` are shared.
    Jit it with ``out_shardings`` (``ensemble_state_shardings``) to create it sharded.
    """
    params = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                      opt_state=jax.vmap(tx.init)(params), rng=rng)


def ensemble_state_shardings(params_sharding, tx: optax.GradientTransformation,
                             abstract_params, mesh) -> TrainState:
    """Shardings of ``create_ensemble_state``'s result: optimizer moments like their stacked
    parameter, every other leaf (per-member counts ``[K]``, ``step``, ``rng``) replicated."""
    from rlhf_jax.sharding import replicated

    abstract_opt = jax.eval_shape(jax.vmap(tx.init), abstract_params)
    opt = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params_sharding,
                                transform_non_params=lambda _: replicated(mesh))
    return TrainState(step=replicated(mesh), params=params_sharding, opt_state=opt,
                      rng=replicated(mesh))


# ---- bootstrap ----------------------------------------------------------------------------
def bootstrap_weights(rng: jax.Array, step: jax.Array, num: int, batch_size: int,
                      kind: Literal["poisson", "none"] = "poisson") -> jax.Array:
    """Per-member row weights ``[K, B]`` float32 of one step.

    ``"poisson"``: ``w[k, b] ~ Poisson(1)`` i.i.d., drawn from
    ``fold_in(fold_in(rng, step), 0)`` (integers 0, 1, 2, ...: how often member k sees row b);
    ``"none"``: all ones. Pure: the step calls it with the state's key and step.
    """
    if kind == "none":
        return jnp.ones((num, batch_size), jnp.float32)
    key = jax.random.fold_in(jax.random.fold_in(rng, step), _BOOTSTRAP)
    return jax.random.poisson(key, 1.0, (num, batch_size)).astype(jnp.float32)


def weighted_preference_loss(scores: jax.Array, valid: jax.Array, weights: jax.Array,
                             total: jax.Array, cfg: RewardConfig):
    """``preference_loss`` with row weights: ``Σ_b w_b c_b ℓ_b / total`` and metrics
    ``(Σ_b w_b c_b s_b, Σ_b w_b c_b n_b)`` (``c_b``: counted prompt, ``counted_prompts``).

    With integer weights this is the plain masked loss on a batch in which row b appears
    ``w_b`` times (and ``total`` that batch's counted prompts); with ``w = 1`` it is
    ``masked_preference_loss``.

    Args:
      scores: ``[B, N]`` float32 candidate scores (reward units).
      valid: ``[B, N]`` bool.
      weights: ``[B]`` float32 row weights >= 0.
      total: scalar denominator (the weighted counted prompts of the full batch, >= 1).
    """
    def row_loss(scores_1xN, valid_1xN, w_1):
        loss, metrics = preference_loss(scores_1xN, valid_1xN, cfg)
        w = w_1[0]
        return w * loss, {k: (w * s, w * c) for k, (s, c) in metrics.items()}
    return rowwise_mean(row_loss, counted_prompts(valid, cfg), total, scores, valid, weights)


def _weighted_totals(weights: jax.Array, valid: jax.Array, cfg: RewardConfig) -> jax.Array:
    """``[K]`` ``max(Σ_b w_kb c_b, 1)``: each member's loss denominator over the full batch."""
    counted = counted_prompts(valid, cfg).astype(jnp.float32)
    return jnp.maximum(jnp.sum(weights * counted[None, :], axis=1), 1.0)


# ---- losses and metrics over K members ----------------------------------------------------
ScoresFn = Callable[..., jax.Array]  # (params, batch, *frozen) -> [K, B, N] float32


def _ensemble_losses(scores_KxBxN: jax.Array, valid: jax.Array, weights_KxB: jax.Array,
                     totals_K: jax.Array, ensemble_total: jax.Array, cfg: EnsembleConfig):
    """Per-member weighted losses ``[K]`` and the metrics of members and of the ensemble."""
    losses_K, member_metrics = jax.vmap(
        functools.partial(weighted_preference_loss, cfg=cfg.reward), in_axes=(0, None, 0, 0)
    )(scores_KxBxN, valid, weights_KxB, totals_K)
    k, b, n = scores_KxBxN.shape
    flat = jax.lax.stop_gradient(scores_KxBxN).reshape(k, b * n)
    agg_BxN = aggregate(flat, cfg.aggregation, cfg.uncertainty_coef).reshape(b, n)
    _, ens = masked_preference_loss(agg_BxN, valid, ensemble_total, cfg.reward)
    cand = (valid.astype(bool) & counted_prompts(valid, cfg.reward)[:, None]).astype(jnp.float32)
    std_BxN = member_std(flat).reshape(b, n)
    metrics = {"members": member_metrics,
               "ensemble": {**ens, "rm/std": (jnp.sum(std_BxN * cand), jnp.sum(cand))}}
    return losses_K, metrics


def _name_metrics(raw, grad_norms_K: jax.Array | None = None):
    """Flat ``(sum, count)`` names from the nested metrics of ``_ensemble_losses``."""
    out = {}
    for name, (s, c) in raw["members"].items():       # "rm/accuracy" -> per member and all
        group, _, leaf = name.partition("/")
        out[name] = (jnp.sum(s), jnp.sum(c))
        for k in range(s.shape[0]):
            out[f"{group}/member{k}/{leaf}"] = (s[k], c[k])
    for name, pair in raw["ensemble"].items():
        group, _, leaf = name.partition("/")
        out[f"{group}/ensemble/{leaf}"] = pair
    if grad_norms_K is not None:
        kk = grad_norms_K.shape[0]
        out["train/grad_norm"] = (jnp.sum(grad_norms_K), jnp.asarray(kk, jnp.float32))
        for k in range(kk):
            out[f"train/member{k}/grad_norm"] = (grad_norms_K[k], jnp.ones((), jnp.float32))
    return out


def _loss_fn(params, microbatch, totals_K, ensemble_total, *frozen, scores_fn: ScoresFn,
             cfg: EnsembleConfig):
    """``Σ_k L_k`` of one microbatch (its gradient w.r.t. member k's params is ``∇L_k``)."""
    batch, weights_BxK = microbatch
    scores = scores_fn(params, batch, *frozen)
    losses_K, metrics = _ensemble_losses(scores, batch.valid, weights_BxK.T, totals_K,
                                         ensemble_total, cfg)
    return jnp.sum(losses_K), metrics


def _update(state: TrainState, batch: PreferenceBatch, frozen: tuple, *, scores_fn: ScoresFn,
            tx: optax.GradientTransformation, cfg: EnsembleConfig):
    k = num_members(state.params)
    weights_KxB = bootstrap_weights(state.rng, state.step, k, batch.valid.shape[0], cfg.bootstrap)
    totals_K = _weighted_totals(weights_KxB, batch.valid, cfg.reward)
    ensemble_total = num_counted_prompts(batch.valid, cfg.reward)
    loss_fn = functools.partial(_loss_fn, scores_fn=scores_fn, cfg=cfg)
    _, grads, metrics = accumulate_gradients(loss_fn, state.params, (batch, weights_KxB.T),
                                             cfg.reward.num_microbatches, totals_K,
                                             ensemble_total, *frozen)

    def member_update(params, opt_state, g):
        updates, opt_state = tx.update(g, opt_state, params)
        return optax.apply_updates(params, updates), opt_state

    params, opt_state = jax.vmap(member_update)(state.params, state.opt_state, grads)
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
    return new_state, _name_metrics(metrics, jax.vmap(optax.global_norm)(grads))


def _eval_metrics(scores_KxBxN: jax.Array, valid: jax.Array, cfg: EnsembleConfig):
    k, b = scores_KxBxN.shape[:2]
    weights = jnp.ones((k, b), jnp.float32)
    _, metrics = _ensemble_losses(scores_KxBxN, valid, weights,
                                  _weighted_totals(weights, valid, cfg.reward),
                                  num_counted_prompts(valid, cfg.reward), cfg)
    return _name_metrics(metrics)


def _scores_out(raw_KxB: jax.Array, gain, bias, cfg: EnsembleConfig) -> dict[str, jax.Array]:
    """Per-member normalisation ``gain_k s_kb + bias_k``, then the aggregation and the std."""
    members_KxB = (raw_KxB * jnp.reshape(jnp.asarray(gain, jnp.float32), (-1, 1))
                   + jnp.reshape(jnp.asarray(bias, jnp.float32), (-1, 1)))
    return {"score": aggregate(members_KxB, cfg.aggregation, cfg.uncertainty_coef),
            "members": members_KxB, "std": member_std(members_KxB)}


# ---- K full members -----------------------------------------------------------------------
def ensemble_candidate_scores(model: Model, params: Params, batch: PreferenceBatch) -> jax.Array:
    """Scores ``[K, B, N]`` float32 of every candidate by every member (``candidate_scores``
    ``vmap``-ed over the stacked params)."""
    return jax.vmap(lambda p: candidate_scores(model, p, batch))(params)


def ensemble_sequence_scores(model: Model, params: Params, tokens: jax.Array,
                             positions: jax.Array, attn_mask: jax.Array) -> jax.Array:
    """Member scores ``[K, B]`` float32 of sequences ``[B, T]`` (the scalar head at each
    sequence's last real token, ``sequence_scores``, per member)."""
    return jax.vmap(lambda p: sequence_scores(model, p, tokens, positions, attn_mask))(params)


def ensemble_reward_step(state: TrainState, batch: PreferenceBatch, *, model: Model,
                         tx: optax.GradientTransformation, cfg: EnsembleConfig = EnsembleConfig()):
    """One update of all K members ``(state, batch) -> (state, metrics)`` (pure).

    ``state.params`` / ``state.opt_state`` are stacked ``[K, ...]`` (``create_ensemble_state``),
    ``batch`` a ``PreferenceBatch [B, N, T]`` shared by all members, which see it through
    their bootstrap weights (module docstring). Member k's update equals ``reward_step`` of
    member k alone on the batch with row b repeated ``w[k, b]`` times.
    """
    return _update(state, batch, (), scores_fn=functools.partial(ensemble_candidate_scores, model),
                   tx=tx, cfg=cfg)


def make_ensemble_reward_step(model: Model, tx: optax.GradientTransformation,
                              cfg: EnsembleConfig = EnsembleConfig(), *, state_sharding=None,
                              batch_sharding=None):
    """Jitted ``ensemble_reward_step(state, batch)`` with shardings and the state donated."""
    return jit_step(functools.partial(ensemble_reward_step, model=model, tx=tx, cfg=cfg),
                    state_sharding=state_sharding, batch_sharding=batch_sharding)


def make_ensemble_reward_eval(model: Model, cfg: EnsembleConfig = EnsembleConfig()):
    """Jitted ``(params [K, ...], batch) -> metrics`` (no update, unweighted): each member's
    ``rm/member{k}/...``, their pooled ``rm/...``, the aggregated score's ``rm/ensemble/...``
    and ``rm/ensemble/std``."""
    def evaluate(params, batch):
        return _eval_metrics(ensemble_candidate_scores(model, params, batch), batch.valid, cfg)
    return jax.jit(evaluate)


def make_ensemble_scores(model: Model, cfg: EnsembleConfig = EnsembleConfig(), *,
                         out_shardings=None):
    """Jitted ``(params [K, ...], tokens, positions, attn_mask [B, T], gain=1, bias=0) ->
    {"score": [B], "members": [K, B], "std": [B]}`` (float32) for rollouts.

    ``members[k, b] = gain_k * s_kb + bias_k``: each member's score normalised with its own
    ``gain``/``bias`` (scalars or ``[K]``, e.g. ``normalization_gain_bias`` of each member's
    scores of SFT samples: members trained apart have different offsets and scales, which
    ``min`` or the std would otherwise mistake for disagreement); ``score`` their aggregation
    (``cfg.aggregation``), ``std`` the between-member std (population, ddof 0)."""
    def scores(params, tokens, positions, attn_mask, gain=1.0, bias=0.0):
        return _scores_out(ensemble_sequence_scores(model, params, tokens, positions, attn_mask),
                           gain, bias, cfg)
    return jax.jit(scores, out_shardings=out_shardings)


# ---- K heads on one frozen trunk ----------------------------------------------------------
def heads_model(model: Model) -> Model:
    """The scalar model whose every layer is frozen (``frozen_layers = n_layers``): its
    ``frozen_hidden`` is the whole trunk below the final norm, run once for all heads."""
    cfg = dataclasses.replace(model.cfg, frozen_layers=model.cfg.n_layers)
    return Model(cfg, kind="scalar")


def init_heads(model: Model, num: int, rng: jax.Array, *, shared_init: bool = False,
               out_shardings=None) -> Params:
    """``{"value_head": [K, ...]}``: K scalar heads for ``model``'s width, head k initialised
    from ``fold_in(rng, k)`` (``shared_init``: all from ``rng``), like ``Model.init``'s head.

    Raises:
      ValueError: ``num < 1``.
    """
    if num < 1:
        raise ValueError(f"init_heads: num={num} must be >= 1")
    scalar = model if model.kind == "scalar" else Model(model.cfg, kind="scalar")

    def build(rng):
        def one(k):
            key = rng if shared_init else jax.random.fold_in(rng, k)
            return {"value_head": scalar.init(key)["value_head"]}
        return jax.vmap(one)(jnp.arange(num))
    return jax.jit(build, out_shardings=out_shardings)(rng)


def multihead_sequence_scores(model: Model, heads: Params, trunk_params: Params,
                              tokens: jax.Array, positions: jax.Array,
                              attn_mask: jax.Array) -> jax.Array:
    """Scores ``[K, B]`` float32 of sequences ``[B, T]`` by K heads on one frozen trunk.

    The trunk (``trunk_params["trunk"]``) runs once; the final norm and each head
    (``heads["value_head"]``, stacked ``[K, ...]``) follow, ``vmap``-ed over the heads. Equal
    to ``sequence_scores`` of the K scalar models ``{"trunk", "value_head": head_k}``.
    ``model`` is ``heads_model(...)`` (every layer frozen).
    """
    first = member(heads, 0)["value_head"]
    trunk = {"trunk": trunk_params["trunk"]}
    hidden = model.frozen_hidden({**trunk, "value_head": first}, tokens, positions, attn_mask)
    idx = last_token_index(attn_mask)

    def head_scores(head):
        values = model.apply({**trunk, "value_head": head}, tokens, positions, attn_mask,
                             compute_logits=False, frozen_hidden=hidden).values
        return jnp.take_along_axis(values, idx[:, None], axis=-1)[:, 0]
    return jax.vmap(head_scores)(heads["value_head"])


def multihead_candidate_scores(model: Model, heads: Params, batch: PreferenceBatch,
                               trunk_params: Params) -> jax.Array:
    """Scores ``[K, B, N]`` float32 of every candidate by K heads on one frozen trunk (one
    trunk forward over the ``B * N`` sequences)."""
    b, n = batch.tokens.shape[:2]
    s = multihead_sequence_scores(model, heads, trunk_params, flatten_candidates(batch.tokens),
                                  flatten_candidates(batch.positions),
                                  flatten_candidates(batch.attn_mask))
    return s.reshape(s.shape[0], b, n)


def _check_heads_model(model: Model) -> None:
    if model.kind != "scalar" or model.cfg.frozen_layers != model.cfg.n_layers:
        raise ValueError("the shared-trunk ensemble needs heads_model(model) (kind 'scalar', "
                         f"frozen_layers == n_layers); got kind {model.kind!r}, frozen_layers="
                         f"{model.cfg.frozen_layers} of {model.cfg.n_layers}")


def multihead_reward_step(state: TrainState, batch: PreferenceBatch, trunk_params: Params, *,
                          model: Model, tx: optax.GradientTransformation,
                          cfg: EnsembleConfig = EnsembleConfig()):
    """One update of K heads on a frozen trunk ``(state, batch, trunk_params) -> (state,
    metrics)`` (pure). ``state.params`` is ``{"value_head": [K, ...]}`` (``init_heads`` +
    ``create_ensemble_state``); ``trunk_params`` (a tree with ``"trunk"``) is frozen and never
    donated; ``model`` is ``heads_model(...)``. Head k's update equals ``reward_step`` of the
    scalar model ``{"trunk", "value_head": head_k}`` with the trunk not trained, on the batch
    with row b repeated ``w[k, b]`` times. Same metrics as ``ensemble_reward_step``.

    Raises:
      ValueError: ``model`` is not a ``heads_model``.
    """
    _check_heads_model(model)
    return _update(state, batch, (trunk_params,),
                   scores_fn=functools.partial(multihead_candidate_scores, model), tx=tx, cfg=cfg)


def make_multihead_reward_step(model: Model, tx: optax.GradientTransformation,
                               cfg: EnsembleConfig = EnsembleConfig(), *, state_sharding=None,
                               batch_sharding=None, trunk_sharding=None):
    """Jitted ``multihead_reward_step(state, batch, trunk_params)``, the state donated (never
    the trunk). ``model`` may be any model of the architecture; ``heads_model(model)`` is used.
    ``trunk_sharding``: the shardings of ``trunk_params`` (e.g. ``{"trunk":
    model.param_shardings(mesh)["trunk"]}``)."""
    model = heads_model(model)
    frozen = (trunk_sharding,) if trunk_sharding is not None else ()
    return jit_step(functools.partial(multihead_reward_step, model=model, tx=tx, cfg=cfg),
                    state_sharding=state_sharding, batch_sharding=batch_sharding,
                    frozen_shardings=frozen)


def make_multihead_reward_eval(model: Model, cfg: EnsembleConfig = EnsembleConfig()):
    """Jitted ``(heads, batch, trunk_params) -> metrics`` (as ``make_ensemble_reward_eval``)."""
    model = heads_model(model)

    def evaluate(heads, batch, trunk_params):
        return _eval_metrics(multihead_candidate_scores(model, heads, batch, trunk_params),
                             batch.valid, cfg)
    return jax.jit(evaluate)


def make_multihead_scores(model: Model, cfg: EnsembleConfig = EnsembleConfig(), *,
                          out_shardings=None):
    """Jitted ``(heads, trunk_params, tokens, positions, attn_mask, gain=1, bias=0) ->
    {"score": [B], "members": [K, B], "std": [B]}`` (as ``make_ensemble_scores``, one trunk
    forward)."""
    model = heads_model(model)

    def scores(heads, trunk_params, tokens, positions, attn_mask, gain=1.0, bias=0.0):
        return _scores_out(multihead_sequence_scores(model, heads, trunk_params, tokens,
                                                     positions, attn_mask), gain, bias, cfg)
    return jax.jit(scores, out_shardings=out_shardings)
