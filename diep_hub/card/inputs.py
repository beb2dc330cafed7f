"""What the card states, as typed data: :class:`CardInputs`, built by :func:`card_inputs_from_report`.

That function is the one place that reads the pruning report (a :class:`PruningReport`, completed by
config.json's ``diep_pruning`` record through ``PruningReport.for_checkpoint``); ``gather.card_inputs`` collects its
arguments from a live model or a checkpoint folder. The template only formats what this produces.
"""

from __future__ import annotations

import os
import re
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..checkpoint.layout import EXPERTS_FIGURE, PRUNER_CONFIG_FILE, RECIPE_FILE, SCORES_FIGURE
from ..checkpoint.report import PruningReport, experts_table
from .tables import (
    ResultRow,
    RetentionSummary,
    memory_rows,
    pair,
    perplexity_row,
    retention_summary,
    split_evaluation,
    task_rows,
)

SKIP_LAYER_FIELDS = ("gamma1", "mean_pairwise_cka", "calibration_skip_rate", "measured_skip_rate")


@dataclass
class LayerRow:
    """One MoE layer of the pruned model: experts kept, originally, and the kept ids in the original numbering.
    ``at_floor``: the layer keeps no more than top-k experts, so every token uses all of them (no routing choice)."""

    layer: int
    kept: int
    original: int
    kept_ids: list[int]
    at_floor: bool = False


@dataclass
class CardInputs:
    """Everything the card states, as plain typed data (the template only formats it). ``title`` names the base
    model; ``model_name`` is the model-index name (the repo's name when there is one)."""

    model_name: str
    title: str
    repo_id: str | None
    base_model: str | None
    license: str | None
    tags: list[str]
    model_type: str
    family: str
    base_name: str | None = None  # the base's name when it is a local folder (no Hub id to link)
    license_name: str | None = None
    license_link: str | None = None
    pipeline_tag: str = "text-generation"
    library_name: str = "transformers"
    method: str | None = None
    method_reference: str | None = None
    sparsity: float | None = None
    selection: str | None = None
    ranking: str | None = None
    seed: int | None = None
    num_removed: int | None = None
    num_total: int | None = None
    calibration: dict[str, Any] | None = None
    wall_seconds: float | None = None
    top_k: int | None = None
    layers: list[LayerRow] = field(default_factory=list)
    scores: dict[int, list[float]] | None = None
    skipping: dict[str, Any] | None = None
    merging: dict[str, Any] | None = None
    recalibration: dict[str, Any] | None = None
    results: list[ResultRow] = field(default_factory=list)
    average_retention: float | None = None
    retention: RetentionSummary | None = None
    perplexity: dict[str, Any] | None = None
    speed: dict[str, Any] | None = None
    memory: dict[str, Any] | None = None
    memory_method: str | None = None
    evaluation_settings: dict[str, Any] | None = None
    recipe_text: str | None = None
    recipe_format: str = "yaml"
    command: str | None = None
    versions: dict[str, Any] = field(default_factory=dict)
    renormalizes: bool = True
    family_notes: str = ""
    figures: dict[str, str] = field(default_factory=dict)
    extra_markdown: str | None = None
    serving: dict[str, Any] | None = None  # checkpoint.inspect.serving_support: what vLLM needs to serve it

    @property
    def has_results(self) -> bool:
        return bool(self.results or self.perplexity or self.speed or self.memory)

    @property
    def floor_layers(self) -> list[int]:
        """Layers left at the floor (kept <= top-k): the router there has no choice left."""
        return [r.layer for r in self.layers if r.at_floor]


