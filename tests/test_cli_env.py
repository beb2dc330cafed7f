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


CACHE_SCRIPT = "from diep_hub.hub import cache_folder; print(cache_folder('offline-text'))"


def test_the_cache_follows_hf_home_and_xdg_cache_home(tmp_path):
    """diep_hub's cache lies where huggingface_hub puts its own: HF_HOME, else XDG_CACHE_HOME/huggingface (its
    assets cache for libraries); DIEP_HUB_CACHE still wins. Fresh processes: huggingface_hub reads them at import."""
    import os
    import subprocess
    import sys

    base = {k: v for k, v in os.environ.items()
            if k not in ("DIEP_HUB_CACHE", "HF_HOME", "XDG_CACHE_HOME", "HF_ASSETS_CACHE")}

    def folder(**env: str) -> str:
        proc = subprocess.run([sys.executable, "-c", CACHE_SCRIPT], env={**base, **env}, capture_output=True,
                              text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return proc.stdout.strip()

    hf_home, xdg, own = tmp_path / "hf-home", tmp_path / "xdg", tmp_path / "own"
    assert folder(HF_HOME=str(hf_home)) == str(hf_home / "assets" / "diep_hub" / "offline-text")
    assert folder(XDG_CACHE_HOME=str(xdg)) == str(xdg / "huggingface" / "assets" / "diep_hub" / "offline-text")
    assert folder(HF_HOME=str(hf_home), DIEP_HUB_CACHE=str(own)) == str(own / "offline-text")
    assert (hf_home / "assets" / "diep_hub" / "offline-text").is_dir()


def test_progress_bars_go_through_huggingface_hub_so_its_switch_turns_them_off(tmp_path):
    """`HF_HUB_DISABLE_PROGRESS_BARS=1` silences diep_hub's bars as it silences `hf`'s: every module that draws one
    uses huggingface_hub's tqdm (the zoo's training loop, zoo/loop.py, too). Checked on the source, then on a real
    bar in a fresh process."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    package = Path(diep_hub.__file__).parent
    plain = [str(p.relative_to(package)) for p in package.rglob("*.py")
             if re.search(r"^\s*from tqdm(\.auto)? import", p.read_text(encoding="utf-8"), re.MULTILINE)]
    assert plain == []
    users = sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                   if "from huggingface_hub.utils import tqdm" in p.read_text(encoding="utf-8"))
    assert {"calibration.py", "skipping.py", "criteria/diep.py", "criteria/removal.py", "zoo/loop.py"} <= set(users)

    script = ("from diep_hub.calibration import tqdm\n"
              "for _ in tqdm(range(3), desc='calibration-bar', mininterval=0): pass\n")
    for disabled, expect_bar in (("1", False), ("0", True)):
        env = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "HF_HUB_OFFLINE": "1",
               "HF_HUB_DISABLE_PROGRESS_BARS": disabled}
        done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=300)
        assert done.returncode == 0, done.stderr
        assert ("calibration-bar" in done.stderr) is expect_bar, done.stderr
