"""Running a recipe end to end: resolve it into a plan, check everything that can fail, then run the stages.

``run_recipe`` resolves the recipe once into a :class:`~diep_hub.pipeline.plan.RunPlan` (one typed config a stage),
refuses before any weights load whatever can be refused (output folder, Hub token, data paths, the model's config
and family, :mod:`diep_hub.preflight`), and runs the stages of :mod:`diep_hub.pipeline.stages` in order: load ->
evaluate base -> prune -> skipping -> evaluate pruned -> card -> save -> push. A bad run fails in seconds rather
than after an hour of search. How to add a stage: :mod:`diep_hub.pipeline`.

The steps around the run have modules of their own: loading the model (:mod:`diep_hub.model_loading`), the dry
run (:mod:`diep_hub.dry_run`), inspecting a checkpoint (:mod:`diep_hub.checkpoint.inspect`) and reproducing one
(:mod:`diep_hub.checkpoint.reproduce`). ``estimate`` (dry_run), ``inspect_checkpoint`` and the plan helpers stay
importable from here (see ``__all__``); ``reproduce`` must be imported from :mod:`diep_hub.checkpoint.reproduce`,
which imports this module. Tests that must prove no weights load patch ``diep_hub.model_loading.load_model``, where
the load stage and ``diep-hub eval`` look it up.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .checkpoint.inspect import inspect_checkpoint
from .checkpoint.layout import CONFIG_FILE, RECIPE_FILE
from .checkpoint.report import experts_table
from .dry_run import estimate
from .errors import ConfigError
from .families import get_family
from .jsonable import to_jsonable
from .model_loading import load_config
from .pipeline import stages
from .pipeline.plan import (
    RunPlan,
    default_output_dir,
    evaluation_settings,
    resolve_output_dir,
    resolve_plan,
    run_inputs,
)
from .recipe import Recipe, load_recipe, shipped_recipes

logger = logging.getLogger(__name__)

__all__ = [
    "build_pruner",
    "default_output_dir",  # lives in diep_hub.pipeline.plan
    "estimate",  # lives in diep_hub.dry_run
    "evaluate",
    "evaluation_tasks",
    "inspect_checkpoint",  # lives in diep_hub.checkpoint.inspect
    "rebuild_card",
    "resolve_output_dir",
    "retention_summary",  # lives in diep_hub.pipeline.plan
    "run_inputs",  # lives in diep_hub.pipeline.plan
    "run_recipe",
]


def _check_output_writable(out: Path) -> None:
    """The output folder can be made: no file on its path, and its nearest existing folder takes a new file."""
    existing = out
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    if existing != out and not existing.is_dir():
        raise ConfigError(
            f"output {out}: {existing} is a file, so the folder cannot be created there -> give a folder path whose "
            "parents are folders (--output DIR)"
        )
    try:
        handle, probe = tempfile.mkstemp(prefix=".diep-hub-write-probe-", dir=existing)
    except OSError as exc:
        raise ConfigError(
            f"output {out}: cannot write in {existing} ({exc.strerror or exc}) -> choose a folder you can write to "
            "(--output DIR)"
        ) from None
    os.close(handle)
    os.unlink(probe)


def _check_before_work(plan: RunPlan) -> None:
    """Everything about the output, the push and the data paths that can be refused without reading the model."""
    out, overwrite = plan.save.out, plan.save.overwrite
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file -> give a folder path (--output DIR)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output {out} exists and is not empty -> choose another --output or pass --overwrite")
    _check_output_writable(out)
    if plan.push.enabled:
        if not plan.push.repo_id:
            raise ConfigError("push requested but no repo id -> set publish.repo_id in the recipe or pass --repo-id")
        from huggingface_hub import get_token

        if not get_token():
            raise ConfigError(
                "push requested but no Hugging Face token found -> set HF_TOKEN or run `hf auth login` "
                "(a token with write access)"
            )
        from .hub import check_write_token

        user = check_write_token()  # an invalid or read-only token fails now, not after the search
        logger.info("pushing as %s once the checkpoint is ready", user)
    cal = plan.prune.calibration
    if cal.path is not None and not Path(cal.path).exists():
        raise ConfigError(f"pruning.calibration.path: {cal.path!r} -> no such file (relative to the recipe folder)")
    include = plan.evaluation.include_path
    if include is not None and not Path(include).exists():
        raise ConfigError(f"evaluation.include_path: {include!r} -> no such folder")
    from .checkpoint.folders import check_output_folder

    # Refuses, even with --overwrite, an output folder that is or holds the working directory, a git checkout or
    # one of the run's own inputs: saving replaces the whole folder.
    check_output_folder(out, overwrite=overwrite, inputs=list(plan.save.inputs))


def _check_model(recipe: Recipe, plan: RunPlan):
    """The model's config (no weights), its family, then preflight (data sources, seq_len, task names): the last
    refusals before the run loads anything. Returns the config."""
    from .preflight import check_model_reachable, check_run_inputs  # looked up at call time: tests replace the module

    check_model_reachable(plan.load)  # a Hub id while the Hub is unreachable: refused now, not after 5 retries
    config = load_config(plan.load)
    get_family(config, source=plan.load.source)
    check_run_inputs(recipe, model_config=config)
    return config


def build_pruner(recipe: Recipe):
    """The :class:`~diep_hub.pruner.DiEPPruner` a recipe describes, its calibration source resolved to local data.

    An offline corpus (``diep-hub/tiny-text``) becomes a JSONL file; a local file is a single "train" split with no
    dataset config, as the calibration loader reads it.
    """
    return resolve_plan(recipe).prune.build_pruner()


def evaluation_tasks(recipe: Recipe, work: Path) -> tuple[list[str], str | None]:
    """Task names and include path; offline tasks (diep_tiny_arith, zoo_*) are written on the fly."""
    return stages.evaluation_tasks(evaluation_settings(recipe), work)


def evaluate(model, tokenizer, recipe: Recipe, *, tasks: list[str], include_path: str | None) -> dict[str, Any]:
    """Evaluate one model as the recipe says (lm-eval tasks, perplexity, speed, memory)."""
    return stages.evaluate(model, tokenizer, evaluation_settings(recipe), tasks=tasks, include_path=include_path)


def run_recipe(
    recipe: Recipe | str | os.PathLike,
    *,
    dry_run: bool = False,
    push: bool | None = None,
    output_dir: str | os.PathLike | None = None,
    repo_id: str | None = None,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Run a recipe: load, evaluate base, prune, skipping, evaluate pruned, card, save, push.

    Args:
        recipe: a :class:`Recipe` or a path to a recipe file.
        dry_run: only resolve the recipe and estimate memory and time from the config (no weights).
        push: override ``publish.push``.
        output_dir: override ``output.dir``.
        repo_id: override ``publish.repo_id``.
        overwrite: replace a non-empty output folder.

    Returns:
        A JSON-able summary: output folder, kept experts per layer, retention with its standard error
        (:func:`retention_summary`), the perplexity comparison, weight bytes before and after, the evaluation,
        wall time, the push URLs and the next commands (inspect, push).
    """
    recipe_path = None if isinstance(recipe, Recipe) else _recipe_file(recipe)
    recipe = load_recipe(recipe) if not isinstance(recipe, Recipe) else recipe.model_copy(deep=True)
    plan = resolve_plan(recipe, output_dir=output_dir, push=push, repo_id=repo_id, overwrite=overwrite,
                        recipe_path=recipe_path)
    if dry_run:
        from .dry_run import dry_run_summary

        return dry_run_summary(recipe, plan)
    _check_before_work(plan)
    _check_model(recipe, plan)

    started = time.perf_counter()
    loading = tuple(stage for stage in stages.STAGES if stage.name == "load")
    with tempfile.TemporaryDirectory(prefix="diep-hub-run-") as tmp:
        state = stages.run_stages(plan, stages.RunState(work=Path(tmp)), loading)
        bytes_before = _weight_bytes(state.model)  # the base model, before any stage cuts it
        stages.run_stages(plan, state, tuple(stage for stage in stages.STAGES if stage not in loading))
    from .evaluation.results import split_raw

    # lm-eval's raw results dicts are saved beside evaluation.json (lm_eval_results/), not repeated in the summary
    evaluation = split_raw(stages.evaluation_results(state))[0]
    out = str(state.require(stages.SaveResult, "summary").path)
    summary: dict[str, Any] = {
        "output_dir": out,
        "model": plan.load.model_id,
        "method": plan.prune.method,
        "sparsity": plan.prune.sparsity,
        "experts": experts_table(state.model.config),
        "retention": retention_summary(evaluation),
        "perplexity": (evaluation.get("comparison") or {}).get("perplexity"),
        "weight_bytes": {"before": bytes_before, "after": _weight_bytes(state.model)},
        "evaluation": evaluation,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    stages.run_stages(plan, state, stages.PUBLISH_STAGES)
    if (pushed := state.get(stages.PushResult)) is not None:
        summary["pushed"] = {"repo_id": pushed.repo_id, "commit_url": pushed.commit_url, "pr_url": pushed.pr_url}
    summary["next_commands"] = _next_commands(out, plan.push.repo_id, pushed=pushed is not None)
    return to_jsonable(summary)


def _weight_bytes(model) -> int:
    """Bytes of the model's parameters, as ``evaluation.memory.parameter_bytes`` counts them."""
    from .evaluation import parameter_bytes

    return parameter_bytes(model)["parameter_bytes"]


def retention_summary(evaluation: dict[str, Any]) -> dict[str, Any] | None:
    """Average retention of the tasks' primary metrics with its standard error and the item count; None without
    a base and a pruned lm-eval result.

    The average is ``comparison.average_retention``. Its standard error propagates lm-eval's standard errors of
    both scores through each ratio (delta method: se(p/b) = (p/b) * sqrt((se_p/p)^2 + (se_b/b)^2), treating the two
    runs as independent), then through the mean of the tasks (sqrt(sum se_i^2) / k); None where a score is 0 or
    lm-eval gave no standard error.
    """
    comparison = evaluation.get("comparison") or {}
    average = comparison.get("average_retention")
    if average is None:
        return None
    tasks = {side: ((evaluation.get(side) or {}).get("lm_eval") or {}).get("tasks", {}) for side in ("base", "pruned")}
    errors: list[float | None] = []
    items = 0
    for name, row in comparison.get("tasks", {}).items():
        primary, base_row = row.get("primary_metric"), tasks["base"].get(name, {})
        entry = row.get("metrics", {}).get(primary)
        if entry is None or entry.get("retention") is None or not base_row.get("requested", True):
            continue
        items += int(base_row.get("num_samples") or 0)
        ratio, parts = entry["retention"], []
        for side, value in (("base", entry["base"]), ("pruned", entry["pruned"])):
            se = tasks[side].get(name, {}).get("metrics", {}).get(f"{primary}_stderr")
            parts.append(None if not isinstance(se, (int, float)) or not value else se / value)
        errors.append(None if None in parts else abs(ratio) * (parts[0] ** 2 + parts[1] ** 2) ** 0.5)
    stderr = None if not errors or None in errors else sum(e * e for e in errors) ** 0.5 / len(errors)
    return {"average": average, "stderr": stderr, "tasks": len(errors), "items": items}


def _next_commands(folder: str, repo_id: str | None, *, pushed: bool) -> list[str]:
    """What to run next on the folder: look at it, then publish it (or look at the published repo)."""
    import shlex

    where = shlex.quote(folder)
    if pushed and repo_id:
        return [f"diep-hub inspect {where}", f"diep-hub inspect {repo_id}"]
    return [f"diep-hub inspect {where}", f"diep-hub push {repo_id or 'REPO_ID'} {where}"]


def _recipe_file(path: str | os.PathLike) -> Path | None:
    """The file ``load_recipe`` reads for ``path``: the path itself, or the shipped recipe it names."""
    file = Path(path)
    if file.is_file():
        return file.resolve()
    return shipped_recipes().get(str(path).removesuffix(".yaml"))


def rebuild_card(folder: str | os.PathLike, *, write: bool = True) -> str:
    """(Re)build the model card of a checkpoint folder from its report, evaluation and recipe files.

    The card extras (license, tags, markdown, repo id) come from the folder's ``recipe.yaml`` when there is one.
    Returns the card text; with ``write`` also writes README.md, its figures and ``.eval_results/`` files.
    """
    from .card import build_model_card, write_card

    path = Path(folder)
    if not (path / CONFIG_FILE).is_file():
        raise ConfigError(f"{folder}: no config.json -> give a checkpoint folder written by `diep-hub run` or `prune`")
    kwargs: dict[str, Any] = {}
    if (path / RECIPE_FILE).is_file():
        c = resolve_plan(load_recipe(path / RECIPE_FILE)).card  # the card stage's own config
        kwargs.update(base_model=c.base_model, license=c.license, tags=list(c.tags), extra_markdown=c.extra_markdown,
                      repo_id=c.repo_id, command=c.command)
    card = build_model_card(path, **kwargs)
    if write:
        write_card(path, card)
    return str(card)
