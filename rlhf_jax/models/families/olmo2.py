"""OLMo 2 (OLMo Team 2025): a post-norm block ``x + norm(attn(x))``, ``x + norm(mlp(x))``
(no pre-norms), RMSNorms on the projected queries and keys over their whole width
(``q_norm [H K]``, ``k_norm [H_kv K]``) before RoPE, SwiGLU MLP."""

from __future__ import annotations

from rlhf_jax.models.families.base import (BlockSpec, Family, common_from_hf, common_to_hf,
                                           llama_layout_tensors, reject, rotary_buffer)

_DEFAULTS = dict(vocab_size=50304, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                 max_position_embeddings=2048, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_theta=10000.0)


def _from_hf(d, where):
    reject(d, where, "attention_bias", lambda v: not v, "no attention biases in OLMo 2 here")
    if d.get("sliding_window") is not None or d.get("layer_types") is not None:
        raise ValueError(f"{where}: sliding_window/layer_types are not supported for OLMo 2")
    return common_from_hf(d, where, arch="olmo2", defaults=_DEFAULTS)


FAMILY = Family(
    name="olmo2",
    block=BlockSpec(norm="rms", residual="post", mlp="gated", activation="silu",
                    qk_norm="width"),
    model_types=("olmo2",),
    architectures={"olmo2": ("Olmo2ForCausalLM", "Olmo2ForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=lambda cfg, mt: dict(common_to_hf(cfg), hidden_act="silu", attention_bias=False),
    tensors=lambda cfg, prefix: llama_layout_tensors(cfg, prefix, q_norm="width",
                                                     post_norms=True, pre_norms=False),
    ignorable=rotary_buffer,
    options=("rope_scaling", "activation"),
)
