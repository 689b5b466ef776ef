"""Mixtral (Jiang et al. 2024, "Mixtral of Experts"): the Mistral block with every MLP
replaced by a sparse mixture of ``num_local_experts`` SwiGLU experts, each token routed to
the top ``num_experts_per_tok`` of the router's softmax, their weights renormalised to sum
to 1 (``rlhf_jax.models.transformer.MoE``). Optional sliding window on every layer, as
Mistral.

The load-balancing loss (``router_aux_loss_coef``) is read only when the config trains with
it (``output_router_logits: true``), as transformers adds it to the loss only then.
"""

from __future__ import annotations

from rlhf_jax.models.families.base import (BlockSpec, Family, common_from_hf, common_to_hf,
                                           llama_layout_tensors, moe_from_hf, moe_tensors,
                                           moe_to_hf, reject, rotary_buffer)

_DEFAULTS = dict(vocab_size=32000, hidden_size=4096, intermediate_size=14336,
                 num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                 hidden_act="silu", max_position_embeddings=4096 * 32, rms_norm_eps=1e-5,
                 tie_word_embeddings=False, rope_theta=1e6, num_local_experts=8,
                 num_experts_per_tok=2, router_aux_loss_coef=0.001)


def _from_hf(d, where):
    reject(d, where, "hidden_act", lambda v: v in ("silu", "swish"), "SwiGLU experts need 'silu'")
    if d.get("layer_types") is not None:
        raise ValueError(f"{where}: layer_types is not supported for Mixtral (its window applies "
                         "to every layer)")
    kw = common_from_hf(d, where, arch="mixtral", defaults=_DEFAULTS)
    kw["sliding_window"] = d.get("sliding_window")
    kw.update(moe_from_hf(d, where, _DEFAULTS))
    return kw


def _to_hf(cfg, mt):
    return dict(common_to_hf(cfg), hidden_act="silu", sliding_window=cfg.sliding_window,
                router_jitter_noise=0.0, **moe_to_hf(cfg))


def _check(cfg):
    if cfg.num_experts is None:
        raise ValueError("arch 'mixtral' needs num_experts and num_experts_per_tok")
    if cfg.norm_topk_prob is False:
        raise ValueError("arch 'mixtral' always renormalises the top-k router weights "
                         "(norm_topk_prob must be None or True)")
    if cfg.activation not in (None, "silu"):
        raise ValueError(f"arch 'mixtral' uses SwiGLU experts, got activation {cfg.activation!r}")


FAMILY = Family(
    name="mixtral",
    block=BlockSpec(norm="rms", residual="pre", mlp="moe", activation="silu"),
    model_types=("mixtral",),
    architectures={"mixtral": ("MixtralForCausalLM", "MixtralForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=lambda cfg, prefix: (llama_layout_tensors(cfg, prefix, mlp=False)
                                 + moe_tensors(cfg, prefix, "block_sparse_moe", "w1", "w3", "w2")),
    ignorable=rotary_buffer,
    options=("rope_scaling", "sliding_window", "activation", "num_experts",
             "num_experts_per_tok", "norm_topk_prob", "router_aux_loss_coef"),
    check=_check,
)
