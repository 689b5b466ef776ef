"""SmolLM3 (Hugging Face 2025, "SmolLM3: smol, multilingual, long-context reasoner"): the
Llama block (pre-RMSNorm, GQA, SwiGLU) in which some layers use no position encoding at all
(NoPE, after Kazemnejad et al. 2023, "The Impact of Positional Encoding on Length
Generalization in Transformers"): by default every 4th layer (``no_rope_layer_interval``),
or as the per-layer ``no_rope_layers`` list says (``1``: RoPE, ``0``: NoPE). Tied
embeddings by default, RoPE base 2,000,000.

``ModelConfig.rope_layers`` holds the per-layer table (looked up by the layer index inside
the layer scan, ``rlhf_jax.models.rope.rope_qk``).

Sliding window: transformers' ``SmolLM3Config`` windows the NoPE layers when
``use_sliding_window`` and ``sliding_window`` are set (or the layers its explicit
``layer_types`` marks ``sliding_attention``). A ``sliding_attention`` layer while
``use_sliding_window`` is false is refused: transformers' eager/SDPA path masks it with the
window but its flash-attention path does not, so the checkpoint has no single meaning.
"""

from __future__ import annotations

from rlhf_jax.models.families.base import (ACTIVATION_TO_HF, BlockSpec, Family, common_from_hf,
                                           common_to_hf, layer_types_from_hf,
                                           layer_types_to_hf, llama_layout_tensors, reject,
                                           rotary_buffer)

# transformers' SmolLM3Config defaults, used when a key is absent from config.json.
_DEFAULTS = dict(vocab_size=128256, hidden_size=2048, intermediate_size=11008,
                 num_hidden_layers=36, num_attention_heads=16, num_key_value_heads=4,
                 hidden_act="silu", max_position_embeddings=32768, rms_norm_eps=1e-6,
                 tie_word_embeddings=True, rope_theta=2_000_000.0, no_rope_layer_interval=4)


def rope_layers_from_hf(d, where: str, n_layers: int) -> tuple[bool, ...]:
    """Per-layer RoPE on/off from ``no_rope_layers`` (``1``: RoPE, ``0``: NoPE; at least
    ``n_layers`` entries, transformers reads the first ``n_layers``) or, when it is absent,
    ``no_rope_layer_interval`` (layer ``i`` is NoPE iff ``(i + 1) % interval == 0``).

    Raises:
      ValueError: an entry other than 0/1, fewer than ``n_layers`` entries, or an interval
        that is not a positive integer.
    """
    flags = d.get("no_rope_layers")
    if flags is None:
        interval = d.get("no_rope_layer_interval", _DEFAULTS["no_rope_layer_interval"])
        if not isinstance(interval, int) or isinstance(interval, bool) or interval <= 0:
            raise ValueError(f"{where}: no_rope_layer_interval={interval!r} must be a positive "
                             "integer")
        return tuple((i + 1) % interval != 0 for i in range(n_layers))
    if len(flags) < n_layers or any(v not in (0, 1) for v in flags):
        raise ValueError(f"{where}: no_rope_layers={list(flags)} must hold at least "
                         f"num_hidden_layers={n_layers} entries, each 0 (NoPE) or 1 (RoPE)")
    return tuple(bool(v) for v in flags[:n_layers])


def _window_from_hf(d, where: str, rope_on: tuple[bool, ...]):
    """``(sliding_window, layer_types)`` as ``SmolLM3Config`` derives them."""
    n = len(rope_on)
    use = bool(d.get("use_sliding_window", False))
    window = d.get("sliding_window")
    types = d.get("layer_types")
    if types is None:
        sliding = use and window is not None
        types = ["sliding_attention" if sliding and not on else "full_attention"
                 for on in rope_on]
    ours = layer_types_from_hf({"layer_types": types}, where, n, window)
    if ours is None:
        return None, None
    if not use:
        raise ValueError(f"{where}: layer_types has sliding_attention layers but "
                         "use_sliding_window is false (transformers' SmolLM3 windows them in "
                         "eager/SDPA attention and not in flash attention)")
    return window, None if all(t == "sliding" for t in ours) else ours


def _from_hf(d, where):
    reject(d, where, "attention_bias", lambda v: not v, "no attention biases in SmolLM3 here")
    reject(d, where, "mlp_bias", lambda v: not v, "no MLP biases in SmolLM3 here")
    kw = common_from_hf(d, where, arch="smollm3", defaults=_DEFAULTS)
    rope_on = rope_layers_from_hf(d, where, kw["n_layers"])
    kw["rope_layers"] = rope_on
    kw["sliding_window"], kw["layer_types"] = _window_from_hf(d, where, rope_on)
    return kw


def _to_hf(cfg, mt):
    rope_on = cfg.rope_layers or (True,) * cfg.n_layers
    return dict(common_to_hf(cfg), hidden_act=ACTIVATION_TO_HF[cfg.activation or "silu"],
                attention_bias=False, mlp_bias=False,
                no_rope_layers=[int(on) for on in rope_on],
                use_sliding_window=cfg.sliding_window is not None,
                sliding_window=cfg.sliding_window, layer_types=layer_types_to_hf(cfg))


FAMILY = Family(
    name="smollm3",
    block=BlockSpec(norm="rms", residual="pre", mlp="gated", activation="silu"),
    model_types=("smollm3",),
    architectures={"smollm3": ("SmolLM3ForCausalLM", "SmolLM3ForSequenceClassification")},
    from_hf=_from_hf,
    to_hf=_to_hf,
    tensors=lambda cfg, prefix: llama_layout_tensors(cfg, prefix),
    ignorable=rotary_buffer,
    options=("rope_scaling", "sliding_window", "layer_types", "rope_layers", "activation"),
)
