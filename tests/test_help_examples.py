"""Every example in `diep-hub --help` and the subcommands' help runs as written (issue 14, point 9).

The examples are taken from the epilogs themselves and run in order, in a scratch working directory holding a copy
of recipes/, against the local fake Hub (``my-user`` and ``my-org`` stand for its test user). An example needs one
of two outcomes:
- it succeeds (exit 0): everything that only needs the offline tiny model, its folder and the Hub;
- it names something that does not exist offline (a real model of the Hub, a folder the reader would have made):
  then it must fail the way a user is told it fails, one ``diep-hub CMD: error:`` line and exit 2, no traceback.
The second list is written below with the reason for each entry, so a new example that errors fails this test.
"""

from __future__ import annotations

import json
import re
import shutil

import pytest

from tests.helpers.console import ROOT, help_examples
from tests.helpers.fault_catalogue import error_lines, run_cli

# Substrings of examples that need what no offline machine has; each must fail with a one-line message.
NEEDS_WHAT_IS_NOT_HERE = {
    "mistralai/": "a real model on the Hub",
    "recipes/mixtral-8x7b": "its recipe names a real model on the Hub (no shipped config)",
    "recipes/olmoe-1b-7b": "its recipe names a real model on the Hub (no shipped config)",
    "out/my-model": "a folder the reader prunes first",
    "out/mixtral": "a folder the reader prunes first",
}


@pytest.mark.slow
def test_every_help_example_runs(hub_server, tmp_path, monkeypatch):
    from huggingface_hub import constants

    work = tmp_path / "work"
    work.mkdir()
    shutil.copytree(ROOT / "recipes", work / "recipes")
    monkeypatch.chdir(work)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setenv("HF_TOKEN", hub_server.token)

    examples = help_examples()
    assert len(examples) >= 15
    outcomes = {}
    for argv in examples:
        argv = [re.sub(r"^my-(user|org)/", f"{hub_server.user}/", a) for a in argv]
        command = " ".join(argv)
        result = run_cli(argv)
        expected_failure = next((why for key, why in NEEDS_WHAT_IS_NOT_HERE.items() if key in command), None)
        assert "Traceback" not in result.stderr, f"{command}: traceback\n{result.stderr[-3000:]}"
        if expected_failure is None:
            assert result.code == 0, f"{command}: exit {result.code}\n{result.stderr[-3000:]}"
        else:
            lines = error_lines(result.stderr)
            assert result.code == 2 and len(lines) == 1, f"{command} ({expected_failure}):\n{result.stderr[-3000:]}"
            assert lines[0].startswith(f"diep-hub {argv[0]}: error: "), lines
        outcomes[command] = (result.code, result.stdout)

    # what the successful examples produced, read back
    kept = json.loads((work / "out" / "tiny" / "config.json").read_text())["num_experts_per_layer"]
    assert sum(kept) == 16  # 50% of 4 layers x 8 experts
    inspected = json.loads(outcomes[f"inspect {hub_server.user}/tiny-mixtral-diep-50 --json"][1])
    assert inspected["source"] == f"{hub_server.user}/tiny-mixtral-diep-50"
    assert hub_server.user + "/tiny-mixtral-diep-50" in hub_server.repos
    reproduced = json.loads(outcomes[f"reproduce {hub_server.user}/tiny-mixtral-diep-50 --json"][1])
    assert reproduced["match"] is True
    assert sum(code == 0 for code, _ in outcomes.values()) >= 12
