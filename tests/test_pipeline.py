"""The run as a pipeline (diep_hub.pipeline): a recipe resolves into exact stage configs without touching the disk,
the stages run in the documented order, switched-off stages make no result, and a new stage slots in after prune."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import yaml

from diep_hub.errors import ConfigError
from diep_hub.pipeline import stages
from diep_hub.pipeline.plan import (
    CardConfig,
    EvaluationConfig,
    LoadConfig,
    PushConfig,
    RunPlan,
    SaveConfig,
    SkippingConfig,
    TextSource,
    resolve_plan,
)
from diep_hub.recipe import Recipe, RecipeError, load_recipe

ROOT = Path(__file__).resolve().parent.parent
TINY = ROOT / "recipes" / "tiny.yaml"

# A recipe that sets every section to a non-default value, so a field resolved from the wrong place shows.
FULL_RECIPE = {
    "model": {"id": "org/model", "revision": "v1", "dtype": "bfloat16"},
    "pruning": {
        "method": "diep", "sparsity": 0.25, "selection": "uniform", "seed": 7,
        "calibration": {"path": "data/calib.jsonl", "text_field": "body", "num_samples": 16, "seq_len": 32},
        "search": {"mode": "gated", "lr": 0.01, "epochs": 3, "batch_size": 4, "lambda": 0.02, "alternation": "2:1"},
        "floors": {"min_experts_per_layer": 2, "max_layer_sparsity": 0.5},
        "merge": "output_cka", "merge_alignment": "none",
        "recalibration": {"enabled": True, "steps": 5, "lr": 0.002, "output_scales": True,
                          "output_scale_lr": 0.05},
    },
    "skipping": {"enabled": True, "kernel": "rbf", "num_samples": 12},
    "evaluation": {
        "tasks": ["boolq", "rte"], "include_path": "tasks", "limit": 0.5, "batch_size": 4, "num_fewshot": 2,
        "perplexity": {"dataset": "diep-hub/tiny-text", "config": None, "split": "test", "num_samples": 16,
                       "seq_len": 64},
        "memory": True,
    },
    "output": {"dir": "recipe-out"},
    "publish": {"repo_id": "org/from-recipe", "push": False, "private": True, "commit_message": "msg",
                "card": {"license": "mit", "tags": ["moe", "test"], "extra_markdown": "Hello"}},
}


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    """Offline corpora are written under DIEP_HUB_CACHE: a folder of this test's own, to see whether it is written."""
    folder = tmp_path / "cache"
    monkeypatch.setenv("DIEP_HUB_CACHE", str(folder))
    return folder


def _files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _write_recipe(folder: Path, data: dict, name: str = "recipe.yaml") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / name
    path.write_text(yaml.safe_dump(data, sort_keys=False), encoding="utf-8")
    return path


def _plan(data: dict, **overrides) -> RunPlan:
    return resolve_plan(Recipe.from_dict(data), **overrides)


