"""The CLI's error boundary for bad inputs: a model that is not a supported MoE, an infeasible sparsity (the dry
run refuses as the run would), recipes, calibration files, weights and checkpoint metadata that cannot be read.
Each is one stderr line, exit code 2, naming the file or value and what is allowed (tests/helpers/cli_faults.py
runs the rows; the catalogue's other parts are test_faults_cli_outputs.py, _advice.py and _exits.py).
"""

from __future__ import annotations

import gzip

import pytest

from tests.helpers.cli_faults import (
    BAD_YAML,
    CORRUPT_JSON,
    FAMILIES,
    OUT,
    RUN_RECIPE,
    calibration_file,
    check_row,
    damaged,
    folder_argv,
    model_folder,
    nothing_written,
    out_only,
    pickle_only,
    prune_data_file,
    prune_tiny,
    recipe_file,
    truncated,
    unchanged,
    write,
)
from tests.helpers.fault_catalogue import CliFault, ids

pytestmark = pytest.mark.usefixtures("untrained_tiny_cli")

ROWS: list[CliFault] = [
    # --- a model transformers does not know, or that is not a Mixture-of-Experts family
    CliFault(
        id="prune-unknown-model-type",
        setup=model_folder({"model_type": "foo_moe", "hidden_size": 8}),
        argv=lambda c: ["prune", str(c["folder"]), "--output", str(c["out"])],
        words=["folder", "model_type 'foo_moe'", "supported", *FAMILIES, "does not know this model_type"],
        on_disk=nothing_written,
    ),
    CliFault(
        id="dry-run-unknown-model-type",
        setup=model_folder({"model_type": "foo_moe", "hidden_size": 8}),
        argv=lambda c: ["run", str(c["recipe"]), "--dry-run"],
        words=["folder", "model_type 'foo_moe'", "supported", *FAMILIES, "does not know this model_type"],
    ),
    CliFault(
        id="prune-dense-model",
        setup=model_folder({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                             "num_attention_heads": 1, "intermediate_size": 16, "vocab_size": 32}),
        argv=lambda c: ["prune", str(c["folder"]), "--output", str(c["out"])],
        words=["folder", "model_type 'llama'", "dense", *FAMILIES],
        on_disk=nothing_written,
    ),
    CliFault(
        id="prune-model-config-not-json",
        setup=model_folder('{"model_type": "mixtral", "hidden_size": '),
        argv=lambda c: ["prune", str(c["folder"]), "--output", str(c["out"])],
        words=["config.json", "not valid JSON", "line 1, column"],
        on_disk=nothing_written,
    ),
    CliFault(
        id="eval-folder-without-config",
        setup=lambda tmp: {"folder": write(tmp / "model" / "notes.txt", "no config here").parent},
        argv=lambda c: ["eval", str(c["folder"])],
        words=["folder", "model", "has no config.json", "Hub repo id"],
    ),
    CliFault(
        id="prune-model-path-that-does-not-exist",
        setup=lambda tmp: {"folder": tmp / "no-such-model", "out": tmp / OUT},
        argv=lambda c: ["prune", str(c["folder"]), "--output", str(c["out"])],
        words=["no-such-model", "not a folder on this machine, nor a Hub repo id"],
        on_disk=nothing_written,
    ),
    # --- the dry run refuses what the run would refuse, in the words of the command: the recipe field for `run`,
    # the flag for `prune` (the library says sparsity=0.9, the Python keyword)
    CliFault(
        id="dry-run-infeasible-sparsity",
        setup=recipe_file({**RUN_RECIPE, "pruning": {**RUN_RECIPE["pruning"], "sparsity": 0.9}}),
        argv=lambda c: ["run", str(c["recipe"]), "--dry-run"],
        words=["pruning.sparsity: 0.9 cannot be reached", "largest feasible sparsity is 0.7500", "top-k 2"],
    ),
    CliFault(
        id="prune-infeasible-sparsity",  # the same words as the dry run above, with the flag
        setup=out_only,
        argv=lambda c: [*prune_tiny(c), "--sparsity", "0.9"],
        words=["--sparsity 0.9 cannot be reached", "largest feasible sparsity is 0.7500", "top-k 2"],
        on_disk=nothing_written,
    ),
    # --- recipes (recipe.py converts these)
    CliFault(
        id="run-recipe-not-utf8",
        setup=recipe_file(b"# caf\xe9 recipe\nmodel:\n  id: diep-hub/tiny-mixtral\n"),
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"])],
        words=["recipe.yaml", "UTF-8", "line 1"],
        on_disk=nothing_written,
    ),
    CliFault(
        id="run-recipe-bad-yaml",
        setup=recipe_file(BAD_YAML),
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"])],
        words=["recipe.yaml", "line 3"],
        on_disk=nothing_written,
    ),
    CliFault(
        id="run-recipe-two-problems-on-one-line",
        setup=recipe_file({"model": {"id": "a/b", "dtype": "int3"}, "pruning": {"sparsity": 7}}),
        argv=lambda c: ["run", str(c["recipe"])],
        words=["2 problem(s)", "model.dtype: 'int3'", "pruning.sparsity: 7"],
    ),
    # --- calibration files (calibration.py converts these)
    CliFault(
        id="prune-calibration-empty",
        setup=calibration_file("calib.jsonl", b""),
        argv=prune_data_file,
        words=["calib.jsonl", "empty"],
        on_disk=nothing_written,
    ),
    CliFault(
        id="prune-calibration-latin1",
        setup=calibration_file("calib.txt", "the caf\u00e9 sees a dog .\n".encode("latin-1") * 40),
        argv=prune_data_file,
        words=["calib.txt", "not UTF-8", "line 1"],
        on_disk=nothing_written,
    ),
    CliFault(
        id="prune-calibration-corrupt-gzip",
        setup=calibration_file("calib.jsonl.gz", gzip.compress(b'{"text": "a dog ."}\n' * 400)[:60]),
        argv=prune_data_file,
        words=["calib.jsonl.gz", "gzip"],
        on_disk=nothing_written,
    ),
    CliFault(
        id="prune-calibration-malformed-jsonl",
        setup=calibration_file("calib.jsonl", b'{"text": "a dog ."}\n{"text": "a cat\n'),
        argv=prune_data_file,
        words=["calib.jsonl", "line 2", "not valid JSON"],
        on_disk=nothing_written,
    ),
    # --- weights `eval` cannot read
    CliFault(
        id="eval-truncated-safetensors",
        setup=truncated("model.safetensors"),
        argv=lambda c: ["eval", str(c["folder"])],
        words=["model.safetensors", "truncated or corrupt"],
    ),
    *[
        CliFault(
            id=f"eval-pickle-{name}",
            setup=pickle_only(kind),
            argv=lambda c: ["eval", str(c["folder"])],
            words=["pytorch_model.bin", *words],
        )
        for name, kind, words in (
            ("with-python-objects", "objects", ["Python objects", "weights_only", "safetensors"]),
            ("garbage", "garbage", ["truncated or corrupt"]),
            ("truncated-zip", "truncated", ["truncated or corrupt"]),
        )
    ],
    # --- damaged metadata of a checkpoint folder, for every command that reads it
    *[
        CliFault(
            id=f"{command}-corrupt-{name.split('.')[0]}",
            setup=damaged(name, content),
            argv=folder_argv(command),
            words=[name, "line", "column"],
            on_disk=unchanged,
        )
        for command in ("inspect", "push", "reproduce")
        for name, content in (("config.json", CORRUPT_JSON), ("pruning_report.json", b'{"method": "frequency",'),
                              ("recipe.yaml", BAD_YAML))
    ],
    CliFault(
        id="inspect-recipe-not-a-mapping",
        setup=damaged("recipe.yaml", b"- just\n- a list\n"),
        argv=lambda c: ["inspect", str(c["folder"])],
        words=["recipe.yaml", "YAML list", "expected a mapping"],
    ),
    CliFault(
        id="push-config-not-utf8",
        setup=damaged("config.json", b'{"model_type": "caf\xe9"}'),
        argv=lambda c: ["push", c["repo"], str(c["folder"])],
        words=["config.json", "not UTF-8"],
    ),
]


@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_cli_fault(row, request, tmp_path, monkeypatch):
    check_row(row, request, tmp_path, monkeypatch)
