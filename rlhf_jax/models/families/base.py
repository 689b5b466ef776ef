"""What an architecture family declares: its block variant, its HF config mapping and its
HF tensor names. Pure Python and NumPy (no JAX), so ``ModelConfig`` can validate ``arch``
against the registry cheaply.

A family module (one file in ``rlhf_jax/models/families/``) defines ``FAMILY = Family(...)``:

* ``block``: a ``BlockSpec`` — norms, attention variant, MLP, residual layout, position
  encoding — that the shared core (``rlhf_jax.models.transformer``) implements;
* ``from_hf`` / ``to_hf``: HF ``config.json`` <-> ``ModelConfig`` keyword arguments, raising
  ``ValueError`` on any key whose value the core cannot honour (never a warning);
* ``tensors``: every HF tensor of the trunk as a ``Spec`` (name, shape, our leaf, layout map).

HF layouts. ``nn.Linear`` stores ``weight [out, in]``; our kernels are ``[in..., out...]``
with heads split out (q ``[D, H, K]``, k/v ``[D, H_kv, K]``, o ``[H, K, D]``) and every block
parameter is stacked over layers on axis 0 (``linear``); norm scales and biases keep their
element order (``same``).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Literal

import numpy as np

LeafPath = tuple[str, ...]
#: Our parameter path prefix of the stacked blocks.
BLOCKS: LeafPath = ("trunk", "blocks")


@dataclasses.dataclass(frozen=True)
class BlockSpec:
    """The structural choices of a family's decoder block (static; selected by ``arch``).

    Attributes:
      norm: ``"rms"`` (RMSNorm ``x / rms(x) * w``, Zhang & Sennrich 2019), ``"rms1p"``
        (Gemma's ``x / rms(x) * (1 + w)``, scale stored as ``w``, initialised to 0) or
        ``"layer"`` (LayerNorm with bias, Ba et al. 2016).
      residual: ``"pre"`` (``x + f(norm x)``; ``ModelConfig.parallel_residual`` gives
        ``x + attn(norm1 x) + mlp(norm2 x)``, GPT-J/GPT-NeoX), ``"sandwich"``
        (``x + post_norm(f(pre_norm x))``, Gemma 2/3) or ``"post"`` (``x + norm(f(x))``,
        OLMo 2, Groeneveld et al. 2024 / OLMo 2 report 2025).
      mlp: ``"gated"`` (``down(act(gate x) * up x)``, Shazeer 2020), ``"plain"``
        (``down(act(up x))``) or ``"moe"`` (``ModelConfig.num_experts`` gated experts behind a
        top-k softmax router; Shazeer et al. 2017, Mixtral: Jiang et al. 2024).
      activation: default activation (``"silu"``, ``"gelu_tanh"``, ``"gelu"``), overridable
        by ``ModelConfig.activation``.
      positions: ``"rope"`` (Su et al. 2021, HF rotate-half convention) or ``"learned"``
        (absolute position table, GPT-2).
      qk_norm: ``None``, ``"head"`` (a norm over each head's ``K`` features of q and k before
        RoPE: Qwen3, Gemma 3) or ``"width"`` (over all ``H*K`` projected features: OLMo 2).
      bias: biases on every projection and norm (GPT-2, GPT-NeoX); otherwise only q/k/v
        biases when ``ModelConfig.qkv_bias``.
      embed_scale: multiply the embeddings by ``sqrt(D)`` (Gemma).
    """

    norm: Literal["rms", "rms1p", "layer"] = "rms"
    residual: Literal["pre", "sandwich", "post"] = "pre"
    mlp: Literal["gated", "plain", "moe"] = "gated"
    activation: Literal["silu", "gelu_tanh", "gelu"] = "silu"
    positions: Literal["rope", "learned"] = "rope"
    qk_norm: Literal["head", "width"] | None = None
    bias: bool = False
    embed_scale: bool = False


@dataclasses.dataclass(frozen=True)
class Spec:
    """One HF tensor and the per-layer slices of our leaves it maps to.

    ``to_ours(hf) -> tuple`` (one array per ``ours`` path, without the layer axis) and
    ``to_hf(*ours) -> hf`` are inverse layout maps. ``experts > 0``: one HF tensor per
    expert (names contain ``"{j}"`` too), stacked on our leaf's axis 1 (after the layers).
    """

    hf: str  # name; per-layer names contain "{i}"
    shape: tuple[int, ...]
    ours: tuple[LeafPath, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    per_layer: bool
    experts: int = 0


def linear(name, out_shape, in_shape, path, per_layer=True) -> Spec:
    """HF ``nn.Linear`` ``weight [prod(out), prod(in)]`` <-> our kernel ``[*in, *out]``."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    return Spec(name, (n_out, n_in), (path,),
                lambda w: (w.T.reshape(*in_shape, *out_shape),),
                lambda k: k.reshape(n_in, n_out).T, per_layer)


