"""Gemma 2 (Gemma Team 2024b): Gemma's block with post-attention and post-MLP norms
(``pre_feedforward_layernorm`` before the MLP), alternating sliding-window and global
layers (``layer_types``; even layers slide by default), attention scale
``query_pre_attn_scalar ** -0.5``, and tanh soft-capping of the attention scores
(``attn_logit_softcapping``) and of the final logits (``final_logit_softcapping``)."""

from __future__ import annotations

from rlhf_jax.models.families.base import (BlockSpec, Family, common_from_hf, common_to_hf,
                                           layer_types_from_hf, layer_types_to_hf,
                                           llama_layout_tensors, rotary_buffer)
from rlhf_jax.models.families.gemma import gemma_checks

_DEFAULTS = dict(vocab_size=256000, hidden_size=2304, intermediate_size=9216,
                 num_hidden_layers=26, num_attention_heads=8, num_key_value_heads=4,
                 head_dim=256, hidden_activation="gelu_pytorch_tanh",
                 max_position_embeddings=8192, rms_norm_eps=1e-6, tie_word_embeddings=True,
                 rope_theta=10000.0, query_pre_attn_scalar=256, sliding_window=4096,
                 final_logit_softcapping=30.0, attn_logit_softcapping=50.0)


def sandwich_from_hf(d, where, *, arch, defaults, pattern: int, per_layer_rope=False) -> dict:
    """Gemma 2/3 keys: common ones, the window and its layers (``layer_types``, or every
    ``pattern``-th layer global), the query scale and the soft-caps."""
    gemma_checks(d, where)
    kw = common_from_hf(d, where, arch=arch, defaults=defaults, act_key="hidden_activation",
                        per_layer_rope=per_layer_rope)
    n = kw["n_layers"]
    window = d.get("sliding_window", defaults["sliding_window"])
    if d.get("layer_types") is not None:
        types = layer_types_from_hf(d, where, n, window)
    else:
        types = tuple("sliding" if (i + 1) % pattern else "full" for i in range(n))
        if "sliding" not in types or window is None:
            types = None
    if types is None:
        window = None
    elif all(t == "sliding" for t in types):
        types = None
    kw.update(sliding_window=window, layer_types=types,
              attn_scale=float(d.get("query_pre_attn_scalar",
                                     defaults["query_pre_attn_scalar"])) ** -0.5,
              attn_softcap=d.get("attn_logit_softcapping", defaults["attn_logit_softcapping"]),
              final_softcap=d.get("final_logit_softcapping",
                                  defaults["final_logit_softcapping"]))
    if kw.get("rope_local_theta") is not None and types is None and window is None:
        kw["rope_local_theta"] = None  # no sliding layer uses it
    return kw


def sandwich_to_hf(cfg) -> dict:
    """Inverse of ``sandwich_from_hf`` (``query_pre_attn_scalar = attn_scale ** -2``)."""
    d = common_to_hf(cfg)
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.per_head_dim ** -0.5
    q = scale ** -2.0
    q = int(round(q)) if abs(q - round(q)) < 1e-6 * q else q  # an int in HF configs
    d.update(hidden_activation="gelu_pytorch_tanh", attention_bias=False,
             query_pre_attn_scalar=q,
             sliding_window=cfg.sliding_window, layer_types=(
                 layer_types_to_hf(cfg) if cfg.sliding_window is not None
                 else ["full_attention"] * cfg.n_layers),
             attn_logit_softcapping=cfg.attn_softcap, final_logit_softcapping=cfg.final_softcap)
    return d


def _from_hf(d, where):
    return sandwich_from_hf(d, where, arch="gemma2", defaults=_DEFAULTS, pattern=2)


FAMILY = Family(
    name="gemma2",
    block=BlockSpec(norm="rms1p", residual="sandwich", mlp="gated", activation="gelu_tanh",
                    embed_scale=True),
    model_types=("gemma2",),
    architectures={"gemma2": ("Gemma2ForCausalLM", "Gemma2ForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=lambda cfg, mt: sandwich_to_hf(cfg),
    tensors=lambda cfg, prefix: llama_layout_tensors(
        cfg, prefix, post_norms=True, pre_mlp_name="pre_feedforward_layernorm"),
    ignorable=rotary_buffer,
    options=("rope_scaling", "sliding_window", "layer_types", "attn_scale", "attn_softcap",
             "final_softcap"),
)
