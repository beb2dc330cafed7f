"""diep_hub: DiEP expert pruning for Mixture-of-Experts models, and publishing the result on the Hub.

The public names below are imported on first use (a module-level ``__getattr__``, as transformers does), so that
``import diep_hub`` and ``diep-hub --help`` do not pay for torch, transformers, lm-eval, matplotlib or datasets.

The ``diep_*`` Auto classes are registered with transformers when ``diep_hub.modeling`` is imported (which
pruning, saving and loading through diep_hub do), and by ``import diep_hub`` itself when transformers is already
imported (as in ``from transformers import AutoModelForCausalLM; import diep_hub``), where it costs nothing more.
"""

from __future__ import annotations

import importlib
import sys
from typing import TYPE_CHECKING, Any

from .errors import ConfigError, DiEPError, KeepMapError, UnsupportedModelError

__version__ = "0.1.0"

#: public name -> the module that defines it (imported on first access)
_LAZY = {
    "build_model_card": "card",
    "write_card": "card",
    "is_pruned": "checkpoint.format",
    "to_stock_model": "checkpoint.format",
    "save_pruned": "checkpoint.saving",
    "get_family": "families",
    "supported_families": "families",
    "push": "hub",
    "register_with_auto_classes": "modeling",
    "DiEPPruner": "pruner",
    "calibrate_skipping": "skipping",
    "disable_skipping": "skipping",
    "enable_skipping": "skipping",
    "skip_rates": "skipping",
    "plan_surgery": "surgery",
    "prune_experts": "surgery",
}

if TYPE_CHECKING:
    from .card import build_model_card, write_card
    from .checkpoint.format import is_pruned, to_stock_model
    from .checkpoint.saving import save_pruned
    from .families import get_family, supported_families
    from .hub import push
    from .modeling import register_with_auto_classes
    from .pruner import DiEPPruner
    from .skipping import calibrate_skipping, disable_skipping, enable_skipping, skip_rates
    from .surgery import plan_surgery, prune_experts


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'diep_hub' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if "transformers" in sys.modules:
    importlib.import_module(".modeling", __name__)  # registers the Auto classes (see the module docstring)

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
