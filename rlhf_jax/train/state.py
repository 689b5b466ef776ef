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

**LoRA.** A parameter tree with LoRA adapters (``rlhf_jax.models.lora``) trains only its
adapters and its ``value_head``: ``value_and_grad_trainable`` differentiates with respect to
those leaves alone (the frozen base enters the loss as a constant, so no gradient of a base
kernel is ever built), gradients carry ``None`` at the frozen leaves, ``make_optimizer``
returns a ``TrainableOnly`` transformation whose state covers the trainable leaves only, and
``apply_gradients`` leaves the frozen leaves untouched. ``checkpoint_view`` /
``restore_checkpoint_view`` drop the frozen base from a state for checkpoints and put it
back from the live state (its ``frozen_digest`` guards the match).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import struct

from rlhf_jax.losses.logprobs import reduce_metrics  # noqa: F401  (re-exported for trainers)
from rlhf_jax.models.lora import (combine, frozen_digest, has_adapters, is_trainable_path,
                                  partition, select, trainable_filter)

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
    a Python float. Heads, final norm and upper blocks are trained. A tree with LoRA adapters
    (``rlhf_jax.models.lora.has_adapters``) trains only the adapters (those of the upper
    blocks) and the ``value_head``: every other leaf gets 0.
    """
    lora = has_adapters(params)

    def mask(path, x):
        names = [getattr(k, "key", str(k)) for k in path]
        if lora and not is_trainable_path([str(n) for n in names]):
            return 0.0
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


class TrainableOnly(NamedTuple):
    """An optax transformation restricted to the trainable leaves of a LoRA tree.

    ``init(params)`` / ``update(updates, state, params)`` run ``inner`` on the leaves where
    ``trainable`` is True (``rlhf_jax.models.lora.trainable_filter``); the state holds nothing
    for the others, and the updates come back with ``None`` there (``apply_gradients`` keeps
    those parameters as they are). Gradients may carry ``None`` at the frozen leaves
    (``value_and_grad_trainable``) or arrays, which are ignored.
    """

    init: Callable
    update: Callable
    inner: optax.GradientTransformation
    trainable: Params


def _trainable_only(inner: optax.GradientTransformation, trainable: Params) -> TrainableOnly:
    def init(params):
        return inner.init(select(params, trainable))

    def update(updates, state, params=None):
        params = None if params is None else select(params, trainable)
        return inner.update(select(updates, trainable), state, params)

    return TrainableOnly(init, update, inner, trainable)


def make_optimizer(cfg: OptimizerConfig, params: Params, *,
                   frozen_layers: int = 0) -> optax.GradientTransformation:
    """AdamW chain for ``params``: [mask ->] clip -> AdamW(schedule) [-> mask].

    With ``frozen_layers > 0`` (pass ``model.cfg.frozen_layers``) the mask is applied before
    clipping (frozen gradients do not count in the global norm) and after AdamW (frozen
    parameters receive neither Adam nor weight-decay updates).

    A tree with LoRA adapters (``rlhf_jax.models.lora``; ``params`` may be abstract) gets the
    same chain over its trainable leaves only (the adapters and the ``value_head``), wrapped
    in ``TrainableOnly``: the frozen base has no optimizer state and receives no update;
    ``frozen_layers`` then masks the adapters of the lower blocks.
    """
    trainable = trainable_filter(params) if has_adapters(params) else None
    if trainable is not None:
        params = select(params, trainable)
    parts = []
    if frozen_layers:
        parts.append(_scale_by_mask(trainable_mask(params, frozen_layers)))
    if cfg.max_grad_norm > 0:
        parts.append(optax.clip_by_global_norm(cfg.max_grad_norm))
    parts.append(optax.adamw(learning_rate_schedule(cfg), b1=cfg.b1, b2=cfg.b2, eps=cfg.eps,
                             weight_decay=cfg.weight_decay, mask=_decay_mask(params)))
    if frozen_layers:
        parts.append(parts[0])
    tx = optax.chain(*parts)
    return tx if trainable is None else _trainable_only(tx, trainable)


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
    if isinstance(tx, TrainableOnly):  # moments of the trainable leaves only
        tx, params_sharding = tx.inner, select(params_sharding, tx.trainable)
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


def apply_updates(params: Params, updates: Params) -> Params:
    """``optax.apply_updates`` where an update may be ``None`` (a frozen LoRA base leaf: kept
    as it is, the same array)."""
    return jax.tree.map(lambda p, u: p if u is None else jnp.asarray(p + u).astype(p.dtype),
                        params, updates)


def apply_gradients(state: TrainState, grads: Params, tx: optax.GradientTransformation) -> TrainState:
    """One optimizer update; ``step`` += 1. ``grads`` may hold ``None`` at frozen leaves
    (``value_and_grad_trainable``)."""
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    return state.replace(step=state.step + 1, params=apply_updates(state.params, updates),
                         opt_state=opt_state)


def value_and_grad_trainable(loss_fn: Callable, has_aux: bool = True) -> Callable:
    """``jax.value_and_grad(loss_fn)`` over its first argument, a parameter tree (or a tuple
    of them, as PPO's ``(policy, value)``), differentiating only the trainable leaves of every
    tree with LoRA adapters (``rlhf_jax.models.lora.partition``): the frozen base is closed
    over as a constant, and its gradient comes back as ``None``. Trees without adapters are
    differentiated whole (the function is then ``jax.value_and_grad``)."""
    grad_fn = jax.value_and_grad(loss_fn, has_aux=has_aux)

    def fn(params, *args, **kwargs):
        trees = params if isinstance(params, tuple) else (params,)
        if not any(t is not None and has_adapters(t) for t in trees):
            return grad_fn(params, *args, **kwargs)
        parts = [partition(t) if t is not None and has_adapters(t) else (t, None) for t in trees]
        trainable = tuple(p[0] for p in parts)
        frozen = tuple(p[1] for p in parts)

        def on_trainable(trainable, *args, **kwargs):
            full = tuple(t if f is None else combine(t, f) for t, f in zip(trainable, frozen))
            return loss_fn(full if isinstance(params, tuple) else full[0], *args, **kwargs)

        value, grads = jax.value_and_grad(on_trainable, has_aux=has_aux)(trainable, *args,
                                                                          **kwargs)
        return value, (grads if isinstance(params, tuple) else grads[0])

    return fn


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
                         num_microbatches: int, *args, dropout_rng: jax.Array | None = None
                         ) -> tuple[jax.Array, Params, Metrics]:
    """Sum of ``value_and_grad(loss_fn)`` over M microbatches with one ``lax.scan``.

    ``loss_fn(params, microbatch, *args) -> (loss, metrics)`` must normalise by global
    (full-batch) denominators, so that the sum over microbatches is the full-batch loss and
    gradient. Metrics are ``(sum, count)`` pairs and are summed too. With LoRA adapters in
    ``params`` only the trainable leaves are differentiated (``value_and_grad_trainable``;
    the gradient is ``None`` at the frozen ones).

    Args:
      dropout_rng: a typed key passed to ``loss_fn`` as ``dropout_rng=`` (folded with the
        microbatch index), for LoRA's adapter dropout; ``None``: the keyword is not passed.

    Returns:
      ``(loss, grads, metrics)`` for the full batch.
    """
    grad_fn = value_and_grad_trainable(loss_fn, has_aux=True)

    def call(mb, m):
        if dropout_rng is None:
            return grad_fn(params, mb, *args)
        return grad_fn(params, mb, *args, dropout_rng=jax.random.fold_in(dropout_rng, m))

    if num_microbatches == 1:
        (loss, metrics), grads = call(batch, 0)
        return loss, grads, metrics

    micro = split_microbatches(batch, num_microbatches)
    first = jax.tree.map(lambda x: x[0], micro)
    (loss_shape, metrics_shape), grads_shape = jax.eval_shape(call, first, 0)
    zeros = lambda tree: jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), tree)

    def body(carry, xs):
        mb, m = xs
        loss_acc, grads_acc, metrics_acc = carry
        (loss, metrics), grads = call(mb, m)
        add = lambda a, b: jax.tree.map(jnp.add, a, b)
        return (loss_acc + loss, add(grads_acc, grads), add(metrics_acc, metrics)), None

    init = (zeros(loss_shape), zeros(grads_shape), zeros(metrics_shape))
    steps = jnp.arange(num_microbatches, dtype=jnp.int32)
    (loss, grads, metrics), _ = jax.lax.scan(body, init, (micro, steps))
    return loss, grads, metrics


def lora_dropout_rng(state: TrainState, model) -> jax.Array | None:
    """The key of this step's LoRA adapter dropout, ``fold_in(fold_in(rng, step), 0x10A)``,
    or ``None`` when ``model`` has no LoRA or a dropout rate of 0 (then no key is drawn and
    the step is unchanged)."""
    lora = model.cfg.lora
    if lora is None or not lora.dropout_rate:
        return None
    return jax.random.fold_in(jax.random.fold_in(state.rng, state.step), 0x10A)


# ---- checkpoints of LoRA states ------------------------------------------------------------
def _is_train_state(x) -> bool:
    return isinstance(x, TrainState)


def checkpoint_view(state):
    """``state`` with the frozen base of every LoRA ``TrainState`` replaced by ``None``: what a
    checkpoint stores (the adapters, trained heads, optimizer state, step and key). States
    without adapters come back unchanged."""
    def view(x):
        if _is_train_state(x) and has_adapters(x.params):
            return x.replace(params=partition(x.params)[0])
        return x
    return jax.tree.map(view, state, is_leaf=_is_train_state)


def restore_checkpoint_view(restored, live):
    """The inverse of ``checkpoint_view``: every LoRA ``TrainState`` of ``restored`` gets the
    frozen base of the matching one in ``live`` (the state the run built, whose base is the
    one the checkpoint was trained on: ``frozen_digests`` checks it)."""
    def fill(r, x):
        if _is_train_state(x) and has_adapters(x.params):
            return r.replace(params=combine(r.params, partition(x.params)[1]))
        return r
    return jax.tree.map(fill, restored, live, is_leaf=lambda v: _is_train_state(v) or v is None)


def frozen_digests(state) -> dict[str, str]:
    """``{path of a LoRA TrainState: rlhf_jax.models.lora.frozen_digest of its params}`` for
    every ``TrainState`` with adapters in ``state`` (``{}`` without LoRA)."""
    out = {}
    leaves = jax.tree_util.tree_flatten_with_path(state, is_leaf=_is_train_state)[0]
    for path, x in leaves:
        if _is_train_state(x) and has_adapters(x.params):
            out[jax.tree_util.keystr(path) or "state"] = frozen_digest(x.params)
    return out


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
