"""Language models with heads, used through a functional API over plain parameter pytrees.

A ``Model`` is static (hashable configuration + NNX graph definition); parameters are plain
nested ``dict``s of arrays that cross jit boundaries, go into optax and orbax, and are what the
checkpoint converters read and write. The NNX module is merged *inside* the pure function::

    model = Model(cfg, kind="lm")
    params = model.init(jax.random.key(0))           # {'trunk': {...}} (+ 'lm_head')
    out = model.apply(params, tokens, positions, attn_mask)
    out.logits  # [B, T, V]

Kinds (the parameter tree is ``{'trunk': ...}`` plus the heads, so a trunk moves between
kinds: an SFT policy initialises a reward model or a value model):

* ``"lm"``: trunk + LM head (tied to the embedding, or ``lm_head`` when untied).
* ``"lm_value"``: LM head + a scalar ``value_head`` on the same trunk (PPO with a shared
  trunk, as in Ziegler et al. 2019's "shared" option and TRL's value-head models).
* ``"scalar"``: trunk + scalar ``value_head`` only (reward model, separate value model;
  Ouyang et al. 2022 §3.5: "we removed the final unembedding layer").
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import jax
import jax.numpy as jnp
from flax import nnx, struct

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.transformer import Dense, KVCache, Transformer, softcap
from rlhf_jax.sharding import PARAM_RULES, LogicalRules, constrain, tree_shardings

Kind = Literal["lm", "lm_value", "scalar"]
Params = dict[str, Any]


class _Net(nnx.Module):
    """Trunk + heads as one NNX module (internal: use ``Model``)."""

    def __init__(self, cfg: ModelConfig, kind: Kind, rngs: nnx.Rngs):
        self.trunk = Transformer(cfg, rngs)
        self.lm_head = nnx.data(None)
        if kind != "scalar" and not cfg.tie_embeddings:
            self.lm_head = Dense((cfg.d_model,), (cfg.vocab_size,), ("embed", "vocab"), bias=False,
                                 cfg=cfg, rngs=rngs)
        self.value_head = nnx.data(None)
        if kind != "lm":
            # std 1/sqrt(D+1) as in lm-human-preferences (Ziegler et al. 2019) reward/value heads.
            self.value_head = Dense((cfg.d_model,), (), ("embed",), bias=True, cfg=cfg, rngs=rngs,
                                    std=1.0 / (cfg.d_model + 1) ** 0.5)


@struct.dataclass
class ModelOutput:
    """Outputs of ``Model.apply``.

    Attributes:
      hidden: ``[B, T, D]`` final-norm hidden states (compute dtype).
      logits: ``[B, T, V]`` next-token logits (``logits[b, t]`` predicts ``tokens[b, t+1]``),
        float32, or ``None`` for scalar models / ``compute_logits=False``.
      values: ``[B, T]`` float32 scalar-head outputs (value or reward at each position), or
        ``None`` when the model has no scalar head.
      cache: the updated ``KVCache`` or ``None``.
      router_aux_loss: scalar float32 load-balancing loss of a mixture-of-experts model's
        routers over this call's real tokens and trainable blocks (Fedus et al. 2022 eq. 4;
        ``rlhf_jax.models.transformer.router_load_balancing_loss``), not yet multiplied by
        ``cfg.router_aux_loss_coef``; ``None`` for a dense model.
    """

    hidden: jax.Array
    logits: jax.Array | None
    values: jax.Array | None
    cache: KVCache | None
    router_aux_loss: jax.Array | None = None


@dataclasses.dataclass(frozen=True, eq=False)
class Model:
    """Functional wrapper: ``init(rng) -> params`` and ``apply(params, ...) -> ModelOutput``.

    Attributes:
      cfg: the architecture.
      kind: ``"lm"``, ``"lm_value"`` or ``"scalar"`` (see module docstring).
    """

    cfg: ModelConfig
    kind: Kind = "lm"

    def __post_init__(self):
        if self.kind not in ("lm", "lm_value", "scalar"):
            raise ValueError(f"Model.kind must be 'lm', 'lm_value' or 'scalar', got {self.kind!r}")
        abstract = nnx.eval_shape(lambda: _Net(self.cfg, self.kind, nnx.Rngs(0)))
        graphdef, state = nnx.split(abstract, nnx.Param)
        object.__setattr__(self, "_graphdef", graphdef)
        object.__setattr__(self, "_abstract_state", state)

    def __hash__(self):
        return hash((self.cfg, self.kind))

    def __eq__(self, other):
        return isinstance(other, Model) and (self.cfg, self.kind) == (other.cfg, other.kind)

    # ---- parameters -------------------------------------------------------------------
    def init(self, rng: jax.Array) -> Params:
        """Fresh parameters (nested dict of arrays, ``param_dtype``) from a typed key."""
        net = _Net(self.cfg, self.kind, nnx.Rngs(params=rng))
        return nnx.to_pure_dict(nnx.state(net, nnx.Param))

    def abstract_params(self) -> Params:
        """``ShapeDtypeStruct`` tree of the parameters (no allocation)."""
        return nnx.to_pure_dict(self._abstract_state)

    def logical_axes(self) -> Params:
        """Tree of logical axis-name tuples matching ``init``'s output (stacked blocks lead
        with ``"layers"``)."""
        specs = nnx.get_partition_spec(self._abstract_state)
        return jax.tree.map(lambda p: tuple(p), nnx.to_pure_dict(specs),
                            is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))

    def param_shardings(self, mesh, rules: LogicalRules = PARAM_RULES):
        """``NamedSharding`` tree for the parameters on ``mesh`` (see ``rlhf_jax.sharding``)."""
        return tree_shardings(self.abstract_params(), self.logical_axes(), mesh, rules)

    def init_sharded(self, rng: jax.Array, mesh, rules: LogicalRules = PARAM_RULES) -> Params:
        """Initialise directly into the mesh shardings (jitted with ``out_shardings``), so no
        unsharded copy of the model is ever built."""
        with jax.set_mesh(mesh):
            return jax.jit(self.init, out_shardings=self.param_shardings(mesh, rules))(rng)

    def num_params(self, params: Params) -> int:
        """Number of scalars in ``params``."""
        return sum(int(x.size) for x in jax.tree.leaves(params))

    # ---- forward ------------------------------------------------------------------------
    def _merge(self, params: Params) -> _Net:
        state = jax.tree.map(lambda x: x, self._abstract_state)
        nnx.replace_by_pure_dict(state, params)
        return nnx.merge(self._graphdef, state)

    def apply(self, params: Params, tokens: jax.Array, positions: jax.Array,
              attn_mask: jax.Array, cache: KVCache | None = None,
              cache_index: jax.Array | int = 0, *, compute_logits: bool = True,
              frozen_hidden: jax.Array | None = None, adapters: bool = True,
              dropout_rng: jax.Array | None = None) -> ModelOutput:
        """Forward pass (pure; call under ``jax.jit``).

        Args:
          params: parameter tree from ``init`` / a converter; ``params["trunk"]["blocks"]``
            may also be a tuple of ``L`` per-layer trees (the stacked tree sliced at each
            layer, as ``rlhf_jax.rollout.sampler`` builds once per call for its decode loop):
            the blocks then run unrolled (``Transformer.__call__``'s ``layer_params``).
          tokens: ``[B, T] int32``.
          positions: ``[B, T] int32``.
          attn_mask: ``[B, T] bool``; padding on either side.
          cache: optional ``KVCache`` (sampling); see ``Transformer.__call__``.
          cache_index: scalar slot of ``tokens[:, 0]`` in the cache.
          compute_logits: skip the ``[B, T, V]`` LM head when only values are needed.
          frozen_hidden: ``[B, T, D]`` from :meth:`frozen_hidden` of the same tokens: the
            embeddings and frozen blocks are skipped (the result is the same as without it
            when it was computed from parameters whose frozen part equals ``params``').
          adapters: with ``cfg.lora``, ``False`` computes the frozen base model from the same
            ``params`` (every LoRA adapter skipped; no copy): the reference policy of DPO / PPO
            when it is the starting policy (``rlhf_jax.models.lora``). A Python bool.
          dropout_rng: typed key of LoRA's adapter-input dropout (``LoraConfig.dropout``, train
            steps only); ``None``: none.

        Returns:
          ``ModelOutput``.

        Raises:
          ValueError: ``frozen_hidden`` given with ``cfg.frozen_layers == 0`` or a cache.
        """
        layers = params.get("trunk", {}).get("blocks")
        layers = layers if isinstance(layers, tuple) else None
        if layers is not None:  # per-layer blocks: merge the rest, hand the layers over
            params = {**params, "trunk": {k: v for k, v in params["trunk"].items()
                                          if k != "blocks"}}
        net = self._merge(params)
        hidden, cache, aux = net.trunk(tokens, positions, attn_mask, cache, cache_index,
                                       frozen_hidden=frozen_hidden, adapters=adapters,
                                       lora_key=dropout_rng, layer_params=layers)
        logits = self.logits(params, hidden) if compute_logits and self.kind != "scalar" else None
        values = None
        if net.value_head is not None:
            values = net.value_head(hidden).astype(jnp.float32)
        return ModelOutput(hidden=hidden, logits=logits, values=values, cache=cache,
                           router_aux_loss=aux)

    def frozen_hidden(self, params: Params, tokens: jax.Array, positions: jax.Array,
                      attn_mask: jax.Array) -> jax.Array:
        """The embeddings and the lowest ``cfg.frozen_layers`` blocks: ``[B, T, D]`` (compute
        dtype, no final norm, under ``stop_gradient``).

        Frozen layers do not change during training, so this part of the forward can be run
        once and shared: by the PPO epochs over one rollout, and by a policy and a reference
        whose frozen parts are equal (``rlhf_jax.train.state.frozen_part_equal``). Pass the
        result as ``apply(..., frozen_hidden=...)`` with the same tokens, positions and mask.

        Raises:
          ValueError: ``cfg.frozen_layers == 0``.
        """
        return self._merge(params).trunk(tokens, positions, attn_mask, stop_after_frozen=True)[0]

    def logits(self, params: Params, hidden: jax.Array) -> jax.Array:
        """LM head: ``hidden [..., D] -> logits [..., V]`` float32 (tied: ``hidden @ embed.T``),
        divided by ``cfg.logits_scaling`` when set (Granite), soft-capped ``c tanh(z / c)``
        when ``cfg.final_softcap`` is set (Gemma 2). The matmul takes compute-dtype inputs
        and accumulates into float32 output (no rounding of the logits to bfloat16; on
        XLA:CPU a bfloat16-output matmul was also ~2x slower than this form); its backward
        runs in the compute dtype too (``lm_head_matmul``)."""
        dt = jnp.dtype(self.cfg.dtype)
        if self.cfg.tie_embeddings:
            logits = lm_head_matmul(hidden.astype(dt), params["trunk"]["embed"].astype(dt),
                                    "vd")
        else:
            logits = lm_head_matmul(hidden.astype(dt), params["lm_head"]["kernel"].astype(dt),
                                    "dv")
        if logits.ndim == 3:
            logits = constrain(logits, ("batch", "seq", "vocab"))
        logits = logits.astype(jnp.float32)
        if self.cfg.logits_scaling is not None:  # Granite
            logits = logits / self.cfg.logits_scaling
        return softcap(logits, self.cfg.final_softcap)

    def init_cache(self, batch: int, length: int, *, per_layer: bool = False) -> KVCache:
        """Empty ``KVCache`` with ``length`` slots (a masked full cache: sliding layers keep
        every slot too; see ``rlhf_jax.models.transformer``); ``per_layer``: one buffer per
        layer, for per-layer parameters (see ``apply``).

        Raises:
          ValueError: ``length`` beyond ``max_positions`` for a learned position table (GPT-2).
        """
        if self.cfg.family.block.positions == "learned" and length > self.cfg.max_positions:
            raise ValueError(f"cache length {length} exceeds {self.cfg.arch} max_positions "
                             f"{self.cfg.max_positions} (its learned position table)")
        return KVCache.zeros(self.cfg, batch, length, per_layer=per_layer)


@jax.custom_vjp
def _head_matmul_vd(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...d,vd->...v", x, w, preferred_element_type=jnp.float32)


@jax.custom_vjp
def _head_matmul_dv(x: jax.Array, w: jax.Array) -> jax.Array:
    return jnp.einsum("...d,dv->...v", x, w, preferred_element_type=jnp.float32)


def _head_fwd(matmul):
    def fwd(x, w):
        return matmul(x, w), (x, w)
    return fwd


def _head_bwd(w_axes: str):
    def bwd(res, g):
        x, w = res
        g = g.astype(x.dtype)  # the logits' cotangent in the compute dtype
        f32 = jnp.float32
        dx = jnp.einsum(f"...v,{w_axes}->...d", g, w, preferred_element_type=f32)
        lead = "".join(chr(ord("a") + i) for i in range(x.ndim - 1))  # batch axes, summed
        dw = jnp.einsum(f"{lead}d,{lead}v->{w_axes}", x, g, preferred_element_type=f32)
        return dx.astype(x.dtype), dw.astype(w.dtype)
    return bwd


_head_matmul_vd.defvjp(_head_fwd(_head_matmul_vd), _head_bwd("vd"))
_head_matmul_dv.defvjp(_head_fwd(_head_matmul_dv), _head_bwd("dv"))


def lm_head_matmul(x: jax.Array, w: jax.Array, w_axes: Literal["vd", "dv"]) -> jax.Array:
    """The LM head's matmul ``x [..., D] @ w -> [..., V]`` float32, for ``w`` as ``[V, D]``
    (``"vd"``: a tied embedding) or ``[D, V]`` (``"dv"``: an untied head).

    Inputs in the compute dtype, accumulation and output in float32 (the log-softmax over the
    vocabulary reads unrounded logits). When the compute dtype is lower than float32, the
    backward casts the logits' float32 cotangent to it before its two matmuls (``dx`` and
    ``dw``, float32 accumulation), as mixed-precision training does for every other matmul
    (Micikevicius et al. 2018, "Mixed Precision Training", §3): otherwise the two largest
    matmuls of a step run in float32, several times slower on a GPU or TPU (the
    ``[tokens, V]`` cotangent promotes the bfloat16 weight). In float32 the result and the
    gradients are those of the plain einsum.

    Args:
      x: ``[..., D]`` hidden states in the compute dtype.
      w: the head weight in the compute dtype, ``[V, D]`` or ``[D, V]`` per ``w_axes``.
      w_axes: the layout of ``w``.

    Returns:
      ``[..., V]`` float32 logits.
    """
    if x.dtype == jnp.float32:  # nothing to round: the plain einsum and its own gradient
        spec = "...d,vd->...v" if w_axes == "vd" else "...d,dv->...v"
        return jnp.einsum(spec, x, w, preferred_element_type=jnp.float32)
    return (_head_matmul_vd if w_axes == "vd" else _head_matmul_dv)(x, w)


def with_head(params: Params, model: Model, rng: jax.Array) -> Params:
    """Re-use the trunk (and LM head if ``model`` has one) of ``params`` in ``model``'s tree,
    initialising any head ``params`` lacks (e.g. an SFT policy -> reward or value model).

    Raises:
      ValueError: the trunk's shapes do not match ``model.cfg``, naming the first mismatch.
    """
    fresh = jax.eval_shape(model.init, rng)
    out = {}
    init = None
    for key, sub in fresh.items():
        if key in params:
            want = jax.tree_util.tree_flatten_with_path(sub)[0]
            have = jax.tree_util.tree_flatten_with_path(params[key])[0]
            for (pw, w), (ph, h) in zip(want, have):
                if pw != ph or w.shape != h.shape:
                    raise ValueError(f"params[{key!r}]{jax.tree_util.keystr(ph)} has shape "
                                     f"{h.shape}; model expects {jax.tree_util.keystr(pw)} {w.shape}")
            out[key] = params[key]
        else:
            init = model.init(rng) if init is None else init
            out[key] = init[key]
    return out
