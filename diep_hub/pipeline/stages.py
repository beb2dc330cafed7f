"""The stages of a run, each a function ``stage(config, state) -> result``, and :data:`STAGES`, their order.

A stage reads its own config (a field of :class:`~diep_hub.pipeline.plan.RunPlan`), the current model and tokenizer
and earlier stages' typed results from the :class:`RunState`; it may replace ``state.model`` and returns its own
typed result (or None when its config switches it off), which :func:`run_stages` files under the result's type.
Results are plain data: the card and the save stage find what they need by type (:func:`final_report`,
:func:`evaluation_results`), not by knowing which stage made it.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from ..checkpoint.layout import RECIPE_FILE
from ..checkpoint.report import Calibration, PruningReport
from ..jsonable import to_jsonable
from .plan import (
    CardConfig,
    EvaluationConfig,
    LoadConfig,
    PruneConfig,
    PushConfig,
    RunPlan,
    SaveConfig,
    SkippingConfig,
)

logger = logging.getLogger(__name__)
R = TypeVar("R")


# ------------------------------------------------------------------------------------------------ results
@dataclass(frozen=True)
class LoadResult:
    """The model and tokenizer are in ``state``; this records where they came from and how long it took."""

    model_id: str
    seconds: float


@dataclass(frozen=True)
class BaseEvaluation:
    """``evaluate_model`` results of the unpruned model."""

    results: dict[str, Any]


@dataclass(frozen=True)
class PrunedEvaluation:
    """``evaluate_model`` results of the pruned model, and the retention against the base (None without one)."""

    results: dict[str, Any]
    comparison: dict[str, Any] | None = None


@dataclass(frozen=True)
class PruneResult:
    """The pruner that ran (its settings go into ``diep_recipe.json``) and its report, the calibration data named
    as the recipe names it."""

    pruner: Any  # DiEPPruner (not imported here: it pulls in every criterion)
    report: PruningReport


@dataclass(frozen=True)
class SkippingResult:
    """``SkippingCalibration.summary()`` (layer keys as strings), with measured rates once the model was evaluated."""

    summary: dict[str, Any]


@dataclass(frozen=True)
class CardResult:
    """The rendered card and its files (README.md, figures, ``.eval_results/``) for the save stage."""

    card: Any  # DiepModelCard
    files: dict[str, Any]


@dataclass(frozen=True)
class SaveResult:
    path: Path


@dataclass(frozen=True)
class PushResult:
    repo_id: str
    commit_url: str
    pr_url: str | None


@dataclass
class RunState:
    """What flows between stages: the current model and tokenizer, a scratch folder, each stage's result."""

    work: Path
    model: Any = None
    tokenizer: Any = None
    results: dict[type, Any] = field(default_factory=dict)

    def get(self, kind: type[R]) -> R | None:
        """The result of type ``kind`` (None when no stage made one: skipped, or not in this pipeline)."""
        return self.results.get(kind)

    def require(self, kind: type[R], stage: str) -> R:
        found = self.get(kind)
        if found is None:
            raise RuntimeError(f"stage {stage!r} needs a {kind.__name__}; a stage before it must make one")
        return found


# ------------------------------------------------------------------------------------------------ helpers
def evaluation_tasks(config: EvaluationConfig, work: Path) -> tuple[list[str], str | None]:
    """Task names and include path; offline tasks (diep_tiny_arith, zoo_*) are written into ``work/tasks``."""
    from ..tiny import write_offline_tasks

    tasks = list(config.tasks)
    include = config.include_path
    if include is None:
        written = write_offline_tasks(tasks, work / "tasks")
        include = str(written) if written is not None else None
    return tasks, include


def evaluate(model, tokenizer, config: EvaluationConfig, *, tasks: list[str], include_path: str | None) -> dict:
    """Evaluate one model as ``config`` says (lm-eval tasks, perplexity, speed, memory)."""
    from ..evaluation import evaluate_model

    ppl = None
    if config.perplexity is not None:
        source, config_name, split = config.perplexity.loader_args()
        ppl = {"source": source, "config_name": config_name, "split": split,
               "text_field": config.perplexity.text_field, "num_samples": config.perplexity_samples,
               "seq_len": config.perplexity_seq_len}
    return evaluate_model(
        model, tokenizer, tasks=tasks, include_path=include_path, limit=config.limit, batch_size=config.batch_size,
        num_fewshot=config.num_fewshot, seed=config.seed, perplexity=ppl, speed=config.speed, memory=config.memory,
    )