def same(name, hf_shape, our_shape, path, per_layer=True) -> Spec:
    """Same element order, possibly different shape (norm scales, biases, Conv1D kernels)."""
    return Spec(name, tuple(hf_shape), (path,), lambda w: (w.reshape(our_shape),),
                lambda k: k.reshape(hf_shape), per_layer)


def fused_rows(name, parts: tuple[tuple[tuple[int, ...], LeafPath], ...], d_in: int) -> Spec:
    """One HF ``nn.Linear`` whose output rows concatenate several of our kernels (Phi-3's
    ``qkv_proj`` = [q; k; v], ``gate_up_proj`` = [gate; up]). ``parts``: (our out shape,
    leaf) in row order; each kernel is ``[d_in, *out]``."""
    sizes = [int(np.prod(s)) for s, _ in parts]
    cuts = np.cumsum(sizes)[:-1]

    def to_ours(w):
        return tuple(x.T.reshape(d_in, *s) for x, (s, _) in zip(np.split(w, cuts, axis=0), parts))

    def to_hf(*ks):
        return np.concatenate([k.reshape(d_in, -1).T for k in ks], axis=0)

    return Spec(name, (sum(sizes), d_in), tuple(p for _, p in parts), to_ours, to_hf, True)


@dataclasses.dataclass(frozen=True)
class Family:
    """An architecture family: what ``ModelConfig.arch`` names.

    Attributes:
      name: the ``arch`` value.
      block: the block variant the core builds.
      model_types: HF ``model_type`` values this family reads (the first is the default
        export type unless ``default_model_type`` says otherwise).
      architectures: ``model_type -> (causal-LM class, sequence-classification class)``.
      from_hf: ``(config dict, where) -> ModelConfig kwargs`` (``arch`` included). Raises
        ``ValueError`` naming any key it cannot honour.
      to_hf: ``(cfg, model_type) -> dict`` of the family's ``config.json`` keys.
      tensors: ``(cfg, prefix) -> [Spec]``: every trunk tensor (no LM or score head).
      prefix: the base-model prefix of tensor names in ``*ForCausalLM`` checkpoints.
      embed_name: the input-embedding tensor (after ``prefix``; tied-embedding check).
      lm_head_name: the untied LM head tensor (``[V, D]``).
      legacy_names: older checkpoints' tensor names -> the current ones (read either).
      ignorable: names of non-parameter buffers that some checkpoints carry.
      default_model_type: ``cfg -> model_type`` for export (default: ``model_types[0]``).
      options: the optional ``ModelConfig`` fields (``OPTION_FIELDS``) this family can
        express in its HF config; any other one set away from its default is refused by
        ``ModelConfig.__post_init__`` (so export never drops a setting).
      check: ``cfg -> None``: raise ``ValueError`` if ``cfg`` is not a valid config of the
        family (called by ``ModelConfig.__post_init__``).
    """

    name: str
    block: BlockSpec
    model_types: tuple[str, ...]
    architectures: Mapping[str, tuple[str, str]]
    from_hf: Callable[[Mapping[str, Any], str], dict]
    to_hf: Callable[[Any, str], dict]
    tensors: Callable[[Any, str], list[Spec]]
    prefix: str = "model."
    embed_name: str = "embed_tokens.weight"
    lm_head_name: str = "lm_head.weight"
    legacy_names: Mapping[str, str] = dataclasses.field(default_factory=dict)
    ignorable: Callable[[str], bool] = lambda name: False
    default_model_type: Callable[[Any], str] | None = None
    options: tuple[str, ...] = ()
    check: Callable[[Any], None] | None = None

    def export_model_type(self, cfg) -> str:
        return self.default_model_type(cfg) if self.default_model_type else self.model_types[0]