# ------------------------------------------------------------------------------------------- resolving a plan
def test_resolve_plan_gives_every_stage_its_exact_config_and_writes_nothing(tmp_path, cache, monkeypatch):
    recipes = tmp_path / "recipes"
    (recipes / "data").mkdir(parents=True)
    (recipes / "data" / "calib.jsonl").write_text('{"body": "one two three"}\n', encoding="utf-8")
    (recipes / "tasks").mkdir()
    path = _write_recipe(recipes, FULL_RECIPE)
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    recipe = load_recipe(path)
    before = _files(tmp_path)

    plan = resolve_plan(recipe, output_dir="cli-out", push=True, repo_id="org/from-cli", overwrite=True,
                        recipe_path=path)

    assert _files(tmp_path) == before, "resolving a plan must not write (no offline corpus, no output folder)"
    calib = str((recipes / "data" / "calib.jsonl").resolve())
    assert plan.load == LoadConfig(model_id="org/model", revision="v1", dtype="bfloat16", device_map=None,
                                   trust_remote_code=False, offline=False)
    # The local file wins; the schema's default dataset stays in the section but is never read.
    calibration = TextSource(dataset="allenai/c4", config="en", split="train", text_field="body", path=calib)
    assert plan.prune.calibration == calibration
    assert plan.prune.pruner_kwargs == {
        "method": "diep", "sparsity": 0.25, "selection": "uniform", "seed": 7,
        "min_experts_per_layer": 2, "max_layer_sparsity": 0.5, "regroup": False,
        "search_mode": "gated", "lr": 0.01, "epochs": 3, "lambda_": 0.02, "alternation": (2, 1),
        "ranking": "softmax", "text_field": "body", "num_samples": 16, "seq_len": 32, "batch_size": 4,
        "skipping": False, "options": None, "merge": "output_cka", "merge_alignment": "none",
        "recalibrate_router": True,
        "recalibration_steps": 5, "recalibration_lr": 0.002, "recalibration_output_scales": True,
        "recalibration_output_scale_lr": 0.05,
    }
    recipe_kwargs = recipe.to_pruner_kwargs()
    assert {k: v for k, v in recipe_kwargs.items() if k not in ("dataset", "dataset_config", "split")} == \
        plan.prune.pruner_kwargs, "the prune stage's settings are the recipe's pruning section, nothing else"
    assert (plan.prune.method, plan.prune.sparsity) == ("diep", 0.25)
    assert plan.prune.calibration_named == "data/calib.jsonl"  # as the recipe writes it (card and report)
    assert plan.prune.base_model == "org/model"
    assert plan.skipping == SkippingConfig(enabled=True, kernel="rbf", num_samples=12, calibration=calibration,
                                           seq_len=32, batch_size=4, seed=7)
    perplexity = TextSource(dataset="diep-hub/tiny-text", config=None, split="test", text_field="text", path=None)
    assert plan.evaluation == EvaluationConfig(
        enabled=True, base=True, tasks=("boolq", "rte"), include_path=str((recipes / "tasks").resolve()),
        limit=0.5, batch_size=4, num_fewshot=2, seed=7, perplexity=perplexity, perplexity_samples=16,
        perplexity_seq_len=64, speed=False, memory=True,
    )
    overridden = recipe.model_copy(deep=True)
    overridden.publish.repo_id = "org/from-cli"
    overridden.output.dir = "cli-out"
    recipe_yaml = overridden.to_yaml(resolve_paths=True)
    assert yaml.safe_load(recipe_yaml)["publish"]["repo_id"] == "org/from-cli"
    assert yaml.safe_load(recipe_yaml)["output"]["dir"] == "cli-out"  # the folder it was written to, as given
    assert recipe.publish.repo_id == "org/from-recipe"  # the caller's recipe is left as it was
    # --repo-id and --output win over publish.repo_id and output.dir for the card, the push and the saved recipe.yaml.
    assert plan.card == CardConfig(base_model="org/model", recipe_yaml=recipe_yaml, license="mit",
                                   tags=("moe", "test"), extra_markdown="Hello", repo_id="org/from-cli",
                                   stock_format=False, command="diep-hub run recipe.yaml")
    assert yaml.safe_load(plan.card.recipe_yaml)["pruning"]["calibration"]["path"] == calib
    # --output wins over output.dir and stays relative: relative to the working directory, not the recipe folder.
    assert plan.save == SaveConfig(out=Path("cli-out"), overwrite=True, stock_format=False, recipe_yaml=recipe_yaml,
                                   inputs=(path.resolve(), Path(calib), (recipes / "tasks").resolve()))
    assert plan.save.out.resolve() == cwd / "cli-out"
    # --push wins over publish.push: false.
    assert plan.push == PushConfig(enabled=True, repo_id="org/from-cli", private=True, create_pr=False,
                                   commit_message="msg")
    assert _files(tmp_path) == before

    # The text sources resolve only when a stage asks: a local file as it is, the offline corpus into the cache.
    assert plan.prune.calibration.loader_args() == (calib, None, "train")
    assert _files(tmp_path) == before
    source, config, split = plan.evaluation.perplexity.loader_args()
    assert (Path(source), config, split) == (cache / "offline-text" / "diep-hub--tiny-text-test.jsonl", None, "train")
    assert Path(source).read_text(encoding="utf-8").count("\n") == 256
    assert plan.evaluation.perplexity.named == "diep-hub/tiny-text"  # the card names the corpus, not the cache file


