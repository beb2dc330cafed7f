"""Running a recipe end to end: check, load, evaluate, prune, skip, evaluate, card, save, push.

The runner only wires library pieces together, in the order of the architecture's flow: load (transformers +
accelerate) -> evaluate the base model -> prune (:class:`~diep_hub.pruner.DiEPPruner`) -> skipping -> evaluate the
pruned model -> card -> atomic save -> push. Every check that can fail (recipe, output folder, Hub token, model
family) runs before the model is loaded, so a bad run fails in seconds rather than after an hour of search.

The steps around the run have modules of their own: loading the model (:mod:`diep_hub.model_loading`), the dry
run (:mod:`diep_hub.dry_run`), inspecting a checkpoint (:mod:`diep_hub.checkpoint.inspect`) and reproducing one
(:mod:`diep_hub.checkpoint.reproduce`). ``estimate`` (dry_run) and ``inspect_checkpoint`` live elsewhere but
stay importable from here (see ``__all__``) for code outside the package; ``reproduce`` must be imported from
:mod:`diep_hub.checkpoint.reproduce`, which imports this module. Patch a name where it is looked up: ``load_model``
here for the run, in :mod:`diep_hub.model_loading` for ``diep-hub eval``.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from pathlib import Path
from typing import Any

from .checkpoint.inspect import inspect_checkpoint
from .checkpoint.layout import EVAL_FILE, RECIPE_FILE
from .checkpoint.report import Calibration, experts_table
from .dry_run import estimate
from .errors import ConfigError
from .families import get_family
from .model_loading import _local_model_folder, _text_source, load_config, load_model, model_source
from .recipe import Recipe, load_recipe, shipped_recipes

logger = logging.getLogger(__name__)

__all__ = [
    "build_pruner",
    "default_output_dir",
    "estimate",  # lives in diep_hub.dry_run
    "evaluate",
    "evaluation_tasks",
    "inspect_checkpoint",  # lives in diep_hub.checkpoint.inspect
    "rebuild_card",
    "resolve_output_dir",
    "run_inputs",
    "run_recipe",
]


def default_output_dir(recipe: Recipe) -> Path:
    """``out/<model name>-<method>-<sparsity %>`` in the working directory, when neither CLI nor recipe sets one."""
    name = recipe.model.id.rsplit("/", 1)[-1]
    return Path("out") / f"{name}-{recipe.pruning.method}-{round(100 * recipe.pruning.sparsity)}"


def resolve_output_dir(recipe: Recipe, output_dir: str | os.PathLike | None) -> Path:
    """The CLI's ``--output`` wins over ``output.dir``; relative paths are relative to the working directory."""
    chosen = output_dir if output_dir is not None else recipe.output.dir
    return Path(os.path.expanduser(str(chosen))) if chosen is not None else default_output_dir(recipe)


def run_inputs(recipe: Recipe, recipe_path: str | os.PathLike | None) -> list[Path]:
    """The local files and folders a run reads: the recipe file, the model folder, the calibration and perplexity
    files and the task folder (absolute). An output folder must not hold any of them, or saving would replace them.
    """
    ev = recipe.evaluation
    candidates: list[str | os.PathLike | None] = [
        recipe_path,
        recipe.model.id if _local_model_folder(recipe.model.id) is not None else None,
        recipe.resolve_path(recipe.pruning.calibration.path),
        recipe.resolve_path(ev.perplexity.path) if ev.perplexity is not None else None,
        recipe.resolve_path(ev.include_path),
    ]
    inputs: list[Path] = []
    for candidate in candidates:
        if candidate is None:
            continue
        path = Path(os.path.expanduser(str(candidate))).resolve()
        if path not in inputs:
            inputs.append(path)
    return inputs


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


def _check_before_work(
    recipe: Recipe,
    out: Path,
    push: bool,
    repo_id: str | None,
    overwrite: bool,
    recipe_path: str | os.PathLike | None = None,
) -> None:
    """Everything that can be refused without loading the model."""
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {out} is a file -> give a folder path (--output DIR)")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise ConfigError(f"output {out} exists and is not empty -> choose another --output or pass --overwrite")
    _check_output_writable(out)
    if push:
        if not repo_id:
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
    cal = recipe.pruning.calibration
    if cal.path is not None and not Path(recipe.calibration_source()).exists():
        raise ConfigError(f"pruning.calibration.path: {cal.path!r} -> no such file (relative to the recipe folder)")
    include = recipe.resolve_path(recipe.evaluation.include_path)
    if include is not None and not Path(include).exists():
        raise ConfigError(f"evaluation.include_path: {recipe.evaluation.include_path!r} -> no such folder")
    from .checkpoint.folders import check_output_folder

    # Refuses, even with --overwrite, an output folder that is or holds the working directory, a git checkout or
    # one of the run's own inputs: saving replaces the whole folder.
    check_output_folder(out, overwrite=overwrite, inputs=run_inputs(recipe, recipe_path))