#: Optional ``ModelConfig`` fields and their defaults (``Family.options`` lists the ones a
#: family can express).
OPTION_FIELDS = {"qkv_bias": False, "rope_scaling": None, "sliding_window": None,
                 "layer_types": None, "rope_local_theta": None, "rotary_dim": None,
                 "attn_scale": None, "attn_softcap": None, "final_softcap": None,
                 "activation": None, "parallel_residual": False, "num_experts": None,
                 "num_experts_per_tok": None, "norm_topk_prob": None,
                 "router_aux_loss_coef": None, "rope_layers": None,
                 "embedding_multiplier": None, "residual_multiplier": None,
                 "logits_scaling": None}


# ----------------------------------------------------------------------------------------
# Shared helpers of the config mappings
# ----------------------------------------------------------------------------------------
def reject(d: Mapping[str, Any], where: str, key: str, ok: Callable[[Any], bool], why: str):
    """Raise ``ValueError`` naming ``key`` unless ``ok(d.get(key))``."""
    if key in d and not ok(d[key]):
        raise ValueError(f"{where}: {key}={d[key]!r} is not supported ({why})")


def activation_from_hf(value: str | None, where: str, key: str) -> str:
    """Our activation name for an HF ``hidden_act`` value (``ValueError`` otherwise)."""
    table = {"silu": "silu", "swish": "silu", "gelu_new": "gelu_tanh",
             "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh", "gelu": "gelu"}
    if value not in table:
        raise ValueError(f"{where}: {key}={value!r} is not supported (supported: "
                         f"{', '.join(table)})")
    return table[value]


#: Our activation name -> the HF ``hidden_act`` value written on export.
ACTIVATION_TO_HF = {"silu": "silu", "gelu_tanh": "gelu_pytorch_tanh", "gelu": "gelu"}

_ROPE_KEYS = {"rope_type", "type", "rope_theta", "factor", "partial_rotary_factor"}
#: The keys a rope-parameter dict of each new scaling type may hold (anything else is refused).
_YARN_KEYS = _ROPE_KEYS | {"original_max_position_embeddings", "beta_fast", "beta_slow",
                           "mscale", "mscale_all_dim", "attention_factor", "truncate"}
_DYNAMIC_KEYS = _ROPE_KEYS | {"original_max_position_embeddings"}


