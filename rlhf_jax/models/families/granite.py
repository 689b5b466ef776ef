"""IBM Granite 3.x dense models (IBM 2024, "Granite 3.0 Language Models", transformers'
``granite``): the Llama block (pre-RMSNorm, RoPE, GQA, SwiGLU) with four scalar
multipliers from its maximal-update-style parametrisation:

* ``embedding_multiplier``: the input embeddings are multiplied by it
  (``ModelConfig.embedding_multiplier``);
* ``residual_multiplier``: each residual branch (attention, MLP) is multiplied by it before
  it is added, ``x + m f(norm x)`` (``ModelConfig.residual_multiplier``);
* ``attention_multiplier``: the attention score scale, in place of ``1/sqrt(K)``
  (``ModelConfig.attn_scale``);
* ``logits_scaling``: the LM logits are divided by it (``ModelConfig.logits_scaling``).

Scalar heads: transformers has no ``GraniteForSequenceClassification``, so a
``kind="scalar"`` export names ``GraniteModel`` (the trunk, which ``AutoModel`` loads) and
carries ``score.weight``/``score.bias`` beside it; rlhf_jax reloads it losslessly, and a
transformers user gets the reward as ``score.weight @ hidden[last token] (+ score.bias)``.
``logits_scaling`` does not touch the scalar head.
"""

from __future__ import annotations

from rlhf_jax.models.families.base import (ACTIVATION_TO_HF, BlockSpec, Family, common_from_hf,
                                           common_to_hf, llama_layout_tensors, reject,
                                           rotary_buffer)

# transformers' GraniteConfig defaults, used when a key is absent from config.json.
_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=11008,
                 num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                 max_position_embeddings=2048, rms_norm_eps=1e-6, tie_word_embeddings=False,
                 rope_theta=10000.0, embedding_multiplier=1.0, residual_multiplier=1.0,
                 logits_scaling=1.0, attention_multiplier=1.0)
#: Our field <- the HF key; a value of 1 is stored as ``None`` (off).
_MULTIPLIERS = {"embedding_multiplier": "embedding_multiplier",
                "residual_multiplier": "residual_multiplier",
                "logits_scaling": "logits_scaling"}


def _from_hf(d, where):
    reject(d, where, "attention_bias", lambda v: not v, "no attention biases in Granite here")
    reject(d, where, "mlp_bias", lambda v: not v, "no MLP biases in Granite here")
    kw = common_from_hf(d, where, arch="granite", defaults=_DEFAULTS)
    for ours, theirs in _MULTIPLIERS.items():
        value = float(_DEFAULTS[theirs] if d.get(theirs) is None else d[theirs])
        kw[ours] = None if value == 1.0 else value
    k = kw["head_dim"] or kw["d_model"] // kw["n_heads"]
    scale = d.get("attention_multiplier")
    scale = float(_DEFAULTS["attention_multiplier"] if scale is None else scale)
    kw["attn_scale"] = None if scale == k ** -0.5 else scale
    return kw


def _to_hf(cfg, mt):
    d = common_to_hf(cfg)
    scale = cfg.attn_scale if cfg.attn_scale is not None else cfg.per_head_dim ** -0.5
    d.update(hidden_act=ACTIVATION_TO_HF[cfg.activation or "silu"], attention_bias=False,
             mlp_bias=False, attention_multiplier=scale)
    for ours, theirs in _MULTIPLIERS.items():
        value = getattr(cfg, ours)
        d[theirs] = 1.0 if value is None else value
    return d


FAMILY = Family(
    name="granite",
    block=BlockSpec(norm="rms", residual="pre", mlp="gated", activation="silu"),
    model_types=("granite",),
    architectures={"granite": ("GraniteForCausalLM", "GraniteModel")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=lambda cfg, prefix: llama_layout_tensors(cfg, prefix),
    ignorable=rotary_buffer,
    options=("rope_scaling", "attn_scale", "embedding_multiplier", "residual_multiplier",
             "logits_scaling", "activation"),
)