def test_overrides_left_out_keep_the_recipe_values(tmp_path, cache, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = {**FULL_RECIPE, "pruning": {**FULL_RECIPE["pruning"], "calibration": {"dataset": "diep-hub/tiny-text",
                                                                                "config": None}},
            "evaluation": {"enabled": False},
            "publish": {**FULL_RECIPE["publish"], "push": True}}
    plan = _plan(data)
    assert plan.save.out == Path("recipe-out")  # output.dir, relative to the working directory
    assert plan.save.overwrite is False
    assert (plan.push.enabled, plan.push.repo_id, plan.card.repo_id) == (True, "org/from-recipe", "org/from-recipe")
    assert plan.prune.calibration == TextSource(dataset="diep-hub/tiny-text", config=None, split="train",
                                                text_field="text", path=None)
    assert plan.prune.calibration_named == "diep-hub/tiny-text"
    assert plan.save.inputs == ()  # built from a dict: no recipe file, and nothing local to read
    # --no-push wins over publish.push: true; with no output anywhere the default folder is named after the run.
    plan = _plan({**data, "output": {}}, push=False)
    assert plan.push.enabled is False and plan.push.repo_id == "org/from-recipe"
    assert plan.save.out == Path("out") / "model-diep-25"
    assert list(tmp_path.iterdir()) == [], "nothing written: not the output folder, not the offline corpus"


def test_an_offline_model_is_recorded_by_its_id_but_is_no_hub_base_model():
    plan = resolve_plan(load_recipe(TINY))
    assert plan.load == LoadConfig(model_id="diep-hub/tiny-mixtral", revision=None, dtype="float32",
                                   device_map=None, trust_remote_code=False, offline=True)
    # the report names the offline id it was built from; the card's front matter links Hub repos only
    assert (plan.prune.base_model, plan.card.base_model) == ("diep-hub/tiny-mixtral", None)
    assert plan.save.out == Path("out/tiny")


# ------------------------------------------------------------------------------------------------- the order
def test_stages_run_in_the_documented_order():
    assert [(s.name, s.config) for s in stages.STAGES] == [
        ("load", "load"),
        ("evaluate_base", "evaluation"),
        ("prune", "prune"),
        ("calibrate_skipping", "skipping"),
        ("evaluate_pruned", "evaluation"),
        ("measure_skipping", "skipping"),
        ("card", "card"),
        ("save", "save"),
    ]
    assert [(s.name, s.config) for s in stages.PUBLISH_STAGES] == [("push", "push")]
    plan_fields = {f.name for f in dataclasses.fields(RunPlan)}
    for stage in (*stages.STAGES, *stages.PUBLISH_STAGES):
        assert stage.config in plan_fields, stage.name
        assert stage.run is getattr(stages, stage.name), "each stage is the module function of its name"


def test_switched_off_stages_make_no_result_and_touch_nothing(tmp_path):
    """Evaluation, skipping and push switched off: their stages return None without reading the model (there is
    none here), and run_stages files nothing for them."""
    data = {"model": {"id": "org/model"}, "evaluation": {"enabled": False, "tasks": ["boolq"]},
            "skipping": {"enabled": False}}
    plan = _plan(data, output_dir=tmp_path / "out")
    assert (plan.evaluation.enabled, plan.skipping.enabled, plan.push.enabled) == (False, False, False)
    state = stages.RunState(work=tmp_path / "work")
    off = [s for s in (*stages.STAGES, *stages.PUBLISH_STAGES)
           if s.name in ("evaluate_base", "calibrate_skipping", "evaluate_pruned", "measure_skipping", "push")]
    assert [s.name for s in off] == ["evaluate_base", "calibrate_skipping", "evaluate_pruned", "measure_skipping",
                                     "push"]
    for stage in off:
        assert stage.run(getattr(plan, stage.config), state) is None, stage.name
    assert stages.run_stages(plan, state, off) is state
    assert state.results == {} and state.model is None
    assert stages.evaluation_results(state) == {}
    assert list(tmp_path.iterdir()) == []

    # Evaluation on but the base switched off: only the base evaluation is skipped.
    base_off = dataclasses.replace(plan.evaluation, enabled=True, base=False)
    assert stages.evaluate_base(base_off, state) is None
    # Skipping on but never calibrated: nothing to measure, so no result (not a rate of 0).
    skipping_on = dataclasses.replace(plan.skipping, enabled=True)
    assert stages.measure_skipping(skipping_on, state) is None
    # Stages that need an earlier result say which one.
    with pytest.raises(RuntimeError, match="stage 'save' needs a PruneResult; a stage before it must make one"):
        stages.save(plan.save, state)
    with pytest.raises(RuntimeError, match="stage 'card/save' needs a PruneResult"):
        stages.final_report(state)


# ------------------------------------------------------------------------------------------ slotting a stage in
@dataclasses.dataclass(frozen=True)
class SeenAfterPrune:
    """What the inserted stage saw: the stage results before it, the PruneResult's kept counts, the model's."""

    results_before: frozenset[str]
    report_kept: dict[int, int]
    model_kept: list[int]
    kept_ids: dict[int, list[int]]


def _inspect_after_prune(config, state: stages.RunState) -> SeenAfterPrune:
    pruned = state.require(stages.PruneResult, "inspect_after_prune")
    state.model.config.inspected_after_prune = True  # later stages save the model as this stage left it
    return SeenAfterPrune(
        results_before=frozenset(t.__name__ for t in state.results),
        report_kept=dict(pruned.report.per_layer_kept),
        model_kept=list(state.model.config.num_experts_per_layer),
        kept_ids={int(k): list(v) for k, v in pruned.report.kept_ids.items()},
    )


def test_a_stage_slotted_in_after_prune_sees_the_prune_result_and_later_stages_still_run(
    tmp_path, cache, monkeypatch, one_torch_thread
):
    """The tiny recipe (evaluation off, skipping on) with one extra stage after prune, on an untrained tiny Mixtral
    (diep_hub.model_loading.load_model patched: training the recipe's model takes most of a run)."""
    import diep_hub.model_loading
    from diep_hub.tiny import build_tiny_tokenizer
    from tests.helpers.tiny_models import tiny_model

    def tiny_load(config: LoadConfig):
        assert config.model_id == "diep-hub/tiny-mixtral" and config.offline
        return tiny_model("mixtral", seed=0), build_tiny_tokenizer()

    monkeypatch.setattr(diep_hub.model_loading, "load_model", tiny_load)
    recipe = load_recipe(TINY)
    recipe.evaluation.enabled = False
    out = tmp_path / "out"
    plan = resolve_plan(recipe, output_dir=out)
    names = [s.name for s in stages.STAGES]
    at = names.index("prune") + 1
    pipeline = (*stages.STAGES[:at], stages.Stage("inspect_after_prune", _inspect_after_prune, "prune"),
                *stages.STAGES[at:])

    state = stages.run_stages(plan, stages.RunState(work=tmp_path / "work"), pipeline)

    seen = state.get(SeenAfterPrune)
    assert seen is not None, "run_stages files a new stage's result under its type"
    assert seen.results_before == {"LoadResult", "PruneResult"}  # no base evaluation: evaluation is off
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert seen.model_kept == config["num_experts_per_layer"]
    assert [seen.report_kept[i] for i in range(4)] == config["num_experts_per_layer"]
    assert [seen.kept_ids[i] for i in range(4)] == config["kept_expert_ids"]
    assert sum(config["num_experts_per_layer"]) == 16 and config["original_num_experts"] == [8, 8, 8, 8]
    assert config["inspected_after_prune"] is True

    # The stages after it ran: skipping calibrated (nothing measured: no evaluation), card and save wrote the folder.
    assert set(state.results) == {stages.LoadResult, stages.PruneResult, SeenAfterPrune, stages.SkippingResult,
                                  stages.CardResult, stages.SaveResult}
    assert state.require(stages.SaveResult, "test").path == out
    assert {"config.json", "model.safetensors", "pruning_report.json", "diep_recipe.json", "recipe.yaml",
            "README.md", "modeling_diep.py", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "evaluation.json").exists()
    report = json.loads((out / "pruning_report.json").read_text(encoding="utf-8"))
    assert report["per_layer_kept"] == {str(i): n for i, n in enumerate(config["num_experts_per_layer"])}
    assert report["calibration"]["dataset"] == "diep-hub/tiny-text"
    skipping = report["skipping"]
    assert skipping == state.require(stages.SkippingResult, "test").summary and "measured_on" not in skipping
    assert sorted(skipping["layers"]) == ["0", "1", "2", "3"]
    assert all("measured_skip_rate" not in layer for layer in skipping["layers"].values())
    assert (out / "recipe.yaml").read_text(encoding="utf-8") == plan.save.recipe_yaml


# ---------------------------------------------------------------------------------------- refused before load
def _no_model(*args, **kwargs):
    raise AssertionError("a refused recipe must not load a model or its config")


def test_a_bad_recipe_value_is_refused_before_anything_loads(tmp_path, cache, monkeypatch):
    import diep_hub.model_loading
    import diep_hub.runner
    from diep_hub.runner import run_recipe

    monkeypatch.setattr(diep_hub.model_loading, "load_model", _no_model)
    monkeypatch.setattr(diep_hub.runner, "load_config", _no_model)
    monkeypatch.chdir(tmp_path)
    out = tmp_path / "out"

    # The schema's words, as tests/test_recipes.py::test_sparsity_out_of_range has them.
    bad = _write_recipe(tmp_path / "r", {"model": {"id": "org/model"}, "pruning": {"sparsity": 1.5}})
    with pytest.raises(RecipeError) as info:
        run_recipe(bad, output_dir=out)
    assert isinstance(info.value, ConfigError)
    # (the recipe file's line of the value, since issue 14 point 10)
    assert info.value.problems == ["pruning.sparsity: 1.5 -> is out of range; allowed: (0, 1) (line 4)"]
    # A bad value cannot reach resolve_plan through the Recipe object either: assignment is validated.
    recipe = Recipe.from_dict({"model": {"id": "org/model"}})
    with pytest.raises(ValueError, match="sparsity"):
        recipe.pruning.sparsity = 1.5

    # A value the schema accepts but the plan cannot run: refused from the resolved plan, before the model.
    missing = _write_recipe(tmp_path / "r", {"model": {"id": "org/model"},
                                             "pruning": {"calibration": {"path": "data/missing.jsonl"}}}, "m.yaml")
    absolute = str((tmp_path / "r" / "data" / "missing.jsonl").resolve())
    with pytest.raises(ConfigError) as info:
        run_recipe(missing, output_dir=out)
    assert str(info.value) == (f"pruning.calibration.path: {absolute!r} -> no such file (relative to the recipe "
                               "folder)")
    assert _files(tmp_path) == ["r", "r/m.yaml", "r/recipe.yaml"], "no output folder, no cache, no probe file"