def _one_rope(params: Mapping[str, Any], where: str, max_positions: int | None = None):
    """``RopeScaling | None`` of one rope-parameter dict; ``max_positions``: the config's
    ``max_position_embeddings`` (yarn's default original length and factor, dynamic's
    threshold)."""
    from rlhf_jax.config import RopeScaling

    rope_type = params.get("rope_type", params.get("type")) if params else None
    if rope_type in (None, "default"):
        return None
    if rope_type == "linear":
        return RopeScaling(rope_type="linear", factor=float(params["factor"]))
    if rope_type == "llama3":
        return RopeScaling(
            rope_type="llama3", factor=float(params["factor"]),
            low_freq_factor=float(params["low_freq_factor"]),
            high_freq_factor=float(params["high_freq_factor"]),
            original_max_position_embeddings=int(params["original_max_position_embeddings"]))
    if rope_type in ("yarn", "dynamic"):
        allowed = _YARN_KEYS if rope_type == "yarn" else _DYNAMIC_KEYS
        unknown = sorted(set(params) - allowed)
        if unknown:
            raise ValueError(f"{where}: rope scaling {rope_type!r} keys {unknown} are not "
                             f"supported (supported: {', '.join(sorted(allowed))})")
    if rope_type == "dynamic":
        # transformers grows the base from max_position_embeddings and never reads an
        # original_max_position_embeddings here: one that differs would be silently ignored.
        orig = params.get("original_max_position_embeddings")
        if orig is not None and orig != max_positions:
            raise ValueError(f"{where}: rope scaling 'dynamic' original_max_position_embeddings="
                             f"{orig} is not supported (transformers' dynamic NTK scaling grows "
                             f"from max_position_embeddings={max_positions} and ignores it)")
        if params.get("factor") is None:
            raise ValueError(f"{where}: rope scaling 'dynamic' needs a factor")
        return RopeScaling(rope_type="dynamic", factor=float(params["factor"]))
    if rope_type == "yarn":
        # transformers: original length defaults to max_position_embeddings, factor to
        # max_position_embeddings / original length; beta 0/None -> 32/1.
        orig = params.get("original_max_position_embeddings") or max_positions
        if orig is None:
            raise ValueError(f"{where}: rope scaling 'yarn' needs "
                             "original_max_position_embeddings (or max_position_embeddings)")
        factor = params.get("factor")
        if factor is None:
            if max_positions is None:
                raise ValueError(f"{where}: rope scaling 'yarn' needs a factor (or "
                                 "max_position_embeddings)")
            factor = max_positions / orig
        truncate = params.get("truncate", True)
        if truncate not in (True, False):
            raise ValueError(f"{where}: rope scaling 'yarn' truncate={truncate!r} must be a bool")

        def opt(key):
            v = params.get(key)
            return None if v is None else float(v)

        return RopeScaling(rope_type="yarn", factor=float(factor),
                           original_max_position_embeddings=int(orig),
                           beta_fast=opt("beta_fast") or None, beta_slow=opt("beta_slow") or None,
                           mscale=opt("mscale"), mscale_all_dim=opt("mscale_all_dim"),
                           attention_factor=opt("attention_factor"), no_truncate=not truncate)
    raise ValueError(f"{where}: rope scaling type {rope_type!r} is not supported "
                     "(supported: default, linear, llama3, yarn, dynamic)")


def rope_from_hf(d: Mapping[str, Any], where: str, default_theta: float,
                 per_layer_type: bool = False, max_positions: int | None = None):
    """RoPE settings from legacy (``rope_theta``/``rope_scaling``) or transformers>=5
    (``rope_parameters``) keys.

    ``max_positions``: the config's ``max_position_embeddings`` (default: read from ``d``),
    which yarn defaults its original length / factor to and dynamic NTK grows from.

    Returns:
      ``(rope_theta, RopeScaling | None, partial_rotary_factor | None, local_theta | None)``;
      ``local_theta`` is the theta of ``sliding_attention`` layers when ``per_layer_type``
      (Gemma 3's ``{"full_attention": {...}, "sliding_attention": {...}}``).

    Raises:
      ValueError: per-layer-type parameters where the family has none, a scaling type other
        than default/linear/llama3/yarn/dynamic, a yarn/dynamic key transformers would not
        honour as written (naming it), or scaling on sliding layers.
    """
    if max_positions is None:
        max_positions = d.get("max_position_embeddings")
    params = d.get("rope_parameters") or {}
    nested = bool(params) and all(isinstance(v, Mapping) for v in params.values())
    local_theta = None
    if nested:
        if not per_layer_type:
            raise ValueError(f"{where}: per-layer-type rope_parameters {params} are not supported")
        unknown = set(params) - {"full_attention", "sliding_attention"}
        if unknown:
            raise ValueError(f"{where}: rope_parameters for layer types {sorted(unknown)} are "
                             "not supported")
        local = params.get("sliding_attention") or {}
        if _one_rope(local, where, max_positions) is not None:
            raise ValueError(f"{where}: rope scaling on sliding_attention layers is not supported")
        if local.get("rope_theta") is not None:
            local_theta = float(local["rope_theta"])
        params = params.get("full_attention") or {}
    elif params and not isinstance(params.get("rope_type", params.get("type", "")), str):
        raise ValueError(f"{where}: per-layer-type rope_parameters {params} are not supported")
    theta = float(params.get("rope_theta", d.get("rope_theta", default_theta)) or default_theta)
    scaling = d.get("rope_scaling") or params
    if nested and d.get("rope_scaling"):
        scaling = d["rope_scaling"]
    partial = params.get("partial_rotary_factor", d.get("partial_rotary_factor"))
    one = _one_rope(scaling, where, max_positions)
    if one is not None and one.rope_type == "yarn":
        if nested and "truncate" in scaling:
            # transformers reads `truncate` from the outer (per-layer-type) dict: ignored here
            raise ValueError(f"{where}: rope scaling 'yarn' truncate inside per-layer-type "
                             "rope_parameters is not supported (transformers ignores it there)")
        top = d.get("original_max_position_embeddings")
        if top is not None and top != one.original_max_position_embeddings:
            raise ValueError(f"{where}: original_max_position_embeddings={top} disagrees with "
                             "the rope scaling's original_max_position_embeddings="
                             f"{one.original_max_position_embeddings}")
    return theta, one, partial, local_theta


