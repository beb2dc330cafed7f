"""Recipe schema: every shipped recipe validates; malformed recipes give one error listing every problem."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from diep_hub import DiEPPruner
from diep_hub.errors import ConfigError
from diep_hub.recipe import Recipe, RecipeError, load_recipe, shipped_recipes

RECIPES = Path(__file__).resolve().parent.parent / "recipes"
RECIPE_FILES = sorted(RECIPES.glob("*.yaml"))

PAPER_MODELS = {
    "mistralai/Mixtral-8x7B-v0.1": {0.25, 0.5},
    "mistralai/Mixtral-8x7B-Instruct-v0.1": {0.25, 0.5},
    "mistralai/Mixtral-8x22B-v0.1": {0.25, 0.5},
    "deepseek-ai/deepseek-moe-16b-base": {0.25},
    "Qwen/Qwen2-57B-A14B": {0.25},
}
CURRENT_MODELS = {
    "Qwen/Qwen3-30B-A3B",
    "allenai/OLMoE-1B-7B-0924",
    "deepseek-ai/DeepSeek-V2-Lite",
    "openai/gpt-oss-20b",
}


def _write(tmp_path: Path, data: dict, name: str = "r.yaml") -> Path:
    path = tmp_path / name
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    return path


def _problems(data: dict) -> list[str]:
    with pytest.raises(RecipeError) as info:
        Recipe.from_dict(data)
    return info.value.problems


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_shipped_recipe_validates_and_documents_its_command(path):
    recipe = load_recipe(path)
    text = path.read_text(encoding="utf-8")
    assert text.startswith("# "), "every recipe starts with a comment giving its purpose"
    assert f"diep-hub run recipes/{path.name}" in text, "every recipe gives the exact command to run it"
    # The YAML round-trips through the schema: what is saved beside a checkpoint reloads to the same recipe.
    assert Recipe.from_dict(yaml.safe_load(recipe.to_yaml())).to_dict() == recipe.to_dict()


def test_the_paper_and_current_models_all_have_recipes():
    recipes = [load_recipe(p) for p in RECIPE_FILES]
    by_model: dict[str, set[float]] = {}
    for r in recipes:
        by_model.setdefault(r.model.id, set()).add(r.pruning.sparsity)
    for model, sparsities in PAPER_MODELS.items():
        assert sparsities <= by_model.get(model, set()), model
    assert CURRENT_MODELS <= set(by_model)
    assert "diep-hub/tiny-mixtral" in by_model


@pytest.mark.parametrize("path", [p for p in RECIPE_FILES if not load_recipe(p).is_offline], ids=lambda p: p.stem)
def test_real_model_recipes_use_the_paper_settings(path):
    r = load_recipe(path)
    cal, s = r.pruning.calibration, r.pruning.search
    assert (cal.dataset, cal.config, cal.num_samples, cal.seq_len) == ("allenai/c4", "en", 128, 2048)
    assert (s.lr, s.epochs, s.batch_size, s.lambda_, s.alternation_steps) == (5e-3, 10, 16, 0.01, (3, 1))
    assert r.pruning.method == "diep" and r.pruning.selection == "global"
    assert r.evaluation.tasks == ["mmlu", "boolq", "openbookqa", "rte"] and r.evaluation.num_fewshot == 0


def test_offline_recipes_resolve_every_source_locally(tmp_path, monkeypatch):
    from diep_hub.model_loading import text_source
    from diep_hub.runner import build_pruner, evaluation_tasks

    monkeypatch.setenv("DIEP_HUB_CACHE", str(tmp_path / "cache"))
    for name in ("tiny", "zoo-mixtral-8e"):
        r = load_recipe(RECIPES / f"{name}.yaml")
        assert r.is_offline
        pruner = build_pruner(r)
        # the pruner keeps the corpus's name (its settings never hold a cache path) and resolves it when it loads
        assert pruner.dataset == r.pruning.calibration.dataset
        path, local = text_source(pruner.dataset, None, pruner.split)
        source = Path(path)
        assert local and source.is_file() and source.suffix == ".jsonl" and tmp_path in source.parents
        assert (pruner.split, pruner.dataset_config) == ("train", None)
        tasks, include = evaluation_tasks(r, tmp_path / name)
        assert include is not None
        for task in tasks:
            assert (Path(include) / f"{task}.yaml").is_file(), task


def test_tiny_recipe_is_offline():
    r = load_recipe(RECIPES / "tiny.yaml")
    assert r.is_offline
    assert r.pruning.calibration.dataset == "diep-hub/tiny-text"
    assert r.evaluation.include_path is None and r.evaluation.tasks == ["diep_tiny_arith", "diep_tiny_reverse"]


def test_shipped_recipes_are_found_by_name_through_the_package():
    shipped = shipped_recipes()
    assert {p.stem for p in RECIPE_FILES} == set(shipped)
    assert load_recipe("tiny").to_dict() == load_recipe(RECIPES / "tiny.yaml").to_dict()


def test_defaults_and_pruner_kwargs():
    r = Recipe.from_dict({"model": {"id": "org/model"}})
    assert r.pruning.method == "validated_choice" and r.pruning.sparsity == 0.5 and r.model.dtype == "auto"
    kwargs = r.to_pruner_kwargs()
    assert kwargs["sparsity"] == 0.5 and kwargs["method"] == "validated_choice" and kwargs["selection"] == "global"
    assert kwargs["dataset"] == "allenai/c4" and kwargs["num_samples"] == 128 and kwargs["seq_len"] == 2048
    assert kwargs["lr"] == 5e-3 and kwargs["batch_size"] == 16
    # a recipe that leaves the search out gets the Python API's defaults (auto: benchmarks/RESULTS.md)
    assert kwargs["search_mode"] == DiEPPruner().search_mode == "auto"
    assert kwargs["epochs"] == DiEPPruner().epochs == 10


def test_relative_data_paths_resolve_against_the_recipe_folder(tmp_path):
    (tmp_path / "data.jsonl").write_text('{"text": "hello"}\n')
    path = _write(tmp_path, {"model": {"id": "org/m"}, "pruning": {"calibration": {"path": "data.jsonl"}}})
    r = load_recipe(path)
    assert r.calibration_source() == str((tmp_path / "data.jsonl").resolve())
    assert r.to_pruner_kwargs()["dataset"] == str((tmp_path / "data.jsonl").resolve())
    # the copy saved into a checkpoint folder keeps finding the file from there (diep-hub reproduce)
    saved = yaml.safe_load(r.to_yaml(resolve_paths=True))
    assert saved["pruning"]["calibration"]["path"] == str((tmp_path / "data.jsonl").resolve())
    elsewhere = tmp_path / "ckpt"
    elsewhere.mkdir()
    (elsewhere / "recipe.yaml").write_text(r.to_yaml(resolve_paths=True))
    assert load_recipe(elsewhere / "recipe.yaml").calibration_source() == str((tmp_path / "data.jsonl").resolve())
    assert yaml.safe_load(r.to_yaml())["pruning"]["calibration"]["path"] == "data.jsonl"  # as written


def test_perplexity_takes_one_source():
    problems = _problems({"model": {"id": "a/b"}, "evaluation": {"perplexity": {"dataset": "wikitext", "path": "x"}}})
    assert any("give either 'dataset' (a Hub dataset) or 'path' (a local file), not both" in p for p in problems)


# ------------------------------------------------------------------------------------------ malformed recipes
def test_unknown_key_names_the_key_and_lists_the_allowed_ones():
    problems = _problems({"model": {"id": "a/b", "revison": "main"}})
    assert problems == [
        "model.revison: unknown key -> did you mean 'revision'? allowed keys: id, revision, dtype, device_map, "
        "trust_remote_code"
    ]
    problems = _problems({"model": {"id": "a/b"}, "pruning": {"search": {"learning_rate": 0.1}}})
    assert problems == [
        # DiEPOptions' fields (the pruner's model), then the search's batch size
        "pruning.search.learning_rate: unknown key -> allowed keys: mode, lr, epochs, lambda, alternation, ranking, "
        "batch_size"  # nothing close enough to guess
    ]
    problems = _problems({"model": {"id": "a/b"}, "prunning": {}})
    assert problems[0].startswith("prunning: unknown key -> did you mean 'pruning'? allowed keys: model, pruning, "
                                  "skipping, evaluation")


def test_a_recipe_file_names_the_line_of_each_problem(tmp_path):
    """Problems read from a file end with the line of their key (a missing key: its section's line)."""
    path = tmp_path / "r.yaml"
    path.write_text("# my recipe\nmodel:\n  dtype: float32\npruning:\n  sparsity: 0.5\n  search:\n"
                    "    epocs: 3\nskiping:\n  enabled: true\n")
    with pytest.raises(RecipeError) as info:
        load_recipe(path)
    assert info.value.problems == [
        "model.id: missing -> required (line 2)",
        "pruning.search.epocs: unknown key -> did you mean 'epochs'? allowed keys: mode, lr, epochs, lambda, "
        "alternation, ranking, batch_size (line 7)",
        "skiping: unknown key -> did you mean 'skipping'? allowed keys: model, pruning, skipping, evaluation, output, "
        "publish (line 8)",
    ]


def test_sparsity_out_of_range():
    # The pruner's words (diep_hub.options.number_problem), named by the recipe field: 0 < sparsity < 1.
    for bad in (1.5, 0, -0.1, 1):
        (problem,) = _problems({"model": {"id": "a/b"}, "pruning": {"sparsity": bad}})
        assert problem == f"pruning.sparsity: {bad!r} -> is out of range; allowed: (0, 1)"
    for bad in (float("nan"), float("inf"), float("-inf")):
        (problem,) = _problems({"model": {"id": "a/b"}, "pruning": {"sparsity": bad}})
        assert problem == f"pruning.sparsity: {bad!r} -> must be a finite number in (0, 1)"


def test_bad_method_lists_the_methods():
    (problem,) = _problems({"model": {"id": "a/b"}, "pruning": {"method": "magnitude"}})
    assert problem.startswith("pruning.method: 'magnitude' -> Input should be")
    for name in ("diep", "reap", "frequency", "soft_frequency", "naee", "random"):
        assert f"'{name}'" in problem


def test_bad_dtype_lists_the_dtypes():
    (problem,) = _problems({"model": {"id": "a/b", "dtype": "float8"}})
    assert problem == "model.dtype: 'float8' -> Input should be 'auto', 'float32', 'float16' or 'bfloat16'"


def test_missing_model_id():
    assert _problems({"model": {"dtype": "bfloat16"}}) == ["model.id: missing -> required"]
    assert _problems({"pruning": {"sparsity": 0.5}}) == ["model: missing -> required"]


def test_all_problems_are_reported_at_once(tmp_path):
    data = {
        "model": {"dtype": "float8", "colour": "red"},
        "pruning": {"sparsity": 2.0, "method": "magic", "search": {"alternation": "3-1", "epochs": 0}},
        "skipping": {"kernel": "poly"},
        "publish": {"repo_id": "not a repo"},
    }
    with pytest.raises(RecipeError) as info:
        load_recipe(_write(tmp_path, data))
    err = info.value
    assert isinstance(err, ConfigError)
    paths = [p.split(":", 1)[0] for p in err.problems]
    assert paths == [
        "model.id",
        "model.dtype",
        "model.colour",
        "pruning.method",
        "pruning.sparsity",
        "pruning.search.epochs",
        "pruning.search.alternation",
        "skipping.kernel",
        "publish.repo_id",
    ]
    message = str(err)
    assert message.startswith(f"invalid recipe {tmp_path / 'r.yaml'} (9 problem(s)):")
    assert "pruning.search.alternation: '3-1' -> expected 'A:B'" in message
    assert "skipping.kernel: 'poly' -> Input should be 'linear' or 'rbf'" in message


def test_cross_field_rules():
    (problem,) = _problems({"model": {"id": "a/b"}, "publish": {"push": True}})
    assert problem.startswith("publish: ") and "needs publish.repo_id" in problem
    (problem,) = _problems({"model": {"id": "a/b"}, "pruning": {"calibration": {"dataset": "x/y", "path": "f.txt"}}})
    assert problem.startswith("pruning.calibration: ") and "not both" in problem


def test_file_errors(tmp_path):
    expected = r"(?s)cannot read recipe .*missing\.yaml.*does not exist -> an existing YAML"
    with pytest.raises(RecipeError, match=expected):
        load_recipe(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("model: {id: [unclosed\n")
    with pytest.raises(RecipeError, match="cannot parse recipe"):
        load_recipe(bad)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(RecipeError, match=r"<top level>: list -> a mapping with a 'model' section"):
        load_recipe(lst)


def test_assignment_is_validated_too():
    r = Recipe.from_dict({"model": {"id": "a/b"}})
    with pytest.raises(ValueError):
        r.pruning.sparsity = 3.0


@pytest.mark.parametrize("path", RECIPE_FILES, ids=lambda p: p.stem)
def test_every_recipe_builds_the_pruner_it_describes(path):
    from diep_hub.pruner import DiEPPruner

    r = load_recipe(path)
    d = DiEPPruner(**r.to_pruner_kwargs()).to_dict()
    p, s, cal = r.pruning, r.pruning.search, r.pruning.calibration
    assert (d["sparsity"], d["method"], d["selection"], d["seed"]) == (p.sparsity, p.method, p.selection, p.seed)
    assert (d["num_samples"], d["seq_len"], d["batch_size"]) == (cal.num_samples, cal.seq_len, s.batch_size)
    assert (d["search_mode"], d["lr"], d["epochs"], d["lambda_"]) == (s.mode, s.lr, s.epochs, s.lambda_)
    assert tuple(d["alternation"]) == s.alternation_steps and d["ranking"] == s.ranking
    assert d["min_experts_per_layer"] == p.floors.min_experts_per_layer
    assert d["max_layer_sparsity"] == p.floors.max_layer_sparsity and d["regroup"] == p.floors.regroup


def test_stock_format_needs_uniform_selection_and_no_skipping():
    (problem,) = _problems({"model": {"id": "a/b"}, "output": {"stock_format": True}})
    assert "output.stock_format: true needs pruning.selection: uniform" in problem
    (problem,) = _problems({"model": {"id": "a/b"}, "output": {"stock_format": True},
                            "pruning": {"selection": "uniform"}, "skipping": {"enabled": True}})
    assert "cannot carry skipping" in problem
    ok = Recipe.from_dict(
        {"model": {"id": "a/b"}, "output": {"stock_format": True}, "pruning": {"selection": "uniform"}}
    )
    assert ok.output.stock_format
