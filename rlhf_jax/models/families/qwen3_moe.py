"""Qwen3-MoE (Qwen team 2025; Qwen3-30B-A3B, Qwen3-235B-A22B): the Qwen3 attention (q/k
RMSNorm per head, explicit ``head_dim``) with every MLP a sparse mixture of
``num_experts`` SwiGLU experts of width ``moe_intermediate_size``, top
``num_experts_per_tok`` routing, renormalised only with ``norm_topk_prob``
(``rlhf_jax.models.transformer.MoE``). With ``use_sliding_window`` the window applies to
every layer (transformers' Qwen3-MoE has no ``max_window_layers`` / ``layer_types``).

Every layer must be sparse (``decoder_sparse_step: 1``, no ``mlp_only_layers``, as in the
released models): dense layers in between would break the one stacked layer scan, so such a
config is refused. ``intermediate_size`` (the width of those dense layers) is therefore
unused and not written on export.
"""

from __future__ import annotations

from rlhf_jax.models.families.base import (BlockSpec, Family, common_from_hf, common_to_hf,
                                           llama_layout_tensors, moe_from_hf, moe_tensors,
                                           moe_to_hf, reject, rotary_buffer)

_DEFAULTS = dict(vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                 num_hidden_layers=24, num_attention_heads=32, num_key_value_heads=4,
                 hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                 tie_word_embeddings=False, rope_theta=10000.0, num_local_experts=128,
                 num_experts_per_tok=8, moe_intermediate_size=768, norm_topk_prob=False,
                 router_aux_loss_coef=0.001)


def _from_hf(d, where):
    reject(d, where, "attention_bias", lambda v: not v, "no attention biases in Qwen3-MoE here")
    reject(d, where, "hidden_act", lambda v: v in ("silu", "swish"), "SwiGLU experts need 'silu'")
    reject(d, where, "decoder_sparse_step", lambda v: v == 1,
           "every layer must be a mixture of experts")
    reject(d, where, "mlp_only_layers", lambda v: not v,
           "dense layers between the sparse ones are not supported")
    d = dict(d, intermediate_size=d.get("moe_intermediate_size",
                                        _DEFAULTS["moe_intermediate_size"]))
    kw = common_from_hf(d, where, arch="qwen3_moe", defaults=_DEFAULTS)
    if d.get("layer_types") is not None:
        raise ValueError(f"{where}: layer_types is not supported for Qwen3-MoE (its window, "
                         "with use_sliding_window, applies to every layer)")
    kw["sliding_window"] = d.get("sliding_window") if d.get("use_sliding_window") else None
    kw.update(moe_from_hf(d, where, _DEFAULTS))
    kw["norm_topk_prob"] = bool(d.get("norm_topk_prob", _DEFAULTS["norm_topk_prob"]))
    return kw


def _to_hf(cfg, mt):
    d = dict(common_to_hf(cfg), hidden_act="silu", attention_bias=False,
             moe_intermediate_size=cfg.mlp_dim, norm_topk_prob=bool(cfg.norm_topk_prob),
             decoder_sparse_step=1, mlp_only_layers=[],
             use_sliding_window=cfg.sliding_window is not None,
             sliding_window=cfg.sliding_window, **moe_to_hf(cfg))
    del d["intermediate_size"]
    return d


def _check(cfg):
    if cfg.num_experts is None or cfg.norm_topk_prob is None:
        raise ValueError("arch 'qwen3_moe' needs num_experts, num_experts_per_tok and "
                         "norm_topk_prob")
    if cfg.activation not in (None, "silu"):
        raise ValueError(f"arch 'qwen3_moe' uses SwiGLU experts, got activation "
                         f"{cfg.activation!r}")


FAMILY = Family(
    name="qwen3_moe",
    block=BlockSpec(norm="rms", residual="pre", mlp="moe", activation="silu", qk_norm="head"),
    model_types=("qwen3_moe",),
    architectures={"qwen3_moe": ("Qwen3MoeForCausalLM", "Qwen3MoeForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=lambda cfg, prefix: (llama_layout_tensors(cfg, prefix, q_norm="head", mlp=False)
                                 + moe_tensors(cfg, prefix, "mlp", "gate_proj", "up_proj",
                                               "down_proj")),
    ignorable=rotary_buffer,
    options=("rope_scaling", "sliding_window", "activation", "num_experts",
             "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef"),
    check=_check,
)
