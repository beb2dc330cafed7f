# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Fixtures of the vLLM tests: checkpoints made by diep_hub in the main environment, engines made in-process.

Set ``DIEP_VLLM_FIXTURES`` to a folder written by make_checkpoints.py (ci.sh does), or ``DIEP_MAIN_PYTHON`` to the
main environment's python (with diep_hub installed) to have them made here, once per session.
"""

from __future__ import annotations

import contextlib
import gc
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# In-process engine, small KV cache: seconds per engine instead of tens (../shared/docs/vllm-serving.md).
os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


HERE = Path(__file__).parent


@pytest.fixture(scope="session")
def fixtures_dir(tmp_path_factory) -> Path:
    given = os.environ.get("DIEP_VLLM_FIXTURES")
    if given:
        folder = Path(given)
        if not (folder / "manifest.json").is_file():
            pytest.fail(f"DIEP_VLLM_FIXTURES={given} holds no manifest.json; run make_checkpoints.py into it")
        return folder
    python = os.environ.get("DIEP_MAIN_PYTHON")
    if not python:
        pytest.fail("set DIEP_VLLM_FIXTURES (a make_checkpoints.py folder) or DIEP_MAIN_PYTHON (python with diep_hub)")
    folder = tmp_path_factory.mktemp("diep_vllm_fixtures")
    subprocess.run([python, str(HERE / "make_checkpoints.py"), str(folder)], check=True)
    return folder


@pytest.fixture(scope="session")
def manifest(fixtures_dir) -> dict:
    return json.loads((fixtures_dir / "manifest.json").read_text())


def reference(fixtures_dir: Path, name: str) -> dict:
    return json.loads((fixtures_dir / "references" / f"{name}.json").read_text())


@contextlib.contextmanager
def engine(path, **overrides):
    """An in-process vLLM engine with the small settings of vllm-serving.md, released afterwards."""
    from vllm import LLM

    kwargs = dict(
        model=str(path), trust_remote_code=True, dtype="float32", enforce_eager=True, max_model_len=256,
        distributed_executor_backend="uni", skip_tokenizer_init=True, seed=0,
    )
    kwargs.update(overrides)
    llm = LLM(**kwargs)
    try:
        yield llm
    finally:
        del llm
        gc.collect()


sys.path.insert(0, str(HERE))
