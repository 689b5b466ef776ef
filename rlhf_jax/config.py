"""Frozen, keyword-only configuration dataclasses with a docstring per field.

Derived sizes are ``@property``; invalid combinations raise ``ValueError`` in
``__post_init__`` naming both numbers. A flag selects a function; it never adds a branch
inside a jitted step.

``to_jsonable`` / ``config_to_dict`` turn any config (nested dataclasses, tuples, enums, paths,
NumPy scalars) into plain JSON types, for checkpoint ``meta``, ``config.json`` and W&B.
"""

from __future__ import annotations

import dataclasses
import enum
import os
from collections.abc import Mapping
from typing import Any, Literal

import numpy as np


def to_jsonable(obj: Any) -> Any:
    """``obj`` as plain JSON types: dataclasses -> dicts, tuples -> lists, enums -> values,
    NumPy/JAX scalars -> Python numbers, NumPy/JAX arrays -> nested lists, paths -> strings.

    Raises:
      TypeError: a value with no JSON form (naming its type and where it was found).
    """
    def convert(x, where):
        if x is None or isinstance(x, (bool, int, float, str)):
            return x
        if dataclasses.is_dataclass(x) and not isinstance(x, type):
            return {f.name: convert(getattr(x, f.name), f"{where}.{f.name}")
                    for f in dataclasses.fields(x)}
        if isinstance(x, Mapping):
            return {str(k): convert(v, f"{where}[{k!r}]") for k, v in x.items()}
        if isinstance(x, (list, tuple)):
            return [convert(v, f"{where}[{i}]") for i, v in enumerate(x)]
        if isinstance(x, enum.Enum):
            return convert(x.value, where)
        if isinstance(x, os.PathLike):
            return os.fspath(x)
        # NumPy scalars/arrays and jax.Array (detected without importing jax)
        if isinstance(x, (np.generic, np.ndarray)) or (
                hasattr(x, "__array__") and hasattr(x, "shape") and hasattr(x, "dtype")):
            arr = np.asarray(x)
            return arr.item() if arr.ndim == 0 else arr.tolist()
        raise TypeError(f"{where or 'value'} of type {type(x).__name__} has no JSON form")
    return convert(obj, "")


def config_to_dict(cfg: Any) -> dict:
    """A frozen config dataclass (nested ones included) as a JSON ``dict`` (``to_jsonable``).

    Raises:
      TypeError: ``cfg`` is not a dataclass instance, or holds a value with no JSON form.
    """
    if not (dataclasses.is_dataclass(cfg) and not isinstance(cfg, type)):
        raise TypeError(f"config_to_dict expects a dataclass instance, got {type(cfg).__name__}")
    return to_jsonable(cfg)


@dataclasses.dataclass(frozen=True, kw_only=True)
class RopeScaling:
    """RoPE frequency scaling as found in HF ``config.json`` (``rope_scaling``).

    Attributes:
      rope_type: ``"linear"`` (position interpolation, Chen et al. 2023) or ``"llama3"``
        (Llama 3.1 wavelength-dependent scaling, Meta 2024).
      factor: scale factor applied to the wavelengths.
      low_freq_factor: llama3 only.
      high_freq_factor: llama3 only.
      original_max_position_embeddings: llama3 only: the pre-training context length.
    """

    rope_type: Literal["linear", "llama3"] = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192