def rope_to_hf(cfg) -> dict:
    """``rope_parameters`` (transformers>=5) plus the legacy ``rope_theta``/``rope_scaling``.

    yarn writes every field that is set (``truncate: false`` for ``no_truncate``); dynamic
    writes its factor only (its threshold is ``max_position_embeddings``)."""
    rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
    legacy = None
    if cfg.rope_scaling is not None:
        s = cfg.rope_scaling
        legacy = {"rope_type": s.rope_type, "factor": s.factor}
        if s.rope_type == "llama3":
            legacy.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                          original_max_position_embeddings=s.original_max_position_embeddings)
        if s.rope_type == "yarn":
            legacy["original_max_position_embeddings"] = s.original_max_position_embeddings
            for key in ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor"):
                if getattr(s, key) is not None:
                    legacy[key] = getattr(s, key)
            if s.no_truncate:
                legacy["truncate"] = False
        rope = {**legacy, "rope_theta": cfg.rope_theta}
    return {"rope_theta": cfg.rope_theta, "rope_scaling": legacy, "rope_parameters": rope}


def check_rope(cfg) -> None:
    """Raise ``ValueError`` when ``cfg.rope_scaling`` cannot be computed for ``cfg``'s sizes:
    dynamic NTK's exponent ``R / (R - 2)`` needs ``R = rope_dim > 2``; YaRN's correction
    range divides by ``ln(rope_theta)`` (needs ``rope_theta > 1``)."""
    s = cfg.rope_scaling
    if s is None:
        return
    if s.rope_type == "dynamic" and cfg.rope_dim <= 2:
        raise ValueError(f"rope scaling 'dynamic' needs more than 2 rotated features per head, "
                         f"got rope_dim={cfg.rope_dim}")
    if s.rope_type == "yarn" and not cfg.rope_theta > 1:
        raise ValueError(f"rope scaling 'yarn' needs rope_theta > 1, got {cfg.rope_theta}")


def layer_types_from_hf(d: Mapping[str, Any], where: str, n_layers: int,
                        window: int | None) -> tuple[str, ...] | None:
    """Our ``layer_types`` (``"full"``/``"sliding"`` per layer) from HF ``layer_types``.

    ``None`` when every layer is full attention (or the key is absent and ``window`` is None).

    Raises:
      ValueError: a layer type other than full/sliding attention, a length that is not
        ``n_layers``, or sliding layers without a window.
    """
    types = d.get("layer_types")
    if types is None:
        return None
    names = {"full_attention": "full", "sliding_attention": "sliding"}
    bad = sorted({t for t in types if t not in names})
    if bad:
        raise ValueError(f"{where}: layer_types {bad} are not supported (supported: "
                         "full_attention, sliding_attention)")
    if len(types) != n_layers:
        raise ValueError(f"{where}: layer_types has {len(types)} entries for "
                         f"num_hidden_layers={n_layers}")
    ours = tuple(names[t] for t in types)
    if "sliding" not in ours:
        return None
    if window is None:
        raise ValueError(f"{where}: layer_types has sliding_attention layers but "
                         "sliding_window is null")
    return ours


