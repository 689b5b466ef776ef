"""Gemma (Gemma Team 2024): the Llama layout with the embeddings scaled by ``sqrt(D)``,
RMSNorm as ``x / rms(x) * (1 + w)``, a GeGLU MLP (tanh GELU) and tied embeddings.

The helpers here are shared by Gemma 2 and Gemma 3 (``gemma2``, ``gemma3``).
"""

from __future__ import annotations

from rlhf_jax.models.families.base import (BlockSpec, Family, common_from_hf, common_to_hf,
                                           llama_layout_tensors, reject, rotary_buffer)

_DEFAULTS = dict(vocab_size=256000, hidden_size=3072, intermediate_size=24576,
                 num_hidden_layers=28, num_attention_heads=16, num_key_value_heads=16,
                 head_dim=256, hidden_act="gelu_pytorch_tanh", max_position_embeddings=8192,
                 rms_norm_eps=1e-6, tie_word_embeddings=True, rope_theta=10000.0)


def gemma_checks(d, where):
    """Keys no Gemma variant here honours when set."""
    reject(d, where, "attention_bias", lambda v: not v, "no attention biases in Gemma here")
    reject(d, where, "use_bidirectional_attention", lambda v: not v,
           "only causal attention is supported")


def _from_hf(d, where):
    gemma_checks(d, where)
    act = d.get("hidden_act", _DEFAULTS["hidden_act"])
    # transformers' GemmaConfig reads the legacy "gelu" of the official releases as tanh GELU.
    d = dict(d, hidden_act="gelu_pytorch_tanh" if act == "gelu" else act)
    return common_from_hf(d, where, arch="gemma", defaults=_DEFAULTS)


def _to_hf(cfg, mt):
    return dict(common_to_hf(cfg), hidden_act="gelu_pytorch_tanh", attention_bias=False)


FAMILY = Family(
    name="gemma",
    block=BlockSpec(norm="rms1p", residual="pre", mlp="gated", activation="gelu_tanh",
                    embed_scale=True),
    model_types=("gemma",),
    architectures={"gemma": ("GemmaForCausalLM", "GemmaForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=lambda cfg, prefix: llama_layout_tensors(cfg, prefix),
    ignorable=rotary_buffer,
    options=("rope_scaling",),
)
