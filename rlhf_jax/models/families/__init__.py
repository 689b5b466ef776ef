"""The architecture registry: one module per family in this package, each defining
``FAMILY = rlhf_jax.models.families.base.Family(...)``.

Modules are discovered on first use (``pkgutil``), so adding a family is one new file here
(plus its test); ``ModelConfig.arch`` names a family, ``config.json``'s ``model_type`` is
looked up in the families' ``model_types``. Order: ``llama`` and ``gpt2`` first (the
original families), then the others alphabetically.
"""

from __future__ import annotations

import importlib
import pkgutil

from rlhf_jax.models.families.base import OPTION_FIELDS, BlockSpec, Family, check_rope

_FIRST = ("llama", "gpt2")
_REGISTRY: dict[str, Family] | None = None


def _load() -> dict[str, Family]:
    global _REGISTRY
    if _REGISTRY is None:
        names = [m.name for m in pkgutil.iter_modules(__path__)
                 if not m.name.startswith("_") and m.name != "base"]
        names.sort(key=lambda n: (_FIRST.index(n) if n in _FIRST else len(_FIRST), n))
        found: dict[str, Family] = {}
        for n in names:
            fam = importlib.import_module(f"{__name__}.{n}").FAMILY
            if fam.name in found:
                raise RuntimeError(f"two families named {fam.name!r}")
            found[fam.name] = fam
        _REGISTRY = found
    return _REGISTRY


def families() -> tuple[Family, ...]:
    """Every registered family, in registry order."""
    return tuple(_load().values())


def get_family(arch: str) -> Family:
    """The family named ``arch``.

    Raises:
      ValueError: no such family, listing the registered ones.
    """
    reg = _load()
    if arch not in reg:
        raise ValueError(f"ModelConfig.arch must be one of {', '.join(reg)}; got {arch!r}")
    return reg[arch]


def supported_model_types() -> tuple[str, ...]:
    """Every HF ``model_type`` some family reads, in registry order."""
    return tuple(mt for fam in families() for mt in fam.model_types)


def family_for_model_type(model_type: str) -> Family:
    """The family that reads HF ``model_type``.

    Raises:
      ValueError: no family reads it (naming it and the supported ones).
    """
    for fam in families():
        if model_type in fam.model_types:
            return fam
    raise ValueError(f"HF model_type {model_type!r} is not supported; supported: "
                     f"{', '.join(supported_model_types())}")


def validate(cfg) -> dict:
    """Check ``cfg`` against its family (called by ``ModelConfig.__post_init__``).

    Returns:
      Field values to normalise (an ``activation`` equal to the family's default becomes
      ``None``, so equal architectures compare equal however they were written).

    Raises:
      ValueError: unknown ``arch``, an option the family cannot express set away from its
        default (naming the field and the family's options), or the family's own checks.
    """
    fam = get_family(cfg.arch)
    fix = {}
    if cfg.activation is not None and cfg.activation == fam.block.activation:
        fix["activation"] = None
    for name, default in OPTION_FIELDS.items():
        value = fix.get(name, getattr(cfg, name))
        if value != default and name not in fam.options:
            raise ValueError(f"ModelConfig.{name}={value!r} is not supported by arch "
                             f"{cfg.arch!r} (its options: {', '.join(fam.options) or 'none'})")
    check_rope(cfg)
    if fam.check is not None:
        fam.check(cfg)
    return fix


__all__ = ["BlockSpec", "Family", "families", "family_for_model_type", "get_family",
           "supported_model_types", "validate"]
