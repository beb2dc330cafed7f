"""diep_hub: DiEP expert pruning for Mixture-of-Experts models, and publishing the result on the Hub."""

from .errors import ConfigError, DiEPError, KeepMapError, UnsupportedModelError
from .families import get_family, supported_families
from .modeling import register_with_auto_classes
from .pruned_format import is_pruned, to_stock_model
from .saving import save_pruned
from .surgery import plan_surgery, prune_experts

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DiEPError",
    "KeepMapError",
    "UnsupportedModelError",
    "get_family",
    "is_pruned",
    "plan_surgery",
    "prune_experts",
    "register_with_auto_classes",
    "save_pruned",
    "supported_families",
    "to_stock_model",
]
