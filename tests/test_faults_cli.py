"""The CLI's error boundary: every expected failure of a ``diep-hub`` command is one stderr line, exit code 2.

A table of :class:`CliFault` rows (tests/helpers/fault_catalogue.py) run through ``diep_hub.cli.main`` in-process, plus
the exit codes around it: ``-v`` shows the traceback, a bug says it is one, Ctrl-C is 130, and a reproduction that
ran and differs is still 1.

The offline tiny model is built untrained here (``build_offline_model`` patched for the module): the rows test
where failures end, not what pruning finds, and training it would cost seconds a row. A reproduction rebuilds the
same untrained model (seed 0), so it still matches exactly.
"""

from __future__ import annotations

import errno
import gzip
import json
import os
import shutil
import sys
import types
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from diep_hub.errors import ConfigError
from diep_hub.tiny import TINY_MODEL_ID, build_tiny_model
from tests.helpers import hub_server as local_hub
from tests.helpers.fault_catalogue import CliFault, check_cli_fault, error_lines, ids, run_cli

hub_server = local_hub.hub_server  # the local Hub fixture (tests/helpers/hub_server.py)

FAMILIES = ["deepseek_v2", "mixtral", "qwen3_moe"]  # a few of the supported families every message must list

# A small run: untrained tiny model, frequency scoring on 8 x 32 tokens, no evaluation, no skipping.
RUN_RECIPE = {
    "model": {"id": TINY_MODEL_ID, "dtype": "float32"},
    "pruning": {
        "method": "frequency", "sparsity": 0.5, "seed": 0,
        "calibration": {"dataset": "diep-hub/tiny-text", "config": None, "num_samples": 8, "seq_len": 32},
        "search": {"batch_size": 8},
    },
    "skipping": {"enabled": False},
    "evaluation": {"enabled": False},
}
OUT = "diep-out"  # output folder of the rows that prune: a name their messages can be searched for
PRUNE_FAST = ["--method", "frequency", "--num-samples", "8", "--seq-len", "32", "--batch-size", "8"]


@pytest.fixture(autouse=True, scope="module")
def _fast_offline_model_and_private_cache(tmp_path_factory):
    import diep_hub.tiny

    original = diep_hub.tiny.build_offline_model

    def untrained(model_id, *, dtype=torch.float32):
        if model_id != TINY_MODEL_ID:
            return original(model_id, dtype=dtype)
        return build_tiny_model(seed=0, train_steps=0, dtype=dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diep_hub.tiny, "build_offline_model", untrained)
        mp.setenv("DIEP_HUB_CACHE", str(tmp_path_factory.mktemp("diep-hub-cache")))
        yield


_BUILT: dict[str, Path] = {}  # "run": the folder `diep-hub run` wrote for RUN_RECIPE (module fixture below)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, _fast_offline_model_and_private_cache) -> Path:
    """One checkpoint written by `diep-hub run` (weights, config, report, recipe.yaml), copied by each row."""
    root = tmp_path_factory.mktemp("built")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RUN_RECIPE))
    out = root / "run"
    result = run_cli(["run", str(recipe), "--output", str(out), "--json"])
    assert result.code == 0, result.stderr[-3000:]
    assert {"config.json", "model.safetensors", "pruning_report.json", "recipe.yaml"} <= {p.name for p in out.iterdir()}
    _BUILT["run"] = out
    return out


# ------------------------------------------------------------------------------------------------ row helpers
@dataclass(frozen=True)
class PatchedCliFault(CliFault):
    """A row that also needs the process patched while it runs (a full disk, a bug, a working directory).

    ``patch(monkeypatch, tmp_path)`` runs before the row's setup, with the same ``tmp_path``.
    """

    patch: Callable[[pytest.MonkeyPatch, Path], None] | None = None


@dataclass(frozen=True)
class AdviceCliFault(CliFault):
    """A row whose message must give the command's advice (the flag, the recipe field) and never the Python API's:
    none of ``absent`` may be in the error line."""

    absent: tuple[str, ...] = ()


def _copy_run(tmp_path: Path, name: str = "ckpt") -> Path:
    folder = tmp_path / name
    shutil.copytree(_BUILT["run"], folder)
    return folder


