"""GPT-2 (Radford et al. 2019): learned absolute positions, pre-LayerNorm with bias, GELU
(tanh approximation, ``gelu_new``), biases on every projection, tied embeddings.

HF layout: ``Conv1D`` weights are already ``[in, out]``; the fused ``c_attn [D, 3D]`` splits
into q, k, v in that order (HF ``GPT2Attention``).
"""

from __future__ import annotations

import re

import numpy as np

from rlhf_jax.models.families.base import (BLOCKS, BlockSpec, Family, Spec, rotary_buffer,
                                           same)


def _from_hf(d, where):
    act = d.get("activation_function", "gelu_new")
    if act not in ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"):
        raise ValueError(f"{where}: activation_function {act!r} is not supported "
                         "(GPT-2 uses the tanh GELU 'gelu_new')")
    if d.get("scale_attn_by_inverse_layer_idx") or d.get("scale_attn_weights") is False:
        raise ValueError(f"{where}: non-standard attention scaling "
                         "(scale_attn_by_inverse_layer_idx / scale_attn_weights) is not supported")
    n_embd = d.get("n_embd", 768)
    return dict(arch="gpt2", vocab_size=d.get("vocab_size", 50257), d_model=n_embd,
                n_layers=d.get("n_layer", 12), n_heads=d.get("n_head", 12),
                mlp_dim=d.get("n_inner") or 4 * n_embd, max_positions=d.get("n_positions", 1024),
                norm_eps=float(d.get("layer_norm_epsilon", 1e-5)),
                tie_embeddings=bool(d.get("tie_word_embeddings", True)))


def _to_hf(cfg, mt):
    return dict(n_embd=cfg.d_model, n_layer=cfg.n_layers, n_head=cfg.n_heads,
                n_positions=cfg.max_positions, n_ctx=cfg.max_positions, n_inner=cfg.mlp_dim,
                layer_norm_epsilon=cfg.norm_eps, activation_function="gelu_new",
                resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, scale_attn_weights=True,
                scale_attn_by_inverse_layer_idx=False, reorder_and_upcast_attn=False)


def _tensors(cfg, prefix):
    d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
    h, hkv, k = cfg.n_heads, cfg.num_kv_heads, cfg.per_head_dim
    B = BLOCKS
    p = prefix + "h.{i}."
    split = (h * k, hkv * k, hkv * k)
    cuts = np.cumsum(split)[:-1]
    qkv = tuple(B + ("attn", n, "kernel") for n in "qkv")
    qkv_b = tuple(B + ("attn", n, "bias") for n in "qkv")
    return [
        same(p + "ln_1.weight", (d,), (d,), B + ("attn_norm", "scale")),
        same(p + "ln_1.bias", (d,), (d,), B + ("attn_norm", "bias")),
        Spec(p + "attn.c_attn.weight", (d, sum(split)), qkv,
             lambda w: tuple(x.reshape(d, -1, k) for x in np.split(w, cuts, axis=1)),
             lambda q, kk, vv: np.concatenate([x.reshape(d, -1) for x in (q, kk, vv)], 1),
             True),
        Spec(p + "attn.c_attn.bias", (sum(split),), qkv_b,
             lambda b: tuple(x.reshape(-1, k) for x in np.split(b, cuts)),
             lambda q, kk, vv: np.concatenate([x.reshape(-1) for x in (q, kk, vv)]), True),
        same(p + "attn.c_proj.weight", (h * k, d), (h, k, d), B + ("attn", "o", "kernel")),
        same(p + "attn.c_proj.bias", (d,), (d,), B + ("attn", "o", "bias")),
        same(p + "ln_2.weight", (d,), (d,), B + ("mlp_norm", "scale")),
        same(p + "ln_2.bias", (d,), (d,), B + ("mlp_norm", "bias")),
        same(p + "mlp.c_fc.weight", (d, f), (d, f), B + ("mlp", "up", "kernel")),
        same(p + "mlp.c_fc.bias", (f,), (f,), B + ("mlp", "up", "bias")),
        same(p + "mlp.c_proj.weight", (f, d), (f, d), B + ("mlp", "down", "kernel")),
        same(p + "mlp.c_proj.bias", (d,), (d,), B + ("mlp", "down", "bias")),
        same(prefix + "wte.weight", (v, d), (v, d), ("trunk", "embed"), False),
        same(prefix + "wpe.weight", (cfg.max_positions, d), (cfg.max_positions, d),
             ("trunk", "pos_embed"), False),
        same(prefix + "ln_f.weight", (d,), (d,), ("trunk", "final_norm", "scale"), False),
        same(prefix + "ln_f.bias", (d,), (d,), ("trunk", "final_norm", "bias"), False),
    ]


def _ignorable(name: str) -> bool:
    return rotary_buffer(name) or re.search(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$",
                                            name) is not None


def _check(cfg):
    if cfg.num_kv_heads != cfg.n_heads:
        raise ValueError(f"GPT-2 has no grouped-query attention: n_kv_heads={cfg.n_kv_heads} "
                         f"!= n_heads={cfg.n_heads}")
    if cfg.activation not in (None, "gelu_tanh"):
        raise ValueError(f"arch 'gpt2' uses the tanh GELU, got activation={cfg.activation!r}")


FAMILY = Family(
    name="gpt2",
    block=BlockSpec(norm="layer", residual="pre", mlp="plain", activation="gelu_tanh",
                    positions="learned", bias=True),
    model_types=("gpt2",),
    architectures={"gpt2": ("GPT2LMHeadModel", "GPT2ForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=_tensors,
    prefix="transformer.",
    embed_name="wte.weight",
    ignorable=_ignorable,
    options=("qkv_bias",),
    check=_check,
)