def build_pruner(recipe: Recipe):
    """The :class:`~diep_hub.pruner.DiEPPruner` a recipe describes, its calibration source resolved to local data.

    An offline corpus (``diep-hub/tiny-text``) becomes a JSONL file; a local file is a single "train" split with no
    dataset config, as the calibration loader reads it.
    """
    from .pruner import DiEPPruner

    cal = recipe.pruning.calibration
    source, local = _text_source(cal.dataset, cal.path, cal.split, recipe)
    kwargs = recipe.to_pruner_kwargs()
    kwargs["dataset"] = source
    if local:
        kwargs.update(split="train", dataset_config=None)
    return DiEPPruner(**kwargs)


def evaluation_tasks(recipe: Recipe, work: Path) -> tuple[list[str], str | None]:
    """Task names and include path; offline tasks (diep_tiny_arith, zoo_*) are written on the fly."""
    from .tiny import write_offline_tasks

    tasks = list(recipe.evaluation.tasks)
    include = recipe.resolve_path(recipe.evaluation.include_path)
    if include is None:
        written = write_offline_tasks(tasks, work / "tasks")
        include = str(written) if written is not None else None
    return tasks, include


def evaluate(model, tokenizer, recipe: Recipe, *, tasks: list[str], include_path: str | None) -> dict[str, Any]:
    """Evaluate one model as the recipe says (lm-eval tasks, perplexity, speed, memory)."""
    from .evaluation import evaluate_model

    ev = recipe.evaluation
    ppl = None
    if ev.perplexity is not None:
        p = ev.perplexity
        source, local = _text_source(p.dataset, p.path, p.split, recipe)
        ppl = {"source": source, "config_name": None if local else p.config, "split": "train" if local else p.split,
               "text_field": p.text_field, "num_samples": p.num_samples, "seq_len": p.seq_len}
    return evaluate_model(
        model,
        tokenizer,
        tasks=tasks,
        include_path=include_path,
        limit=ev.limit,
        batch_size=ev.batch_size,
        num_fewshot=ev.num_fewshot,
        seed=recipe.pruning.seed,
        perplexity=ppl,
        speed=ev.speed,
        memory=ev.memory,
    )


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
        A JSON-able summary (output folder, kept experts per layer, evaluation, timings, push URL).
    """
    recipe_path = None if isinstance(recipe, Recipe) else _recipe_file(recipe)
    recipe = load_recipe(recipe) if not isinstance(recipe, Recipe) else recipe.model_copy(deep=True)
    if repo_id is not None:
        recipe.publish.repo_id = repo_id
    do_push = recipe.publish.push if push is None else push
    out = resolve_output_dir(recipe, output_dir)
    if dry_run:
        return {"dry_run": True, "output_dir": str(out), "push": do_push, "recipe": recipe.to_dict(),
                "estimate": estimate(recipe)}
    _check_before_work(recipe, out, do_push, recipe.publish.repo_id, overwrite, recipe_path)
    config = load_config(recipe)  # the config only: every refusal below comes before any download of weights
    if not recipe.is_offline:
        get_family(config, source=model_source(recipe.model.id))
    from .preflight import check_run_inputs

    check_run_inputs(recipe, model_config=config)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diep-hub-run-") as tmp:
        work = Path(tmp)
        model, tokenizer = load_model(recipe)
        pruner = build_pruner(recipe)
        tasks, include = evaluation_tasks(recipe, work)
        ev = recipe.evaluation
        results: dict[str, Any] = {}
        if ev.enabled and ev.base:
            logger.info("evaluating the base model")
            results["base"] = evaluate(model, tokenizer, recipe, tasks=tasks, include_path=include)
        model = pruner.prune_model(model, tokenizer)
        cal = recipe.pruning.calibration
        # The card names the calibration data as the recipe does (a Hub name, the offline corpus's name, the path
        # as written), not the cache file an offline corpus was written to.
        pruner.report.calibration = Calibration(
            dataset=cal.path if cal.path is not None else cal.dataset,
            loaded_from=pruner.to_dict()["dataset"],
            num_samples=cal.num_samples,
            seq_len=cal.seq_len,
        )
        if not recipe.is_offline:
            pruner.report.base_model = recipe.model.id
        skipping = _calibrate_skipping(model, tokenizer, recipe) if recipe.skipping.enabled else None
        if ev.enabled:
            logger.info("evaluating the pruned model")
            results["pruned"] = evaluate(model, tokenizer, recipe, tasks=tasks, include_path=include)
        if skipping is not None:
            from .skipping import skip_counts

            # Measured while the pruned model was evaluated; left out where no token went through a layer
            # (no evaluation ran), rather than reported as a rate of 0.
            for index, (skipped, seen) in skip_counts(model).items():
                if seen:
                    skipping["layers"][index]["measured_skip_rate"] = skipped / seen
                    skipping["layers"][index]["measured_slots"] = seen
            if ev.enabled:
                skipping["measured_on"] = "the pruned model's evaluation"
            pruner.report.skipping = skipping
        if "base" in results and "pruned" in results:
            from .evaluation import compare

            results["comparison"] = compare(results["base"], results["pruned"])
        from .card import card_files

        card = _build_card(model, pruner, recipe, results)
        extra = {RECIPE_FILE: recipe.to_yaml(resolve_paths=True), **card_files(card)}
        if results:
            extra[EVAL_FILE] = results
        saved = pruner.save(model, out, tokenizer=tokenizer, overwrite=overwrite, extra_files=extra,
                            stock_format=recipe.output.stock_format)
    summary: dict[str, Any] = {
        "output_dir": str(Path(saved) if saved is not None else out),
        "model": recipe.model.id,
        "method": recipe.pruning.method,
        "sparsity": recipe.pruning.sparsity,
        "experts": experts_table(model.config),
        "evaluation": results,
        "wall_seconds": round(time.perf_counter() - started, 2),
    }
    if do_push:
        from .hub import push as hub_push

        p = recipe.publish
        info = hub_push(out, p.repo_id, private=p.private, create_pr=p.create_pr, commit_message=p.commit_message)
        summary["pushed"] = {"repo_id": p.repo_id, "commit_url": getattr(info, "commit_url", str(info)),
                             "pr_url": getattr(info, "pr_url", None)}
    return summary


def _recipe_file(path: str | os.PathLike) -> Path | None:
    """The file ``load_recipe`` reads for ``path``: the path itself, or the shipped recipe it names."""
    file = Path(path)
    if file.is_file():
        return file.resolve()
    return shipped_recipes().get(str(path).removesuffix(".yaml"))


def _calibrate_skipping(model, tokenizer, recipe: Recipe) -> dict[str, Any]:
    """Calibrate and switch on adaptive expert skipping on the pruned model (paper section 3.3)."""
    from .calibration import load_calibration_data, vocab_size_of
    from .skipping import calibrate_skipping, enable_skipping, reset_skip_counters

    cal = recipe.pruning.calibration
    source, local = _text_source(cal.dataset, cal.path, cal.split, recipe)
    ids = load_calibration_data(
        source, tokenizer, num_samples=recipe.skipping.num_samples, seq_len=cal.seq_len, seed=recipe.pruning.seed,
        config_name=None if local else cal.config, split="train" if local else cal.split, text_field=cal.text_field,
        vocab_size=vocab_size_of(model),
    )
    calibration = calibrate_skipping(
        model, ids, kernel=recipe.skipping.kernel, batch_size=recipe.pruning.search.batch_size,
        seed=recipe.pruning.seed,
    )
    enable_skipping(model, calibration)
    reset_skip_counters(model)
    return calibration.summary()


def _build_card(model, pruner, recipe: Recipe, results: dict[str, Any]):
    from .card import build_model_card

    c = recipe.publish.card
    return build_model_card(
        model,
        report=pruner.report,
        evaluation=results or None,
        base_model=None if recipe.is_offline else recipe.model.id,
        recipe_yaml=recipe.to_yaml(resolve_paths=True),
        license=c.license,
        tags=c.tags,
        extra_markdown=c.extra_markdown,
        repo_id=recipe.publish.repo_id,
        command=f"diep-hub run {RECIPE_FILE}",
        stock_format=recipe.output.stock_format,
    )


def rebuild_card(folder: str | os.PathLike, *, write: bool = True) -> str:
    """(Re)build the model card of a checkpoint folder from its report, evaluation and recipe files.

    The card extras (license, tags, markdown, repo id) come from the folder's ``recipe.yaml`` when there is one.
    Returns the card text; with ``write`` also writes README.md, its figures and ``.eval_results/`` files.
    """
    from .card import build_model_card, write_card

    path = Path(folder)
    if not (path / "config.json").is_file():
        raise ConfigError(f"{folder}: no config.json -> give a checkpoint folder written by `diep-hub run` or `prune`")
    kwargs: dict[str, Any] = {}
    if (path / RECIPE_FILE).is_file():
        recipe = load_recipe(path / RECIPE_FILE)
        c = recipe.publish.card
        kwargs.update(base_model=None if recipe.is_offline else recipe.model.id, license=c.license, tags=c.tags,
                      extra_markdown=c.extra_markdown, repo_id=recipe.publish.repo_id,
                      command=f"diep-hub run {RECIPE_FILE}")
    card = build_model_card(path, **kwargs)
    if write:
        write_card(path, card)
    return str(card)
