"""Phi-3 (Abdin et al. 2024): the Llama block with fused projections (``qkv_proj`` rows
``[q; k; v]``, ``gate_up_proj`` rows ``[gate; up]``), an optional partial rotary
(``partial_rotary_factor``) and an optional sliding window on every layer
(``sliding_window``, e.g. 2047 in Phi-3-mini-4k). ``longrope`` scaling (the 128k variants)
is not supported."""

from __future__ import annotations

from rlhf_jax.models.families.base import (BLOCKS, BlockSpec, Family, common_from_hf,
                                           common_to_hf, fused_rows, linear, same)

_DEFAULTS = dict(vocab_size=32064, hidden_size=3072, intermediate_size=8192,
                 num_hidden_layers=32, num_attention_heads=32, hidden_act="silu",
                 max_position_embeddings=4096, rms_norm_eps=1e-5, tie_word_embeddings=False,
                 rope_theta=10000.0)


def _from_hf(d, where):
    if d.get("layer_types") is not None:
        raise ValueError(f"{where}: layer_types is not supported for Phi-3 (its window applies "
                         "to every layer)")
    kw = common_from_hf(d, where, arch="phi3", defaults=_DEFAULTS, partial_rotary=True)
    kw["sliding_window"] = d.get("sliding_window")
    return kw


def _to_hf(cfg, mt):
    d = common_to_hf(cfg)
    factor = cfg.rope_dim / cfg.per_head_dim
    d["rope_parameters"] = dict(d["rope_parameters"], partial_rotary_factor=factor)
    d.update(hidden_act="silu", partial_rotary_factor=factor,
             sliding_window=cfg.sliding_window, resid_pdrop=0.0, embd_pdrop=0.0,
             original_max_position_embeddings=cfg.max_positions)
    return d


def _check(cfg):
    s = cfg.rope_scaling
    if s is not None and s.rope_type in ("yarn", "dynamic"):
        raise ValueError(f"arch 'phi3' cannot use rope scaling {s.rope_type!r} (transformers' "
                         "Phi3Config reads 'yarn' as longrope and refuses 'dynamic')")


def _tensors(cfg, prefix):
    d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
    h, hkv, k = cfg.n_heads, cfg.num_kv_heads, cfg.per_head_dim
    B = BLOCKS
    A = B + ("attn",)
    p = prefix + "layers.{i}."
    return [
        fused_rows(p + "self_attn.qkv_proj.weight", (((h, k), A + ("q", "kernel")),
                                                     ((hkv, k), A + ("k", "kernel")),
                                                     ((hkv, k), A + ("v", "kernel"))), d),
        linear(p + "self_attn.o_proj.weight", (d,), (h, k), A + ("o", "kernel")),
        fused_rows(p + "mlp.gate_up_proj.weight", (((f,), B + ("mlp", "gate", "kernel")),
                                                   ((f,), B + ("mlp", "up", "kernel"))), d),
        linear(p + "mlp.down_proj.weight", (d,), (f,), B + ("mlp", "down", "kernel")),
        same(p + "input_layernorm.weight", (d,), (d,), B + ("attn_norm", "scale")),
        same(p + "post_attention_layernorm.weight", (d,), (d,), B + ("mlp_norm", "scale")),
        same(prefix + "embed_tokens.weight", (v, d), (v, d), ("trunk", "embed"), False),
        same(prefix + "norm.weight", (d,), (d,), ("trunk", "final_norm", "scale"), False),
    ]


FAMILY = Family(
    name="phi3",
    block=BlockSpec(norm="rms", residual="pre", mlp="gated", activation="silu"),
    model_types=("phi3",),
    architectures={"phi3": ("Phi3ForCausalLM", "Phi3ForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=_tensors,
    ignorable=lambda name: name.endswith("rotary_emb.inv_freq"),
    options=("rope_scaling", "sliding_window", "rotary_dim", "activation"),
    check=_check,
)