@dataclasses.dataclass(frozen=True, kw_only=True)
class ModelConfig:
    """A decoder-only transformer of one of the registered architecture families.

    Attributes:
      arch: the family (``rlhf_jax.models.families``), which fixes the block's structure
        (norms, attention variant, MLP, residual layout): ``"llama"`` (Llama 2/3, SmolLM2,
        Qwen2, Mistral: RMSNorm, RoPE, GQA, SwiGLU; Touvron et al. 2023), ``"gpt2"``
        (learned positions, LayerNorm, GELU-tanh, biases everywhere; Radford et al. 2019),
        and the other families listed in the README. The numeric options below are only
        accepted by the families whose HF configs can express them.
      vocab_size: number of token ids ``V``.
      d_model: residual width ``D``.
      n_layers: number of blocks ``L``.
      n_heads: query heads ``H``.
      n_kv_heads: key/value heads (``H`` for multi-head, fewer for grouped-query attention,
        Ainslie et al. 2023). ``None`` means ``n_heads``.
      head_dim: per-head width ``K``; ``None`` means ``d_model // n_heads``.
      mlp_dim: hidden width of the MLP ``F``.
      max_positions: learned position table size (GPT-2) / the longest sequence the sampler
        is allowed to build a cache for.
      rope_theta: RoPE base (Su et al. 2021); Llama 2 10000, Llama 3 500000, SmolLM2 100000.
      rope_scaling: optional frequency scaling (see ``RopeScaling``).
      norm_eps: epsilon of RMSNorm / LayerNorm.
      tie_embeddings: share the input embedding with the LM head.
      qkv_bias: biases on the q/k/v projections (Qwen2).
      dtype: compute dtype of matmuls (``"float32"`` or ``"bfloat16"``). Norms, softmax and
        log-probs always run in float32.
      param_dtype: storage dtype of parameters (keep ``"float32"`` for training).
      remat: rematerialise each block in the backward pass (``jax.checkpoint``), trading
        compute for activation memory.
      frozen_layers: the embeddings and the lowest ``frozen_layers`` blocks run under
        ``stop_gradient`` in their own ``lax.scan`` (no backward pass through them) and
        ``rlhf_jax.train.state.make_optimizer`` gives them zero updates: fine-tune only the
        top blocks, final norm and heads. Inference is unaffected.
      scan_unroll: unroll factor of the ``lax.scan`` over stacked layers (1 = no unroll).
      sliding_window: ``W``: a query at slot ``s`` attends to key slots ``s - W < j <= s``
        on sliding layers (Beltagy et al. 2020; Mistral, Jiang et al. 2023), the mask of HF
        transformers. ``None``: full causal attention everywhere.
      layer_types: per layer ``"full"`` or ``"sliding"`` (local/global interleaving, Gemma
        2/3); ``None`` with a ``sliding_window`` means every layer is sliding. Needs
        ``sliding_window``; length ``n_layers``.
      rope_local_theta: RoPE base of the sliding layers (Gemma 3's ``rope_local_base_freq``;
        those layers get no ``rope_scaling``); ``None``: every layer uses ``rope_theta``.
      rotary_dim: rotate only the first ``rotary_dim`` features of each head (partial
        rotary, GPT-NeoX / Phi); ``None``: the whole head.
      attn_scale: attention score scale; ``None``: ``1 / sqrt(head_dim)`` (Gemma 2/3 use
        ``query_pre_attn_scalar ** -0.5``).
      attn_softcap: attention logits become ``c * tanh(s / c)`` (Gemma 2); ``None``: off.
      final_softcap: LM logits become ``c * tanh(z / c)`` (Gemma 2); ``None``: off.
      activation: MLP activation (``"silu"``, ``"gelu_tanh"`` or ``"gelu"`` (erf));
        ``None``: the family's own.
      parallel_residual: ``x + attn(norm1 x) + mlp(norm2 x)`` (GPT-J / GPT-NeoX) instead of
        two sequential residual updates.
    """

    arch: str = "llama"
    vocab_size: int
    d_model: int
    n_layers: int
    n_heads: int
    n_kv_heads: int | None = None
    head_dim: int | None = None
    mlp_dim: int
    max_positions: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    qkv_bias: bool = False
    dtype: Literal["float32", "bfloat16"] = "float32"
    param_dtype: Literal["float32", "bfloat16"] = "float32"
    remat: bool = False
    frozen_layers: int = 0
    scan_unroll: int = 1
    sliding_window: int | None = None
    layer_types: tuple[str, ...] | None = None
    rope_local_theta: float | None = None
    rotary_dim: int | None = None
    attn_scale: float | None = None
    attn_softcap: float | None = None
    final_softcap: float | None = None
    activation: str | None = None
    parallel_residual: bool = False

    def __post_init__(self):
        if self.layer_types is not None:  # JSON gives a list; keep the config hashable
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        from rlhf_jax.models.families import validate  # the registry (pure Python)

        for name, value in validate(self).items():
            object.__setattr__(self, name, value)
        for name in ("vocab_size", "d_model", "n_layers", "n_heads", "mlp_dim", "max_positions"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.head_dim is None and self.d_model % self.n_heads:
            raise ValueError(
                f"ModelConfig.d_model={self.d_model} is not divisible by n_heads={self.n_heads}; "
                "set head_dim explicitly")
        if self.num_kv_heads > self.n_heads or self.n_heads % self.num_kv_heads:
            raise ValueError(
                f"ModelConfig.n_heads={self.n_heads} must be a multiple of "
                f"n_kv_heads={self.num_kv_heads}")
        if not 0 <= self.frozen_layers <= self.n_layers:
            raise ValueError(f"ModelConfig.frozen_layers={self.frozen_layers} must be in "
                             f"[0, n_layers={self.n_layers}]")
        if self.rotary_dim is not None and not (0 < self.rotary_dim <= self.per_head_dim
                                                and self.rotary_dim % 2 == 0):
            raise ValueError(f"ModelConfig.rotary_dim={self.rotary_dim} must be even and in "
                             f"(0, head_dim={self.per_head_dim}]")
        if self.rope_dim % 2 and self.family.block.positions == "rope":
            raise ValueError(f"RoPE needs an even head_dim, got {self.per_head_dim}")
        if self.sliding_window is not None and self.sliding_window <= 0:
            raise ValueError(f"ModelConfig.sliding_window must be positive, got "
                             f"{self.sliding_window}")
        if self.layer_types is not None:
            if self.sliding_window is None:
                raise ValueError(f"ModelConfig.layer_types={self.layer_types} needs a "
                                 "sliding_window")
            if len(self.layer_types) != self.n_layers or not set(self.layer_types) <= {
                    "full", "sliding"}:
                raise ValueError(f"ModelConfig.layer_types must hold n_layers={self.n_layers} "
                                 f"entries 'full'/'sliding', got {self.layer_types}")
        for name in ("attn_softcap", "final_softcap", "attn_scale", "rope_local_theta"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.activation not in (None, "silu", "gelu_tanh", "gelu"):
            raise ValueError(f"ModelConfig.activation must be 'silu', 'gelu_tanh', 'gelu' or None, "
                             f"got {self.activation!r}")

    @property
    def family(self):
        """The ``rlhf_jax.models.families.base.Family`` named by ``arch``."""
        from rlhf_jax.models.families import get_family

        return get_family(self.arch)

    @property
    def rope_dim(self) -> int:
        """Rotated features per head (``rotary_dim`` or the whole head)."""
        return self.per_head_dim if self.rotary_dim is None else self.rotary_dim

    @property
    def layer_kinds(self) -> tuple[str, ...]:
        """``"full"`` or ``"sliding"`` for each layer."""
        if self.layer_types is not None:
            return self.layer_types
        return ("full" if self.sliding_window is None else "sliding",) * self.n_layers

    @property
    def num_kv_heads(self) -> int:
        """Key/value heads actually used."""
        return self.n_heads if self.n_kv_heads is None else self.n_kv_heads

    @property
    def per_head_dim(self) -> int:
        """Per-head width ``K``."""
        return self.d_model // self.n_heads if self.head_dim is None else self.head_dim

    @property
    def num_params(self) -> int:
        """Parameter count of the trunk + LM head (no scalar head): the sizes of the tensors of
        the family's HF checkpoint."""
        fam = self.family
        specs = fam.tensors(self, "")
        n = sum(int(np.prod(s.shape)) * (self.n_layers if s.per_layer else 1) for s in specs)
        return n + (0 if self.tie_embeddings else self.d_model * self.vocab_size)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward matmul FLOPs per token at context ``seq_len`` (2 x MACs, incl. attention scores).

        Kaplan et al. 2020 Table 1: ``2 N + 2 L T d_attn`` with N the non-embedding matmul
        parameters; the LM head counts as a matmul. Backward is about twice the forward.
        """
        d, f, v, l = self.d_model, self.mlp_dim, self.vocab_size, self.n_layers
        hk, kvk = self.n_heads * self.per_head_dim, self.num_kv_heads * self.per_head_dim
        n_mlp = (3 if self.family.block.mlp == "gated" else 2) * d * f
        matmul_params = l * (d * hk + 2 * d * kvk + hk * d + n_mlp) + d * v
        return 2 * matmul_params + 2 * l * seq_len * hk


def gpt2_config(*, n_layer: int, n_embd: int, n_head: int, n_positions: int, vocab_size: int,
                **overrides) -> ModelConfig:
    """A GPT-2 ``ModelConfig`` from GPT-2's own hyper-parameter names (``mlp_dim = 4 d``)."""
    return ModelConfig(arch="gpt2", vocab_size=vocab_size, d_model=n_embd, n_layers=n_layer,
                       n_heads=n_head, mlp_dim=4 * n_embd, max_positions=n_positions,
                       tie_embeddings=True, norm_eps=1e-5, **overrides)
