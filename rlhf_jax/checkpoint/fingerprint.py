"""Model fingerprints: what identifies an architecture in a checkpoint's ``meta``.

``model_fingerprint`` builds the JSON ``dict`` that a caller stores in ``meta``;
``Checkpointer.restore(expected_fingerprint=...)`` compares it with ``_fingerprint_diff`` and
refuses a checkpoint of another model before reading any array.
"""

from __future__ import annotations

from typing import Any

from rlhf_jax.config import config_to_dict as _config_to_dict


#: ``ModelConfig`` fields that change how a model runs, not what its parameters are.
_RUNTIME_ONLY_FIELDS = ("dtype", "remat", "frozen_layers", "scan_unroll")


def model_fingerprint(model_cfg: Any) -> dict:
    """A JSON ``dict`` that identifies a model architecture, for ``meta`` and
    ``Checkpointer.restore(expected_fingerprint=...)``.

    Args:
      model_cfg: a ``rlhf_jax.config.ModelConfig``, a ``rlhf_jax.models.model.Model`` (adds its
        ``kind``) or any config dataclass.

    Returns:
      Every field of the config except those that only change execution (compute ``dtype``,
      ``remat``, ``frozen_layers``, ``scan_unroll``), with derived sizes resolved
      (``n_kv_heads``, ``head_dim``) so equal architectures compare equal however they were
      written.
    """
    kind = None
    if hasattr(model_cfg, "cfg") and hasattr(model_cfg, "kind"):  # a Model
        kind, model_cfg = model_cfg.kind, model_cfg.cfg
    fp = _config_to_dict(model_cfg)
    for name in _RUNTIME_ONLY_FIELDS:
        fp.pop(name, None)
    if hasattr(model_cfg, "num_kv_heads") and "n_kv_heads" in fp:
        fp["n_kv_heads"] = model_cfg.num_kv_heads
    if hasattr(model_cfg, "per_head_dim") and "head_dim" in fp:
        fp["head_dim"] = model_cfg.per_head_dim
    if kind is not None:
        fp["kind"] = kind
    return fp


def _fingerprint_diff(expected: Any, found: Any, where: str = "") -> list[str]:
    """Human-readable differences between two JSON values (first-level keys named). A key
    that one side lacks and the other has as ``None`` / ``False`` (an option that did not exist
    when the checkpoint was written, and is off) is no difference."""
    if isinstance(expected, dict) and isinstance(found, dict):
        out = []
        for k in list(expected) + [k for k in found if k not in expected]:
            sub = f"{where}.{k}" if where else str(k)
            # an option added later is off (None / False) where a checkpoint lacks it
            if k not in found:
                if expected[k] is not None and expected[k] is not False:
                    out.append(f"{sub}: expected {expected[k]!r}, missing in checkpoint")
            elif k not in expected:
                if found[k] is not None and found[k] is not False:
                    out.append(f"{sub}: not expected, checkpoint has {found[k]!r}")
            else:
                out.extend(_fingerprint_diff(expected[k], found[k], sub))
        return out
    if expected != found:
        return [f"{where or 'fingerprint'}: expected {expected!r}, found {found!r}"]
    return []


__all__ = ["model_fingerprint"]
