"""Reload saved checkpoints in a fresh Python process that cannot import diep_hub, as a Hub user would load them.

The process runs in the checkpoints' folder with ``PYTHONPATH`` empty, so the source tree is not importable: what
it computes comes from the saved remote code and weights alone, and ``out["diep_hub_imported"]`` says whether
anything imported diep_hub anyway.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch

_SCRIPT = """
import json, sys, warnings
import torch
from transformers import AutoModelForCausalLM

root, families, ids = sys.argv[1], json.loads(sys.argv[2]), torch.load(sys.argv[3])
out = {{}}
for family in families:
    path = root + "/" + family
    model = AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True).eval()
{per_model}
out["diep_hub_imported"] = any(name.startswith("diep_hub") for name in sys.modules)
torch.save(out, sys.argv[4])
"""


def reload_each_family(
    root: Path, families: list[str], ids: torch.Tensor, per_model: str, env: dict[str, str] | None = None
) -> tuple[dict, str]:
    """Load ``root/<family>`` with ``trust_remote_code`` for each family and run ``per_model`` on it.

    ``per_model`` is code run once a family; it may read ``family``, ``path``, ``model``, ``ids`` (a tensor),
    ``torch``, ``warnings`` and ``AutoModelForCausalLM``, and stores its results in ``out[family]``. Returns
    ``out`` and the process's stderr.
    """
    torch.save(ids, root / "fresh-process-ids.pt")
    script = _SCRIPT.format(per_model=textwrap.indent(textwrap.dedent(per_model).strip("\n"), "    "))
    argv = [str(root), json.dumps(families), str(root / "fresh-process-ids.pt"), str(root / "fresh-process-out.pt")]
    result = subprocess.run(
        [sys.executable, "-c", script, *argv],
        cwd=root,
        env={**os.environ, "PYTHONPATH": "", **(env or {})},
        capture_output=True,
        text=True,
        stdin=subprocess.DEVNULL,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return torch.load(root / "fresh-process-out.pt", weights_only=False), result.stderr
