"""HF tensor names and layouts <-> ``rlhf_jax`` parameter leaves (one ``_Spec`` per tensor).

HF ``nn.Linear`` stores ``weight [out, in]``; ours are ``[in..., out...]`` kernels with heads
split out (q ``[D, H, K]``, k/v ``[D, H_kv, K]``, o ``[H, K, D]``) and every block parameter
stacked over layers on axis 0 (``_linear``). GPT-2's ``Conv1D`` is already ``[in, out]`` and
its fused ``c_attn [D, 3D]`` splits into q, k, v (in that order, HF ``GPT2Attention``). Tied
embeddings have no ``lm_head`` tensor; untied ones store ``lm_head.weight [V, D]`` and our
kernel is its transpose. The scalar head (``value_head``: kernel ``[D]``, bias ``[]``) is
``score.weight [1, D]`` / ``score.bias [1]`` (``_score_specs``).

``_specs(cfg, prefix, ...)`` lists every tensor of a checkpoint of ``cfg``; ``_expand`` gives a
spec's per-layer names and ``_ignorable`` the non-parameter buffers some checkpoints carry.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable

import numpy as np

from rlhf_jax.config import ModelConfig

#: HF names of the scalar (reward / value) head: ``*ForSequenceClassification`` with one label.
SCORE_WEIGHT, SCORE_BIAS = "score.weight", "score.bias"

LeafPath = tuple[str, ...]


@dataclasses.dataclass(frozen=True)
class _Spec:
    """One HF tensor and the per-layer slices of our leaves it maps to.

    ``to_ours(hf) -> tuple`` (one array per ``ours`` path, without the layer axis) and
    ``to_hf(*ours) -> hf`` are inverse layout maps.
    """

    hf: str  # name; per-layer names contain "{i}"
    shape: tuple[int, ...]
    ours: tuple[LeafPath, ...]
    to_ours: Callable[[np.ndarray], tuple[np.ndarray, ...]]
    to_hf: Callable[..., np.ndarray]
    per_layer: bool


def _linear(name, out_shape, in_shape, path, per_layer=True):
    """HF ``nn.Linear`` ``weight [prod(out), prod(in)]`` <-> our kernel ``[*in, *out]``."""
    n_out, n_in = int(np.prod(out_shape)), int(np.prod(in_shape))
    return _Spec(name, (n_out, n_in), (path,),
                 lambda w: (w.T.reshape(*in_shape, *out_shape),),
                 lambda k: k.reshape(n_in, n_out).T, per_layer)


def _same(name, hf_shape, our_shape, path, per_layer=True):
    """Same element order, possibly different shape (norm scales, biases, Conv1D kernels)."""
    return _Spec(name, tuple(hf_shape), (path,), lambda w: (w.reshape(our_shape),),
                 lambda k: k.reshape(hf_shape), per_layer)


def _score_specs(d: int) -> list[_Spec]:
    """``score.weight [1, D]`` / ``score.bias [1]`` <-> ``value_head`` kernel ``[D]`` / bias ``[]``."""
    return [
        _Spec(SCORE_WEIGHT, (1, d), (("value_head", "kernel"),), lambda w: (w[0],),
              lambda k: k[None], False),
        _Spec(SCORE_BIAS, (1,), (("value_head", "bias"),), lambda b: (b.reshape(()),),
              lambda b: b.reshape(1), False),
    ]


def _specs(cfg: ModelConfig, prefix: str, *, lm_head: bool, score: bool) -> list[_Spec]:
    """Every HF tensor of a checkpoint of ``cfg`` (``prefix``: ``"model."``/``"transformer."``
    or ``""`` for a base-model checkpoint). Per-layer names carry ``{i}``."""
    d, f, v = cfg.d_model, cfg.mlp_dim, cfg.vocab_size
    h, hkv, k = cfg.n_heads, cfg.num_kv_heads, cfg.per_head_dim
    B = ("trunk", "blocks")
    out: list[_Spec] = []
    if cfg.arch == "gpt2":
        p = prefix + "h.{i}."
        split = (h * k, hkv * k, hkv * k)
        cuts = np.cumsum(split)[:-1]
        qkv = tuple(B + ("attn", n, "kernel") for n in "qkv")
        qkv_b = tuple(B + ("attn", n, "bias") for n in "qkv")
        out += [
            _same(p + "ln_1.weight", (d,), (d,), B + ("attn_norm", "scale")),
            _same(p + "ln_1.bias", (d,), (d,), B + ("attn_norm", "bias")),
            _Spec(p + "attn.c_attn.weight", (d, sum(split)), qkv,
                  lambda w: tuple(x.reshape(d, -1, k) for x in np.split(w, cuts, axis=1)),
                  lambda q, kk, vv: np.concatenate([x.reshape(d, -1) for x in (q, kk, vv)], 1),
                  True),
            _Spec(p + "attn.c_attn.bias", (sum(split),), qkv_b,
                  lambda b: tuple(x.reshape(-1, k) for x in np.split(b, cuts)),
                  lambda q, kk, vv: np.concatenate([x.reshape(-1) for x in (q, kk, vv)]), True),
            _same(p + "attn.c_proj.weight", (h * k, d), (h, k, d), B + ("attn", "o", "kernel")),
            _same(p + "attn.c_proj.bias", (d,), (d,), B + ("attn", "o", "bias")),
            _same(p + "ln_2.weight", (d,), (d,), B + ("mlp_norm", "scale")),
            _same(p + "ln_2.bias", (d,), (d,), B + ("mlp_norm", "bias")),
            _same(p + "mlp.c_fc.weight", (d, f), (d, f), B + ("mlp", "up", "kernel")),
            _same(p + "mlp.c_fc.bias", (f,), (f,), B + ("mlp", "up", "bias")),
            _same(p + "mlp.c_proj.weight", (f, d), (f, d), B + ("mlp", "down", "kernel")),
            _same(p + "mlp.c_proj.bias", (d,), (d,), B + ("mlp", "down", "bias")),
            _same(prefix + "wte.weight", (v, d), (v, d), ("trunk", "embed"), False),
            _same(prefix + "wpe.weight", (cfg.max_positions, d), (cfg.max_positions, d),
                  ("trunk", "pos_embed"), False),
            _same(prefix + "ln_f.weight", (d,), (d,), ("trunk", "final_norm", "scale"), False),
            _same(prefix + "ln_f.bias", (d,), (d,), ("trunk", "final_norm", "bias"), False),
        ]
    else:
        p = prefix + "layers.{i}."
        A = B + ("attn",)
        out += [
            _linear(p + "self_attn.q_proj.weight", (h, k), (d,), A + ("q", "kernel")),
            _linear(p + "self_attn.k_proj.weight", (hkv, k), (d,), A + ("k", "kernel")),
            _linear(p + "self_attn.v_proj.weight", (hkv, k), (d,), A + ("v", "kernel")),
        ]
        if cfg.qkv_bias:
            out += [_same(p + f"self_attn.{n}_proj.bias", (hh * k,), (hh, k), A + (n, "bias"))
                    for n, hh in (("q", h), ("k", hkv), ("v", hkv))]
        out += [
            _linear(p + "self_attn.o_proj.weight", (d,), (h, k), A + ("o", "kernel")),
            _linear(p + "mlp.gate_proj.weight", (f,), (d,), B + ("mlp", "gate", "kernel")),
            _linear(p + "mlp.up_proj.weight", (f,), (d,), B + ("mlp", "up", "kernel")),
            _linear(p + "mlp.down_proj.weight", (d,), (f,), B + ("mlp", "down", "kernel")),
            _same(p + "input_layernorm.weight", (d,), (d,), B + ("attn_norm", "scale")),
            _same(p + "post_attention_layernorm.weight", (d,), (d,), B + ("mlp_norm", "scale")),
            _same(prefix + "embed_tokens.weight", (v, d), (v, d), ("trunk", "embed"), False),
            _same(prefix + "norm.weight", (d,), (d,), ("trunk", "final_norm", "scale"), False),
        ]
    if lm_head:
        out.append(_linear("lm_head.weight", (v,), (d,), ("lm_head", "kernel"), False))
    if score:
        out += _score_specs(d)
    return out


def _expand(spec: _Spec, n_layers: int) -> list[str]:
    return [spec.hf.format(i=i) for i in range(n_layers)] if spec.per_layer else [spec.hf]


def _ignorable(name: str, arch: str) -> bool:
    """Buffers some checkpoints carry that are not parameters."""
    if name.endswith("rotary_emb.inv_freq") or name.endswith("rotary_emb.original_inv_freq"):
        return True
    return arch == "gpt2" and re.search(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$", name) is not None
