"""HF tensor names and layouts <-> ``rlhf_jax`` parameter leaves (one ``Spec`` per tensor).

Each family (``rlhf_jax.models.families``) lists its trunk tensors (``Family.tensors``);
this module adds the heads every family shares: the untied LM head (``[V, D]``, our kernel
is its transpose; tied embeddings have no LM-head tensor) and the scalar head
(``value_head``: kernel ``[D]``, bias ``[]``) stored as ``score.weight [1, D]`` /
``score.bias [1]``, the names of HF's ``*ForSequenceClassification`` with one label.

``_specs(cfg, prefix, ...)`` lists every tensor of a checkpoint of ``cfg``; ``_expand`` gives a
spec's per-layer names and ``_ignorable`` the non-parameter buffers some checkpoints carry.
"""

from __future__ import annotations

from rlhf_jax.config import ModelConfig
from rlhf_jax.models.families.base import (SCORE_BIAS, SCORE_WEIGHT, LeafPath, Spec, linear,
                                           score_specs)

_Spec = Spec  # the name the converters use

__all__ = ["SCORE_BIAS", "SCORE_WEIGHT", "LeafPath"]


def _specs(cfg: ModelConfig, prefix: str, *, lm_head: bool, score: bool) -> list[Spec]:
    """Every HF tensor of a checkpoint of ``cfg`` (``prefix``: the family's base-model prefix,
    e.g. ``"model."``/``"transformer."``, or ``""`` for a base-model checkpoint). Per-layer
    names carry ``{i}``."""
    fam = cfg.family
    out = list(fam.tensors(cfg, prefix))
    if lm_head:
        out.append(linear(fam.lm_head_name, (cfg.vocab_size,), (cfg.d_model,),
                          ("lm_head", "kernel"), False))
    if score:
        out += score_specs(cfg.d_model)
    return out


def _expand(spec: Spec, n_layers: int) -> list[str]:
    """HF names of ``spec``: one, one per layer, or (``spec.experts``) one per layer and
    expert, layer-major."""
    if spec.experts:
        return [spec.hf.format(i=i, j=j) for i in range(n_layers) for j in range(spec.experts)]
    return [spec.hf.format(i=i) for i in range(n_layers)] if spec.per_layer else [spec.hf]


def _ignorable(name: str, arch: str) -> bool:
    """Buffers some checkpoints of family ``arch`` carry that are not parameters."""
    from rlhf_jax.models.families import get_family

    return get_family(arch).ignorable(name)
