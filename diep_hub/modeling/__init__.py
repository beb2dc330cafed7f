"""Remote-code modeling shipped inside every pruned checkpoint, and its registration with transformers."""

from transformers import AutoConfig, AutoModelForCausalLM

from ..errors import CheckpointLoadError
from .configuration_diep import DIEP_CONFIG_CLASSES, DiepCheckpointError, DiepConfigMixin
from .modeling_diep import DIEP_MODEL_CLASSES, DiepForCausalLMMixin, per_layer_load_balancing_loss

REMOTE_CODE_FILES = ("configuration_diep.py", "modeling_diep.py", "skipping_diep.py", "loading_diep.py")


class DiepCheckpointLoadError(CheckpointLoadError, DiepCheckpointError):
    """What the registered classes raise for an incomplete or corrupt checkpoint.

    The remote code can only raise its own ``DiepCheckpointError(ValueError)``; with diep_hub imported the same
    failure is also a ``CheckpointLoadError`` (a DiEPError), so the CLI reports it as one line.
    """


# The remote code files are shared verbatim with every checkpoint; only the copies diep_hub imports get this class.
DiepConfigMixin._diep_error = DiepCheckpointLoadError
DiepForCausalLMMixin._diep_error = DiepCheckpointLoadError


def register_with_auto_classes() -> None:
    """Make ``AutoModelForCausalLM.from_pretrained(dir)`` load diep_* checkpoints without remote code."""
    for model_type, config_class in DIEP_CONFIG_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, DIEP_MODEL_CLASSES[model_type], exist_ok=True)


register_with_auto_classes()

__all__ = [
    "DIEP_CONFIG_CLASSES",
    "DIEP_MODEL_CLASSES",
    "REMOTE_CODE_FILES",
    "DiepCheckpointError",
    "DiepCheckpointLoadError",
    "per_layer_load_balancing_loss",
]
