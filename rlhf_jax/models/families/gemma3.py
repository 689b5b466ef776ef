"""Gemma 3 text (Gemma Team 2025): Gemma 2's sandwich block with Gemma-style RMSNorms on
each head's q and k (``q_norm``/``k_norm``, ``[K]``) instead of attention soft-capping,
five sliding layers per global one (``layer_types``), and a separate RoPE base for the
sliding layers (``rope_local_base_freq``, or ``rope_parameters.sliding_attention``), the
global layers' rope possibly scaled (``linear``).

``model_type: gemma3_text`` (``Gemma3ForCausalLM``); the multimodal ``gemma3`` checkpoints
(``Gemma3ForConditionalGeneration``) are not read.
"""

from __future__ import annotations

from rlhf_jax.models.families.base import BlockSpec, Family, llama_layout_tensors, rotary_buffer
from rlhf_jax.models.families.gemma2 import sandwich_from_hf, sandwich_to_hf

_DEFAULTS = dict(vocab_size=262208, hidden_size=2304, intermediate_size=9216,
                 num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=256, hidden_activation="gelu_pytorch_tanh",
                 max_position_embeddings=131072, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_theta=1_000_000.0, query_pre_attn_scalar=256, sliding_window=4096,
                 final_logit_softcapping=None, attn_logit_softcapping=None)
_LOCAL_THETA = 10_000.0


def _from_hf(d, where):
    if d.get("attn_logit_softcapping") is not None:
        raise ValueError(f"{where}: attn_logit_softcapping={d['attn_logit_softcapping']!r} is "
                         "not supported (transformers' Gemma 3 does not apply it)")
    kw = sandwich_from_hf(d, where, arch="gemma3", defaults=_DEFAULTS, pattern=int(
        d.get("sliding_window_pattern", 6)), per_layer_rope=True)
    if kw.get("rope_local_theta") is None and kw["sliding_window"] is not None:
        kw["rope_local_theta"] = float(d.get("rope_local_base_freq", _LOCAL_THETA))
    if kw["rope_local_theta"] == kw["rope_theta"] and kw["rope_scaling"] is None:
        kw["rope_local_theta"] = None
    return kw


def _to_hf(cfg, mt):
    d = sandwich_to_hf(cfg)
    local = cfg.rope_theta if cfg.rope_local_theta is None else cfg.rope_local_theta
    d["rope_parameters"] = {"full_attention": d["rope_parameters"],
                            "sliding_attention": {"rope_type": "default", "rope_theta": local}}
    d["rope_local_base_freq"] = local
    return d


def _check(cfg):
    if cfg.attn_softcap is not None:
        raise ValueError("arch 'gemma3' has no attention soft-capping (transformers' Gemma 3 "
                         f"does not apply it), got attn_softcap={cfg.attn_softcap}")
    if cfg.rope_scaling is not None and cfg.rope_scaling.no_truncate:
        raise ValueError("arch 'gemma3' cannot express yarn no_truncate (transformers reads "
                         "`truncate` from the outer per-layer-type rope_parameters, always True)")


FAMILY = Family(
    name="gemma3",
    block=BlockSpec(norm="rms1p", residual="sandwich", mlp="gated", activation="gelu_tanh",
                    embed_scale=True, qk_norm="head"),
    model_types=("gemma3_text",),
    architectures={"gemma3_text": ("Gemma3ForCausalLM", "Gemma3TextForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=lambda cfg, prefix: llama_layout_tensors(
        cfg, prefix, q_norm="head", post_norms=True, pre_mlp_name="pre_feedforward_layernorm"),
    ignorable=rotary_buffer,
    options=("rope_scaling", "sliding_window", "layer_types", "rope_local_theta", "attn_scale",
             "final_softcap"),
    check=_check,
)
