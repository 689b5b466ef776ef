"""GPT-NeoX / Pythia (Black et al. 2022; Biderman et al. 2023): LayerNorm with bias, biases
on every projection, a plain GELU MLP (erf GELU), rotary embeddings on the first
``rotary_pct`` of each head (partial rotary, default 25%), and the parallel residual
``x + attn(ln1 x) + mlp(ln2 x)`` (``use_parallel_residual``, true for Pythia).

HF layout: the fused ``query_key_value`` weight ``[3 H K, D]`` is interleaved per head
(rows ``[head, (q, k, v), K]``, HF ``GPTNeoXAttention``); the LM head is stored as
``embed_out.weight`` (what Pythia and transformers' ``save_pretrained`` write; transformers
>= 5 calls the module ``lm_head``, and a ``lm_head.weight`` tensor is read too).
"""

from __future__ import annotations

import numpy as np

from rlhf_jax.models.families.base import (BLOCKS, BlockSpec, Family, Spec,
                                           activation_from_hf, reject, rope_from_hf,
                                           rope_to_hf, same)

_DEFAULTS = dict(vocab_size=50432, hidden_size=6144, num_hidden_layers=44,
                 num_attention_heads=64, intermediate_size=24576, hidden_act="gelu",
                 max_position_embeddings=2048, layer_norm_eps=1e-5, tie_word_embeddings=False,
                 use_parallel_residual=True)


def _from_hf(d, where):
    get = lambda key: d.get(key, _DEFAULTS.get(key))  # noqa: E731
    reject(d, where, "attention_bias", lambda v: v, "GPT-NeoX here has q/k/v/dense biases")
    theta, scaling, partial, _ = rope_from_hf(
        {**d, "rope_theta": d.get("rope_theta", d.get("rotary_emb_base", 10000.0))}, where,
        10000.0)
    if partial is None:
        partial = d.get("rotary_pct", 0.25)
    hidden, heads = get("hidden_size"), get("num_attention_heads")
    k = hidden // heads
    rot = int(k * float(partial))
    return dict(arch="gpt_neox", vocab_size=get("vocab_size"), d_model=hidden,
                n_layers=get("num_hidden_layers"), n_heads=heads,
                mlp_dim=get("intermediate_size"), max_positions=get("max_position_embeddings"),
                rope_theta=theta, rope_scaling=scaling,
                rotary_dim=None if rot == k else rot,
                norm_eps=float(get("layer_norm_eps")),
                tie_embeddings=bool(get("tie_word_embeddings")),
                parallel_residual=bool(get("use_parallel_residual")),
                activation=activation_from_hf(get("hidden_act"), where, "hidden_act"))


def _to_hf(cfg, mt):
    rope = rope_to_hf(cfg)
    factor = cfg.rope_dim / cfg.per_head_dim
    rope["rope_parameters"] = dict(rope["rope_parameters"], partial_rotary_factor=factor)
    act = {"gelu": "gelu", "gelu_tanh": "gelu_pytorch_tanh", "silu": "silu"}[
        cfg.activation or "gelu"]
    return dict(hidden_size=cfg.d_model, num_hidden_layers=cfg.n_layers,
                num_attention_heads=cfg.n_heads, intermediate_size=cfg.mlp_dim,
                max_position_embeddings=cfg.max_positions, layer_norm_eps=cfg.norm_eps,
                hidden_act=act, use_parallel_residual=cfg.parallel_residual,
                attention_bias=True, attention_dropout=0.0, hidden_dropout=0.0,
                rotary_pct=factor, rotary_emb_base=cfg.rope_theta, **rope)


def _tensors(cfg, prefix):
    d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
    h, k = cfg.n_heads, cfg.per_head_dim
    B = BLOCKS
    A = B + ("attn",)
    p = prefix + "layers.{i}."
    qkv = tuple(A + (n, "kernel") for n in "qkv")
    qkv_b = tuple(A + (n, "bias") for n in "qkv")
    out = [
        Spec(p + "attention.query_key_value.weight", (3 * h * k, d), qkv,
             lambda w: tuple(x[..., 0, :] for x in np.split(
                 w.T.reshape(d, h, 3, k), 3, axis=2)),
             lambda q, kk, vv: np.stack([q, kk, vv], axis=2).reshape(d, 3 * h * k).T, True),
        Spec(p + "attention.query_key_value.bias", (3 * h * k,), qkv_b,
             lambda b: tuple(x[:, 0] for x in np.split(b.reshape(h, 3, k), 3, axis=1)),
             lambda q, kk, vv: np.stack([q, kk, vv], axis=1).reshape(-1), True),
        Spec(p + "attention.dense.weight", (d, h * k), (A + ("o", "kernel"),),
             lambda w: (w.T.reshape(h, k, d),), lambda o: o.reshape(h * k, d).T, True),
        same(p + "attention.dense.bias", (d,), (d,), A + ("o", "bias")),
        Spec(p + "mlp.dense_h_to_4h.weight", (f, d), (B + ("mlp", "up", "kernel"),),
             lambda w: (w.T,), lambda u: u.T, True),
        same(p + "mlp.dense_h_to_4h.bias", (f,), (f,), B + ("mlp", "up", "bias")),
        Spec(p + "mlp.dense_4h_to_h.weight", (d, f), (B + ("mlp", "down", "kernel"),),
             lambda w: (w.T,), lambda u: u.T, True),
        same(p + "mlp.dense_4h_to_h.bias", (d,), (d,), B + ("mlp", "down", "bias")),
        same(prefix + "embed_in.weight", (v, d), (v, d), ("trunk", "embed"), False),
        same(prefix + "final_layer_norm.weight", (d,), (d,), ("trunk", "final_norm", "scale"),
             False),
        same(prefix + "final_layer_norm.bias", (d,), (d,), ("trunk", "final_norm", "bias"),
             False),
    ]
    for hf, ours in (("input_layernorm", "attn_norm"), ("post_attention_layernorm", "mlp_norm")):
        out += [same(p + f"{hf}.weight", (d,), (d,), B + (ours, "scale")),
                same(p + f"{hf}.bias", (d,), (d,), B + (ours, "bias"))]
    return out


def _ignorable(name: str) -> bool:
    # Old checkpoints carry the causal-mask and rotary buffers.
    return name.endswith(("attention.bias", "attention.masked_bias", "rotary_emb.inv_freq"))


def _check(cfg):
    if cfg.num_kv_heads != cfg.n_heads:
        raise ValueError(f"GPT-NeoX has no grouped-query attention: n_kv_heads={cfg.n_kv_heads} "
                         f"!= n_heads={cfg.n_heads}")


FAMILY = Family(
    name="gpt_neox",
    block=BlockSpec(norm="layer", residual="pre", mlp="plain", activation="gelu", bias=True),
    model_types=("gpt_neox",),
    architectures={"gpt_neox": ("GPTNeoXForCausalLM", "GPTNeoXForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=_tensors,
    prefix="gpt_neox.",
    embed_name="embed_in.weight",
    lm_head_name="embed_out.weight",
    legacy_names={"lm_head.weight": "embed_out.weight"},
    ignorable=_ignorable,
    options=("qkv_bias", "rope_scaling", "rotary_dim", "activation", "parallel_residual"),
    check=_check,
)
