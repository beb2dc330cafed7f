"""What a Hub user meets in a saved checkpoint (issue 14, points 4 and 5).

One `run` of the tiny recipe (evaluation off: the snippets and records do not depend on it) saves a pruned folder
with its card. Every ```python block of that card is executed as written, in a fresh process, against the folder
(the repo id replaced by its path), offline and with stdin closed, so that a prompt for remote code cannot be
answered; each must load a model with the experts per layer the report records and generate token ids without a
FutureWarning. The saved files must record names (the Hub id, the corpus name), never a path of this machine, and
agree with each other and with the model about skipping, the output folder and the base model.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from diep_hub.checkpoint.inspect import inspect_checkpoint
from diep_hub.checkpoint.layout import CARD_FILE, CONFIG_FILE, PRUNER_CONFIG_FILE, RECIPE_FILE, REPORT_FILE
from diep_hub.checkpoint.report import PruningReport
from diep_hub.recipe import load_recipe
from diep_hub.runner import run_recipe
from diep_hub.tiny import TINY_TEXT_ID

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"
REPO_ID = "test-user/tiny-mixtral-diep-50"
BASE_MODEL = "diep-hub/tiny-mixtral"  # the recipe's model.id
PROMPT = "1 2 3"
NEW_TOKENS = 4
RECORD_FILES = (CONFIG_FILE, REPORT_FILE, PRUNER_CONFIG_FILE)
REMOTE_CODE_PROMPT = "Do you wish to run the custom code"
RESULT = "SNIPPET-RESULT "

pytestmark = pytest.mark.slow  # one pruning run (about 2 minutes on 2 cores) and a fresh interpreter per snippet

# Appended to each snippet: what the snippet's `model` (and `tokenizer`, when it defines one) do.
PROBE = f"""

import json as _json
import sys as _sys
import warnings as _warnings

import torch as _torch

_tok = globals().get("tokenizer")
_ids = _tok({PROMPT!r}, return_tensors="pt").input_ids if _tok is not None else _torch.tensor([[1, 5, 6, 7]])
_skippers = [m.diep_skipping for m in model.modules() if "diep_skipping" in m.__dict__]
with _warnings.catch_warnings(record=True) as _caught:
    _warnings.simplefilter("always")
    with _torch.no_grad():
        _out = model.eval().generate(_ids, max_new_tokens={NEW_TOKENS}, min_new_tokens={NEW_TOKENS}, do_sample=False)
print({RESULT!r} + _json.dumps({{
    "module": type(model).__module__,
    "tokenizer": type(_tok).__name__ if _tok is not None else None,
    "experts": [layer.mlp.experts.gate_up_proj.shape[0] for layer in model.model.layers],
    "skipping_layers": len(_skippers),
    "skipped": sum(int(s.skipped) for s in _skippers),
    "prompt": _ids.tolist(),
    "generated": _out.tolist(),
    "warnings": [f"{{w.category.__name__}}: {{w.message}}" for w in _caught
                 if issubclass(w.category, (FutureWarning, DeprecationWarning))],
    "diep_hub_imported": any(name.startswith("diep_hub") for name in _sys.modules),
}}))
"""


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """`diep-hub run recipes/tiny.yaml --output DIR --repo-id REPO_ID` (evaluation off), its cache in tmp."""
    root = tmp_path_factory.mktemp("card-snippets")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("DIEP_HUB_CACHE", str(root / "cache"))
        recipe = load_recipe(TINY)
        recipe.evaluation.enabled = False
        out = root / "published"
        summary = run_recipe(recipe, output_dir=out, repo_id=REPO_ID)
    return root, out, summary


def python_blocks(card: str) -> list[str]:
    return re.findall(r"^```python\n(.*?)^```", card, flags=re.M | re.S)


def run_snippet(code: str, cwd: Path) -> tuple[subprocess.CompletedProcess, dict | None]:
    """``code`` in a fresh, offline interpreter that cannot answer a prompt (stdin closed)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": ""}
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, stdin=subprocess.DEVNULL,
                          capture_output=True, text=True, timeout=600)
    lines = [line for line in proc.stdout.splitlines() if line.startswith(RESULT)]
    return proc, json.loads(lines[-1][len(RESULT):]) if lines else None


