"""The exit codes around the CLI's one-line errors: a bug is still one line and says so, ``-v`` adds the traceback,
Ctrl-C is 130, a reproduction that ran and differs is 1; preflight refuses before any weights load, the run's
inputs are listed, and log records and progress bars never look like the error line.
"""

from __future__ import annotations

import json
import sys
import types

import pytest
import yaml

from diep_hub.errors import ConfigError
from diep_hub.tiny import TINY_MODEL_ID
from tests.helpers.cli_faults import CORRUPT_JSON, RUN_RECIPE, PatchedCliFault, boom, check_row, copy_run
from tests.helpers.fault_catalogue import CliFault, error_lines, ids, run_cli

pytestmark = pytest.mark.usefixtures("untrained_tiny_cli")

ROWS: list[CliFault] = [
    # --- not an expected error: a bug is still one line, and says so
    PatchedCliFault(
        id="bug-is-one-line-and-says-so",
        setup=lambda tmp: {"folder": tmp},
        argv=lambda c: ["inspect", str(c["folder"])],
        words=["unexpected ZeroDivisionError: boom", "this is a bug", "run with -v"],
        patch=lambda mp, tmp: mp.setattr("diep_hub.checkpoint.inspect.inspect_checkpoint", boom),
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_cli_fault(row, request, tmp_path, monkeypatch):
    check_row(row, request, tmp_path, monkeypatch)


def test_verbose_adds_the_traceback_after_the_one_line(run_folder, tmp_path):
    folder = copy_run(tmp_path)
    (folder / "config.json").write_bytes(CORRUPT_JSON)
    quiet = run_cli(["inspect", str(folder)])
    loud = run_cli(["inspect", str(folder), "-v"])
    assert quiet.code == loud.code == 2
    line = f"diep-hub inspect: error: config.json {folder / 'config.json'} is not valid JSON"
    assert error_lines(quiet.stderr)[0].startswith(line) and "Traceback" not in quiet.stderr
    lines = error_lines(loud.stderr)
    assert lines[0] == error_lines(quiet.stderr)[0]
    assert lines[1] == "Traceback (most recent call last):"
    assert lines[-1].startswith("diep_hub.errors.CorruptFileError: config.json ")
    assert 'in read_checkpoint_metadata' in loud.stderr  # where it was raised, for a bug report


def test_verbose_traceback_of_a_bug(monkeypatch, tmp_path):
    monkeypatch.setattr("diep_hub.checkpoint.inspect.inspect_checkpoint", boom)
    result = run_cli(["-v", "inspect", str(tmp_path)])
    assert result.code == 2
    lines = error_lines(result.stderr)
    assert lines[0] == ("diep-hub inspect: error: unexpected ZeroDivisionError: boom; this is a bug: run with -v for "
                        "the traceback and report it")
    assert "Traceback (most recent call last):" in lines and lines[-1] == "ZeroDivisionError: boom"


def test_ctrl_c_exits_130_without_a_traceback(monkeypatch, tmp_path):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr("diep_hub.checkpoint.inspect.inspect_checkpoint", interrupted)
    result = run_cli(["inspect", str(tmp_path)])
    assert (result.code, result.stderr) == (130, "diep-hub inspect: interrupted\n")


def test_reproduce_mismatch_still_exits_1(run_folder, tmp_path):
    """A reproduction that ran and found a difference is exit 1 with the report on stdout, not an error line."""
    from safetensors.torch import load_file, save_file

    folder = copy_run(tmp_path)
    tensors = load_file(str(folder / "model.safetensors"))
    name = next(n for n in sorted(tensors) if "experts" in n)
    tensors[name] = tensors[name] + 0.5
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    result = run_cli(["reproduce", str(folder), "--no-eval", "--json"])
    assert result.code == 1, result.stderr[-3000:]
    assert not [line for line in result.stderr.split("\n") if line.startswith("diep-hub ")], result.stderr
    report = json.loads(result.stdout)
    assert report["match"] is False
    assert report["checks"]["kept_experts"]["match"] is True
    assert [d["tensor"] for d in report["checks"]["weights"]["differences"]] == [name]


def test_preflight_runs_after_the_config_and_before_any_weights(monkeypatch, tmp_path):
    """run and the dry run hand the recipe and the model's config to preflight.check_run_inputs before weights
    load; its refusal is the command's one error line."""
    import diep_hub.model_loading

    calls = []

    def check_run_inputs(recipe, model_config=None):
        calls.append((recipe.model.id, type(model_config).__name__, model_config.num_local_experts))
        raise ConfigError("evaluation.tasks: 'no_such_task' -> a task lm-eval knows")

    def no_weights(recipe):
        raise AssertionError("weights must not load when preflight refuses the run")

    import diep_hub.preflight

    real = diep_hub.preflight
    monkeypatch.setitem(sys.modules, "diep_hub.preflight",  # the dry run's variant refuses the same way
                        types.SimpleNamespace(check_run_inputs=check_run_inputs, check_dry_run_inputs=check_run_inputs,
                                              check_model_reachable=real.check_model_reachable))
    monkeypatch.setattr(diep_hub.model_loading, "load_model", no_weights)
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RUN_RECIPE))
    for argv in (["run", str(recipe), "--output", str(tmp_path / "out")], ["run", str(recipe), "--dry-run"]):
        result = run_cli(argv)
        assert result.code == 2
        assert error_lines(result.stderr) == [
            "diep-hub run: error: evaluation.tasks: 'no_such_task' -> a task lm-eval knows"
        ]
    assert calls == [(TINY_MODEL_ID, "MixtralConfig", 8)] * 2
    assert not (tmp_path / "out").exists()