def evaluation_results(state: RunState) -> dict[str, Any]:
    """``{"base", "pruned", "comparison"}`` as far as the evaluation stages ran ({} when none did)."""
    results: dict[str, Any] = {}
    if (base := state.get(BaseEvaluation)) is not None:
        results["base"] = base.results
    if (pruned := state.get(PrunedEvaluation)) is not None:
        results["pruned"] = pruned.results
        if pruned.comparison is not None:
            results["comparison"] = pruned.comparison
    return results


def final_report(state: RunState) -> PruningReport:
    """The pruning report with what later stages add (skipping)."""
    report = state.require(PruneResult, "card/save").report
    skipping = state.get(SkippingResult)
    return report if skipping is None else dataclasses.replace(report, skipping=skipping.summary)


# ------------------------------------------------------------------------------------------------ stages
def load(config: LoadConfig, state: RunState) -> LoadResult:
    """Load the model and tokenizer (``model_loading.load_model``, looked up at call time: tests patch it)."""
    from .. import model_loading

    started = time.perf_counter()
    state.model, state.tokenizer = model_loading.load_model(config)
    return LoadResult(model_id=config.model_id, seconds=round(time.perf_counter() - started, 3))


def evaluate_base(config: EvaluationConfig, state: RunState) -> BaseEvaluation | None:
    if not (config.enabled and config.base):
        return None
    logger.info("evaluating the base model")
    tasks, include = evaluation_tasks(config, state.work)
    return BaseEvaluation(evaluate(state.model, state.tokenizer, config, tasks=tasks, include_path=include))


def prune(config: PruneConfig, state: RunState) -> PruneResult:
    """Calibrate, score, select and cut (``DiEPPruner.prune_model``); the report names the data as the recipe does
    (a Hub name, the offline corpus's name, the path as written), not the cache file an offline corpus became."""
    pruner = config.build_pruner()
    state.model = pruner.prune_model(state.model, state.tokenizer, base_model=config.base_model)
    calibration = Calibration(dataset=config.calibration_named, num_samples=pruner.num_samples,
                              seq_len=pruner.seq_len)
    report = dataclasses.replace(pruner.report, calibration=calibration)
    return PruneResult(pruner=pruner, report=report)


def calibrate_skipping(config: SkippingConfig, state: RunState) -> SkippingResult | None:
    """Calibrate and switch on adaptive expert skipping on the pruned model (paper section 3.3)."""
    if not config.enabled:
        return None
    from ..calibration import load_calibration_data, vocab_size_of
    from ..skipping import calibrate_skipping as calibrate
    from ..skipping import enable_skipping, reset_skip_counters

    source, config_name, split = config.calibration.loader_args()
    ids = load_calibration_data(
        source, state.tokenizer, num_samples=config.num_samples, seq_len=config.seq_len, seed=config.seed,
        config_name=config_name, split=split, text_field=config.calibration.text_field,
        vocab_size=vocab_size_of(state.model),
    )
    calibration = calibrate(state.model, ids, kernel=config.kernel, batch_size=config.batch_size, seed=config.seed)
    enable_skipping(state.model, calibration)
    reset_skip_counters(state.model)
    return SkippingResult(to_jsonable(calibration.summary()))


def evaluate_pruned(config: EvaluationConfig, state: RunState) -> PrunedEvaluation | None:
    if not config.enabled:
        return None
    logger.info("evaluating the pruned model")
    tasks, include = evaluation_tasks(config, state.work)
    results = evaluate(state.model, state.tokenizer, config, tasks=tasks, include_path=include)
    base = state.get(BaseEvaluation)
    if base is None:
        return PrunedEvaluation(results)
    from ..evaluation import compare

    return PrunedEvaluation(results, compare(base.results, results))


