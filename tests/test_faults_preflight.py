"""Fault catalogue of the run's preflight: PREFLIGHT_FAULTS, ``check_run_inputs`` on unreachable sources, lengths
above the model's positions and unknown lm-eval tasks, with the model loaders patched to fail the test if anything
tries to load weights; nothing is written but the setup's files.
"""

from __future__ import annotations

import gzip
import time
from pathlib import Path

import datasets
import pytest

import diep_hub.evaluation.lm_eval_runner as lm_eval_runner
from diep_hub.errors import ConfigError, CorruptFileError
from diep_hub.preflight import check_run_inputs
from diep_hub.recipe import Recipe, load_recipe
from diep_hub.tiny import TINY_TASK, tiny_config
from tests.helpers.calibration_files import documents_jsonl, jsonl_with_bad_line
from tests.helpers.fault_catalogue import Fault, check_fault, ids


def _nothing_on_disk_but(*names: str):
    """on_disk check: the tmp folder holds exactly the files the setup wrote (no cache, no output)."""

    def check(ctx):
        root: Path = ctx["tmp_path"]
        found = sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file())
        assert found == sorted(names), found

    return check


# ======================================================================================== preflight faults
class FakeTaskManager:
    """lm-eval's TaskManager as far as the checks use it (``all_tasks``), without indexing 15k built-in tasks."""

    BUILTIN = ["boolq", "boolqa_bn", "mmlu", "mmlu_anatomy", "rte", "openbookqa", "hellaswag", "arc_easy"]
    built: list[tuple] = []

    def __init__(self, include_path=None, include_defaults=True):
        type(self).built.append((include_path, include_defaults))
        local = sorted(p.stem for p in Path(include_path).glob("*.yaml")) if include_path else []
        self.all_tasks = (list(self.BUILTIN) if include_defaults else []) + local


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """Fail the test if anything loads a model, a tokenizer or a dataset; keep the offline-corpus cache apart."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"loaded something during the checks: {args} {kwargs}")

    import transformers

    import diep_hub.model_loading

    # Where the run's load stage and `diep-hub eval` look load_model up.
    monkeypatch.setattr(diep_hub.model_loading, "load_model", refuse)
    monkeypatch.setattr(transformers.AutoModelForCausalLM, "from_pretrained", refuse)
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained", refuse)
    monkeypatch.setattr(datasets, "load_dataset", refuse)
    monkeypatch.setenv("DIEP_HUB_CACHE", str(tmp_path / "diep-cache"))
    # No dataset is in a local cache: the offline refusal must not depend on this machine's caches.
    from huggingface_hub import constants

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "no-datasets-cache"))
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "no-hub-cache"))
    monkeypatch.setattr(lm_eval_runner, "_MANAGERS", {})
    import lm_eval.tasks

    FakeTaskManager.built = []
    monkeypatch.setattr(lm_eval.tasks, "TaskManager", FakeTaskManager)


def _run_inputs(data: dict, files: dict[str, bytes] | None = None, config=None):
    """setup: recipe data (its folder is tmp_path, so relative paths resolve there) plus files to write."""

    def setup(tmp_path: Path):
        for name, content in (files or {}).items():
            (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
            (tmp_path / name).write_bytes(content)
        recipe = Recipe.from_dict(data, base_dir=tmp_path)
        return {"recipe": recipe, "config": config}

    return setup


def _check(ctx):
    return check_run_inputs(ctx["recipe"], ctx["config"])


def _tasks(*names: str, include_path: str | None = None) -> dict:
    evaluation = {"tasks": list(names)}
    if include_path is not None:
        evaluation["include_path"] = include_path
    return {"model": {"id": "diep-hub/tiny-mixtral"}, "pruning": {"calibration": {"dataset": "diep-hub/tiny-text"}},
            "evaluation": evaluation}


def _local_task(name: str) -> dict[str, bytes]:
    return {f"tasks/{name}.yaml": f"task: {name}\ndataset_path: json\n".encode()}


TINY = {"model": {"id": "diep-hub/tiny-mixtral"}, "pruning": {"calibration": {"dataset": "diep-hub/tiny-text"}}}

PREFLIGHT_FAULTS = [
    Fault("offline-hub-calibration", _run_inputs({"model": {"id": "a/b"}}), _check, ConfigError,
          ["pruning.calibration.dataset", "'allenai/c4'", "offline mode is on", "HF_HUB_OFFLINE",
           "pruning.calibration.path"], on_disk=_nothing_on_disk_but()),
    Fault("offline-hub-perplexity",
          _run_inputs({**TINY, "evaluation": {"perplexity": {"dataset": "wikitext"}}}), _check, ConfigError,
          ["evaluation.perplexity.dataset", "'wikitext'", "offline mode is on"], on_disk=_nothing_on_disk_but()),
    Fault("offline-hub-both-in-one-message",
          _run_inputs({"model": {"id": "a/b"}, "evaluation": {"perplexity": {"dataset": "wikitext"}}}), _check,
          ConfigError, ["2 problems", "pruning.calibration.dataset", "evaluation.perplexity.dataset"]),
    Fault("calibration-path-missing",
          _run_inputs({"model": {"id": "a/b"}, "pruning": {"calibration": {"path": "data/missing.jsonl"}}}),
          _check, ConfigError, ["pruning.calibration.path", "'data/missing.jsonl'", "does not exist"]),
    Fault("calibration-path-is-a-folder",
          _run_inputs({"model": {"id": "a/b"}, "pruning": {"calibration": {"path": "data"}}},
                      {"data/x.txt": b"w1\n"}),
          _check, ConfigError, ["pruning.calibration.path", "'data'", "is a folder"]),
    Fault("calibration-file-corrupt-gzip",
          _run_inputs({"model": {"id": "a/b"}, "pruning": {"calibration": {"path": "c.jsonl.gz"}}},
                      {"c.jsonl.gz": gzip.compress(documents_jsonl())[:100]}),
          _check, CorruptFileError, ["pruning.calibration.path", "c.jsonl.gz", "not a valid gzip file"],
          on_disk=_nothing_on_disk_but("c.jsonl.gz")),
    Fault("calibration-file-without-text-field",
          _run_inputs({"model": {"id": "a/b"}, "pruning": {"calibration": {"path": "c.jsonl"}}},
                      {"c.jsonl": documents_jsonl(field="body")}),
          _check, ConfigError, ["pruning.calibration.path", "no field 'text'", "['body']"]),
    Fault("perplexity-file-bad-line",
          _run_inputs({**TINY, "evaluation": {"perplexity": {"path": "p.jsonl"}}}, {"p.jsonl": jsonl_with_bad_line(3)}),
          _check, CorruptFileError, ["evaluation.perplexity.path", "perplexity file", "line 3 is not valid JSON"]),
    Fault("offline-corpus-unknown-split",
          _run_inputs({"model": {"id": "a/b"},
                       "pruning": {"calibration": {"dataset": "diep-hub/tiny-text", "split": "validation"}}}),
          _check, ConfigError, ["pruning.calibration.split", "'validation'", "train, test"]),
    Fault("include-path-missing", _run_inputs(_tasks("boolq", include_path="no-tasks-here")), _check,
          ConfigError, ["evaluation.include_path", "'no-tasks-here'", "does not exist"]),
    Fault("seq-len-above-positions",
          _run_inputs({**TINY, "pruning": {"calibration": {"dataset": "diep-hub/tiny-text", "seq_len": 1024}},
                       "evaluation": {"perplexity": {"dataset": "diep-hub/tiny-text", "seq_len": 600}}},
                      config=tiny_config()),
          _check, ConfigError, ["2 problems", "pruning.calibration.seq_len: 1024", "evaluation.perplexity.seq_len: 600",
                                "max_position_embeddings 512"]),
    Fault("unknown-builtin-task", _run_inputs(_tasks("boolqq", "rte", "zzzyx")), _check, ConfigError,
          ["evaluation.tasks", "['boolqq', 'zzzyx']", "'boolqq': did you mean 'boolq'", "'zzzyx': no close match",
           "lm-eval ls tasks"]),
    Fault("unknown-task-in-include-path",
          _run_inputs(_tasks("my_task", "my_tsak", include_path="tasks"), _local_task("my_task")),
          _check, ConfigError, ["evaluation.tasks", "'my_tsak': did you mean 'my_task'", "include_path='tasks'"]),
    Fault("offline-task-needs-no-include-path-but-typo",
          _run_inputs(_tasks(TINY_TASK, "diep_tiny_arth")), _check, ConfigError,
          ["evaluation.tasks", "'diep_tiny_arth': did you mean 'diep_tiny_arith'"]),
]


@pytest.mark.parametrize("row", PREFLIGHT_FAULTS, ids=ids(PREFLIGHT_FAULTS))
def test_preflight_faults(row, tmp_path, no_weights):
    started = time.perf_counter()
    check_fault(row, tmp_path)
    assert time.perf_counter() - started < 5.0  # no retries, no index of lm-eval's real tasks
    assert not (tmp_path / "diep-cache").exists()  # offline corpora only recognised by name, never written


def test_problem_classes_are_checked_in_order(tmp_path, no_weights):
    """A bad source is reported alone: lengths and task names are only looked at once the sources are fine."""
    recipe = Recipe.from_dict({"model": {"id": "a/b"}, "pruning": {"calibration": {"seq_len": 4096}},
                               "evaluation": {"tasks": ["boolqq"]}})
    with pytest.raises(ConfigError) as info:
        check_run_inputs(recipe, tiny_config())
    assert "pruning.calibration.dataset" in str(info.value)
    assert "seq_len" not in str(info.value) and "boolqq" not in str(info.value)
    assert FakeTaskManager.built == []


def test_good_inputs_pass_and_build_the_task_index_once(tmp_path, no_weights):
    (tmp_path / "c.jsonl").write_bytes(documents_jsonl())
    recipe = Recipe.from_dict({
        "model": {"id": "a/b"},
        "pruning": {"calibration": {"path": "c.jsonl", "seq_len": 512}},
        "evaluation": {"tasks": ["boolq", "mmlu"], "perplexity": {"path": "c.jsonl", "seq_len": 64}},
    }, base_dir=tmp_path)
    assert check_run_inputs(recipe, tiny_config()) is None
    assert check_run_inputs(recipe, tiny_config()) is None
    assert FakeTaskManager.built == [(None, True)]  # cached: the evaluation reuses it
    # run_lm_eval's lookup gets the same manager, without building another.
    assert lm_eval_runner._task_manager(FakeTaskManager, ["boolq"], None).all_tasks[:1] == ["boolq"]
    assert FakeTaskManager.built == [(None, True)]


def test_the_offline_recipes_pass_without_writing_anything(tmp_path, no_weights):
    for name in ("tiny", "zoo-mixtral-8e"):
        recipe = load_recipe(name)
        check_run_inputs(recipe)
    check_run_inputs(load_recipe("tiny"), tiny_config())
    assert FakeTaskManager.built == []  # offline tasks are known without lm-eval's index
    assert not (tmp_path / "diep-cache").exists()


def test_evaluation_off_skips_the_task_check(tmp_path, no_weights):
    recipe = Recipe.from_dict({**TINY, "evaluation": {"enabled": False, "tasks": ["no_such_task"],
                                                      "perplexity": {"dataset": "wikitext"}}})
    check_run_inputs(recipe)
    assert FakeTaskManager.built == []


def test_a_hub_dataset_in_the_local_cache_is_left_to_the_loader(tmp_path, no_weights, monkeypatch):
    """Offline, a dataset ``datasets`` has cached can still load: preflight does not refuse it."""
    recipe = Recipe.from_dict({"model": {"id": "a/b"}})
    with pytest.raises(ConfigError, match="offline mode is on"):
        check_run_inputs(recipe)
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", True)
    (Path(datasets.config.HF_DATASETS_CACHE) / "allenai___c4").mkdir(parents=True)
    check_run_inputs(recipe)
    # The switch set after datasets was imported: the loader would refuse, so preflight refuses too.
    monkeypatch.setattr(datasets.config, "HF_HUB_OFFLINE", False)
    with pytest.raises(ConfigError, match="offline mode is on"):
        check_run_inputs(recipe)


@pytest.mark.slow
def test_unknown_task_against_lm_evals_real_index(monkeypatch):
    """The real TaskManager (indexing ~15k tasks takes tens of seconds): close matches come from it."""
    monkeypatch.setattr(lm_eval_runner, "_MANAGERS", {})
    recipe = Recipe.from_dict({**TINY, "evaluation": {"tasks": ["boolqq", "mmlu"]}})
    with pytest.raises(ConfigError) as info:
        check_run_inputs(recipe)
    message = str(info.value)
    assert "evaluation.tasks" in message and "'boolqq': did you mean 'boolq'" in message and "mmlu" not in message