# ------------------------------------------------------------------------------------------------ the report
def card_inputs_from_report(
    report: PruningReport | Mapping[str, Any] | None,
    evaluation: Mapping[str, Any] | None,
    *,
    config: Mapping[str, Any],
    recipe_text: str | None = None,
    base_model: str | None = None,
    license: str | Mapping[str, str | None] | None = None,
    tags: Sequence[str] = (),
    repo_id: str | None = None,
    model_name: str | None = None,
    command: str | None = None,
    extra_markdown: str | None = None,
    stock_format: bool = False,
) -> CardInputs:
    """The card's data from the pruning report, the evaluation results and config.json (as a dict).

    The report is read here and nowhere else in the card: ``PruningReport.for_checkpoint`` completes it with the
    config's ``diep_pruning`` record, so a checkpoint without a report still states its method and sparsity.
    ``license`` is an id, or the base card's ``{"license", "license_name", "license_link"}`` (name and link are
    kept for ``license: other`` only, as the Hub asks).
    """
    from ..checkpoint.inspect import serving_support
    from ..families import get_family

    view = PruningReport.for_checkpoint(config, report)
    family = get_family(str(config.get("model_type", "unknown")))
    # the live model is diep_<family> while it may be saved as the stock architecture
    model_type = family.model_type if stock_format else str(config.get("model_type", "unknown"))
    # The base as given (a Hub id, or a local folder), else as the report recorded it; only a Hub id goes into the
    # front matter and gets a link, while the title names the model either way (a local folder by its name).
    named_base = base_model or view.base_model
    hub_base = hub_model_id(named_base)
    # The config's name_or_path only names the card: as base_model it could point at a local or offline id.
    stem = model_stem(named_base) or model_stem(config.get("_name_or_path") or config.get("name_or_path"))
    top_k = _top_k(family, config)
    base, pruned, comparison = split_evaluation(evaluation)
    layers = layer_rows(config, view, top_k)
    repo_name = repo_id.split("/")[-1] if repo_id else None
    name = model_name or repo_name or _default_name(stem or family.model_type, view.sparsity)
    # The title names the base model ("Mixtral-8x7B-v0.1-DiEP-50"); the repo's name only when the base is unknown.
    title = model_name or (_default_name(stem, view.sparsity) if stem else None) or repo_name or name
    recipe_format = "json" if recipe_text and recipe_text.lstrip().startswith("{") else "yaml"
    settings = (pruned or base or {}).get("lm_eval") or {}
    versions = dict(view.versions or {})
    environment = ((pruned or {}).get("environment") or {}).get("versions", {})
    versions.update({k: v for k, v in environment.items() if k not in versions})
    results = task_rows(base, pruned)
    average = (comparison or {}).get("average_retention")
    calibration = view.calibration
    licensing = dict(license) if isinstance(license, Mapping) else {"license": license}
    other = licensing.get("license") == "other"
    figures = {"experts": EXPERTS_FIGURE} if layers else {}
    if view.scores:
        figures["scores"] = SCORES_FIGURE
    return CardInputs(
        model_name=name,
        title=title,
        repo_id=repo_id,
        base_model=hub_base,
        base_name=stem if not hub_base else None,
        license=licensing.get("license"),
        license_name=licensing.get("license_name") if other else None,
        license_link=licensing.get("license_link") if other else None,
        tags=list(dict.fromkeys(["diep", "moe", "expert-pruning", "pruned", family.model_type, *tags])),
        model_type=model_type,
        family=family.model_type,
        method=view.method,
        method_reference=view.reference,
        sparsity=view.sparsity,
        selection=view.selection,
        ranking=view.ranking,
        seed=view.seed,
        num_removed=view.num_removed,
        num_total=view.num_total,
        calibration={"dataset": calibration.dataset, "num_samples": calibration.num_samples,
                     "seq_len": calibration.seq_len} if calibration is not None else None,
        wall_seconds=view.wall_seconds,
        top_k=top_k,
        layers=layers,
        scores=view.scores or None,
        skipping=skipping_section(view.skipping, config.get("diep_skipping") or {}),
        merging=view.merging or None,
        recalibration=view.recalibration or None,
        results=results,
        average_retention=average,
        retention=retention_summary(results, average),
        perplexity=perplexity_row(base, pruned),
        speed=pair(base, pruned, "speed", ("prefill_tokens_per_s", "decode_tokens_per_s")),
        memory=memory_rows(base, pruned),
        memory_method=_memory_method(base, pruned),
        evaluation_settings={k: settings.get(k) for k in ("lm_eval_version", "limit", "num_fewshot", "batch_size",
                                                           "date")} if settings else None,
        recipe_text=recipe_text,
        recipe_format=recipe_format,
        command=command or _default_command(recipe_text, recipe_format),
        versions=versions,
        renormalizes=family.renormalizes(SimpleNamespace(**config)),
        family_notes=family.notes,
        figures=figures,
        extra_markdown=extra_markdown,
        serving=serving_support({"model_type": model_type}),
    )


