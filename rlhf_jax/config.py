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
    """RoPE frequency scaling as found in HF ``config.json`` (``rope_scaling`` /
    ``rope_parameters``), computed as transformers 5 does (``rlhf_jax.models.rope``).

    The fields added after ``original_max_position_embeddings`` default to off (``None`` /
    ``False``), so configs of the older types compare (and fingerprint) as before.

    Attributes:
      rope_type: ``"linear"`` (position interpolation, Chen et al. 2023), ``"llama3"``
        (Llama 3.1 wavelength-dependent scaling, Meta 2024), ``"yarn"`` (Peng et al. 2023,
        "YaRN": per-frequency ramp between interpolation and extrapolation, Sec. 3.2, and an
        attention temperature, Sec. 3.4) or ``"dynamic"`` (dynamic NTK-aware scaling,
        bloc97 / emozilla 2023: the base grows with the batch's longest position once it
        exceeds ``ModelConfig.max_positions``; see ``rlhf_jax.models.rope``).
      factor: scale factor applied to the wavelengths (yarn: the context extension ``s``;
        dynamic: the NTK factor).
      low_freq_factor: llama3 only.
      high_freq_factor: llama3 only.
      original_max_position_embeddings: llama3 and yarn: the pre-training context length
        ``L``. Not used by dynamic, whose threshold is ``ModelConfig.max_positions``
        (transformers' ``max_position_embeddings``).
      beta_fast: yarn: frequencies that rotate more than ``beta_fast`` times over ``L`` are
        extrapolated (kept); ``None``: 32 (the paper's ``beta``, Peng et al. 2023 Sec. 3.2).
      beta_slow: yarn: frequencies that rotate fewer than ``beta_slow`` times over ``L`` are
        interpolated (divided by ``factor``); ``None``: 1 (the paper's ``alpha``).
      mscale: yarn: with ``mscale_all_dim`` (DeepSeek's form), the attention factor is
        ``(0.1 mscale ln s + 1) / (0.1 mscale_all_dim ln s + 1)``; transformers uses the two
        only together. ``None``: unset.
      mscale_all_dim: yarn: see ``mscale``. ``None``: unset.
      attention_factor: yarn: the multiplier of cos and sin (so of q and k; the scores scale
        by its square). ``None``: ``0.1 ln s + 1`` (Peng et al. 2023 eq. 22, ``sqrt(1/t)``)
        or the ``mscale`` ratio above; 1 for ``s <= 1``.
      no_truncate: yarn: keep the correction range's bounds fractional (HF
        ``truncate: false``); ``False``: floor / ceil them (HF's default ``truncate: true``).
    """

    rope_type: Literal["linear", "llama3", "yarn", "dynamic"] = "linear"
    factor: float = 1.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192
    beta_fast: float | None = None
    beta_slow: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    attention_factor: float | None = None
    no_truncate: bool = False

    def __post_init__(self):
        if self.rope_type not in ("linear", "llama3", "yarn", "dynamic"):
            raise ValueError("RopeScaling.rope_type must be 'linear', 'llama3', 'yarn' or "
                             f"'dynamic', got {self.rope_type!r}")
        if not self.factor > 0:
            raise ValueError(f"RopeScaling.factor must be positive, got {self.factor}")
        if self.rope_type in ("llama3", "yarn") and not self.original_max_position_embeddings > 0:
            raise ValueError("RopeScaling.original_max_position_embeddings must be positive, got "
                             f"{self.original_max_position_embeddings}")
        if self.attention_factor is not None and not self.attention_factor > 0:
            raise ValueError(f"RopeScaling.attention_factor must be positive, got "
                             f"{self.attention_factor}")
        yarn_only = ("beta_fast", "beta_slow", "mscale", "mscale_all_dim", "attention_factor",
                     "no_truncate")
        if self.rope_type != "yarn":
            for name in yarn_only:
                if getattr(self, name) not in (None, False):
                    raise ValueError(f"RopeScaling.{name}={getattr(self, name)!r} is only used "
                                     f"by rope_type 'yarn', got rope_type {self.rope_type!r}")


#: Projection names LoRA can target: the attention's ``q, k, v, o`` and the MLP's ``gate, up,
#: down`` (``gate`` only in gated MLPs), and the two groups.
LORA_PROJECTIONS = ("q", "k", "v", "o", "gate", "up", "down")
LORA_GROUPS = {"attention": ("q", "k", "v", "o"), "mlp": ("gate", "up", "down")}


