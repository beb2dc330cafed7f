"""Family adapters: one module a family, each registering itself by ``model_type``.

Adding a family is one file here plus a row in tests/conftest.py's tiny-model table.
"""

from . import (  # noqa: F401  (importing registers each family)
    deepseek_v2,
    deepseek_v3,
    gpt_oss,
    granitemoe,
    mixtral,
    olmoe,
    phimoe,
    qwen2_moe,
    qwen3_moe,
)
from .base import ROUTER_ACTIVATIONS, GroupedRouting, MoEFamily, MoELayer, RoutingRules
from .registry import base_model_type, get_family, register_family, supported_families

__all__ = [
    "ROUTER_ACTIVATIONS",
    "GroupedRouting",
    "MoEFamily",
    "MoELayer",
    "RoutingRules",
    "base_model_type",
    "get_family",
    "register_family",
    "supported_families",
]
