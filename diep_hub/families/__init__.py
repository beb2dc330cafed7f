"""Family adapters: one module a family, each registering itself by ``model_type``.

Adding a family is one file here (imported below) plus the remote-code classes in diep_hub/modeling/ and a row in
the tests' family tables (tests/helpers/tiny_models.py FAMILY_CONFIGS, tests/test_families.py ROUTING_CASES,
tests/test_faults_loading.py LAYOUT); see docs/architecture.md.
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