def layer_types_to_hf(cfg) -> list[str]:
    """HF ``layer_types`` of ``cfg``."""
    names = {"full": "full_attention", "sliding": "sliding_attention"}
    return [names[t] for t in cfg.layer_kinds]


def qwen_window_from_hf(d: Mapping[str, Any], where: str, n_layers: int):
    """Qwen2/Qwen3 windows: ``(sliding_window, layer_types)``.

    transformers: ``sliding_window`` applies only with ``use_sliding_window``, and (without
    explicit ``layer_types``) to layers ``i >= max_window_layers``.
    """
    window = d.get("sliding_window") if d.get("use_sliding_window") else None
    if "layer_types" in d and d["layer_types"] is not None:
        types = layer_types_from_hf(d, where, n_layers, window)
    elif window is None:
        types = None
    else:
        first = int(d.get("max_window_layers", 28))
        types = tuple("sliding" if i >= first else "full" for i in range(n_layers))
        if "sliding" not in types:
            types = None
    if types is None:
        window = None
    elif all(t == "sliding" for t in types):
        types = None
    return window, types


def qwen_window_to_hf(cfg) -> dict:
    """Qwen2/Qwen3 window keys (``use_sliding_window``, ``sliding_window``,
    ``max_window_layers``, ``layer_types``) that transformers reads back to ``cfg``'s layers."""
    if cfg.sliding_window is None:
        return dict(use_sliding_window=False, sliding_window=None,
                    max_window_layers=cfg.n_layers, layer_types=["full_attention"] * cfg.n_layers)
    return dict(use_sliding_window=True, sliding_window=cfg.sliding_window,
                max_window_layers=cfg.n_layers, layer_types=layer_types_to_hf(cfg))


def score_specs(d: int) -> list[Spec]:
    """``score.weight [1, D]`` / ``score.bias [1]`` <-> ``value_head`` kernel ``[D]`` / bias ``[]``."""
    return [
        Spec(SCORE_WEIGHT, (1, d), (("value_head", "kernel"),), lambda w: (w[0],),
             lambda k: k[None], False),
        Spec(SCORE_BIAS, (1,), (("value_head", "bias"),), lambda b: (b.reshape(()),),
             lambda b: b.reshape(1), False),
    ]


#: HF names of the scalar (reward / value) head: ``*ForSequenceClassification`` with one label.
SCORE_WEIGHT, SCORE_BIAS = "score.weight", "score.bias"


def rotary_buffer(name: str) -> bool:
    """RoPE frequency buffers some checkpoints carry."""
    return name.endswith("rotary_emb.inv_freq") or name.endswith("rotary_emb.original_inv_freq")


def moe_tensors(cfg, prefix: str, module: str, gate: str, up: str, down: str) -> list[Spec]:
    """A mixture-of-experts MLP saved one ``nn.Linear`` per expert:
    ``layers.{i}.<module>.gate.weight [E, D]`` (the router) and
    ``layers.{i}.<module>.experts.{j}.<gate|up|down>.weight`` (Mixtral: ``w1``/``w3``/``w2``,
    Qwen3-MoE: ``gate_proj``/``up_proj``/``down_proj``) <-> our stacked ``router`` kernel
    ``[L, D, E]`` and expert tensors ``[L, E, D, F]`` / ``[L, E, F, D]``."""
    d, f, e = cfg.d_model, cfg.mlp_dim, cfg.num_experts
    m = BLOCKS + ("mlp",)
    p = f"{prefix}layers.{{i}}.{module}."
    return [
        linear(p + "gate.weight", (e,), (d,), m + ("router", "kernel")),
        dataclasses.replace(linear(p + f"experts.{{j}}.{gate}.weight", (f,), (d,), m + ("gate",)),
                            experts=e),
        dataclasses.replace(linear(p + f"experts.{{j}}.{up}.weight", (f,), (d,), m + ("up",)),
                            experts=e),
        dataclasses.replace(linear(p + f"experts.{{j}}.{down}.weight", (d,), (f,), m + ("down",)),
                            experts=e),
    ]


