"""Row helpers of the CLI fault catalogue (tests/test_faults_cli_*.py): a small run folder to damage, setups that
write bad inputs, disk checks, and the row check itself.

The offline tiny model is built untrained here (``build_offline_model`` patched while a module runs): the rows test
where failures end, not what pruning finds, and training it would cost seconds a row. A reproduction rebuilds the
same untrained model (seed 0), so it still matches exactly.
"""

from __future__ import annotations

import contextlib
import json
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import yaml

from diep_hub.tiny import TINY_MODEL_ID, build_tiny_model
from tests.helpers.fault_catalogue import CliFault, check_cli_fault, error_lines, run_cli

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


CORRUPT_JSON = b'{"model_type": "diep_mixtral", "num_experts_per_layer": [6, '
BAD_YAML = b"model:\n  id: diep-hub/tiny-mixtral\n pruning: [unclosed\n"


@contextlib.contextmanager
def _untrained_tiny_model(cache: Path):
    """``diep-hub`` loads the README's tiny model untrained, and writes offline corpora under ``cache``."""
    import diep_hub.tiny

    original = diep_hub.tiny.build_offline_model

    def untrained(model_id, *, dtype=torch.float32):
        if model_id != TINY_MODEL_ID:
            return original(model_id, dtype=dtype)
        return build_tiny_model(seed=0, train_steps=0, dtype=dtype)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(diep_hub.tiny, "build_offline_model", untrained)
        mp.setenv("DIEP_HUB_CACHE", str(cache))
        yield


@pytest.fixture(scope="module")
def untrained_tiny_cli(tmp_path_factory):
    """For a whole module: the untrained tiny model and a private cache (``pytestmark = usefixtures(...)``)."""
    with _untrained_tiny_model(tmp_path_factory.mktemp("diep-hub-cache")):
        yield


_BUILT: dict[str, Path] = {}  # "run": the folder `diep-hub run` wrote for RUN_RECIPE (session fixture below)


@pytest.fixture(scope="session")
def run_folder(tmp_path_factory) -> Path:
    """One checkpoint written by `diep-hub run` (weights, config, report, recipe.yaml), copied by each row."""
    root = tmp_path_factory.mktemp("built")
    recipe = root / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RUN_RECIPE))
    out = root / "run"
    with _untrained_tiny_model(root / "cache"):
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


def copy_run(tmp_path: Path, name: str = "ckpt") -> Path:
    folder = tmp_path / name
    shutil.copytree(_BUILT["run"], folder)
    return folder


def damaged(file_name: str, content: bytes):
    """Setup: a copy of the run folder with ``file_name`` replaced by ``content``."""

    def setup(tmp_path: Path) -> dict:
        folder = copy_run(tmp_path)
        (folder / file_name).write_bytes(content)
        return {"folder": folder, "file": folder / file_name, "content": content, "repo": "someone/tiny"}

    return setup


def folder_argv(command: str) -> Callable[[dict], list[str]]:
    """``diep-hub <command> FOLDER`` (``push REPO_ID FOLDER``, in the order of ``hf upload``)."""
    return lambda c: [command, *([c["repo"]] if command == "push" else []), str(c["folder"])]


def truncated(file_name: str):
    def setup(tmp_path: Path) -> dict:
        folder = copy_run(tmp_path)
        file = folder / file_name
        data = file.read_bytes()
        file.write_bytes(data[: len(data) // 2])
        return {"folder": folder, "file": file}

    return setup


def pickle_only(kind: str):
    """Setup: the run folder with its safetensors replaced by a pytorch_model.bin (see ``kind``)."""

    def setup(tmp_path: Path) -> dict:
        from fractions import Fraction

        from safetensors.torch import load_file

        folder = copy_run(tmp_path)
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


def model_folder(config: dict | str):
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


def nothing_written(ctx: dict) -> None:
    out = ctx["out"]
    assert not out.exists(), f"{out} was created"
    leftovers = [p.name for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert not leftovers, f"staging folders left beside {out}: {leftovers}"


def unchanged(ctx: dict) -> None:
    """The damaged folder is as the setup left it (a failed command must not rewrite or delete anything)."""
    assert ctx["file"].read_bytes() == ctx["content"], f"{ctx['file']} changed"


def recipe_file(content: bytes | dict):
    def setup(tmp_path: Path) -> dict:
        recipe = tmp_path / "recipe.yaml"
        recipe.write_bytes(content if isinstance(content, bytes) else yaml.safe_dump(content).encode())
        return {"recipe": recipe, "out": tmp_path / OUT}

    return setup


def calibration_file(name: str, content: bytes):
    def setup(tmp_path: Path) -> dict:
        data = tmp_path / name
        data.write_bytes(content)
        return {"data": data, "out": tmp_path / OUT}

    return setup


def prune_data_file(ctx: dict) -> list[str]:
    return ["prune", TINY_MODEL_ID, "--data-file", str(ctx["data"]), "--output", str(ctx["out"]), *PRUNE_FAST]


def disk_full(error: BaseException):
    """Patch: transformers' shard writer fails as a full disk does."""

    def patch(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
        import transformers.modeling_utils

        def full(*args, **kwargs):
            raise error

        monkeypatch.setattr(transformers.modeling_utils, "safe_save_file", full)

    return patch


def prune_tiny(ctx: dict) -> list[str]:
    return ["prune", TINY_MODEL_ID, "--dataset", "diep-hub/tiny-text", "--output", str(ctx["out"]), *PRUNE_FAST]


def out_only(tmp_path: Path) -> dict:
    return {"out": tmp_path / OUT}


def in_work_dir(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Patch: the command runs in ``tmp_path/work`` (holding a file that must survive)."""
    work = tmp_path / "work"
    (work / "sub").mkdir(parents=True)
    (work / "notes.txt").write_text("keep me")
    monkeypatch.chdir(work)


def run_recipe_setup(tmp_path: Path) -> dict:
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RUN_RECIPE))
    return {"recipe": recipe, "work": tmp_path / "work"}


def work_kept(ctx: dict) -> None:
    assert (ctx["work"] / "notes.txt").read_text() == "keep me"


def unwritable_dir(tmp_path: Path) -> Path:
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


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def git_checkout(folder: Path) -> Path:
    (folder / ".git").mkdir(parents=True)
    (folder / ".git" / "HEAD").write_text("ref: refs/heads/main\n")
    (folder / "README.md").write_text("my project\n")
    return folder


def recipe_inside(out: Path) -> dict:
    out.mkdir()
    recipe = out / "recipe.yaml"
    recipe.write_text(yaml.safe_dump(RUN_RECIPE))
    return {"recipe": recipe, "out": out}


def boom(*args, **kwargs):
    raise ZeroDivisionError("boom")


# Rows whose setup reads the module's run folder need the fixture; the others do not build it.
_NEEDS_RUN = {"eval-", "inspect-", "push-", "reproduce-"}


def check_row(row: CliFault, request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Run a catalogue row: the run folder built first where its setup copies it, the row's patch, the shared CLI
    check, and for advice rows no Python advice in the line."""
    if any(row.id.startswith(prefix) for prefix in _NEEDS_RUN):
        request.getfixturevalue("run_folder")
    if isinstance(row, PatchedCliFault) and row.patch is not None:
        row.patch(monkeypatch, tmp_path)
    result = check_cli_fault(row, tmp_path, monkeypatch)
    if isinstance(row, AdviceCliFault):
        line = error_lines(result.stderr)[0]
        assert not [word for word in row.absent if word in line], f"[{row.id}] Python advice in: {line}"
