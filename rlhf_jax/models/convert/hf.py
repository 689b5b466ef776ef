"""Hugging Face checkpoints (``config.json`` + safetensors) <-> ``rlhf_jax`` parameter trees.

Supported ``model_type`` values: ``llama``, ``mistral``, ``qwen2``, ``smollm`` (read as
``llama``; SmolLM/SmolLM2 ship ``model_type: llama`` anyway) and ``gpt2``.

Layouts. HF ``nn.Linear`` stores ``weight [out, in]``; ours are ``[in..., out...]`` kernels
with heads split out (q ``[D, H, K]``, k/v ``[D, H_kv, K]``, o ``[H, K, D]``) and every block
parameter stacked over layers on axis 0. GPT-2's ``Conv1D`` is already ``[in, out]`` and its
fused ``c_attn [D, 3D]`` splits into q, k, v (in that order, HF ``GPT2Attention``). Tied
embeddings have no ``lm_head`` tensor; untied ones store ``lm_head.weight [V, D]`` and our
kernel is its transpose.

Scalar head. Our reward/value head (``value_head``: kernel ``[D]``, bias ``[]``) is stored as
``score.weight [1, D]`` and ``score.bias [1]``, the names of HF's
``*ForSequenceClassification`` with ``num_labels=1``. A ``kind="scalar"`` export writes
``architectures: [LlamaForSequenceClassification]`` (Qwen2/GPT-2 likewise), which HF loads
with the score weight; HF's classifier has no bias, so it ignores ``score.bias`` (logged as an
unexpected key) and its reward differs from ours by that constant, which a Bradley-Terry
reward is invariant to. Our own reload is lossless. A ``kind="lm_value"`` export is a
``*ForCausalLM`` checkpoint plus the two ``score.*`` tensors. Importing an HF
sequence-classification checkpoint without ``score.bias`` gives bias 0.

Large models. ``load_hf_checkpoint(..., shardings=...)`` builds each parameter directly into
its target sharding (``jax.make_array_from_callback``: every device receives only its slice,
host memory holds one stacked parameter at a time). ``save_hf_checkpoint`` gathers one
parameter at a time to the host (``jax.device_get``, or
``multihost_utils.process_allgather`` for arrays spanning processes); only process 0 writes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import shutil
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np

from rlhf_jax.config import ModelConfig, RopeScaling
from rlhf_jax.models.model import Model, Params

log = logging.getLogger(__name__)

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "smollm")
SUPPORTED_MODEL_TYPES = (*LLAMA_MODEL_TYPES, "gpt2")
#: HF names of the scalar (reward / value) head: ``*ForSequenceClassification`` with one label.
SCORE_WEIGHT, SCORE_BIAS = "score.weight", "score.bias"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
GENERATION_CONFIG_FILE = "generation_config.json"
#: Tokenizer files copied by ``save_hf_checkpoint(tokenizer=<dir>)``.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja", "chat_template.json", "vocab.json", "merges.txt",
                   "tokenizer.model", "added_tokens.json")

# Per-type defaults of the HF config classes, used when a key is absent from config.json.
_DEFAULTS = {
    "llama": dict(rms_norm_eps=1e-6, max_position_embeddings=2048, rope_theta=10000.0,
                  tie_word_embeddings=False),
    "mistral": dict(rms_norm_eps=1e-6, max_position_embeddings=4096 * 32, rope_theta=10000.0,
                    tie_word_embeddings=False),
    "qwen2": dict(rms_norm_eps=1e-6, max_position_embeddings=32768, rope_theta=10000.0,
                  tie_word_embeddings=False),
}
_ARCHITECTURES = {
    ("llama", "lm"): "LlamaForCausalLM", ("llama", "scalar"): "LlamaForSequenceClassification",
    ("mistral", "lm"): "MistralForCausalLM",
    ("mistral", "scalar"): "MistralForSequenceClassification",
    ("qwen2", "lm"): "Qwen2ForCausalLM", ("qwen2", "scalar"): "Qwen2ForSequenceClassification",
    ("gpt2", "lm"): "GPT2LMHeadModel", ("gpt2", "scalar"): "GPT2ForSequenceClassification",
}


# ----------------------------------------------------------------------------------------
# config.json <-> ModelConfig
# ----------------------------------------------------------------------------------------
def read_hf_config(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The HF config as a dict, from a dict, a checkpoint directory or a ``config.json`` path.

    Raises:
      FileNotFoundError: no ``config.json`` at ``src``.
    """
    if isinstance(src, Mapping):
        return dict(src)
    p = Path(src)
    if p.is_dir():
        p = p / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no HF config at {p} (expected a checkpoint directory with "
                                f"{CONFIG_FILE} or the path of that file)")
    with open(p) as f:
        return json.load(f)


