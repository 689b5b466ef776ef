"""Named architectures: the published sizes of well-known checkpoints as ``ModelConfig`` s.

They let the memory planner (``rlhf_jax.plan``, ``rlhf-jax plan --policy.path llama3-8b``)
and tests describe a model without its ``config.json`` or weights. Each entry holds the
sizes of the checkpoint's HF configuration (hidden size, layers, query and key/value heads,
MLP width, vocabulary, RoPE base and scaling, norm epsilon, tied embeddings, q/k/v biases);
``ModelConfig.num_params`` of each matches the parameter count its authors publish.

``resolve_architecture(name_or_path)`` accepts a name of ``ARCHITECTURES`` or an HF checkpoint
directory / ``config.json`` path (read with ``rlhf_jax.models.convert.hf_config``). Adding an
architecture is one ``register_architecture`` call here.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from rlhf_jax.config import ModelConfig, RopeScaling
from rlhf_jax.registry import add_to

#: name -> ``ModelConfig`` (float32 parameters and compute, no remat: override per use).
ARCHITECTURES: dict[str, ModelConfig] = {}


def register_architecture(name: str, cfg: ModelConfig) -> ModelConfig:
    """Add ``cfg`` to ``ARCHITECTURES`` under ``name``.

    Raises:
      ValueError: ``name`` is already registered.
    """
    return add_to(ARCHITECTURES, "architecture", name)(cfg)


_LLAMA3 = dict(arch="llama", vocab_size=128256, rope_theta=500000.0, norm_eps=1e-5)
_LLAMA31_ROPE = RopeScaling(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                            high_freq_factor=4.0, original_max_position_embeddings=8192)
_QWEN25 = dict(arch="llama", qkv_bias=True, rope_theta=1000000.0, norm_eps=1e-6,
               max_positions=32768)

# Meta Llama 3 (Meta 2024, "The Llama 3 Herd of Models"): 8.03 B, 70.6 B parameters.
register_architecture("llama3-8b", ModelConfig(
    **_LLAMA3, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336,
    max_positions=8192))
register_architecture("llama3.1-8b", ModelConfig(
    **_LLAMA3, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, mlp_dim=14336,
    max_positions=131072, rope_scaling=_LLAMA31_ROPE))
register_architecture("llama3-70b", ModelConfig(
    **_LLAMA3, d_model=8192, n_layers=80, n_heads=64, n_kv_heads=8, mlp_dim=28672,
    max_positions=8192))
# Llama 3.2 1B: 1.24 B parameters, tied embeddings, head_dim 64.
register_architecture("llama3.2-1b", ModelConfig(
    **_LLAMA3, d_model=2048, n_layers=16, n_heads=32, n_kv_heads=8, mlp_dim=8192,
    max_positions=131072, tie_embeddings=True,
    rope_scaling=RopeScaling(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                             high_freq_factor=4.0, original_max_position_embeddings=8192)))
# Qwen2.5 (Qwen Team 2024, "Qwen2.5 Technical Report"): 7.62 B and 0.49 B parameters.
register_architecture("qwen2.5-7b", ModelConfig(
    **_QWEN25, vocab_size=152064, d_model=3584, n_layers=28, n_heads=28, n_kv_heads=4,
    mlp_dim=18944))
register_architecture("qwen2.5-0.5b", ModelConfig(
    **_QWEN25, vocab_size=151936, d_model=896, n_layers=24, n_heads=14, n_kv_heads=2,
    mlp_dim=4864, tie_embeddings=True))
# SmolLM2-135M (Allal et al. 2025), the project's default policy: 134.5 M parameters.
register_architecture("smollm2-135m", ModelConfig(
    arch="llama", vocab_size=49152, d_model=576, n_layers=30, n_heads=9, n_kv_heads=3,
    mlp_dim=1536, max_positions=8192, rope_theta=100000.0, norm_eps=1e-5,
    tie_embeddings=True))


def resolve_architecture(name_or_path: str | os.PathLike, **overrides) -> ModelConfig:
    """The ``ModelConfig`` of a named architecture or of an HF checkpoint's ``config.json``.

    Args:
      name_or_path: a key of ``ARCHITECTURES`` (e.g. ``"llama3-8b"``), or a directory holding
        ``config.json`` (no weights needed), or the path of that file.
      **overrides: ``ModelConfig`` fields set on top (``dtype``, ``param_dtype``, ``remat``,
        ``frozen_layers``, ...).

    Raises:
      ValueError: neither a known name nor an existing path (the message lists the known
        names), or an HF config the families cannot read (from ``config_from_hf``).
    """
    key = str(name_or_path)
    if key in ARCHITECTURES:
        return dataclasses.replace(ARCHITECTURES[key], **overrides)
    path = Path(name_or_path).expanduser()
    if path.is_dir() or path.is_file():
        from rlhf_jax.models.convert.hf_config import config_from_hf
        return config_from_hf(path, **overrides)
    raise ValueError(f"unknown architecture {key!r}: not one of {', '.join(ARCHITECTURES)}, and "
                     f"no HF checkpoint directory or config.json at {path}")


def architecture_names() -> tuple[str, ...]:
    """The registered names, in registration order."""
    return tuple(ARCHITECTURES)


__all__ = ["ARCHITECTURES", "architecture_names", "register_architecture",
           "resolve_architecture"]
