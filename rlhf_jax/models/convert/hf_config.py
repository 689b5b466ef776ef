"""HF ``config.json`` <-> ``ModelConfig``: reading, mapping and writing HF model configs.

Supported ``model_type`` values: ``llama``, ``mistral``, ``qwen2``, ``smollm`` (read as
``llama``; SmolLM/SmolLM2 ship ``model_type: llama`` anyway) and ``gpt2``. ``config_from_hf``
reads a config (legacy ``rope_theta``/``rope_scaling`` or transformers>=5 ``rope_parameters``
keys); ``hf_config_dict`` writes one (both rope spellings), naming the architecture
(``*ForCausalLM``, or ``*ForSequenceClassification`` for ``kind="scalar"``).
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlhf_jax.config import ModelConfig, RopeScaling

log = logging.getLogger(__name__)

LLAMA_MODEL_TYPES = ("llama", "mistral", "qwen2", "smollm")
SUPPORTED_MODEL_TYPES = (*LLAMA_MODEL_TYPES, "gpt2")
CONFIG_FILE = "config.json"

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


__all__ = ["CONFIG_FILE", "LLAMA_MODEL_TYPES", "SUPPORTED_MODEL_TYPES", "config_from_hf",
           "default_model_type", "hf_config_dict", "read_hf_config"]
