"""One explicit registry of family adapters, looked up by ``model_type``."""

from __future__ import annotations

from ..errors import UnsupportedModelError
from .base import MoEFamily

_FAMILIES: dict[str, MoEFamily] = {}

DIEP_PREFIX = "diep_"


def register_family(family: MoEFamily) -> MoEFamily:
    if family.model_type in _FAMILIES:
        raise ValueError(f"family {family.model_type!r} is registered twice")
    _FAMILIES[family.model_type] = family
    return family


def supported_families() -> list[str]:
    return sorted(_FAMILIES)


def base_model_type(model_type: str) -> str:
    """``diep_mixtral`` -> ``mixtral``: a pruned checkpoint is served by its base family's adapter."""
    return model_type[len(DIEP_PREFIX) :] if model_type.startswith(DIEP_PREFIX) else model_type


def get_family(model_or_config_or_type) -> MoEFamily:
    """The adapter for a model, a config, or a model_type string.

    Raises:
        UnsupportedModelError: for a dense model or an unknown family, listing the supported ones.
    """
    if isinstance(model_or_config_or_type, str):
        model_type = model_or_config_or_type
    else:
        config = getattr(model_or_config_or_type, "config", model_or_config_or_type)
        model_type = getattr(config, "model_type", None)
    family = _FAMILIES.get(base_model_type(model_type or ""))
    if family is None:
        raise UnsupportedModelError(
            f"model_type {model_type!r} is not a supported Mixture-of-Experts family (dense models have no "
            f"experts to prune). Supported: {', '.join(supported_families())}."
        )
    return family
