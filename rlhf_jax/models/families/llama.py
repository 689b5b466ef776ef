"""The Llama family (Touvron et al. 2023): Llama 2/3, SmolLM/SmolLM2, Mistral, Qwen2.

Pre-RMSNorm, RoPE, grouped-query attention, SwiGLU MLP. Within the family:

* Qwen2 (``model_type: qwen2``): q/k/v biases (``ModelConfig.qkv_bias``); with
  ``use_sliding_window`` a window on layers ``i >= max_window_layers`` (or as its
  ``layer_types`` say).
* Mistral (``model_type: mistral``): a sliding window on every layer, ``sliding_window``
  (default 4096 when the key is absent, as transformers' ``MistralConfig``).
* ``smollm`` reads as ``llama`` (SmolLM/SmolLM2 ship ``model_type: llama`` anyway).
"""

from __future__ import annotations

from rlhf_jax.models.families.base import (BlockSpec, Family, common_from_hf, common_to_hf,
                                           layer_types_from_hf, llama_layout_tensors,
                                           qwen_window_from_hf, qwen_window_to_hf,
                                           rotary_buffer)

# Per-type defaults of the HF config classes, used when a key is absent from config.json.
_COMMON = dict(hidden_act="silu", tie_word_embeddings=False, rope_theta=10000.0,
               rms_norm_eps=1e-6)
_DEFAULTS = {
    "llama": dict(_COMMON, max_position_embeddings=2048),
    "mistral": dict(_COMMON, max_position_embeddings=4096 * 32, sliding_window=4096),
    "qwen2": dict(_COMMON, max_position_embeddings=32768),
}


def _from_hf(d, where):
    mt = d.get("model_type")
    base = "llama" if mt == "smollm" else mt
    dflt = _DEFAULTS[base]
    act = d.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"{where}: hidden_act {act!r} is not supported (SwiGLU needs 'silu')")
    if base in ("llama", "mistral") and (d.get("attention_bias") or d.get("mlp_bias")):
        raise ValueError(f"{where}: attention_bias/mlp_bias=True is not supported (no bias on "
                         "the output projection / MLP in rlhf_jax's Llama)")
    kw = common_from_hf(d, where, arch="llama", defaults=dflt)
    kw["qkv_bias"] = base == "qwen2"
    n = kw["n_layers"]
    if base == "mistral":
        if d.get("layer_types") is not None:
            raise ValueError(f"{where}: layer_types is not supported for model_type 'mistral' "
                             "(transformers' Mistral ignores it and windows every layer)")
        kw["sliding_window"] = d.get("sliding_window", dflt["sliding_window"])
    elif base == "qwen2":
        kw["sliding_window"], kw["layer_types"] = qwen_window_from_hf(d, where, n)
    elif d.get("layer_types") is not None:
        # LlamaConfig has no window; a layer_types key there is inert (all full attention).
        layer_types_from_hf(d, where, n, None)
    return kw


def _default_model_type(cfg) -> str:
    if cfg.qkv_bias:
        return "qwen2"
    return "mistral" if cfg.sliding_window is not None else "llama"


def _to_hf(cfg, mt):
    if mt == "smollm":
        mt = "llama"
    if cfg.qkv_bias != (mt == "qwen2"):
        raise ValueError(f"model_type {mt!r} cannot express qkv_bias={cfg.qkv_bias} "
                         "(only qwen2 has q/k/v biases, and always)")
    if cfg.sliding_window is not None and mt == "llama":
        raise ValueError(f"model_type 'llama' cannot express sliding_window={cfg.sliding_window} "
                         "(use 'mistral', or 'qwen2' with q/k/v biases)")
    if cfg.layer_types is not None and mt == "mistral":
        raise ValueError("model_type 'mistral' windows every layer; it cannot express "
                         f"layer_types={cfg.layer_types}")
    d = common_to_hf(cfg)
    d["hidden_act"] = "silu"
    if mt in ("llama", "mistral"):
        d.update(attention_bias=False, mlp_bias=False)
    if mt == "mistral":
        d.update(sliding_window=cfg.sliding_window)
    if mt == "qwen2":
        d.update(qwen_window_to_hf(cfg))
    return d


def _check(cfg):
    if cfg.activation not in (None, "silu"):
        raise ValueError(f"arch 'llama' uses SwiGLU (activation 'silu'), got {cfg.activation!r}")


FAMILY = Family(
    name="llama",
    block=BlockSpec(norm="rms", residual="pre", mlp="gated", activation="silu"),
    model_types=("llama", "mistral", "qwen2", "smollm"),
    architectures={"llama": ("LlamaForCausalLM", "LlamaForSequenceClassification"),
                   "mistral": ("MistralForCausalLM", "MistralForSequenceClassification"),
                   "qwen2": ("Qwen2ForCausalLM", "Qwen2ForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=lambda cfg, prefix: llama_layout_tensors(cfg, prefix),
    ignorable=rotary_buffer,
    default_model_type=_default_model_type,
    options=("qkv_bias", "rope_scaling", "sliding_window", "layer_types"),
    check=_check,
)