def test_the_card_has_load_snippets_naming_the_repo(run):
    _, out, _ = run
    blocks = python_blocks((out / CARD_FILE).read_text())
    assert len(blocks) >= 2, blocks  # with remote code, and with diep_hub installed
    assert all(REPO_ID in block for block in blocks), blocks


@pytest.mark.parametrize("index", [0, 1])
def test_every_python_snippet_of_the_card_runs_as_written(run, index):
    root, out, _ = run
    blocks = python_blocks((out / CARD_FILE).read_text())
    code = blocks[index].replace(REPO_ID, str(out))
    proc, result = run_snippet(code + PROBE, cwd=root)
    output = proc.stdout + proc.stderr
    assert REMOTE_CODE_PROMPT not in output, f"snippet {index} asks for remote code:\n{blocks[index]}"
    assert proc.returncode == 0 and result is not None, f"snippet {index}:\n{blocks[index]}\n{proc.stderr[-3000:]}"

    report = PruningReport.load(out)
    config = json.loads((out / CONFIG_FILE).read_text())
    assert result["experts"] == list(report.per_layer_kept.values()) == config["num_experts_per_layer"]
    assert result["skipping_layers"] == len(config["diep_skipping"]["layers"]) == len(report.skipping["layers"])
    assert result["warnings"] == []
    prompt, generated = result["prompt"], result["generated"]
    assert all(isinstance(t, int) for row in generated for t in row)
    assert [row[: len(prompt[0])] for row in generated] == prompt
    assert [len(row) for row in generated] == [len(prompt[0]) + NEW_TOKENS]
    if "import diep_hub" in blocks[index]:
        assert result["module"].startswith("diep_hub.modeling")
    else:  # the remote code shipped in the folder, with no diep_hub in the process
        assert result["module"].startswith("transformers_modules") and result["diep_hub_imported"] is False
    if "AutoTokenizer" in blocks[index]:
        assert result["tokenizer"] is not None


def test_saved_records_name_sources_never_local_paths(run):
    root, out, _ = run
    forbidden = {"home": str(Path.home()) + os.sep, "tmp": str(root), "cache": os.fspath(root / "cache")}
    for name in RECORD_FILES:
        text = (out / name).read_text()
        for what, path in forbidden.items():
            assert path not in text, f"{name} holds a {what} path {path!r}"
    config = json.loads((out / CONFIG_FILE).read_text())
    settings = json.loads((out / PRUNER_CONFIG_FILE).read_text())
    report = PruningReport.load(out)
    assert settings["dataset"] == report.pruner_config["dataset"] == TINY_TEXT_ID
    assert report.calibration.dataset == config["diep_pruning"]["calibration"]["dataset"] == TINY_TEXT_ID


def test_skipping_is_recorded_as_the_model_has_it(run):
    _, out, _ = run
    config = json.loads((out / CONFIG_FILE).read_text())
    settings = json.loads((out / PRUNER_CONFIG_FILE).read_text())
    report = PruningReport.load(out)
    assert config["diep_skipping"]["enabled"] is True  # the recipe's skipping section enables it
    assert settings["skipping"] is True and report.pruner_config["skipping"] is True
    assert inspect_checkpoint(out)["skipping"] is True


def test_saved_recipe_records_the_output_folder_it_was_written_to(run):
    _, out, summary = run
    recipe = yaml.safe_load((out / RECIPE_FILE).read_text())
    assert recipe["output"]["dir"] == str(out) == summary["output_dir"]


def test_inspect_and_card_name_the_same_base_model(run):
    _, out, _ = run
    report = PruningReport.load(out)
    card = (out / CARD_FILE).read_text()
    assert report.base_model == BASE_MODEL
    assert inspect_checkpoint(out)["base_model"] == report.base_model
    assert json.loads((out / CONFIG_FILE).read_text())["diep_pruning"]["base_model"] == report.base_model
    assert report.base_model in card and "base model is not recorded" not in card