def _damaged(file_name: str, content: bytes):
    """Setup: a copy of the run folder with ``file_name`` replaced by ``content``."""

    def setup(tmp_path: Path) -> dict:
        folder = _copy_run(tmp_path)
        (folder / file_name).write_bytes(content)
        return {"folder": folder, "file": folder / file_name, "content": content, "repo": "someone/tiny"}

    return setup


def _folder_argv(command: str) -> Callable[[dict], list[str]]:
    """``diep-hub <command> FOLDER`` (``push REPO_ID FOLDER``, in the order of ``hf upload``)."""
    return lambda c: [command, *([c["repo"]] if command == "push" else []), str(c["folder"])]


def _truncated(file_name: str):
    def setup(tmp_path: Path) -> dict:
        folder = _copy_run(tmp_path)
        file = folder / file_name
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
        return {"folder": folder, "file": file}

    return setup


def _pickle_only(kind: str):
    """Setup: the run folder with its safetensors replaced by a pytorch_model.bin (see ``kind``)."""

    def setup(tmp_path: Path) -> dict:
        from fractions import Fraction

        from safetensors.torch import load_file

        folder = _copy_run(tmp_path)
        tensors = load_file(str(folder / "model.safetensors"))
        (folder / "model.safetensors").unlink()
        file = folder / "pytorch_model.bin"
        if kind == "objects":  # a pickle that needs more than tensors: weights_only refuses it
            torch.save({**tensors, "step": Fraction(1, 3)}, file)
        elif kind == "garbage":
            file.write_bytes(b"this is not a pickle " * 20)
        else:  # a torch zip archive cut in half
            torch.save(tensors, file)
            file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
        return {"folder": folder, "file": file}

    return setup


def _model_folder(config: dict | str):
    """Setup: a folder holding only config.json (a dict, or raw text for a damaged one) and a dry-run recipe."""

    def setup(tmp_path: Path) -> dict:
        folder = tmp_path / "model"
        folder.mkdir()
        text = config if isinstance(config, str) else json.dumps(config)
        (folder / "config.json").write_text(text)
        recipe = tmp_path / "recipe.yaml"
        recipe.write_text(yaml.safe_dump({"model": {"id": str(folder)}, "pruning": {"sparsity": 0.5}}))
        return {"folder": folder, "file": folder / "config.json", "recipe": recipe, "out": tmp_path / OUT}

    return setup


def _nothing_written(ctx: dict) -> None:
    out = ctx["out"]
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"staging folders left beside {out}: {leftovers}"


def _unchanged(ctx: dict) -> None:
    """The damaged folder is as the setup left it (a failed command must not rewrite or delete anything)."""
    assert ctx["file"].read_bytes() == ctx["content"], f"{ctx['file']} changed"


def _recipe_file(content: bytes | dict):
    def setup(tmp_path: Path) -> dict:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_bytes(content if isinstance(content, bytes) else yaml.safe_dump(content).encode())
        return {"recipe": recipe, "out": tmp_path / OUT}

    return setup


def _calibration_file(name: str, content: bytes):
    def setup(tmp_path: Path) -> dict:
        data = tmp_path / name
        data.write_bytes(content)
        return {"data": data, "out": tmp_path / OUT}

    return setup


def _prune_data_file(ctx: dict) -> list[str]:
    return ["prune", TINY_MODEL_ID, "--data-file", str(ctx["data"]), "--output", str(ctx["out"]), *PRUNE_FAST]


def _disk_full(error: BaseException):
    """Patch: transformers' shard writer fails as a full disk does."""

    def patch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        import transformers.modeling_utils

        def full(*args, **kwargs):
            raise error

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)

    return patch


def _prune_tiny(ctx: dict) -> list[str]:
    return ["prune", TINY_MODEL_ID, "--dataset", "diep-hub/tiny-text", "--output", str(ctx["out"]), *PRUNE_FAST]


def _out_only(tmp_path: Path) -> dict:
    return {"out": tmp_path / OUT}


def _in_work_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Patch: the command runs in ``tmp_path/work`` (holding a file that must survive)."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)


def _run_recipe_setup(tmp_path: Path) -> dict:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RUN_RECIPE))
    return {"recipe": recipe, "work": tmp_path / "work"}


def _work_kept(ctx: dict) -> None:
    assert (ctx["work"] / "notes.txt").read_text() == "keep me"


