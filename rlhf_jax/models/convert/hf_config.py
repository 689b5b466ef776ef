"""HF ``config.json`` <-> ``ModelConfig``: reading, mapping and writing HF model configs.

Each architecture family (``rlhf_jax.models.families``) maps its own keys; this module finds
the family from ``model_type`` (``config_from_hf``) or ``ModelConfig.arch``
(``hf_config_dict``) and adds what all families share (architectures, dtype, special
tokens, the sequence-classification head). Supported ``model_type`` values:
``SUPPORTED_MODEL_TYPES`` (``smollm`` reads as ``llama``; SmolLM/SmolLM2 ship
``model_type: llama`` anyway). Rope settings are read from legacy ``rope_theta`` /
``rope_scaling`` or transformers>=5 ``rope_parameters`` keys and written both ways. A key
whose value a family cannot honour raises ``ValueError``; nothing loads with a warning.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.families import (family_for_model_type, get_family,
                                      supported_model_types)

LLAMA_MODEL_TYPES = get_family("llama").model_types
SUPPORTED_MODEL_TYPES = supported_model_types()
CONFIG_FILE = "config.json"


def read_hf_config(src: str | os.PathLike | Mapping[str, Any]) -> dict[str, Any]:
    """The HF config as a dict, from a dict, a checkpoint directory or a ``config.json`` path.

    Raises:
      FileNotFoundError: no ``config.json`` at ``src``.
    """
    if isinstance(src, Mapping):
        return dict(src)
    p = Path(src)
    if p.is_dir():
        p = p / CONFIG_FILE
    if not p.is_file():
        raise FileNotFoundError(f"no HF config at {p} (expected a checkpoint directory with "
                                f"{CONFIG_FILE} or the path of that file)")
    with open(p) as f:
        return json.load(f)


def config_from_hf(src: str | os.PathLike | Mapping[str, Any], **overrides) -> ModelConfig:
    """A ``ModelConfig`` from an HF config (dict, checkpoint directory or ``config.json`` path).

    The family that reads ``model_type`` maps the keys (e.g. for the Llama family
    ``hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads, head_dim,
    intermediate_size, vocab_size, max_position_embeddings, rms_norm_eps, rope_theta /
    rope_scaling`` (or ``rope_parameters``), ``tie_word_embeddings`` and the sliding-window
    keys; GPT-2's ``n_layer, n_embd, n_head, n_positions, vocab_size, layer_norm_epsilon,
    n_inner``).

    Args:
      src: the HF config.
      **overrides: ``ModelConfig`` fields to set on top (``dtype``, ``remat``, ...).

    Raises:
      ValueError: unsupported ``model_type`` (naming it and the supported ones), rope
        scaling type, activation, or any other key whose value the family cannot honour.
    """
    d = read_hf_config(src)
    mt = d.get("model_type")
    where = f"HF config (model_type={mt!r})"
    fam = family_for_model_type(mt)
    kw = fam.from_hf(d, where)
    kw.update(overrides)
    return ModelConfig(**kw)


def default_model_type(cfg: ModelConfig) -> str:
    """The HF ``model_type`` that reproduces ``cfg`` (e.g. ``gpt2``; ``qwen2`` for q/k/v
    biases, ``mistral`` for a window, else ``llama`` in the Llama family)."""
    return cfg.family.export_model_type(cfg)


def hf_config_dict(cfg: ModelConfig, *, kind: str = "lm", model_type: str | None = None,
                   dtype: str | None = None, extra: Mapping[str, Any] | None = None) -> dict:
    """The HF ``config.json`` dict for ``cfg`` (inverse of ``config_from_hf``).

    Args:
      cfg: the architecture.
      kind: ``"lm"``/``"lm_value"`` export ``*ForCausalLM``; ``"scalar"`` exports
        ``*ForSequenceClassification`` with ``num_labels=1``.
      model_type: HF model type; default ``default_model_type(cfg)``.
      dtype: the stored tensor dtype name (default ``cfg.param_dtype``).
      extra: keys merged in last (``bos_token_id``, ``eos_token_id``, ``pad_token_id``, ...).

    Raises:
      ValueError: ``model_type`` is unsupported, belongs to another family than
        ``cfg.arch``, or cannot express ``cfg`` (e.g. q/k/v biases outside qwen2, a window in
        ``llama``).
    """
    fam = cfg.family
    mt = model_type or default_model_type(cfg)
    owner = family_for_model_type(mt)
    if owner.name != fam.name:
        raise ValueError(f"model_type {mt!r} cannot express arch={cfg.arch!r} (it is a "
                         f"{owner.name!r} type; {cfg.arch!r} exports as "
                         f"{', '.join(t for t in fam.model_types if t in fam.architectures)})")
    body = fam.to_hf(cfg, mt)
    if mt not in fam.architectures:  # an alias read as another type (smollm -> llama)
        mt = default_model_type(cfg) if model_type is None else fam.model_types[0]
    dtype = dtype or cfg.param_dtype
    arch_name = fam.architectures[mt][1 if kind == "scalar" else 0]
    d: dict[str, Any] = {"architectures": [arch_name], "model_type": mt, "dtype": dtype,
                         "torch_dtype": dtype, "vocab_size": cfg.vocab_size,
                         "tie_word_embeddings": cfg.tie_embeddings, "use_cache": True,
                         "initializer_range": 0.02}
    d.update(body)
    if kind == "scalar":
        d.update(num_labels=1, id2label={"0": "LABEL_0"}, label2id={"LABEL_0": 0})
    # Special-token ids are unknown unless given (HF's per-class defaults, e.g. Llama's 1/2,
    # would be guesses); GPT-2's own vocabulary keeps its <|endoftext|> = 50256.
    gpt2_eot = 50256 if mt == "gpt2" and cfg.vocab_size == 50257 else None
    d.update(bos_token_id=gpt2_eot, eos_token_id=gpt2_eot, pad_token_id=None)
    d.update(extra or {})
    return d


__all__ = ["CONFIG_FILE", "LLAMA_MODEL_TYPES", "SUPPORTED_MODEL_TYPES", "config_from_hf",
           "default_model_type", "hf_config_dict", "read_hf_config"]