def _rope_from_hf(d: Mapping[str, Any], where: str, default_theta: float):
    """``(rope_theta, RopeScaling | None)`` from legacy (``rope_theta``/``rope_scaling``) or
    transformers>=5 (``rope_parameters``) keys."""
    params = d.get("rope_parameters") or {}
    if params and not isinstance(params.get("rope_type", params.get("type", "")), str):
        raise ValueError(f"{where}: per-layer-type rope_parameters {params} are not supported")
    theta = float(params.get("rope_theta", d.get("rope_theta", default_theta)) or default_theta)
    scaling = d.get("rope_scaling") or params
    rope_type = scaling.get("rope_type", scaling.get("type")) if scaling else None
    if rope_type in (None, "default"):
        return theta, None
    if rope_type == "linear":
        return theta, RopeScaling(rope_type="linear", factor=float(scaling["factor"]))
    if rope_type == "llama3":
        return theta, RopeScaling(
            rope_type="llama3", factor=float(scaling["factor"]),
            low_freq_factor=float(scaling["low_freq_factor"]),
            high_freq_factor=float(scaling["high_freq_factor"]),
            original_max_position_embeddings=int(scaling["original_max_position_embeddings"]))
    raise ValueError(f"{where}: rope scaling type {rope_type!r} is not supported "
                     "(supported: default, linear, llama3)")