def layer_rows(config: Mapping[str, Any], report: PruningReport | Mapping[str, Any] | None,
               top_k: int | None = None) -> list[LayerRow]:
    """:func:`experts_table`'s rows with the card's defaults: no recorded ids means experts 0..kept-1, no recorded
    original count means nothing was removed there. A layer keeping <= ``top_k`` experts is at the floor."""
    return [
        LayerRow(r["layer"], int(r["kept"]), int(r["original"] or r["kept"]),
                 list(r["kept_ids"] if r["kept_ids"] is not None else range(r["kept"])),
                 at_floor=top_k is not None and int(r["kept"]) <= top_k)
        for r in experts_table(config, report)
    ]


def skipping_section(skipping: Mapping[str, Any] | None, configured: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the card says about skipping: scalar settings (booleans as yes/no), and one row a layer
    (``SkippingCalibration.summary()`` plus the rates measured during evaluation, when there was one)."""
    if not isinstance(skipping, Mapping):
        if not configured:
            return None
        configured_layers = configured.get("layers") or {}
        skipping = {
            "kernel": configured.get("kernel"),
            "layers": {i: {"gamma1": v.get("gamma1")} for i, v in configured_layers.items()},
        }
    settings = {k: v for k, v in skipping.items() if k != "layers" and not isinstance(v, (Mapping, list, tuple))}
    if configured:
        settings["enabled at load"] = bool(configured.get("enabled", True))
    settings = {k: ("yes" if v else "no") if isinstance(v, bool) else v for k, v in settings.items()}
    rows = []
    for index, layer in sorted((skipping.get("layers") or {}).items(), key=lambda item: int(item[0])):
        rows.append({"layer": int(index), **{name: (layer or {}).get(name) for name in SKIP_LAYER_FIELDS}})
    return {"settings": settings, "layers": rows}


def _top_k(family, config: Mapping[str, Any]) -> int | None:
    try:
        return family.top_k(SimpleNamespace(**config))
    except (AttributeError, TypeError, ValueError):
        return None


def _hub_id(name: Any) -> str | None:
    """``name`` when it reads as a Hub repo id (namespace/name) and is no local path; else None."""
    looks_like_repo = isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~"))
    return name if looks_like_repo and not os.path.exists(name) else None


_HUB_CACHE_FOLDER = re.compile(r"(?:^|[/\\])models--([^/\\]+?)--([^/\\]+)(?:[/\\]|$)")


def hub_model_id(name: Any) -> str | None:
    """The Hub id a base model is known by: ``name`` itself when it is one, or the id a huggingface_hub cache
    folder stands for (``.../models--mistralai--Mixtral-8x7B-v0.1/snapshots/<sha>``); None for other local paths."""
    if not isinstance(name, str):
        return None
    if found := _HUB_CACHE_FOLDER.search(name):
        return f"{found.group(1)}/{found.group(2)}"
    return _hub_id(name)


def model_stem(name: Any) -> str | None:
    """The model's own name, for the title: the part after the namespace of a Hub id, the folder name of a local
    path (``/models/Mixtral-8x7B-v0.1/`` -> ``Mixtral-8x7B-v0.1``)."""
    if not isinstance(name, str) or not name.strip():
        return None
    hub = hub_model_id(name)
    if hub is not None:
        return hub.split("/")[-1]
    return Path(os.path.expanduser(name.strip())).name or None


def _default_name(stem: str, sparsity: float | None) -> str:
    return f"{stem}-DiEP-{round(100 * sparsity)}" if isinstance(sparsity, (int, float)) else f"{stem}-DiEP"


def _memory_method(base: Mapping | None, pruned: Mapping | None) -> str | None:
    """How the forward peak was read (results before the weight/forward split measured the process RSS: not
    shown)."""
    memory = (pruned or base or {}).get("memory") or {}
    if "forward_peak_bytes" not in memory or not memory.get("peak_method"):
        return None
    return (f"{memory['peak_method']}; one forward over {memory.get('batch_size', '?')} x "
            f"{memory.get('seq_len', '?')} tokens on {memory.get('device', '?')}")


def _default_command(recipe_text: str | None, recipe_format: str) -> str | None:
    if not recipe_text:
        return None
    name = RECIPE_FILE if recipe_format == "yaml" else PRUNER_CONFIG_FILE
    return f"diep-hub run {shlex.quote(name)}"
