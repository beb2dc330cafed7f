"""`diep-hub --version` and `diep-hub env`: the two things a bug report starts with."""

from __future__ import annotations

import json
import platform
from importlib.metadata import version

import torch

import diep_hub
from tests.helpers.fault_catalogue import run_cli

SECRET = "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123"


def test_version_prints_the_package_version(monkeypatch):
    result = run_cli(["--version"], monkeypatch)
    assert result.code == 0
    assert result.stdout.strip() == f"diep-hub {diep_hub.__version__}"


def test_env_json_reports_installed_versions_and_hub_settings_without_the_token(monkeypatch):
    monkeypatch.setenv("HF_TOKEN", SECRET)
    result = run_cli(["env", "--json"], monkeypatch)
    assert result.code == 0, result.stderr
    report = json.loads(result.stdout)
    packages = report["packages"]
    assert packages["python"] == platform.python_version()
    assert packages["diep_hub"] == version("diep_hub")
    assert packages["torch"] == torch.__version__
    assert packages["transformers"] == version("transformers")
    assert packages["huggingface_hub"] == version("huggingface_hub")
    assert report["hub"]["offline"] is True  # the test session runs with HF_HUB_OFFLINE=1
    assert report["hub"]["token_configured"] is True
    assert platform.machine() in report["machine"]
    assert SECRET not in result.stdout + result.stderr


def test_env_text_says_no_token_when_none_is_configured(monkeypatch, tmp_path):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_TOKEN_PATH", str(tmp_path / "no-token"))
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    result = run_cli(["env"], monkeypatch)
    assert result.code == 0, result.stderr
    lines = dict(line.strip().split(": ", 1) for line in result.stdout.splitlines() if ": " in line)
    assert lines["token configured"] == "no"
    assert lines["transformers"] == version("transformers")
    assert lines["offline"] == "yes"
