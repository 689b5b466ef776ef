"""Train state, optimizers, gradient accumulation and jitting with shardings.

Every train step in ``rlhf_jax.train`` is a pure function
``step(state, batch, *frozen_params) -> (new_state, metrics)``; this module holds the pieces
they share:

* ``TrainState`` - ``step``, ``params``, ``opt_state``, ``rng`` (a typed key) as a pytree.
* ``OptimizerConfig`` / ``make_optimizer`` - optax AdamW with linear warm-up and cosine /
  linear decay (Loshchilov & Hutter 2019), global-norm clipping (Pascanu et al. 2013), and an
  optional freeze of the embeddings and lower blocks (``ModelConfig.frozen_layers``).
* ``accumulate_gradients`` - a ``lax.scan`` over M microbatches whose summed gradient equals
  the full-batch gradient when the loss is normalised by *global* denominators (token or
  sequence counts of the whole batch), the convention every loss in ``rlhf_jax.losses``
  supports.
* ``jit_step`` - ``jax.jit`` with input/output shardings and the state donated.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from rlhf_jax.losses.logprobs import reduce_metrics  # noqa: F401  (re-exported for trainers)

Params = Any
Metrics = dict[str, tuple[jax.Array, jax.Array]]


@struct.dataclass
class TrainState:
    """Optimisation state of one trained model.

    Attributes:
      step: scalar int32, number of optimizer updates applied.
      params: parameter pytree (see ``rlhf_jax.models.model``).
      opt_state: optax state, mirroring ``params``.
      rng: typed PRNG key; a step derives ``fold_in(rng, step)`` and splits it by purpose.
    """

    step: jax.Array
    params: Params
    opt_state: Any
    rng: jax.Array


@dataclasses.dataclass(frozen=True, kw_only=True)
class OptimizerConfig:
    """AdamW with warm-up, decay and clipping.

    Attributes:
      lr: peak learning rate.
      warmup_steps: linear warm-up from 0 to ``lr`` over this many updates.
      total_steps: length of the schedule (decay ends here); ignored by ``"constant"``.
      schedule: ``"cosine"``, ``"linear"`` (to ``end_lr_ratio * lr``) or ``"constant"``
        after warm-up.
      end_lr_ratio: final learning rate as a fraction of ``lr``.
      b1, b2, eps: Adam moments (Kingma & Ba 2015).
      weight_decay: decoupled weight decay (AdamW); not applied to norms and biases.
      max_grad_norm: global-norm clip; ``0`` disables it.

    Which parameters train is a property of the model (``ModelConfig.frozen_layers``), passed
    to ``make_optimizer``, so the forward's ``stop_gradient`` and the optimizer mask agree.
    """

    lr: float = 1e-5
    warmup_steps: int = 0
    total_steps: int = 1000
    schedule: Literal["cosine", "linear", "constant"] = "constant"
    end_lr_ratio: float = 0.0
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0

    def __post_init__(self):
        if self.lr <= 0:
            raise ValueError(f"OptimizerConfig.lr must be > 0, got {self.lr}")
        if self.warmup_steps < 0 or self.total_steps < 1:
            raise ValueError(f"OptimizerConfig: warmup_steps={self.warmup_steps} must be >= 0 and "
                             f"total_steps={self.total_steps} >= 1")
        if self.schedule != "constant" and self.warmup_steps > self.total_steps:
            raise ValueError(f"OptimizerConfig.warmup_steps={self.warmup_steps} exceeds "
                             f"total_steps={self.total_steps}")


def learning_rate_schedule(cfg: OptimizerConfig) -> optax.Schedule:
    """The optax schedule of ``cfg`` (warm-up then constant / cosine / linear decay)."""
    end = cfg.lr * cfg.end_lr_ratio
    if cfg.schedule == "cosine":
        return optax.warmup_cosine_decay_schedule(0.0, cfg.lr, cfg.warmup_steps, cfg.total_steps, end)
    decay_steps = max(cfg.total_steps - cfg.warmup_steps, 1)
    after = (optax.constant_schedule(cfg.lr) if cfg.schedule == "constant"
             else optax.linear_schedule(cfg.lr, end, decay_steps))
    if cfg.warmup_steps == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, cfg.lr, cfg.warmup_steps), after],
                                [cfg.warmup_steps])


def _decay_mask(params: Params) -> Params:
    """True for matrices (weight decay), False for norms, biases, scalars."""
    def is_matrix(path, x):
        names = [getattr(k, "key", str(k)) for k in path]
        return not ("bias" in names or "scale" in names) and x.ndim >= 2
    return jax.tree_util.tree_map_with_path(is_matrix, params)


def trainable_mask(params: Params, frozen_layers: int) -> Params:
    """Update multipliers: 0 for the embeddings and the lowest ``frozen_layers`` blocks, 1 else.

    Stacked block parameters (leading ``layers`` axis) get a ``[L, 1, ...]`` array; other leaves
    a Python float. Heads, final norm and upper blocks are trained.
    """
    def mask(path, x):
        names = [getattr(k, "key", str(k)) for k in path]
        if "blocks" in names:
            n_layers = x.shape[0]
            on = (jnp.arange(n_layers) >= frozen_layers).astype(jnp.float32)
            return on.reshape((n_layers,) + (1,) * (x.ndim - 1))
        if "trunk" in names and ("embed" in names or "pos_embed" in names):
            return 0.0
        return 1.0

    return jax.tree_util.tree_map_with_path(mask, params)


def frozen_part_equal(params: Params, other: Params, frozen_layers: int) -> bool:
    """Whether two parameter trees agree exactly on what ``trainable_mask`` freezes: the
    embeddings and the lowest ``frozen_layers`` blocks (host check, once per run).

    True licenses sharing ``Model.frozen_hidden`` between the two (e.g. a policy and a
    reference loaded from elsewhere: ``reference_shares_frozen_layers`` of the DPO and PPO
    configs). ``frozen_layers == 0`` freezes nothing and gives False (nothing to share). The
    arrays may live on different devices or shardings; they are compared on the host, so each
    must be fully addressable by this process (gather multi-host arrays first).

    Raises:
      ValueError: the trees differ in structure or in the shape of a frozen leaf.
    """
    if not frozen_layers:
        return False
    mask = trainable_mask(params, frozen_layers)
    leaves = jax.tree_util.tree_flatten_with_path(params)[0]
    others, other_def = jax.tree_util.tree_flatten(other)
    if len(others) != len(leaves) or other_def != jax.tree.structure(params):
        raise ValueError("frozen_part_equal: the parameter trees differ in structure")
    for (path, a), b, m in zip(leaves, others, jax.tree.leaves(mask)):
        if a.shape != b.shape:
            raise ValueError(f"frozen_part_equal: {jax.tree_util.keystr(path)} has shapes "
                             f"{a.shape} and {b.shape}")
        if isinstance(m, float):
            if m == 0.0 and not np.array_equal(np.asarray(a), np.asarray(b)):
                return False
        elif not np.array_equal(np.asarray(a)[:frozen_layers], np.asarray(b)[:frozen_layers]):
            return False
    return True


def _scale_by_mask(mask: Params) -> optax.GradientTransformation:
    def init(params):
        del params
        return optax.EmptyState()

    def update(updates, state, params=None):
        del params
        return jax.tree.map(lambda u, m: (u * m).astype(u.dtype), updates, mask), state

    return optax.GradientTransformation(init, update)


def make_optimizer(cfg: OptimizerConfig, params: Params, *,
                   frozen_layers: int = 0) -> optax.GradientTransformation:
    """AdamW chain for ``params``: [mask ->] clip -> AdamW(schedule) [-> mask].

    With ``frozen_layers > 0`` (pass ``model.cfg.frozen_layers``) the mask is applied before
    clipping (frozen gradients do not count in the global norm) and after AdamW (frozen
    parameters receive neither Adam nor weight-decay updates).
    """
    parts = []
    if frozen_layers:
        parts.append(_scale_by_mask(trainable_mask(params, frozen_layers)))
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask(params)))
    if frozen_layers:
        parts.append(parts[0])
    return optax.chain(*parts)


def create_train_state(params: Params, tx: optax.GradientTransformation, rng: jax.Array) -> TrainState:
    """A ``TrainState`` at step 0 that owns a *copy* of ``params``.

    Train steps donate their state, so the state must not share buffers with arrays the caller
    keeps (a frozen reference policy, the trunk of another model). On a mesh use
    ``create_sharded_train_state`` so the optimizer moments are sharded like the parameters.
    """
    params = jax.tree.map(jnp.copy, params)
    return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                      rng=rng)


def train_state_shardings(params_sharding, tx: optax.GradientTransformation, abstract_params, mesh):
    """Shardings of a ``TrainState`` whose params have ``params_sharding``: optimizer moments
    mirror their parameter's sharding (FSDP shards Adam's ``mu``/``nu`` too), every other
    optimizer leaf (counts, scalars), ``step`` and ``rng`` are replicated."""
    from rlhf_jax.sharding import replicated

    abstract_opt = jax.eval_shape(tx.init, abstract_params)
    opt_sharding = optax.tree_map_params(tx, lambda _, s: s, abstract_opt, params_sharding,
                                         transform_non_params=lambda _: replicated(mesh))
    return TrainState(step=replicated(mesh), params=params_sharding, opt_state=opt_sharding,
                      rng=replicated(mesh))


def create_sharded_train_state(params: Params, tx: optax.GradientTransformation, rng: jax.Array,
                               mesh, params_sharding) -> TrainState:
    """``create_train_state`` jitted with ``out_shardings`` from ``train_state_shardings``, so the
    optimizer state is born sharded like the parameters (never replicated first)."""
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype), params)
    shardings = train_state_shardings(params_sharding, tx, abstract, mesh)
    with jax.set_mesh(mesh):
        return jax.jit(lambda p, r: create_train_state(p, tx, r), out_shardings=shardings)(params, rng)


def apply_gradients(state: TrainState, grads: Params, tx: optax.GradientTransformation) -> TrainState:
    """One optimizer update; ``step`` += 1."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=optax.apply_updates(state.params, updates),
                         opt_state=opt_state)


