"""diep_hub: DiEP expert pruning for Mixture-of-Experts models, and publishing the result on the Hub."""

from .card import build_model_card, write_card
from .errors import ConfigError, DiEPError, KeepMapError, UnsupportedModelError
from .families import get_family, supported_families
from .hub import push
from .modeling import register_with_auto_classes
from .pruned_format import is_pruned, to_stock_model
from .pruner import DiEPPruner
from .saving import save_pruned
from .skipping import calibrate_skipping, disable_skipping, enable_skipping, skip_rates
from .surgery import plan_surgery, prune_experts

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "DiEPPruner",
    "DiEPError",
    "KeepMapError",
    "UnsupportedModelError",
    "build_model_card",
    "calibrate_skipping",
    "disable_skipping",
    "enable_skipping",
    "get_family",
    "is_pruned",
    "plan_surgery",
    "prune_experts",
    "push",
    "register_with_auto_classes",
    "save_pruned",
    "skip_rates",
    "supported_families",
    "to_stock_model",
    "write_card",
]
