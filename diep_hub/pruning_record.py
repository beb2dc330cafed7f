"""What a ``DiEPPruner.prune_model`` call records: ``config.diep_pruning`` (travels with the weights) and the
:class:`~diep_hub.checkpoint.report.PruningReport` (``pruning_report.json``), built from the run's results."""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from torch import nn

from .checkpoint.format import current_layer_plans
from .checkpoint.report import Calibration, PruningReport

#: the package versions a pruning report records, in this order (from ``evaluation.results.package_versions``)
REPORT_VERSIONS = ("python", "diep_hub", "torch", "transformers", "accelerate", "datasets")
#: DiEP's search record: fields of their own in the report, not ``details``
_SEARCHED = ("alpha", "beta", "loss_curve")


def record_pruning(
    pruner,
    model: nn.Module,
    *,
    family,
    reference: str,
    result,
    selection,
    experts_before: Mapping[int, int],
    previous: Mapping[str, Any] | None,
    base_model: str | None,
    calibration_shape: list[int],
    started: float,
    scoring_seconds: float,
    peak_memory: Mapping[str, Any],
    edits: Mapping[str, Any],
) -> PruningReport:
    """Set ``model.config.diep_pruning`` and return the report of this pruning.

    Args:
        pruner: the ``DiEPPruner`` that ran (its settings are recorded as ``to_dict`` gives them).
        model: the pruned model (its layer plans give ``kept_original_ids``).
        result, selection: the criterion's ``ScoringResult`` and the selection applied.
        previous: ``diep_pruning`` of an already pruned model, kept as ``previous``.
        started: ``time.perf_counter()`` when ``prune_model`` began (``wall_seconds`` runs to now).
        edits: what the steps after selection recorded: ``skipping``, ``merging``, ``recalibration`` (or None).
    """
    from .evaluation.results import package_versions

    installed = package_versions()
    versions = {name: installed[name] for name in REPORT_VERSIONS}
    settings = pruner.to_dict()
    record = {
        "base_model": base_model,
        "method": pruner.method,
        "sparsity": pruner.sparsity,
        "selection": pruner.selection,
        "ranking": result.ranking,
        "seed": pruner.seed,
        "num_removed": int(selection.num_removed),
        "num_total": int(selection.num_total),
        "calibration": {
            "dataset": settings["dataset"],
            "num_samples": pruner.num_samples,
            "seq_len": pruner.seq_len,
        },
        "criterion_options": pruner.criterion_options(),
        "merge": pruner.merge,
        "merge_alignment": pruner.merge_alignment,
        "recalibrate_router": pruner.recalibrate_router,
        "recalibration_output_scales": pruner.recalibration_output_scales,
        "diep_hub_version": versions["diep_hub"],
    }
    if previous:
        record["previous"] = previous
    model.config.diep_pruning = record
    return PruningReport(
        pruner_config=settings,
        base_model=base_model,
        family=family.model_type,
        format="diep",
        method=pruner.method,
        reference=reference,
        ranking=result.ranking,
        seed=pruner.seed,
        sparsity=pruner.sparsity,
        selection=pruner.selection,
        num_removed=int(selection.num_removed),
        num_total=int(selection.num_total),
        rounding=selection.rounding,
        selection_plan=selection.to_dict(),
        experts_before=dict(experts_before),
        kept_ids={k: [int(i) for i in v] for k, v in selection.keep.items()},
        kept_original_ids={i: list(plan.kept_original_ids) for i, plan in current_layer_plans(model).items()},
        per_layer_kept={k: int(v) for k, v in selection.per_layer_kept.items()},
        scores={k: [float(x) for x in v.tolist()] for k, v in result.scores.items()},
        details={k: v for k, v in result.details.items() if k not in _SEARCHED},
        calibration=Calibration(dataset=settings["dataset"], num_samples=pruner.num_samples, seq_len=pruner.seq_len),
        calibration_shape=calibration_shape,
        wall_seconds=round(time.perf_counter() - started, 3),
        scoring_seconds=round(scoring_seconds, 3),
        peak_memory=peak_memory,
        versions=versions,
        previous_pruning=previous,
        alpha=result.details.get("alpha"),
        beta=result.details.get("beta"),
        loss_curve=result.details.get("loss_curve"),
        skipping=edits.get("skipping"),
        merging=edits.get("merging"),
        recalibration=edits.get("recalibration"),
    )


__all__ = ["REPORT_VERSIONS", "record_pruning"]
