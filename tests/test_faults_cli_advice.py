"""The CLI gives the command's advice, never the Python API's: the flag (for `run`, the recipe field) that fixes a
refused value, with none of the library's keyword spellings (``num_samples``, ``overwrite=True``, ``token=``) in the
error line.
"""

from __future__ import annotations

import pytest

from tests.helpers.cli_faults import (
    RUN_RECIPE,
    AdviceCliFault,
    calibration_file,
    check_row,
    copy_run,
    nothing_written,
    out_only,
    prune_data_file,
    prune_tiny,
    recipe_file,
    run_recipe_setup,
    write,
)
from tests.helpers.fault_catalogue import CliFault, check_cli_fault, error_lines, ids

pytestmark = pytest.mark.usefixtures("untrained_tiny_cli")

ROWS: list[CliFault] = [
    # --- CLI advice, not Python advice: the flag (or for `run`, the recipe field), never the API's keyword
    AdviceCliFault(
        id="prune-calibration-too-short-names-the-flags",
        setup=calibration_file("calib.txt", b"the cat sees a dog .\n" * 3),
        argv=prune_data_file,
        words=["calib.txt", "--num-samples 8 x --seq-len 32 needs 256", "lower --num-samples / --seq-len"],
        on_disk=nothing_written,
        absent=("num_samples", "seq_len"),
    ),
    AdviceCliFault(
        id="prune-floor-infeasible-names-the-flags",
        setup=out_only,
        argv=lambda c: [*prune_tiny(c), "--max-layer-sparsity", "0.25"],
        words=["--sparsity 0.5", "relax --max-layer-sparsity / --min-experts-per-layer", "pass --regroup"],
        on_disk=nothing_written,
        absent=("sparsity=", "max_layer_sparsity", "regroup=True"),
    ),
    AdviceCliFault(
        id="dry-run-floor-infeasible-names-the-recipe-fields",
        setup=recipe_file({**RUN_RECIPE,
                            "pruning": {**RUN_RECIPE["pruning"], "floors": {"max_layer_sparsity": 0.25}}}),
        argv=lambda c: ["run", str(c["recipe"]), "--dry-run"],
        words=["pruning.sparsity: 0.5",
               "relax pruning.floors.max_layer_sparsity / pruning.floors.min_experts_per_layer",
               "set pruning.floors.regroup: true in the recipe"],
        absent=("sparsity=", "regroup=True"),
    ),
    AdviceCliFault(
        id="run-overwrite-of-a-non-checkpoint-names-the-flag",
        setup=lambda tmp: {**run_recipe_setup(tmp), "out": write(tmp / "data" / "table.csv", "a,b\n").parent},
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"]), "--overwrite"],
        words=["does not look like a checkpoint folder, so --overwrite will not replace it", "table.csv"],
        on_disk=lambda c: (c["out"] / "table.csv").read_text() == "a,b\n" or pytest.fail("table.csv changed"),
        absent=("overwrite=True",),
    ),
    AdviceCliFault(
        id="run-recipe-typo-did-you-mean-with-its-line",
        setup=recipe_file(b"model:\n  id: diep-hub/tiny-mixtral\npruning:\n  sparsity: 0.5\n  serach:\n    lr: 0.1\n"),
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"])],
        words=["pruning.serach: unknown key -> did you mean 'search'? allowed keys: method, sparsity", "(line 5)"],
        on_disk=nothing_written,
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_cli_fault(row, request, tmp_path, monkeypatch):
    check_row(row, request, tmp_path, monkeypatch)


def test_push_without_a_token_names_the_flag(run_folder, hub_server, tmp_path, monkeypatch):
    """No token anywhere: the one line says HF_TOKEN, `hf auth login` or --token, never the API's token=..."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    row = AdviceCliFault(
        id="push-without-a-token",
        setup=lambda tmp: {"folder": copy_run(tmp)},
        argv=lambda c: ["push", f"{hub_server.user}/tiny-no-token", str(c["folder"])],
        words=["no Hugging Face token found", "set HF_TOKEN", "`hf auth login`", "pass --token TOKEN"],
        absent=("token=",),
    )
    line = error_lines(check_cli_fault(row, tmp_path, monkeypatch).stderr)[0]
    assert "token=" not in line
    assert hub_server.requests == []


@pytest.mark.parametrize(("command", "expected"), [
    ("prune", "give a local file instead: --data-file FILE (.json, .jsonl, .parquet or .txt)"),
    ("run", "give a local file instead: the recipe's path key (pruning.calibration.path, evaluation.perplexity.path; "
            ".json, .jsonl, .parquet or .txt)"),
])
def test_local_data_advice_is_a_flag_not_a_function_call(command, expected):
    """The calibration loader's Python advice (``load_calibration_data(...)``) becomes --data-file / the recipe key."""
    from diep_hub.calibration_sources import LOCAL_DATA_HINT
    from diep_hub.cli.advice import cli_message

    head = "calibration source 'someone/text' cannot be read offline; "
    assert cli_message(head + LOCAL_DATA_HINT, {"command": command}) == head + expected


def test_run_names_the_flag_that_overrode_a_recipe_field():
    """`run --output DIR`: a message about output.dir names --output; without the flag, the recipe field stays."""
    from diep_hub.cli.advice import cli_message

    message = "output.dir: 'x' -> a folder path; publish.repo_id: 'a b' -> namespace/name"
    assert cli_message(message, {"command": "run", "output": "x", "repo_id": "a b"}) == (
        "--output: 'x' -> a folder path; --repo-id: 'a b' -> namespace/name")
    assert cli_message(message, {"command": "run", "output": None, "repo_id": None}) == message