def config_from_hf(src: str | os.PathLike | Mapping[str, Any], **overrides) -> ModelConfig:
    """A ``ModelConfig`` from an HF config (dict, checkpoint directory or ``config.json`` path).

    Reads ``hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
    head_dim, intermediate_size, vocab_size, max_position_embeddings, rms_norm_eps,
    rope_theta / rope_scaling`` (or transformers>=5 ``rope_parameters``) and
    ``tie_word_embeddings`` for the Llama family (Qwen2 gets ``qkv_bias=True``), and GPT-2's
    ``n_layer, n_embd, n_head, n_positions, vocab_size, layer_norm_epsilon, n_inner``.

    Args:
      src: the HF config.
      **overrides: ``ModelConfig`` fields to set on top (``dtype``, ``remat``, ...).

    Raises:
      ValueError: unsupported ``model_type`` (naming it and the supported ones), rope
        scaling type, activation, or attention/MLP biases that the architecture lacks.
    """
    d = read_hf_config(src)
    where = f"HF config (model_type={d.get('model_type')!r})"
    mt = d.get("model_type")
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"HF model_type {mt!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if mt == "gpt2":
        act = d.get("activation_function", "gelu_new")
        if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
            raise ValueError(f"{where}: activation_function {act!r} is not supported "
                             "(GPT-2 uses the tanh GELU 'gelu_new')")
        if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False:
            raise ValueError(f"{where}: non-standard attention scaling "
                             "(scale_attn_by_inverse_layer_idx / scale_attn_weights) is not supported")
        n_embd = d.get("n_embd", 768)
        kw = dict(arch="gpt2", vocab_size=d.get("vocab_size", 50257), d_model=n_embd,
                  n_layers=d.get("n_layer", 12), n_heads=d.get("n_head", 12),
                  mlp_dim=d.get("n_inner") or 4 * n_embd, max_positions=d.get("n_positions", 1024),
                  norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
                  tie_embeddings=bool(d.get("tie_word_embeddings", True)))
    else:
        base = "llama" if mt == "smollm" else mt
        dflt = _DEFAULTS[base]
        act = d.get("hidden_act", "silu")
        if act not in ("silu", "swish"):
            raise ValueError(f"{where}: hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
        if base in ("llama", "mistral") and (d.get("attention_bias") or d.get("mlp_bias")):
            raise ValueError(f"{where}: attention_bias/mlp_bias=True is not supported (no bias on "
                             "the output projection / MLP in rlhf_jax's Llama)")
        window = d.get("sliding_window")
        if window is not None and (base == "mistral" or d.get("use_sliding_window")):
            log.warning("%s: sliding_window=%s is ignored; rlhf_jax attends to the full causal "
                        "context (identical for sequences up to %s tokens)", where, window, window)
        theta, scaling = _rope_from_hf(d, where, dflt["rope_theta"])
        hidden, n_heads = d["hidden_size"], d["num_attention_heads"]
        head_dim = d.get("head_dim")
        kw = dict(arch="llama", vocab_size=d["vocab_size"], d_model=hidden,
                  n_layers=d["num_hidden_layers"], n_heads=n_heads,
                  n_kv_heads=d.get("num_key_value_heads") or n_heads,
                  head_dim=None if head_dim in (None, hidden // n_heads) else head_dim,
                  mlp_dim=d["intermediate_size"],
                  max_positions=d.get("max_position_embeddings") or dflt["max_position_embeddings"],
                  rope_theta=theta, rope_scaling=scaling,
                  norm_eps=float(d.get("rms_norm_eps", dflt["rms_norm_eps"])),
                  tie_embeddings=bool(d.get("tie_word_embeddings", dflt["tie_word_embeddings"])),
                  qkv_bias=base == "qwen2")
    kw.update(overrides)
    return ModelConfig(**kw)


def default_model_type(cfg: ModelConfig) -> str:
    """The HF ``model_type`` that reproduces ``cfg``: ``gpt2``, ``qwen2`` (q/k/v biases) or
    ``llama``."""
    if cfg.arch == "gpt2":
        return "gpt2"
    return "qwen2" if cfg.qkv_bias else "llama"


def hf_config_dict(cfg: ModelConfig, *, kind: str = "lm", model_type: str | None = None,
                   dtype: str | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """The HF ``config.json`` dict for ``cfg`` (inverse of ``config_from_hf``).

    Rope settings are written both as transformers>=5 ``rope_parameters`` and as the legacy
    ``rope_theta``/``rope_scaling`` keys so older transformers read them too.

    Args:
      cfg: the architecture.
      kind: ``"lm"``/``"lm_value"`` export ``*ForCausalLM``; ``"scalar"`` exports
        ``*ForSequenceClassification`` with ``num_labels=1``.
      model_type: HF model type; default ``default_model_type(cfg)``.
      dtype: the stored tensor dtype name (default ``cfg.param_dtype``).
      extra: keys merged in last (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ...).

    Raises:
      ValueError: ``model_type`` cannot express ``cfg`` (q/k/v biases only exist in qwen2;
        GPT-2 needs ``arch="gpt2"``).
    """
    mt = model_type or default_model_type(cfg)
    if mt == "smollm":
        mt = "llama"
    if mt not in SUPPORTED_MODEL_TYPES:
        raise ValueError(f"HF model_type {mt!r} is not supported; supported: "
                         f"{', '.join(SUPPORTED_MODEL_TYPES)}")
    if (mt == "gpt2") != (cfg.arch == "gpt2"):
        raise ValueError(f"model_type {mt!r} cannot express arch={cfg.arch!r}")
    if cfg.arch == "llama" and cfg.qkv_bias != (mt == "qwen2"):
        raise ValueError(f"model_type {mt!r} cannot express qkv_bias={cfg.qkv_bias} "
                         "(only qwen2 has q/k/v biases, and always)")
    dtype = dtype or cfg.param_dtype
    arch_name = _ARCHITECTURES[(mt, "scalar" if kind == "scalar" else "lm")]
    d: dict[str, Any] = {"architectures": [arch_name], "model_type": mt, "dtype": dtype,
                         "torch_dtype": dtype, "vocab_size": cfg.vocab_size,
                         "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
                         "initializer_range": 0.02}
    if mt == "gpt2":
        d.update(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                 n_positions=cfg.max_positions, n_ctx=cfg.max_positions, n_inner=cfg.mlp_dim,
                 layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
                 scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)
    else:
        rope: dict[str, Any] = {"rope_type": "default", "rope_theta": cfg.rope_theta}
        legacy = None
        if cfg.rope_scaling is not None:
            s = cfg.rope_scaling
            legacy = {"rope_type": s.rope_type, "factor": s.factor}
            if s.rope_type == "llama3":
                legacy.update(low_freq_factor=s.low_freq_factor, high_freq_factor=s.high_freq_factor,
                              original_max_position_embeddings=s.original_max_position_embeddings)
            rope = {**legacy, "rope_theta": cfg.rope_theta}
        d.update(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                 num_attention_heads=cfg.n_heads, num_key_value_heads=cfg.num_kv_heads,
                 head_dim=cfg.per_head_dim, intermediate_size=cfg.mlp_dim, hidden_act="silu",
                 max_position_embeddings=cfg.max_positions, rms_norm_eps=cfg.norm_eps,
                 rope_theta=cfg.rope_theta, rope_scaling=legacy, rope_parameters=rope,
                 attention_dropout=0.0)
        if mt in ("llama", "mistral"):
            d.update(attention_bias=False, mlp_bias=False)
        if mt in ("mistral", "qwen2"):
            d.update(sliding_window=None, use_sliding_window=False)
    if kind == "scalar":
        d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    # Special-token ids are unknown unless given (HF's per-class defaults, e.g. Llama's 1/2,
    # would be guesses); GPT-2's own vocabulary keeps its <|endoftext|> = 50256.
    gpt2_eot = 50256 if mt == "gpt2" and cfg.vocab_size == 50257 else None
    d.update(bos_token_id=gpt2_eot, eos_token_id=gpt2_eot, pad_token_id=None)
    d.update(extra or {})
    return d


# ----------------------------------------------------------------------------------------
# Tensor name/layout mapping
# ----------------------------------------------------------------------------------------
LeafPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One HF tensor and the per-layer slices of our leaves it maps to.

    ``to_ours(hf) -> tuple`` (one array per ``ours`` path, without the layer axis) and
    ``to_hf(*ours) -> hf`` are inverse layout maps.
    """

    hf: str  # name; per-layer names contain "{i}"
    shape: tuple[int, ...]
    ours: tuple[LeafPath, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    per_layer: bool


def _linear(name, out_shape, in_shape, path, per_layer=True):
    """HF ``nn.Linear`` ``weight [prod(out), prod(in)]`` <-> our kernel ``[*in, *out]``."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    return _Spec(name, (n_out, n_in), (path,),
                 lambda w: (w.T.reshape(*in_shape, *out_shape),),
                 lambda k: k.reshape(n_in, n_out).T, per_layer)


def _same(name, hf_shape, our_shape, path, per_layer=True):
    """Same element order, possibly different shape (norm scales, biases, Conv1D kernels)."""
    return _Spec(name, tuple(hf_shape), (path,), lambda w: (w.reshape(our_shape),),
                 lambda k: k.reshape(hf_shape), per_layer)


def _score_specs(d: int) -> list[_Spec]:
    """``score.weight [1, D]`` / ``score.bias [1]`` <-> ``value_head`` kernel ``[D]`` / bias ``[]``."""
    return [
        _Spec(SCORE_WEIGHT, (1, d), (("value_head", "kernel"),), lambda w: (w[0],),
              lambda k: k[None], False),
        _Spec(SCORE_BIAS, (1,), (("value_head", "bias"),), lambda b: (b.reshape(()),),
              lambda b: b.reshape(1), False),
    ]


def _specs(cfg: ModelConfig, prefix: str, *, lm_head: bool, score: bool) -> list[_Spec]:
    """Every HF tensor of a checkpoint of ``cfg`` (``prefix``: ``"model."``/``"transformer."``
    or ``""`` for a base-model checkpoint). Per-layer names carry ``{i}``."""
    d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
    h, hkv, k = cfg.n_heads, cfg.num_kv_heads, cfg.per_head_dim
    B = ("trunk", "blocks")
    out: list[_Spec] = []
    if cfg.arch == "gpt2":
        p = prefix + "h.{i}."
        split = (h * k, hkv * k, hkv * k)
        cuts = np.cumsum(split)[:-1]
        qkv = tuple(B + ("attn", n, "kernel") for n in "qkv")
        qkv_b = tuple(B + ("attn", n, "bias") for n in "qkv")
        out += [
            _same(p + "ln_1.weight", (d,), (d,), B + ("attn_norm", "scale")),
            _same(p + "ln_1.bias", (d,), (d,), B + ("attn_norm", "bias")),
            _Spec(p + "attn.c_attn.weight", (d, sum(split)), qkv,
                  lambda w: tuple(x.reshape(d, -1, k) for x in np.split(w, cuts, axis=1)),
                  lambda q, kk, vv: np.concatenate([x.reshape(d, -1) for x in (q, kk, vv)], 1),
                  True),
            _Spec(p + "attn.c_attn.bias", (sum(split),), qkv_b,
                  lambda b: tuple(x.reshape(-1, k) for x in np.split(b, cuts)),
                  lambda q, kk, vv: np.concatenate([x.reshape(-1) for x in (q, kk, vv)]), True),
            _same(p + "attn.c_proj.weight", (h * k, d), (h, k, d), B + ("attn", "o", "kernel")),
            _same(p + "attn.c_proj.bias", (d,), (d,), B + ("attn", "o", "bias")),
            _same(p + "ln_2.weight", (d,), (d,), B + ("mlp_norm", "scale")),
            _same(p + "ln_2.bias", (d,), (d,), B + ("mlp_norm", "bias")),
            _same(p + "mlp.c_fc.weight", (d, f), (d, f), B + ("mlp", "up", "kernel")),
            _same(p + "mlp.c_fc.bias", (f,), (f,), B + ("mlp", "up", "bias")),
            _same(p + "mlp.c_proj.weight", (f, d), (f, d), B + ("mlp", "down", "kernel")),
            _same(p + "mlp.c_proj.bias", (d,), (d,), B + ("mlp", "down", "bias")),
            _same(prefix + "wte.weight", (v, d), (v, d), ("trunk", "embed"), False),
            _same(prefix + "wpe.weight", (cfg.max_positions, d), (cfg.max_positions, d),
                  ("trunk", "pos_embed"), False),
            _same(prefix + "ln_f.weight", (d,), (d,), ("trunk", "final_norm", "scale"), False),
            _same(prefix + "ln_f.bias", (d,), (d,), ("trunk", "final_norm", "bias"), False),
        ]
    else:
        p = prefix + "layers.{i}."
        A = B + ("attn",)
        out += [
            _linear(p + "self_attn.q_proj.weight", (h, k), (d,), A + ("q", "kernel")),
            _linear(p + "self_attn.k_proj.weight", (hkv, k), (d,), A + ("k", "kernel")),
            _linear(p + "self_attn.v_proj.weight", (hkv, k), (d,), A + ("v", "kernel")),
        ]
        if cfg.qkv_bias:
            out += [_same(p + f"self_attn.{n}_proj.bias", (hh * k,), (hh, k), A + (n, "bias"))
                    for n, hh in (("q", h), ("k", hkv), ("v", hkv))]
        out += [
            _linear(p + "self_attn.o_proj.weight", (d,), (h, k), A + ("o", "kernel")),
            _linear(p + "mlp.gate_proj.weight", (f,), (d,), B + ("mlp", "gate", "kernel")),
            _linear(p + "mlp.up_proj.weight", (f,), (d,), B + ("mlp", "up", "kernel")),
            _linear(p + "mlp.down_proj.weight", (d,), (f,), B + ("mlp", "down", "kernel")),
            _same(p + "input_layernorm.weight", (d,), (d,), B + ("attn_norm", "scale")),
            _same(p + "post_attention_layernorm.weight", (d,), (d,), B + ("mlp_norm", "scale")),
            _same(prefix + "embed_tokens.weight", (v, d), (v, d), ("trunk", "embed"), False),
            _same(prefix + "norm.weight", (d,), (d,), ("trunk", "final_norm", "scale"), False),
        ]
    if lm_head:
        out.append(_linear("lm_head.weight", (v,), (d,), ("lm_head", "kernel"), False))
    if score:
        out += _score_specs(d)
    return out


def _expand(spec: _Spec, n_layers: int) -> list[str]:
    return [spec.hf.format(i=i) for i in range(n_layers)] if spec.per_layer else [spec.hf]


def _ignorable(name: str, arch: str) -> bool:
    """Buffers some checkpoints carry that are not parameters."""
    if name.endswith("rotary_emb.inv_freq") or name.endswith("rotary_emb.original_inv_freq"):
        return True
    return arch == "gpt2" and re.search(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$", name) is not None


# ----------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class TensorInfo:
    file: Path
    shape: tuple[int, ...]
    dtype: str


def _np_dtype(name: str):
    return ml_dtypes.bfloat16 if str(name) == "bfloat16" else np.dtype(name)


def list_safetensors(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Name -> (file, shape, dtype) of every tensor of a checkpoint directory (headers only).

    Reads ``model.safetensors.index.json`` (sharded) or ``model.safetensors``.

    Raises:
      FileNotFoundError: neither weights file exists, or a shard named in the index is missing.
      ValueError: the index names a tensor its shard lacks.
    """
    from safetensors import safe_open

    root = Path(path)
    index, single = root / INDEX_FILE, root / WEIGHTS_FILE
    if index.is_file():
        with open(index) as f:
            weight_map: dict[str, str] = json.load(f)["weight_map"]
        files = sorted(set(weight_map.values()))
    elif single.is_file():
        weight_map, files = None, [WEIGHTS_FILE]
    else:
        found = sorted(p.name for p in root.glob("*")) if root.is_dir() else []
        raise FileNotFoundError(
            f"no safetensors weights in {root}: expected {WEIGHTS_FILE} or {INDEX_FILE} "
            f"(found: {found[:20]}); convert .bin checkpoints with transformers' "
            "save_pretrained(safe_serialization=True)")
    out: dict[str, TensorInfo] = {}
    for fname in files:
        fpath = root / fname
        if not fpath.is_file():
            raise FileNotFoundError(f"safetensors shard {fpath} listed in {index} does not exist")
        with safe_open(fpath, framework="np") as f:
            for name in f.keys():
                sl = f.get_slice(name)
                out[name] = TensorInfo(fpath, tuple(sl.get_shape()), str(sl.get_dtype()))
    if weight_map is not None:
        for name, fname in weight_map.items():
            if name not in out or out[name].file.name != fname:
                raise ValueError(f"{index} maps tensor {name!r} to {fname}, which does not "
                                 "contain it")
    return out


def _detect_prefix(names: Sequence[str], arch: str) -> str:
    base = "transformer." if arch == "gpt2" else "model."
    return base if any(n.startswith(base) for n in names) else ""


_DTYPE_ALIASES = {"float32": "float32", "fp32": "float32", "bfloat16": "bfloat16", "bf16": "bfloat16"}


def _dtype_name(dtype) -> str:
    name = str(jnp.dtype(dtype)) if not isinstance(dtype, str) else dtype
    if name not in _DTYPE_ALIASES:
        raise ValueError(f"parameter dtype must be float32 or bfloat16, got {dtype!r}")
    return _DTYPE_ALIASES[name]


def _resolve_shardings(model: Model, shardings):
    if shardings is None:
        return None
    if isinstance(shardings, jax.sharding.Mesh):
        return model.param_shardings(shardings)
    if isinstance(shardings, jax.sharding.Sharding):
        return jax.tree.map(lambda _: shardings, model.abstract_params())
    return shardings


def _get_path(tree, path):
    for k in path:
        tree = tree[k]
    return tree


def _set_path(tree: dict, path, value):
    for k in path[:-1]:
        tree = tree.setdefault(k, {})
    tree[path[-1]] = value


def _place(host: np.ndarray, sharding) -> jax.Array:
    """Put a host array on devices; with a sharding each device receives only its slice."""
    if sharding is None:
        return jnp.asarray(host)
    return jax.make_array_from_callback(host.shape, sharding, lambda idx: host[idx])


def load_hf_checkpoint(path: str | os.PathLike, *, kind: str = "lm", dtype=None,
                       shardings=None, rng: jax.Array | None = None,
                       config_overrides: Mapping[str, Any] | None = None) -> tuple[Model, Params]:
    """Load an HF checkpoint directory into ``(Model(cfg, kind), params)``.

    Args:
      path: directory with ``config.json`` and ``model.safetensors`` or a sharded
        ``model.safetensors.index.json`` (base-model checkpoints without the ``model.`` /
        ``transformer.`` prefix work too).
      kind: ``"lm"``, ``"lm_value"`` or ``"scalar"``. A scalar head (``score.weight [1, D]``,
        optional ``score.bias [1]``) is loaded when present, else initialised from ``rng``
        as ``rlhf_jax.models.model.with_head`` would (same key stream; computed under
        ``jit`` so only the head is materialised, equal up to float rounding). ``kind="scalar"`` drops an
        untied ``lm_head.weight`` and ``kind="lm"`` drops ``score.*`` (each logged).
      dtype: parameter storage dtype (``"float32"``/``"bfloat16"``); default float32. Sets
        ``ModelConfig.param_dtype``.
      shardings: ``None`` (default device), a ``Mesh`` (the model's rule-table shardings), one
        ``Sharding`` for every leaf, or a tree of shardings matching the parameters. Each
        parameter is built on its devices from a host copy of that parameter only.
      rng: typed key for a freshly initialised scalar head (default ``jax.random.key(0)``).
      config_overrides: ``ModelConfig`` fields to override (``dtype``, ``remat``, ...).

    Returns:
      ``(model, params)`` with ``params`` matching ``model.init``'s tree.

    Raises:
      FileNotFoundError: ``config.json`` or the weights (or a shard) is missing, naming it.
      ValueError: unsupported config; a missing tensor, an unexpected tensor, or a shape
        mismatch, naming the tensor, the file and the expected vs found shape.
    """
    from safetensors import safe_open

    root = Path(path)
    overrides = dict(config_overrides or {})
    if dtype is not None:
        overrides["param_dtype"] = _dtype_name(dtype)
    cfg = config_from_hf(root, **overrides)
    model = Model(cfg, kind)
    infos = list_safetensors(root)
    prefix = _detect_prefix(list(infos), cfg.arch)
    has_score = SCORE_WEIGHT in infos
    want_score = kind != "lm"
    want_lm_head = kind != "scalar" and not cfg.tie_embeddings
    specs = _specs(cfg, prefix, lm_head=want_lm_head, score=want_score and has_score)
    if want_score and has_score and SCORE_BIAS not in infos:
        specs = [s for s in specs if s.hf != SCORE_BIAS]

    # Validate every name and shape from the headers before reading any data.
    expected: dict[str, _Spec] = {}
    for s in specs:
        for name in _expand(s, cfg.n_layers):
            expected[name] = s
    for name, s in expected.items():
        if name not in infos:
            files = sorted({str(i.file) for i in infos.values()})
            raise ValueError(f"tensor {name!r} is missing from the checkpoint {root} "
                             f"(files: {files}); expected shape {s.shape} for {cfg.arch} "
                             f"with {cfg.n_layers} layers")
        if tuple(infos[name].shape) != tuple(s.shape):
            raise ValueError(f"tensor {name!r} in {infos[name].file} has shape "
                             f"{tuple(infos[name].shape)}, expected {tuple(s.shape)} for config "
                             f"{root / CONFIG_FILE}")
    dropped = []
    for name, info in infos.items():
        if name in expected or _ignorable(name, cfg.arch):
            continue
        if name in (SCORE_WEIGHT, SCORE_BIAS) and not want_score:
            dropped.append(name)
        elif name == "lm_head.weight" and (kind == "scalar" or cfg.tie_embeddings):
            dropped.append(name)
        else:
            raise ValueError(f"unexpected tensor {name!r} (shape {info.shape}) in {info.file}: "
                             f"not part of a {cfg.arch} checkpoint with kind={kind!r} "
                             f"(HF names are expected with prefix {prefix!r})")
    if dropped:
        log.info("load_hf_checkpoint(%s, kind=%r): not loading %s", root, kind, dropped)

    abstract = model.abstract_params()
    target = _resolve_shardings(model, shardings)
    np_dt = _np_dtype(cfg.param_dtype)
    params: dict = {}
    with contextlib.ExitStack() as stack:
        handles = {f: stack.enter_context(safe_open(f, framework="np"))
                   for f in sorted({i.file for i in infos.values()})}

        def read(name):
            return handles[infos[name].file].get_tensor(name)

        for s in specs:
            for j, leaf in enumerate(s.ours):
                if s.per_layer:
                    host = np.stack([s.to_ours(read(n))[j] for n in _expand(s, cfg.n_layers)])
                else:
                    host = s.to_ours(read(s.hf))[j]
                host = np.asarray(host.astype(np_dt), order="C")
                want = _get_path(abstract, leaf)
                if host.shape != tuple(want.shape):  # a mapping bug, not bad input
                    raise AssertionError(f"{leaf}: built {host.shape}, model wants {want.shape}")
                sharding = None if target is None else _get_path(target, leaf)
                _set_path(params, leaf, _place(host, sharding))
        if cfg.tie_embeddings and "lm_head.weight" in infos and kind != "scalar":
            if not np.array_equal(read("lm_head.weight"), read(prefix + (
                    "wte.weight" if cfg.arch == "gpt2" else "embed_tokens.weight"))):
                raise ValueError(f"{root / CONFIG_FILE} says tie_word_embeddings=True but "
                                 f"lm_head.weight in {infos['lm_head.weight'].file} differs from "
                                 "the input embedding")

    if want_score and not has_score:
        rng = jax.random.key(0) if rng is None else rng
        # with_head(params, model, rng)["value_head"], jitted: XLA computes only the head.
        head = jax.jit(lambda r: model.init(r)["value_head"])(rng)
        if target is not None:
            head = jax.device_put(head, target["value_head"])
        params["value_head"] = head
        log.info("load_hf_checkpoint(%s, kind=%r): no %s in the checkpoint; value head "
                 "initialised", root, kind, SCORE_WEIGHT)
    elif want_score and SCORE_BIAS not in infos:
        params["value_head"]["bias"] = _place(np.zeros((), np_dt),
                                              None if target is None else target["value_head"]["bias"])
    _check_tree(model, params)
    return model, params


# ----------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------
def _check_tree(model: Model, params: Params) -> None:
    """Raise ``ValueError`` unless ``params`` has ``model``'s tree structure and shapes."""
    want = jax.tree_util.tree_flatten_with_path(model.abstract_params())[0]
    try:
        have = jax.tree_util.tree_flatten_with_path(params)[0]
        jax.tree.map(lambda a, b: None, model.abstract_params(), params)
    except (ValueError, TypeError, KeyError) as e:
        raise ValueError(f"params do not match the tree of Model(kind={model.kind!r}): {e}") from e
    for (path, w), (_, h) in zip(want, have):
        if tuple(w.shape) != tuple(np.shape(h)):
            raise ValueError(f"params{jax.tree_util.keystr(path)} has shape {tuple(np.shape(h))}, "
                             f"Model(kind={model.kind!r}) expects {tuple(w.shape)}")


def _to_host(x) -> np.ndarray:
    """Gather one (possibly sharded, possibly multi-process) array to a host NumPy array."""
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(jax.device_get(x))


def _write_tokenizer(tokenizer, out: Path) -> None:
    if hasattr(tokenizer, "save_pretrained"):
        tokenizer.save_pretrained(str(out))
        return
    src = Path(tokenizer)
    if not src.is_dir():
        raise FileNotFoundError(f"tokenizer directory {src} does not exist")
    copied = [n for n in TOKENIZER_FILES if (src / n).is_file()]
    if not copied:
        raise FileNotFoundError(f"no tokenizer files in {src} (looked for {TOKENIZER_FILES})")
    for n in copied:
        shutil.copyfile(src / n, out / n)


def save_hf_checkpoint(model: Model, params: Params, path: str | os.PathLike, *,
                       tokenizer=None, max_shard_bytes: int = 5 * 10**9,
                       dtype=None, model_type: str | None = None,
                       config_extra: Mapping[str, Any] | None = None,
                       generation_config: Mapping[str, Any] | None = None) -> Path:
    """Write ``params`` as an HF checkpoint directory that ``transformers`` loads.

    ``AutoModelForCausalLM.from_pretrained(path)`` loads ``kind="lm"``/``"lm_value"`` exports;
    ``AutoModelForSequenceClassification`` loads ``kind="scalar"`` ones (see module docstring
    for the ``score.*`` head). Existing ``model*.safetensors`` files in ``path`` are removed.

    Args:
      model: the ``Model`` whose tree ``params`` is.
      params: parameter tree (host or device arrays, sharded or not, even spanning
        processes; every process must call this, only process 0 writes).
      path: output directory (created).
      tokenizer: an HF tokenizer (``save_pretrained`` is called) or a directory whose
        tokenizer files are copied; ``None`` writes none.
      max_shard_bytes: shard the weights into ``model-0000k-of-0000n.safetensors`` + index
        when they exceed this many bytes.
      dtype: stored dtype (``"float32"``/``"bfloat16"``); default ``cfg.param_dtype``.
      model_type: HF model type (default ``default_model_type(cfg)``; e.g. ``"mistral"``).
      config_extra: keys merged into ``config.json`` (``bos_token_id``, ``eos_token_id``, ...);
        bos/eos/pad ids default to the ``tokenizer`` object's, else ``null``.
      generation_config: if given, written as ``generation_config.json``.

    Returns:
      ``path``.

    Raises:
      ValueError: ``params`` does not match ``model``'s tree, or ``model_type`` cannot
        express the config.
    """
    from safetensors.numpy import save_file

    cfg = model.cfg
    out = Path(path)
    dtype = _dtype_name(dtype or cfg.param_dtype)
    np_dt = _np_dtype(dtype)
    extra = {}
    for key in ("bos_token_id", "eos_token_id", "pad_token_id"):  # from a tokenizer object
        if getattr(tokenizer, key, None) is not None:
            extra[key] = int(getattr(tokenizer, key))
    extra.update(config_extra or {})
    config = hf_config_dict(cfg, kind=model.kind, model_type=model_type, dtype=dtype,
                            extra=extra)
    _check_tree(model, params)
    prefix = "transformer." if cfg.arch == "gpt2" else "model."
    specs = _specs(cfg, prefix, lm_head=model.kind != "scalar" and not cfg.tie_embeddings,
                   score=model.kind != "lm")
    writer = jax.process_index() == 0
    if writer:
        out.mkdir(parents=True, exist_ok=True)
        for old in list(out.glob("model*.safetensors")) + [out / INDEX_FILE]:
            old.unlink(missing_ok=True)

    shards: list[list[str]] = []
    buf: dict[str, np.ndarray] = {}
    buf_bytes = 0
    weight_map: dict[str, str] = {}
    total = 0

    def flush():
        nonlocal buf, buf_bytes
        if buf and writer:
            name = f"_partial-{len(shards):05d}.safetensors"
            save_file(buf, str(out / name), metadata={"format": "pt"})
            shards.append(list(buf))
        elif buf:
            shards.append(list(buf))
        buf, buf_bytes = {}, 0

    for s in specs:
        leaves = [_to_host(_get_path(params, p)) for p in s.ours]  # one gather per leaf
        for i, name in enumerate(_expand(s, cfg.n_layers)):
            parts = [x[i] for x in leaves] if s.per_layer else leaves
            t = np.asarray(np.asarray(s.to_hf(*parts)).astype(np_dt), order="C")
            if buf and buf_bytes + t.nbytes > max_shard_bytes:
                flush()
            buf[name] = t
            buf_bytes += t.nbytes
            total += t.nbytes
        del leaves
    flush()

    if writer:
        n = len(shards)
        if n == 1:
            os.replace(out / "_partial-00000.safetensors", out / WEIGHTS_FILE)
        else:
            for k, names in enumerate(shards):
                final = f"model-{k + 1:05d}-of-{n:05d}.safetensors"
                os.replace(out / f"_partial-{k:05d}.safetensors", out / final)
                weight_map.update({nm: final for nm in names})
            with open(out / INDEX_FILE, "w") as f:
                json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, f,
                          indent=2, sort_keys=True)
        with open(out / CONFIG_FILE, "w") as f:
            json.dump(config, f, indent=2, sort_keys=True)
        if generation_config is not None:
            with open(out / GENERATION_CONFIG_FILE, "w") as f:
                json.dump(dict(generation_config), f, indent=2, sort_keys=True)
        if tokenizer is not None:
            _write_tokenizer(tokenizer, out)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(f"save_hf_checkpoint:{out}")
    return out