def _unwritable_dir(tmp_path: Path) -> Path:
    """A folder this process cannot create files in: a read-only folder, or /sys when running as root."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    folder.chmod(0o555)
    if _cannot_create_in(folder):
        return folder
    if Path("/sys").is_dir() and _cannot_create_in(Path("/sys")):  # root ignores modes; sysfs takes no new files
        return Path("/sys")
    pytest.skip("no folder on this machine refuses new files to this user")


def _cannot_create_in(folder: Path) -> bool:
    try:
        (folder / ".diep-hub-test-probe").touch()
    except OSError:
        return True
    (folder / ".diep-hub-test-probe").unlink()
    return False


# ---------------------------------------------------------------------------------------------- the catalogue
CORRUPT_JSON = b'{"model_type": "diep_mixtral", "num_experts_per_layer": [6, '
BAD_YAML = b"model:\n  id: diep-hub/tiny-mixtral\n pruning: [unclosed\n"

ROWS: list[CliFault] = [
    # --- a model transformers does not know, or that is not a Mixture-of-Experts family
    CliFault(
        id="prune-unknown-model-type",
        setup=_model_folder({"model_type": "foo_moe", "hidden_size": 8}),
        argv=lambda c: ["prune", str(c["folder"]), "--output", str(c["out"])],
        words=["folder", "model_type 'foo_moe'", "supported", *FAMILIES, "does not know this model_type"],
        on_disk=_nothing_written,
    ),
    CliFault(
        id="dry-run-unknown-model-type",
        setup=_model_folder({"model_type": "foo_moe", "hidden_size": 8}),
        argv=lambda c: ["run", str(c["recipe"]), "--dry-run"],
        words=["folder", "model_type 'foo_moe'", "supported", *FAMILIES, "does not know this model_type"],
    ),
    CliFault(
        id="prune-dense-model",
        setup=_model_folder({"model_type": "llama", "hidden_size": 8, "num_hidden_layers": 1,
                             "num_attention_heads": 1, "intermediate_size": 16, "vocab_size": 32}),
        argv=lambda c: ["prune", str(c["folder"]), "--output", str(c["out"])],
        words=["folder", "model_type 'llama'", "dense", *FAMILIES],
        on_disk=_nothing_written,
    ),
    CliFault(
        id="prune-model-config-not-json",
        setup=_model_folder('{"model_type": "mixtral", "hidden_size": '),
        argv=lambda c: ["prune", str(c["folder"]), "--output", str(c["out"])],
        words=["config.json", "not valid JSON", "line 1, column"],
        on_disk=_nothing_written,
    ),
    CliFault(
        id="eval-folder-without-config",
        setup=lambda tmp: {"folder": _write(tmp / "model" / "notes.txt", "no config here").parent},
        argv=lambda c: ["eval", str(c["folder"])],
        words=["folder", "model", "has no config.json", "Hub repo id"],
    ),
    CliFault(
        id="prune-model-path-that-does-not-exist",
        setup=lambda tmp: {"folder": tmp / "no-such-model", "out": tmp / OUT},
        argv=lambda c: ["prune", str(c["folder"]), "--output", str(c["out"])],
        words=["no-such-model", "not a folder on this machine, nor a Hub repo id"],
        on_disk=_nothing_written,
    ),
    # --- the dry run refuses what the run would refuse, in the words of the command: the recipe field for `run`,
    # the flag for `prune` (the library says sparsity=0.9, the Python keyword)
    CliFault(
        id="dry-run-infeasible-sparsity",
        setup=_recipe_file({**RUN_RECIPE, "pruning": {**RUN_RECIPE["pruning"], "sparsity": 0.9}}),
        argv=lambda c: ["run", str(c["recipe"]), "--dry-run"],
        words=["pruning.sparsity: 0.9 cannot be reached", "largest feasible sparsity is 0.7500", "top-k 2"],
    ),
    CliFault(
        id="prune-infeasible-sparsity",  # the same words as the dry run above, with the flag
        setup=_out_only,
        argv=lambda c: [*_prune_tiny(c), "--sparsity", "0.9"],
        words=["--sparsity 0.9 cannot be reached", "largest feasible sparsity is 0.7500", "top-k 2"],
        on_disk=_nothing_written,
    ),
    # --- recipes (recipe.py converts these)
    CliFault(
        id="run-recipe-not-utf8",
        setup=_recipe_file(b"# caf\xe9 recipe\nmodel:\n  id: diep-hub/tiny-mixtral\n"),
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"])],
        words=["recipe.yaml", "UTF-8", "line 1"],
        on_disk=_nothing_written,
    ),
    CliFault(
        id="run-recipe-bad-yaml",
        setup=_recipe_file(BAD_YAML),
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"])],
        words=["recipe.yaml", "line 3"],
        on_disk=_nothing_written,
    ),
    CliFault(
        id="run-recipe-two-problems-on-one-line",
        setup=_recipe_file({"model": {"id": "a/b", "dtype": "int3"}, "pruning": {"sparsity": 7}}),
        argv=lambda c: ["run", str(c["recipe"])],
        words=["2 problem(s)", "model.dtype: 'int3'", "pruning.sparsity: 7"],
    ),
    # --- calibration files (calibration.py converts these)
    CliFault(
        id="prune-calibration-empty",
        setup=_calibration_file("calib.jsonl", b""),
        argv=_prune_data_file,
        words=["calib.jsonl", "empty"],
        on_disk=_nothing_written,
    ),
    CliFault(
        id="prune-calibration-latin1",
        setup=_calibration_file("calib.txt", "the caf\u00e9 sees a dog .\n".encode("latin-1") * 40),
        argv=_prune_data_file,
        words=["calib.txt", "not UTF-8", "line 1"],
        on_disk=_nothing_written,
    ),
    CliFault(
        id="prune-calibration-corrupt-gzip",
        setup=_calibration_file("calib.jsonl.gz", gzip.compress(b'{"text": "a dog ."}\n' * 400)[:60]),
        argv=_prune_data_file,
        words=["calib.jsonl.gz", "gzip"],
        on_disk=_nothing_written,
    ),
    CliFault(
        id="prune-calibration-malformed-jsonl",
        setup=_calibration_file("calib.jsonl", b'{"text": "a dog ."}\n{"text": "a cat\n'),
        argv=_prune_data_file,
        words=["calib.jsonl", "line 2", "not valid JSON"],
        on_disk=_nothing_written,
    ),
    # --- weights `eval` cannot read
    CliFault(
        id="eval-truncated-safetensors",
        setup=_truncated("model.safetensors"),
        argv=lambda c: ["eval", str(c["folder"])],
        words=["model.safetensors", "truncated or corrupt"],
    ),
    CliFault(
        id="eval-pickle-with-python-objects",
        setup=_pickle_only("objects"),
        argv=lambda c: ["eval", str(c["folder"])],
        words=["pytorch_model.bin", "Python objects", "weights_only", "safetensors"],
    ),
    CliFault(
        id="eval-pickle-garbage",
        setup=_pickle_only("garbage"),
        argv=lambda c: ["eval", str(c["folder"])],
        words=["pytorch_model.bin", "truncated or corrupt"],
    ),
    CliFault(
        id="eval-pickle-truncated-zip",
        setup=_pickle_only("truncated"),
        argv=lambda c: ["eval", str(c["folder"])],
        words=["pytorch_model.bin", "truncated or corrupt"],
    ),
    # --- damaged metadata of a checkpoint folder, for every command that reads it
    *[
        CliFault(
            id=f"{command}-corrupt-{name.split('.')[0]}",
            setup=_damaged(name, content),
            argv=_folder_argv(command),
            words=[name, "line", "column"],
            on_disk=_unchanged,
        )
        for command in ("inspect", "push", "reproduce")
        for name, content in (("config.json", CORRUPT_JSON), ("pruning_report.json", b'{"method": "frequency",'),
                              ("recipe.yaml", BAD_YAML))
    ],
    CliFault(
        id="inspect-recipe-not-a-mapping",
        setup=_damaged("recipe.yaml", b"- just\n- a list\n"),
        argv=lambda c: ["inspect", str(c["folder"])],
        words=["recipe.yaml", "YAML list", "expected a mapping"],
    ),
    CliFault(
        id="push-config-not-utf8",
        setup=_damaged("config.json", b'{"model_type": "caf\xe9"}'),
        argv=lambda c: ["push", c["repo"], str(c["folder"])],
        words=["config.json", "not UTF-8"],
    ),
    # --- a full disk while saving (saving.py converts the safetensors error)
    PatchedCliFault(
        id="prune-disk-full-safetensors",
        setup=_out_only,
        argv=_prune_tiny,
        words=[OUT, "No space left on device"],
        on_disk=_nothing_written,
        patch=_disk_full(__import__("safetensors").SafetensorError(
            "Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: \"No space left on device\" })"
        )),
    ),
    PatchedCliFault(
        id="prune-disk-full-oserror",
        setup=_out_only,
        argv=_prune_tiny,
        words=[OUT, "No space left on device"],
        on_disk=_nothing_written,
        patch=_disk_full(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), "model.safetensors")),
    ),
    # --- output folders (the runner's checks; saving.check_output_folder for the rest)
    CliFault(
        id="run-output-parent-is-a-file",
        setup=lambda tmp: {**_run_recipe_setup(tmp), "blocker": _write(tmp / "blocker", "x"),
                           "out": tmp / "blocker" / "out"},
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"])],
        words=["blocker", "is a file", "--output"],
        on_disk=lambda c: (c["blocker"].read_text() == "x") or pytest.fail("blocker changed"),
    ),
    CliFault(
        id="run-output-not-writable",
        setup=lambda tmp: {**_run_recipe_setup(tmp), "out": _unwritable_dir(tmp) / "diep-hub-out"},
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"])],
        words=["diep-hub-out", "cannot write", "--output"],
        on_disk=lambda c: not c["out"].exists() or pytest.fail(f"{c['out']} was created"),
    ),
    PatchedCliFault(
        id="run-output-is-the-working-directory",
        setup=_run_recipe_setup,
        argv=lambda c: ["run", str(c["recipe"]), "--output", ".", "--overwrite"],
        words=["working directory"],
        on_disk=_work_kept,
        patch=_in_work_dir,
    ),
    PatchedCliFault(
        id="run-output-contains-the-working-directory",
        setup=_run_recipe_setup,
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["work"]), "--overwrite"],
        words=["working directory", "work"],
        on_disk=_work_kept,
        patch=lambda mp, tmp: (_in_work_dir(mp, tmp), mp.chdir(tmp / "work" / "sub")),
    ),
    CliFault(
        id="run-output-holds-git",
        setup=lambda tmp: {**_run_recipe_setup(tmp), "out": _git_checkout(tmp / "repo")},
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"]), "--overwrite"],
        words=["repo", ".git"],
        on_disk=lambda c: (c["out"] / ".git" / "HEAD").is_file() or pytest.fail(".git removed"),
    ),
    CliFault(
        id="run-output-holds-the-recipe",
        setup=lambda tmp: _recipe_inside(tmp / "out"),
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"]), "--overwrite"],
        words=["recipe.yaml", "out"],
        on_disk=lambda c: c["recipe"].is_file() or pytest.fail("the recipe was deleted"),
    ),
    # --- CLI advice, not Python advice: the flag (or for `run`, the recipe field), never the API's keyword
    AdviceCliFault(
        id="prune-calibration-too-short-names-the-flags",
        setup=_calibration_file("calib.txt", b"the cat sees a dog .\n" * 3),
        argv=_prune_data_file,
        words=["calib.txt", "--num-samples 8 x --seq-len 32 needs 256", "lower --num-samples / --seq-len"],
        on_disk=_nothing_written,
        absent=("num_samples", "seq_len"),
    ),
    AdviceCliFault(
        id="prune-floor-infeasible-names-the-flags",
        setup=_out_only,
        argv=lambda c: [*_prune_tiny(c), "--max-layer-sparsity", "0.25"],
        words=["--sparsity 0.5", "relax --max-layer-sparsity / --min-experts-per-layer", "pass --regroup"],
        on_disk=_nothing_written,
        absent=("sparsity=", "max_layer_sparsity", "regroup=True"),
    ),
    AdviceCliFault(
        id="dry-run-floor-infeasible-names-the-recipe-fields",
        setup=_recipe_file({**RUN_RECIPE,
                            "pruning": {**RUN_RECIPE["pruning"], "floors": {"max_layer_sparsity": 0.25}}}),
        argv=lambda c: ["run", str(c["recipe"]), "--dry-run"],
        words=["pruning.sparsity: 0.5",
               "relax pruning.floors.max_layer_sparsity / pruning.floors.min_experts_per_layer",
               "set pruning.floors.regroup: true in the recipe"],
        absent=("sparsity=", "regroup=True"),
    ),
    AdviceCliFault(
        id="run-overwrite-of-a-non-checkpoint-names-the-flag",
        setup=lambda tmp: {**_run_recipe_setup(tmp), "out": _write(tmp / "data" / "table.csv", "a,b\n").parent},
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"]), "--overwrite"],
        words=["does not look like a checkpoint folder, so --overwrite will not replace it", "table.csv"],
        on_disk=lambda c: (c["out"] / "table.csv").read_text() == "a,b\n" or pytest.fail("table.csv changed"),
        absent=("overwrite=True",),
    ),
    AdviceCliFault(
        id="run-recipe-typo-did-you-mean-with-its-line",
        setup=_recipe_file(b"model:\n  id: diep-hub/tiny-mixtral\npruning:\n  sparsity: 0.5\n  serach:\n    lr: 0.1\n"),
        argv=lambda c: ["run", str(c["recipe"]), "--output", str(c["out"])],
        words=["pruning.serach: unknown key -> did you mean 'search'? allowed keys: method, sparsity", "(line 5)"],
        on_disk=_nothing_written,
    ),
    # --- not an expected error: a bug is still one line, and says so
    PatchedCliFault(
        id="bug-is-one-line-and-says-so",
        setup=lambda tmp: {"folder": tmp},
        argv=lambda c: ["inspect", str(c["folder"])],
        words=["unexpected ZeroDivisionError: boom", "this is a bug", "run with -v"],
        patch=lambda mp, tmp: mp.setattr("diep_hub.checkpoint.inspect.inspect_checkpoint", _boom),
    ),
]


def _write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def _git_checkout(folder: Path) -> Path:
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "README.md").write_text("my project\n")
    return folder


def _recipe_inside(out: Path) -> dict:
    out.mkdir()
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RUN_RECIPE))
    return {"recipe": recipe, "out": out}


def _boom(*args, **kwargs):
    raise ZeroDivisionError("boom")


# Rows whose setup reads the module's run folder need the fixture; the others do not build it.
_NEEDS_RUN = {"eval-", "inspect-", "push-", "reproduce-"}


@pytest.mark.parametrize("row", ROWS, ids=ids(ROWS))
def test_cli_fault(row, request, tmp_path, monkeypatch):
    if any(row.id.startswith(prefix) for prefix in _NEEDS_RUN):
        request.getfixturevalue("run_folder")
    if isinstance(row, PatchedCliFault) and row.patch is not None:
        row.patch(monkeypatch, tmp_path)
    result = check_cli_fault(row, tmp_path, monkeypatch)
    if isinstance(row, AdviceCliFault):
        line = error_lines(result.stderr)[0]
        assert not [word for word in row.absent if word in line], f"[{row.id}] Python advice in: {line}"


def test_push_connection_dropped_mid_commit(run_folder, hub_server, tmp_path, monkeypatch):
    """The server closes the connection while the commit is sent: one line naming the repo (hub.py's PushError)."""
    repo = f"{hub_server.user}/tiny-dropped"
    hub_server.faults["commit"] = "drop"
    row = CliFault(
        id="push-connection-dropped-mid-commit",
        setup=lambda tmp: {"folder": _copy_run(tmp)},
        argv=lambda c: ["push", repo, str(c["folder"])],
        words=[repo, "commit"],
        env={"HF_TOKEN": hub_server.token},
    )
    check_cli_fault(row, tmp_path, monkeypatch)
    assert ("commit", "drop") in hub_server.fault_hits
    assert hub_server.token not in repr(hub_server.fault_hits)


def test_push_without_a_token_names_the_flag(run_folder, hub_server, tmp_path, monkeypatch):
    """No token anywhere: the one line says HF_TOKEN, `hf auth login` or --token, never the API's token=..."""
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "no-stored-tokens"))
    row = AdviceCliFault(
        id="push-without-a-token",
        setup=lambda tmp: {"folder": _copy_run(tmp)},
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


# ------------------------------------------------------------------------------------------ around the table
def test_verbose_adds_the_traceback_after_the_one_line(run_folder, tmp_path):
    folder = _copy_run(tmp_path)
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
    monkeypatch.setattr("diep_hub.checkpoint.inspect.inspect_checkpoint", _boom)
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

    folder = _copy_run(tmp_path)
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