def measure_skipping(config: SkippingConfig, state: RunState) -> SkippingResult | None:
    """The skip rates counted while the pruned model was evaluated; left out where no token went through a layer
    (no evaluation ran), rather than reported as a rate of 0."""
    calibrated = state.get(SkippingResult)
    if not config.enabled or calibrated is None:
        return None
    from ..skipping import skip_counts

    summary = {**calibrated.summary, "layers": {k: dict(v) for k, v in calibrated.summary["layers"].items()}}
    for index, (skipped, seen) in skip_counts(state.model).items():
        if seen:
            summary["layers"][str(index)].update(measured_skip_rate=skipped / seen, measured_slots=seen)
    if state.get(PrunedEvaluation) is not None:
        summary["measured_on"] = "the pruned model's evaluation"
    return SkippingResult(summary)


def card(config: CardConfig, state: RunState) -> CardResult:
    from ..card import build_model_card, card_files

    made = build_model_card(
        state.model, report=final_report(state), evaluation=evaluation_results(state) or None,
        base_model=config.base_model, recipe_yaml=config.recipe_yaml, license=config.license, tags=list(config.tags),
        extra_markdown=config.extra_markdown, repo_id=config.repo_id, command=config.command,
        stock_format=config.stock_format,
    )
    return CardResult(card=made, files=card_files(made))


def save(config: SaveConfig, state: RunState) -> SaveResult:
    """Weights, config, remote code, report, pruner settings, recipe, evaluation and card, in one atomic save."""
    pruner = state.require(PruneResult, "save").pruner
    extra: dict[str, Any] = {RECIPE_FILE: config.recipe_yaml}
    if (made := state.get(CardResult)) is not None:
        extra.update(made.files)
    if results := evaluation_results(state):
        from ..evaluation.results import evaluation_files

        extra.update(evaluation_files(results))  # evaluation.json + lm_eval_results/{base,pruned}.json
    saved = pruner.save(state.model, config.out, tokenizer=state.tokenizer, overwrite=config.overwrite,
                        extra_files=extra, stock_format=config.stock_format, report=final_report(state))
    return SaveResult(Path(saved) if saved is not None else config.out)


def push(config: PushConfig, state: RunState) -> PushResult | None:
    if not config.enabled:
        return None
    from ..hub import push as hub_push

    folder = state.require(SaveResult, "push").path
    info = hub_push(folder, config.repo_id, private=config.private, create_pr=config.create_pr,
                    commit_message=config.commit_message)
    return PushResult(repo_id=str(config.repo_id), commit_url=getattr(info, "commit_url", str(info)),
                      pr_url=getattr(info, "pr_url", None))


# ------------------------------------------------------------------------------------------------ the order
@dataclass(frozen=True)
class Stage:
    """A step of the run: ``run(getattr(plan, config), state)``."""

    name: str
    run: Callable[[Any, RunState], Any]
    config: str  # the RunPlan field holding this stage's config


STAGES: tuple[Stage, ...] = (
    Stage("load", load, "load"),
    Stage("evaluate_base", evaluate_base, "evaluation"),
    Stage("prune", prune, "prune"),
    Stage("calibrate_skipping", calibrate_skipping, "skipping"),
    Stage("evaluate_pruned", evaluate_pruned, "evaluation"),
    Stage("measure_skipping", measure_skipping, "skipping"),
    Stage("card", card, "card"),
    Stage("save", save, "save"),
)
# Pushing comes after the run's wall time is taken (it measures the network, not the run).
PUBLISH_STAGES: tuple[Stage, ...] = (Stage("push", push, "push"),)


def run_stages(plan: RunPlan, state: RunState, stages: Sequence[Stage] = STAGES) -> RunState:
    """Run ``stages`` in order on ``state``, filing each non-None result under its type."""
    for stage in stages:
        started = time.perf_counter()
        result = stage.run(getattr(plan, stage.config), state)
        if result is not None:
            state.results[type(result)] = result
        logger.debug("stage %s: %.2fs%s", stage.name, time.perf_counter() - started, "" if result else " (skipped)")
    return state


__all__ = [
    "PUBLISH_STAGES",
    "STAGES",
    "BaseEvaluation",
    "CardResult",
    "LoadResult",
    "PruneResult",
    "PrunedEvaluation",
    "PushResult",
    "RunState",
    "SaveResult",
    "SkippingResult",
    "Stage",
    "evaluate",
    "evaluation_results",
    "evaluation_tasks",
    "final_report",
    "run_stages",
]