def split_microbatches(batch, num_microbatches: int):
    """Reshape every leaf ``[B, ...] -> [M, B/M, ...]``.

    Raises:
      ValueError: ``B`` not divisible by ``M`` (both named).
    """
    def split(x):
        if x.shape[0] % num_microbatches:
            raise ValueError(f"batch size {x.shape[0]} is not divisible by "
                             f"num_microbatches={num_microbatches}")
        return x.reshape((num_microbatches, x.shape[0] // num_microbatches) + x.shape[1:])
    return jax.tree.map(split, batch)


def accumulate_gradients(loss_fn: Callable[..., tuple[jax.Array, Metrics]], params: Params, batch,
                         num_microbatches: int, *args) -> tuple[jax.Array, Params, Metrics]:
    """Sum of ``value_and_grad(loss_fn)`` over M microbatches with one ``lax.scan``.

    ``loss_fn(params, microbatch, *args) -> (loss, metrics)`` must normalise by global
    (full-batch) denominators, so that the sum over microbatches is the full-batch loss and
    gradient. Metrics are ``(sum, count)`` pairs and are summed too.

    Returns:
      ``(loss, grads, metrics)`` for the full batch.
    """
    grad_fn = jax.value_and_grad(loss_fn, has_aux=True)
    if num_microbatches == 1:
        (loss, metrics), grads = grad_fn(params, batch, *args)
        return loss, grads, metrics

    micro = split_microbatches(batch, num_microbatches)
    first = jax.tree.map(lambda x: x[0], micro)
    (loss_shape, metrics_shape), grads_shape = jax.eval_shape(grad_fn, params, first, *args)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)

    def body(carry, mb):
        loss_acc, grads_acc, metrics_acc = carry
        (loss, metrics), grads = grad_fn(params, mb, *args)
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (loss_acc + loss, add(grads_acc, grads), add(metrics_acc, metrics)), None

    init = (zeros(loss_shape), zeros(grads_shape), zeros(metrics_shape))
    (loss, grads, metrics), _ = jax.lax.scan(body, init, micro)
    return loss, grads, metrics


def state_shardings(state):
    """The shardings of an (already placed) state pytree, for ``jit_step``."""
    return jax.tree.map(lambda x: x.sharding, state)


def jit_step(step_fn: Callable, *, state_sharding=None, batch_sharding=None,
             frozen_shardings: tuple = (), metrics_sharding=None, donate_state: bool = True):
    """``jax.jit(step_fn)`` with in/out shardings and the state (argument 0) donated.

    Shardings may be ``None`` (left to propagation, e.g. on one device).
    """
    in_shardings = (state_sharding, batch_sharding, *frozen_shardings)
    if all(s is None for s in in_shardings):
        return jax.jit(step_fn, donate_argnums=(0,) if donate_state else ())
    return jax.jit(step_fn, in_shardings=in_shardings,
                   out_shardings=(state_sharding, metrics_sharding),
                   donate_argnums=(0,) if donate_state else ())
