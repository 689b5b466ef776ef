"""Qwen3 (Qwen team 2025): the Llama block with an RMSNorm over each head's features of q
and k before RoPE (``q_norm``/``k_norm``, shape ``[K]``), no q/k/v biases, an explicit
``head_dim``, and Qwen2's optional sliding window (``use_sliding_window``, layers
``i >= max_window_layers``)."""

from __future__ import annotations

from rlhf_jax.models.families.base import (BlockSpec, Family, common_from_hf, common_to_hf,
                                           llama_layout_tensors, qwen_window_from_hf,
                                           qwen_window_to_hf, reject, rotary_buffer)

_DEFAULTS = dict(vocab_size=151936, hidden_size=4096, intermediate_size=22016,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=32,
                 head_dim=128, hidden_act="silu", max_position_embeddings=32768,
                 rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0)


def _from_hf(d, where):
    reject(d, where, "attention_bias", lambda v: not v, "no attention biases in Qwen3 here")
    kw = common_from_hf(d, where, arch="qwen3", defaults=_DEFAULTS)
    kw["sliding_window"], kw["layer_types"] = qwen_window_from_hf(d, where, kw["n_layers"])
    return kw


def _to_hf(cfg, mt):
    return dict(common_to_hf(cfg), hidden_act="silu", attention_bias=False,
                **qwen_window_to_hf(cfg))


FAMILY = Family(
    name="qwen3",
    block=BlockSpec(norm="rms", residual="pre", mlp="gated", activation="silu",
                    qk_norm="head"),
    model_types=("qwen3",),
    architectures={"qwen3": ("Qwen3ForCausalLM", "Qwen3ForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=lambda cfg, prefix: llama_layout_tensors(cfg, prefix, q_norm="head"),
    ignorable=rotary_buffer,
    options=("rope_scaling", "sliding_window", "layer_types", "activation"),
)