@dataclasses.dataclass(frozen=True, kw_only=True)
class LoraConfig:
    """Low-rank adapters on chosen projections (LoRA, Hu et al. 2021), optionally over a
    quantised frozen base (QLoRA, Dettmers et al. 2023); see ``rlhf_jax.models.lora``.

    A targeted projection ``y = x W`` becomes ``y = x W + (alpha / r) (drop(x) A) B`` with
    ``A [*in, r]`` drawn at random and ``B [r, *out]`` zero, so a fresh adapter changes
    nothing (Hu et al. 2021 §4.1); only ``A``, ``B`` (and a freshly initialised scalar head)
    train. Every field defaults to off (``None``), so a config without LoRA records (and
    fingerprints) as it did before the option existed.

    Attributes:
      rank: ``r``, the adapters' rank; ``None`` or ``0``: LoRA off (stored as ``None``).
      alpha: ``alpha``; the update is scaled by ``alpha / r`` (Hu et al. 2021 §4.1).
        ``None``: ``alpha = r`` (a scale of 1).
      dropout: dropout rate on the adapter's input ``x`` while training (the base path sees
        ``x`` unchanged; Hu et al. 2021's released code, Dettmers et al. 2023 §4). ``None``: 0.
      targets: the projections that get adapters: names of ``LORA_PROJECTIONS`` and the groups
        ``"attention"`` (q, k, v, o) and ``"mlp"`` (gate, up, down). ``None``: every
        projection, ``("attention", "mlp")`` (Dettmers et al. 2023 §4 find adapters on all
        layers needed to match full fine-tuning). The MLP of a mixture-of-experts model is
        refused.
      quantize_base: store the frozen kernels of the targeted projections quantised
        (``"int8"`` or ``"int4"``, symmetric absmax scales, through qwix) and dequantise them
        in the forward; the adapters stay in ``param_dtype``. ``None``: a float base.
      block_size: with ``quantize_base``: one scale per output channel and per block of this
        many entries of the last input axis (``D`` for q, k, v, gate, up; ``F`` for down; the
        head dim ``K`` for o; Dettmers et al. 2023 use blocks of 64); ``None``: one scale per
        output channel. The block must divide that axis.

    Raises:
      ValueError: a negative rank, a non-positive alpha, a dropout outside ``[0, 1)``, an
        unknown target, an unknown ``quantize_base``, a non-positive ``block_size``, or any
        option set while the rank is off.
    """

    rank: int | None = None
    alpha: float | None = None
    dropout: float | None = None
    targets: tuple[str, ...] | None = None
    quantize_base: Literal["int8", "int4"] | None = None
    block_size: int | None = None

    def __post_init__(self):
        if self.targets is not None:  # JSON gives a list; keep the config hashable
            object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank is not None and self.rank < 0:
            raise ValueError(f"LoraConfig.rank must be >= 0 (0 or None: off), got {self.rank}")
        if not self.rank:
            object.__setattr__(self, "rank", None)
            on = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                  if f.name != "rank" and getattr(self, f.name) is not None}
            if on:
                raise ValueError(f"LoraConfig: {', '.join(f'{k}={v!r}' for k, v in on.items())} "
                                 "set without a rank: set lora.rank > 0 to use LoRA")
            return
        if self.alpha is not None and not self.alpha > 0:
            raise ValueError(f"LoraConfig.alpha must be > 0, got {self.alpha}")
        if self.dropout is not None and not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"LoraConfig.dropout must be in [0, 1), got {self.dropout}")
        if self.targets is not None:
            bad = [t for t in self.targets if t not in LORA_PROJECTIONS and t not in LORA_GROUPS]
            if bad or not self.targets:
                raise ValueError(f"LoraConfig.targets has unknown {bad or 'nothing'}; expected "
                                 f"names of {LORA_PROJECTIONS} or the groups "
                                 f"{tuple(LORA_GROUPS)}")
        if self.quantize_base not in (None, "int8", "int4"):
            raise ValueError(f"LoraConfig.quantize_base must be 'int8', 'int4' or None, got "
                             f"{self.quantize_base!r}")
        if self.block_size is not None:
            if self.quantize_base is None:
                raise ValueError(f"LoraConfig.block_size={self.block_size} needs quantize_base")
            if self.block_size < 1:
                raise ValueError(f"LoraConfig.block_size must be >= 1, got {self.block_size}")

    @property
    def enabled(self) -> bool:
        """Whether adapters are on (``rank > 0``)."""
        return bool(self.rank)

    @property
    def scale(self) -> float:
        """``alpha / r``, the multiplier of the adapters' product (Hu et al. 2021 §4.1)."""
        return (self.rank if self.alpha is None else self.alpha) / self.rank

    @property
    def dropout_rate(self) -> float:
        """The adapter-input dropout rate (0 when unset)."""
        return self.dropout or 0.0

    @property
    def target_names(self) -> tuple[str, ...]:
        """The targeted projection names, groups expanded, in ``LORA_PROJECTIONS`` order."""
        chosen = set()
        for t in self.targets or ("attention", "mlp"):
            chosen.update(LORA_GROUPS.get(t, (t,)))
        return tuple(p for p in LORA_PROJECTIONS if p in chosen)


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
        is allowed to build a cache for (HF ``max_position_embeddings``); dynamic NTK RoPE
        (``RopeScaling``) grows its base beyond it.
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
      num_experts: ``E`` routed experts in every block's MLP (mixture-of-experts families:
        Mixtral, Qwen3-MoE); each expert is a gated MLP of width ``mlp_dim``. ``None``: a
        dense MLP.
      num_experts_per_tok: experts ``k`` each token is routed to (top-k of the router's
        softmax; Shazeer et al. 2017, Fedus et al. 2022).
      norm_topk_prob: renormalise the ``k`` selected router probabilities to sum to 1
        (Mixtral always does; Qwen3-MoE's ``norm_topk_prob``). ``None``: the family's rule.
      router_aux_loss_coef: weight ``alpha`` of the router's load-balancing loss (Fedus et
        al. 2022 eq. 4; ``ModelOutput.router_aux_loss``) that the trainers add to their loss
        for a mixture-of-experts model (HF ``router_aux_loss_coef``); ``None``: 0.
      rope_layers: per layer, whether it applies RoPE; ``False`` marks a NoPE layer (no
        position encoding in its attention: SmolLM3, after Kazemnejad et al. 2023). ``None``:
        every layer (a tuple of all ``True`` is stored as ``None``). Length ``n_layers``.
      embedding_multiplier: the embeddings are multiplied by it (Granite 3.0, IBM 2024:
        HF ``embedding_multiplier``); ``None``: 1.
      residual_multiplier: each residual branch's output (attention, MLP) is multiplied by
        it before it is added (Granite's ``residual_multiplier``); ``None``: 1.
      logits_scaling: the LM logits are *divided* by it (Granite's ``logits_scaling``);
        ``None``: 1.
      lora: low-rank adapters on the projections named by ``LoraConfig.targets`` (and their
        frozen base optionally quantised); ``None`` (or a ``LoraConfig`` with no rank): none.
        The parameter tree then holds ``lora_a`` / ``lora_b`` on every targeted projection
        (``rlhf_jax.models.lora``).
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
    num_experts: int | None = None
    num_experts_per_tok: int | None = None
    norm_topk_prob: bool | None = None
    router_aux_loss_coef: float | None = None
    rope_layers: tuple[bool, ...] | None = None
    embedding_multiplier: float | None = None
    residual_multiplier: float | None = None
    logits_scaling: float | None = None
    lora: LoraConfig | None = None

    def __post_init__(self):
        if self.layer_types is not None:  # JSON gives a list; keep the config hashable
            object.__setattr__(self, "layer_types", tuple(self.layer_types))
        if self.rope_layers is not None:  # a tuple of bools; all True is the default (None)
            rope_layers = tuple(bool(v) for v in self.rope_layers)
            if len(rope_layers) != self.n_layers:
                raise ValueError(f"ModelConfig.rope_layers has {len(rope_layers)} entries for "
                                 f"n_layers={self.n_layers}")
            object.__setattr__(self, "rope_layers", None if all(rope_layers) else rope_layers)
        if isinstance(self.rope_scaling, Mapping):
            object.__setattr__(self, "rope_scaling", RopeScaling(**self.rope_scaling))
        if isinstance(self.lora, Mapping):
            object.__setattr__(self, "lora", LoraConfig(**self.lora))
        if self.lora is not None and not self.lora.enabled:  # rank off: no LoRA at all
            object.__setattr__(self, "lora", None)
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
        for name in ("attn_softcap", "final_softcap", "attn_scale", "rope_local_theta",
                     "embedding_multiplier", "residual_multiplier", "logits_scaling"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_experts is not None and not (
                self.num_experts >= 1 and 1 <= (self.num_experts_per_tok or 0) <= self.num_experts):
            raise ValueError(f"ModelConfig.num_experts_per_tok={self.num_experts_per_tok} must be "
                             f"in [1, num_experts={self.num_experts}]")
        if self.router_aux_loss_coef is not None and self.router_aux_loss_coef < 0:
            raise ValueError("ModelConfig.router_aux_loss_coef must be >= 0, got "
                             f"{self.router_aux_loss_coef}")
        if self.activation not in (None, "silu", "gelu_tanh", "gelu"):
            raise ValueError(f"ModelConfig.activation must be 'silu', 'gelu_tanh', 'gelu' or None, "
                             f"got {self.activation!r}")
        if self.lora is not None:
            self._check_lora()

    def _check_lora(self) -> None:
        """Refuse LoRA targets the architecture does not have (or that LoRA does not support)."""
        names = self.lora.target_names
        mlp = self.family.block.mlp
        if mlp == "moe" and set(names) & set(LORA_GROUPS["mlp"]):
            raise ValueError(f"ModelConfig.lora.targets={self.lora.targets} puts adapters on the "
                             f"MLP of a mixture-of-experts model ({self.arch}), which LoRA here "
                             f"does not support; use targets=('attention',)")
        present = [n for n in names if n != "gate" or mlp == "gated"]
        if not present:
            raise ValueError(f"ModelConfig.lora.targets={self.lora.targets}: the {self.arch} "
                             f"family has no such projection (its MLP is {mlp!r}, without 'gate')")
        block = self.lora.block_size
        if block is not None:
            last_in = {"q": self.d_model, "k": self.d_model, "v": self.d_model,
                       "o": self.per_head_dim, "gate": self.d_model, "up": self.d_model,
                       "down": self.mlp_dim}
            bad = {n: last_in[n] for n in present if last_in[n] % block}
            if bad:
                raise ValueError(f"ModelConfig.lora.block_size={block} must divide the last "
                                 f"input axis of every targeted projection; it does not divide "
                                 f"{bad}")

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
        n = sum(int(np.prod(s.shape)) * (self.n_layers if s.per_layer else 1) * max(s.experts, 1)
                for s in specs)
        return n + (0 if self.tie_embeddings else self.d_model * self.vocab_size)

    def flops_per_token(self, seq_len: int) -> int:
        """Forward matmul FLOPs per token at context ``seq_len`` (2 x MACs, incl. attention scores).

        Kaplan et al. 2020 Table 1: ``2 N + 2 L T d_attn`` with N the non-embedding matmul
        parameters; the LM head counts as a matmul. Backward is about twice the forward.
        """
        d, f, v, l = self.d_model, self.mlp_dim, self.vocab_size, self.n_layers
        hk, kvk = self.n_heads * self.per_head_dim, self.num_kv_heads * self.per_head_dim
        n_mlp = (3 if self.family.block.mlp in ("gated", "moe") else 2) * d * f
        if self.num_experts is not None:  # k active experts per token, plus the router
            n_mlp = self.num_experts_per_tok * n_mlp + d * self.num_experts
        matmul_params = l * (d * hk + 2 * d * kvk + hk * d + n_mlp) + d * v
        return 2 * matmul_params + 2 * l * seq_len * hk


def gpt2_config(*, n_layer: int, n_embd: int, n_head: int, n_positions: int, vocab_size: int,
                **overrides) -> ModelConfig:
    """A GPT-2 ``ModelConfig`` from GPT-2's own hyper-parameter names (``mlp_dim = 4 d``)."""
    return ModelConfig(arch="gpt2", vocab_size=vocab_size, d_model=n_embd, n_layers=n_layer,
                       n_heads=n_head, mlp_dim=4 * n_embd, max_positions=n_positions,
                       tie_embeddings=True, norm_eps=1e-5, **overrides)