def test_run_inputs_lists_every_local_file_the_run_reads(tmp_path):
    from diep_hub.recipe import Recipe
    from diep_hub.runner import run_inputs

    (tmp_path / "model").mkdir()
    data = {
        "model": {"id": str(tmp_path / "model")},
        "pruning": {"calibration": {"path": "data/calib.jsonl"}},
        "evaluation": {"include_path": "tasks", "perplexity": {"path": str(tmp_path / "ppl.txt")}},
    }
    recipe = Recipe.from_dict(data, source="r.yaml", base_dir=tmp_path / "recipes")
    assert run_inputs(recipe, tmp_path / "recipes" / "r.yaml") == [
        tmp_path / "recipes" / "r.yaml",
        tmp_path / "model",
        tmp_path / "recipes" / "data" / "calib.jsonl",
        tmp_path / "ppl.txt",
        tmp_path / "recipes" / "tasks",
    ]
    hub = Recipe.from_dict({"model": {"id": "org/model"}}, source="r.yaml")
    assert run_inputs(hub, None) == []  # a Hub model and Hub data: nothing local to protect


def test_log_records_are_prefixed_on_every_line(capsys):
    """A multi-line log record (a warning quoting a file, a logged traceback) never looks like an error line."""
    import logging

    from diep_hub.cli import _setup_logging

    _setup_logging(0, False)
    log = logging.getLogger("diep_hub.test")
    log.warning("first line\nsecond line")
    try:
        raise ValueError("inside")
    except ValueError:
        log.exception("failed")
    err = capsys.readouterr().err
    assert err.splitlines()[:2] == ["WARNING diep_hub.test: first line", "WARNING diep_hub.test: second line"]
    assert all(line.startswith(("WARNING diep_hub.test: ", "ERROR diep_hub.test: ")) for line in err.splitlines())
    assert "ERROR diep_hub.test: ValueError: inside" in err


def test_error_line_starts_its_own_line_after_a_progress_bar(monkeypatch, tmp_path):
    """A bar interrupted mid-line (``\\r``-drawn, no newline) and never closed: the error line still starts a line
    of its own, and the bar is closed before it rather than redrawn after it."""
    from tqdm.auto import tqdm

    from diep_hub.errors import CorruptFileError

    def fails_inside_a_bar(*args, **kwargs):
        for step in tqdm(range(10), desc="scoring", leave=False):
            if step == 3:
                raise CorruptFileError("calibration file x.jsonl line 3 is not valid JSON")

    monkeypatch.setattr("diep_hub.checkpoint.inspect.inspect_checkpoint", fails_inside_a_bar)
    result = run_cli(["inspect", str(tmp_path)])
    assert result.code == 2
    lines = result.stderr.split("\n")
    assert "scoring" in result.stderr and lines[-1] == ""
    assert lines[-2] == "diep-hub inspect: error: calibration file x.jsonl line 3 is not valid JSON"
    assert all("\r" in line for line in lines[:-2] if line), lines  # everything before it is the bar



def test_run_cli_puts_the_library_logger_back(tmp_path):
    """The in-process CLI helper undoes the CLI's terminal logging (own handler, no propagation): the session
    fixture `run_folder` calls it before any test's own fixtures, and a leak there left every later caplog check of
    a library record blind (the test_hub / test_push_guards failures of one CI run)."""
    import logging

    from tests.helpers.fault_catalogue import run_cli

    library = logging.getLogger("diep_hub")
    before = (list(library.handlers), library.level, library.propagate)
    result = run_cli(["inspect", str(tmp_path / "missing")])
    assert result.code == 2 and "missing" in result.stderr  # the CLI did run and configure its logging
    assert (list(library.handlers), library.level, library.propagate) == before
