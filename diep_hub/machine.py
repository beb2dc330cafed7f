"""One line that says where a figure was measured: written next to every benchmark number and training time."""

from __future__ import annotations

import os
import platform
from importlib.metadata import PackageNotFoundError, version

import torch


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as info:
            for line in info:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


def machine_description() -> str:
    """E.g. "x86_64, 2 CPU cores (Intel(R) Xeon(R) Processor), no GPU; torch 2.13.0+cpu, transformers 5.24.0"."""
    if torch.cuda.is_available():
        names = sorted({torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())})
        gpu = f"{torch.cuda.device_count()} GPU(s): {', '.join(names)}"
    else:
        gpu = "no GPU"
    try:
        transformers_version = version("transformers")
    except PackageNotFoundError:
        transformers_version = "not installed"
    return (
        f"{platform.machine()}, {os.cpu_count()} CPU cores ({_cpu_model()}), {gpu}; "
        f"torch {torch.__version__}, transformers {transformers_version}"
    )


def environment_report() -> dict[str, object]:
    """What a bug report needs (``diep-hub env``): platform, hardware, package versions and the Hub settings in force.

    Whether a Hub token is configured is reported as yes/no only; the token itself is never read into the report.
    """
    from huggingface_hub import constants, get_token

    from .evaluation.results import package_versions

    versions = package_versions()
    for name in ("safetensors", "pydantic", "jinja2"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = None
    return {
        "platform": platform.platform(),
        "machine": machine_description(),
        "packages": versions,
        "hub": {
            "endpoint": constants.ENDPOINT,
            "offline": bool(constants.HF_HUB_OFFLINE),
            "cache": constants.HF_HUB_CACHE,
            "token_configured": get_token() is not None,
        },
    }