def moe_from_hf(d: Mapping[str, Any], where: str, defaults: Mapping[str, Any]) -> dict:
    """``num_experts`` (``num_local_experts``, or the older ``num_experts``),
    ``num_experts_per_tok`` and, when the config trains with it (``output_router_logits``),
    ``router_aux_loss_coef``.

    Raises:
      ValueError: ``router_jitter_noise`` > 0 (training-time router noise, not implemented).
    """
    reject(d, where, "router_jitter_noise", lambda v: not v, "router noise is not implemented")
    e = d.get("num_local_experts", d.get("num_experts", defaults["num_local_experts"]))
    kw = dict(num_experts=int(e),
              num_experts_per_tok=int(d.get("num_experts_per_tok",
                                            defaults["num_experts_per_tok"])))
    if d.get("output_router_logits"):
        kw["router_aux_loss_coef"] = float(d.get("router_aux_loss_coef",
                                                 defaults["router_aux_loss_coef"]))
    return kw


def moe_to_hf(cfg) -> dict:
    """The mixture-of-experts keys of ``config.json`` (inverse of ``moe_from_hf``)."""
    coef = cfg.router_aux_loss_coef
    return dict(num_local_experts=cfg.num_experts, num_experts_per_tok=cfg.num_experts_per_tok,
                output_router_logits=coef is not None,
                router_aux_loss_coef=0.001 if coef is None else coef)


def llama_layout_tensors(cfg, prefix: str, *, q_norm: str | None = None,
                         post_norms: bool = False, pre_norms: bool = True,
                         pre_mlp_name: str = "post_attention_layernorm",
                         post_attn_name: str = "post_attention_layernorm",
                         mlp: bool = True) -> list[Spec]:
    """The ``model.layers.{i}.self_attn.*`` / ``mlp.{gate,up,down}_proj`` layout shared by
    Llama, Qwen2/3, Mistral, Gemma 1-3 and OLMo 2.

    Args:
      q_norm: ``"head"`` (``q_norm.weight [K]``) / ``"width"`` (``[H*K]``) / ``None``.
      post_norms: post-attention/post-MLP norms (``post_attn_name`` and
        ``post_feedforward_layernorm``).
      pre_norms: ``input_layernorm`` and the pre-MLP norm named ``pre_mlp_name``.
      mlp: the dense ``mlp.{gate,up,down}_proj`` (``False`` for a mixture of experts, whose
        tensors ``moe_tensors`` lists).
    """
    d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
    h, hkv, k = cfg.n_heads, cfg.num_kv_heads, cfg.per_head_dim
    B = BLOCKS
    A = B + ("attn",)
    p = prefix + "layers.{i}."
    out = [
        linear(p + "self_attn.q_proj.weight", (h, k), (d,), A + ("q", "kernel")),
        linear(p + "self_attn.k_proj.weight", (hkv, k), (d,), A + ("k", "kernel")),
        linear(p + "self_attn.v_proj.weight", (hkv, k), (d,), A + ("v", "kernel")),
    ]
    if cfg.qkv_bias:
        out += [same(p + f"self_attn.{n}_proj.bias", (hh * k,), (hh, k), A + (n, "bias"))
                for n, hh in (("q", h), ("k", hkv), ("v", hkv))]
    if q_norm == "head":
        out += [same(p + f"self_attn.{n}_norm.weight", (k,), (k,), A + (f"{n}_norm", "scale"))
                for n in "qk"]
    elif q_norm == "width":
        out += [same(p + f"self_attn.{n}_norm.weight", (hh * k,), (hh, k),
                     A + (f"{n}_norm", "scale")) for n, hh in (("q", h), ("k", hkv))]
    out.append(linear(p + "self_attn.o_proj.weight", (d,), (h, k), A + ("o", "kernel")))
    if mlp:
        out += [
            linear(p + "mlp.gate_proj.weight", (f,), (d,), B + ("mlp", "gate", "kernel")),
            linear(p + "mlp.up_proj.weight", (f,), (d,), B + ("mlp", "up", "kernel")),
            linear(p + "mlp.down_proj.weight", (d,), (f,), B + ("mlp", "down", "kernel")),
        ]
    out += [
        same(prefix + "embed_tokens.weight", (v, d), (v, d), ("trunk", "embed"), False),
        same(prefix + "norm.weight", (d,), (d,), ("trunk", "final_norm", "scale"), False),
    ]
    if pre_norms:
        out += [same(p + "input_layernorm.weight", (d,), (d,), B + ("attn_norm", "scale")),
                same(p + pre_mlp_name + ".weight", (d,), (d,), B + ("mlp_norm", "scale"))]
    if post_norms:
        out += [same(p + post_attn_name + ".weight", (d,), (d,), B + ("post_attn_norm", "scale")),
                same(p + "post_feedforward_layernorm.weight", (d,), (d,),
                     B + ("post_mlp_norm", "scale"))]
    return out


