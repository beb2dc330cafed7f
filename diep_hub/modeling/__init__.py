"""Remote-code modeling shipped inside every pruned checkpoint, and its registration with transformers."""

from transformers import AutoConfig, AutoModelForCausalLM

from .configuration_diep import DIEP_CONFIG_CLASSES
from .modeling_diep import DIEP_MODEL_CLASSES, per_layer_load_balancing_loss

REMOTE_CODE_FILES = ("configuration_diep.py", "modeling_diep.py")


def register_with_auto_classes() -> None:
    """Make ``AutoModelForCausalLM.from_pretrained(dir)`` load diep_* checkpoints without remote code."""
    for model_type, config_class in DIEP_CONFIG_CLASSES.items():
        AutoConfig.register(model_type, config_class, exist_ok=True)
        AutoModelForCausalLM.register(config_class, DIEP_MODEL_CLASSES[model_type], exist_ok=True)


register_with_auto_classes()

__all__ = ["DIEP_CONFIG_CLASSES", "DIEP_MODEL_CLASSES", "REMOTE_CODE_FILES", "per_layer_load_balancing_loss"]
