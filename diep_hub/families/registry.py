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


def unsupported_model_error(model_type: str | None, source: str | None = None) -> UnsupportedModelError:
    """The error for a model_type without an adapter: names the model (when known), the type and the families.

    One wording for every caller (the registry lookup, the runner when transformers itself does not know the type).
    """
    where = f"{source}: " if source else ""
    return UnsupportedModelError(
        f"{where}model_type {model_type!r} is not a supported Mixture-of-Experts family (dense models have no "
        f"experts to prune). Supported: {', '.join(supported_families())}."
    )


def get_family(model_or_config_or_type, *, source: str | None = None) -> MoEFamily:
    """The adapter for a model, a config, or a model_type string.

    Args:
        source: the folder or Hub id the model comes from, named in the error.

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
        raise unsupported_model_error(model_type, source)
    return family