def common_to_hf(cfg) -> dict:
    """The ``config.json`` keys shared by the RoPE families."""
    return dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.num_kv_heads,
                head_dim=cfg.per_head_dim, intermediate_size=cfg.mlp_dim,
                max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
                attention_dropout=0.0, **rope_to_hf(cfg))


def common_from_hf(d: Mapping[str, Any], where: str, *, arch: str, defaults: Mapping[str, Any],
                   act_key: str = "hidden_act", per_layer_rope: bool = False,
                   partial_rotary: bool = False) -> dict:
    """``ModelConfig`` kwargs from the keys shared by the RoPE families (``hidden_size``,
    ``num_hidden_layers``, heads, ``head_dim``, ``intermediate_size``, ``vocab_size``,
    ``max_position_embeddings``, ``rms_norm_eps``, rope, ``tie_word_embeddings``, the
    activation). ``defaults``: the HF config class's defaults of absent keys;
    ``partial_rotary``: the family reads ``partial_rotary_factor`` (else it must be 1)."""
    get = lambda key: d.get(key, defaults.get(key))  # noqa: E731
    theta, scaling, partial, local_theta = rope_from_hf(
        d, where, float(defaults.get("rope_theta", 10000.0)), per_layer_rope,
        max_positions=get("max_position_embeddings"))
    if partial not in (None, 1.0) and not partial_rotary:
        raise ValueError(f"{where}: partial_rotary_factor={partial} is not supported by this "
                         "family")
    hidden, n_heads = get("hidden_size"), get("num_attention_heads")
    head_dim = get("head_dim")
    kw = dict(arch=arch, vocab_size=get("vocab_size"), d_model=hidden,
              n_layers=get("num_hidden_layers"), n_heads=n_heads,
              n_kv_heads=get("num_key_value_heads") or n_heads,
              head_dim=None if head_dim in (None, hidden // n_heads) else head_dim,
              mlp_dim=get("intermediate_size"),
              max_positions=get("max_position_embeddings"),
              rope_theta=theta, rope_scaling=scaling,
              norm_eps=float(get("rms_norm_eps")),
              tie_embeddings=bool(get("tie_word_embeddings")))
    if local_theta is not None:
        kw["rope_local_theta"] = local_theta
    if partial not in (None, 1.0):
        k = head_dim or hidden // n_heads
        kw["rotary_dim"] = int(k * float(partial))  # transformers: int(head_dim * factor)
    act = d.get(act_key, defaults.get(act_key))
    kw["activation"] = activation_from_hf(act, where, act_key)
    return kw
