"""Model cards for pruned checkpoints: typed card data, rendered from ``templates/modelcard.md.j2``.

Data and rendering are separate, as in huggingface_hub: :func:`card_inputs` gathers everything the card states
(from a live model or a checkpoint folder, the pruning report, evaluation results and the recipe) into a
:class:`CardInputs`; :func:`render_card` fills the jinja2 template through ``ModelCard.from_template`` with a
``ModelCardData`` front matter (base_model, license, tags, pipeline_tag, library_name and a ``model-index`` of
``EvalResult``); :func:`build_model_card` does both. :func:`write_card` writes README.md, the figures and the
``.eval_results/*.yaml`` entries (huggingface_hub's ``EvalResultEntry`` format) for benchmarks the Hub tracks.
Nothing here touches the network except the optional license look-up of the base model.
"""

from __future__ import annotations

import json
import logging
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml
from huggingface_hub import EvalResult, EvalResultEntry, ModelCard, ModelCardData
from huggingface_hub import eval_result_entries_to_yaml as _entries_to_yaml

from .errors import ConfigError
from .evaluation.comparison import higher_is_better, metric_retention
from .evaluation.lm_eval_runner import primary_metric
from .inspection import experts_table
from .plots import EXPERTS_FIGURE, SCORES_FIGURE, experts_per_layer_png, scores_heatmap_png

logger = logging.getLogger(__name__)

TEMPLATE = "modelcard.md.j2"
CARD_FILE = "README.md"
EVAL_RESULTS_DIR = ".eval_results"
REPORT_FILES = ("pruning_report.json",)
EVALUATION_FILES = ("evaluation.json",)
RECIPE_FILES = ("recipe.yaml", "diep_recipe.json")

# lm-eval task -> (Hub benchmark dataset id, task id) for `.eval_results/` entries. Only tasks listed here (or
# passed as ``benchmarks=``) get an entry: a made-up dataset id would not link to any leaderboard.
HUB_BENCHMARKS: dict[str, tuple[str, str]] = {
    "mmlu": ("cais/mmlu", "mmlu"),
    "mmlu_pro": ("TIGER-Lab/MMLU-Pro", "mmlu_pro"),
    "gpqa_diamond_zeroshot": ("Idavidrein/gpqa", "gpqa_diamond"),
    "boolq": ("google/boolq", "boolq"),
    "openbookqa": ("allenai/openbookqa", "openbookqa"),
    "rte": ("nyu-mll/glue", "rte"),
    "hellaswag": ("Rowan/hellaswag", "hellaswag"),
    "arc_challenge": ("allenai/ai2_arc", "arc_challenge"),
    "arc_easy": ("allenai/ai2_arc", "arc_easy"),
    "winogrande": ("allenai/winogrande", "winogrande"),
    "gsm8k": ("openai/gsm8k", "gsm8k"),
    "piqa": ("ybisk/piqa", "piqa"),
}


@dataclass
class LayerRow:
    """One MoE layer of the pruned model: experts kept, originally, and the kept ids in the original numbering."""

    layer: int
    kept: int
    original: int
    kept_ids: list[int]


@dataclass
class ResultRow:
    """One task metric, base vs pruned (either side may be missing)."""

    task: str
    metric: str
    base: float | None
    pruned: float | None
    retention: float | None
    stderr: float | None = None
    version: Any = None
    num_fewshot: int | None = None
    num_samples: int | None = None
    dataset: str | None = None


@dataclass
class CardInputs:
    """Everything the card states, as plain typed data (the template only formats it)."""

    model_name: str
    repo_id: str | None
    base_model: str | None
    license: str | None
    tags: list[str]
    model_type: str
    family: str
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
    layers: list[LayerRow] = field(default_factory=list)
    skipping: dict[str, Any] | None = None
    results: list[ResultRow] = field(default_factory=list)
    average_retention: float | None = None
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

    @property
    def has_results(self) -> bool:
        return bool(self.results or self.perplexity or self.speed or self.memory)


# ------------------------------------------------------------------------------------------------- gathering
def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else None
    except (OSError, json.JSONDecodeError) as exc:
        logger.warning("ignoring unreadable %s: %s", path, exc)
        return None


def _first_file(folder: Path, names: Sequence[str]) -> Path | None:
    return next((folder / n for n in names if (folder / n).is_file()), None)


def _config_dict(model_or_folder) -> tuple[dict[str, Any], Path | None]:
    if isinstance(model_or_folder, (str, os.PathLike)):
        folder = Path(model_or_folder)
        config = _read_json(folder / "config.json")
        if config is None:
            raise ConfigError(f"{folder} has no readable config.json; give a checkpoint folder or a model")
        return config, folder
    config = getattr(model_or_folder, "config", None)
    if config is None:
        raise ConfigError(f"expected a model or a checkpoint folder, got {type(model_or_folder).__name__}")
    return config.to_dict(), None


def _layer_rows(config: Mapping[str, Any], report: Mapping[str, Any]) -> list[LayerRow]:
    """:func:`experts_table`'s rows with the card's defaults: no recorded ids means experts 0..kept-1, no recorded
    original count means nothing was removed there."""
    return [
        LayerRow(r["layer"], int(r["kept"]), int(r["original"] or r["kept"]),
                 list(r["kept_ids"] if r["kept_ids"] is not None else range(r["kept"])))
        for r in experts_table(config, report)
    ]


def _split_evaluation(evaluation: Mapping[str, Any] | None) -> tuple[dict | None, dict | None, dict | None]:
    """(base, pruned, comparison) from either ``{"base", "pruned", "comparison"}`` or one model's results."""
    if not evaluation:
        return None, None, None
    if any(k in evaluation for k in ("base", "pruned", "comparison")):
        return evaluation.get("base"), evaluation.get("pruned"), evaluation.get("comparison")
    return None, dict(evaluation), None


def _task_rows(base: Mapping | None, pruned: Mapping | None) -> list[ResultRow]:
    base_tasks = ((base or {}).get("lm_eval") or {}).get("tasks", {})
    pruned_tasks = ((pruned or {}).get("lm_eval") or {}).get("tasks", {})
    rows = []
    for task in list(dict.fromkeys([*pruned_tasks, *base_tasks])):
        p, b = pruned_tasks.get(task) or {}, base_tasks.get(task) or {}
        info = p or b
        if info.get("requested") is False:  # subtasks of a requested group (mmlu_*) stay in evaluation.json
            continue
        metrics_p, metrics_b = p.get("metrics", {}), b.get("metrics", {})
        metric = info.get("primary_metric") or primary_metric(metrics_p or metrics_b)
        if metric is None:
            continue
        pv, bv = metrics_p.get(metric), metrics_b.get(metric)
        retention = metric_retention(pv, bv, higher_is_better(info, metric))
        stderr = metrics_p.get(f"{metric}_stderr")
        rows.append(ResultRow(
            task=task, metric=metric, base=bv, pruned=pv, retention=retention,
            stderr=stderr if isinstance(stderr, (int, float)) else None, version=info.get("version"),
            num_fewshot=info.get("num_fewshot"), num_samples=info.get("num_samples"),
            dataset=info.get("dataset_path"),
        ))
    return rows


def _pair(base: Mapping | None, pruned: Mapping | None, part: str, keys: Sequence[str]) -> dict[str, Any] | None:
    b, p = (base or {}).get(part), (pruned or {}).get(part)
    if not b and not p:
        return None
    out = {}
    for key in keys:
        bv, pv = (b or {}).get(key), (p or {}).get(key)
        ratio = pv / bv if isinstance(pv, (int, float)) and isinstance(bv, (int, float)) and bv else None
        out[key] = {"base": bv, "pruned": pv, "ratio": ratio}
    return out


def _base_model_license(base_model: str) -> str | None:
    """The base model's license from its Hub card; None offline or when the look-up fails."""
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        return None
    try:
        info = HfApi().model_info(base_model)
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown license", stated as such on the card
        logger.warning("could not read the license of %s: %s", base_model, type(exc).__name__)
        return None
    data = info.card_data
    license_ = data.get("license") if data is not None else None
    return license_ if isinstance(license_, str) else None


def card_inputs(
    model_or_folder,
    *,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
    report: Mapping[str, Any] | None = None,
    recipe_text: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    repo_id: str | None = None,
    model_name: str | None = None,
    command: str | None = None,
    extra_markdown: str | None = None,
    stock_format: bool = False,
) -> CardInputs:
    """Gather what the card says. A folder supplies missing report, evaluation and recipe from its files."""
    from .families import get_family

    config, folder = _config_dict(model_or_folder)
    if folder is not None:
        if report is None and (path := _first_file(folder, REPORT_FILES)):
            report = _read_json(path)
        if eval_results is None and (path := _first_file(folder, EVALUATION_FILES)):
            eval_results = _read_json(path)
        if recipe_text is None and (path := _first_file(folder, RECIPE_FILES)):
            recipe_text = path.read_text(encoding="utf-8")
    report = dict(report or {})
    pruning = config.get("diep_pruning") or {}
    model_type = str(config.get("model_type", "unknown"))
    family = get_family(model_type)
    if stock_format:  # the live model is diep_<family>, but it is saved as the stock architecture
        model_type = family.model_type
    if license is None and base_model:
        license = _base_model_license(base_model)
    base, pruned, comparison = _split_evaluation(eval_results)
    layers = _layer_rows(config, report)
    # The config's name_or_path only names the card: as base_model it could point at a local or offline id.
    stem_source = base_model or _base_from_config(config)
    name = model_name or (repo_id.split("/")[-1] if repo_id else None) or _default_name(stem_source, report, pruning)
    recipe_format = "json" if recipe_text and recipe_text.lstrip().startswith("{") else "yaml"
    settings = ((pruned or base or {}).get("lm_eval") or {})
    versions = dict(report.get("versions") or pruning.get("versions") or {})
    versions.update({k: v for k, v in ((pruned or {}).get("environment") or {}).get("versions", {}).items()
                     if k not in versions})
    figures = {}
    if layers:
        figures["experts"] = EXPERTS_FIGURE
    if report.get("scores"):
        figures["scores"] = SCORES_FIGURE
    return CardInputs(
        model_name=name,
        repo_id=repo_id,
        base_model=base_model,
        license=license,
        tags=list(dict.fromkeys(["diep", "moe", "expert-pruning", "pruned", family.model_type, *tags])),
        model_type=model_type,
        family=family.model_type,
        method=report.get("method") or pruning.get("method"),
        method_reference=report.get("reference"),
        sparsity=report.get("sparsity", pruning.get("sparsity")),
        selection=report.get("selection") or pruning.get("selection"),
        ranking=report.get("ranking") or pruning.get("ranking"),
        seed=report.get("seed", pruning.get("seed")),
        num_removed=report.get("num_removed", pruning.get("num_removed")),
        num_total=report.get("num_total", pruning.get("num_total")),
        calibration=report.get("calibration") or (report.get("config") and _calibration(report["config"]))
        or pruning.get("calibration"),
        wall_seconds=report.get("wall_seconds"),
        layers=layers,
        skipping=_skipping(report, config),
        results=_task_rows(base, pruned),
        average_retention=(comparison or {}).get("average_retention"),
        perplexity=_pair(base, pruned, "perplexity", ("perplexity",)),
        speed=_pair(base, pruned, "speed", ("prefill_tokens_per_s", "decode_tokens_per_s")),
        memory=_pair(base, pruned, "memory", ("parameter_bytes", "routed_expert_bytes", "peak_bytes")),
        memory_method=((pruned or base or {}).get("memory") or {}).get("peak_method"),
        evaluation_settings={k: settings.get(k) for k in ("lm_eval_version", "limit", "num_fewshot", "batch_size")}
        if settings else None,
        recipe_text=recipe_text,
        recipe_format=recipe_format,
        command=command or _default_command(recipe_text, recipe_format),
        versions=versions,
        renormalizes=family.renormalizes(SimpleNamespace(**config)),
        family_notes=family.notes,
        figures=figures,
        extra_markdown=extra_markdown,
    )


def _base_from_config(config: Mapping[str, Any]) -> str | None:
    name = config.get("_name_or_path") or config.get("name_or_path")
    looks_like_repo = isinstance(name, str) and name.count("/") == 1 and not name.startswith((".", "/", "~"))
    if looks_like_repo and not os.path.exists(name):
        return name
    return None


def _default_name(base_model: str | None, report: Mapping, pruning: Mapping) -> str:
    stem = base_model.split("/")[-1] if base_model else "model"
    sparsity = report.get("sparsity", pruning.get("sparsity"))
    return f"{stem}-DiEP-{round(100 * sparsity)}" if isinstance(sparsity, (int, float)) else f"{stem}-DiEP"


def _calibration(config: Mapping[str, Any]) -> dict[str, Any]:
    return {k: config.get(k) for k in ("dataset", "num_samples", "seq_len") if k in config}


SKIP_LAYER_FIELDS = ("gamma1", "mean_pairwise_cka", "calibration_skip_rate", "measured_skip_rate")


def _skipping(report: Mapping[str, Any], config: Mapping[str, Any]) -> dict[str, Any] | None:
    """What the card says about skipping: scalar settings, and one row a layer (``SkippingCalibration.summary()``
    plus the rates measured during evaluation, when there was one)."""
    skipping = report.get("skipping")
    configured = config.get("diep_skipping") or {}
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
    rows = []
    for index, layer in sorted((skipping.get("layers") or {}).items(), key=lambda item: int(item[0])):
        rows.append({"layer": int(index), **{name: (layer or {}).get(name) for name in SKIP_LAYER_FIELDS}})
    return {"settings": settings, "layers": rows}


def _default_command(recipe_text: str | None, recipe_format: str) -> str | None:
    if not recipe_text:
        return None
    name = "recipe.yaml" if recipe_format == "yaml" else "diep_recipe.json"
    return f"diep-hub run {shlex.quote(name)}"


# ------------------------------------------------------------------------------------------------ rendering
def load_template() -> str:
    """The card template shipped in the package (``diep_hub.templates/modelcard.md.j2``)."""
    return (resources.files("diep_hub.templates") / TEMPLATE).read_text(encoding="utf-8")


def model_index_results(inputs: CardInputs) -> list[EvalResult]:
    """``EvalResult`` rows for the front matter's model-index: the pruned model's values, unchanged."""
    out = []
    for row in inputs.results:
        if row.pruned is None:
            continue
        dataset_id = HUB_BENCHMARKS.get(row.task, (row.task, row.task))[0]
        out.append(EvalResult(
            task_type="text-generation", task_name="Text Generation", dataset_type=dataset_id,
            dataset_name=row.task, metric_type=row.metric, metric_value=row.pruned,
            metric_name=f"{row.metric} ({row.num_fewshot if row.num_fewshot is not None else 0}-shot)",
            source_name="diep_hub evaluation (lm-eval)" if inputs.repo_id else None,
            source_url=f"https://huggingface.co/{inputs.repo_id}" if inputs.repo_id else None,
        ))
    return out


def eval_result_entries(
    inputs: CardInputs, benchmarks: Mapping[str, tuple[str, str]] | None = None
) -> dict[str, list[EvalResultEntry]]:
    """``.eval_results/<task>.yaml`` entries for tasks that map to a Hub benchmark dataset."""
    table = {**HUB_BENCHMARKS, **(benchmarks or {})}
    out: dict[str, list[EvalResultEntry]] = {}
    for row in inputs.results:
        if row.pruned is None or row.task not in table:
            continue
        dataset_id, task_id = table[row.task]
        shots = row.num_fewshot if row.num_fewshot is not None else 0
        version = (inputs.evaluation_settings or {}).get("lm_eval_version")
        out[row.task] = [EvalResultEntry(
            dataset_id=dataset_id, task_id=task_id, value=row.pruned,
            notes=f"lm-eval {version or ''} {row.metric}, {shots}-shot, after DiEP expert pruning".replace("  ", " "),
        )]
    return out


def render_card(inputs: CardInputs, *, template: str | None = None) -> ModelCard:
    """Fill the template; front matter from ``ModelCardData`` (with the model-index when there are results)."""
    results = model_index_results(inputs)
    data = ModelCardData(
        base_model=inputs.base_model,
        license=inputs.license,
        tags=inputs.tags,
        pipeline_tag=inputs.pipeline_tag,
        library_name=inputs.library_name,
        model_name=inputs.model_name if results else None,
        eval_results=results or None,
        experts_per_layer={str(r.layer): r.kept for r in inputs.layers} or None,
    )
    context = asdict(inputs)
    context["has_results"] = inputs.has_results
    context["pct"] = None if inputs.sparsity is None else round(100 * inputs.sparsity, 2)
    context["kept_total"] = sum(r.kept for r in inputs.layers)
    context["original_total"] = sum(r.original for r in inputs.layers)
    context["memory_human"] = _human_bytes(inputs.memory)
    # ModelCardData.to_dict() is merged into the context by from_template; our keys must win.
    card = ModelCard.from_template(data, template_str=template or load_template(), **context)
    return card


def _human_bytes(memory: Mapping[str, Any] | None) -> dict[str, dict[str, str]] | None:
    if not memory:
        return None

    def fmt(value):
        if not isinstance(value, (int, float)):
            return "n/a"
        for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
            if abs(value) < 1024 or unit == "TiB":
                return f"{value:.1f} {unit}" if unit != "B" else f"{int(value)} B"
            value /= 1024
        return str(value)

    return {k: {"base": fmt(v["base"]), "pruned": fmt(v["pruned"])} for k, v in memory.items()}


def build_model_card(
    model_or_folder,
    *,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
    report: Mapping[str, Any] | None = None,
    recipe_text: str | None = None,
    license: str | None = None,
    tags: Sequence[str] = (),
    repo_id: str | None = None,
    model_name: str | None = None,
    command: str | None = None,
    extra_markdown: str | None = None,
    benchmarks: Mapping[str, tuple[str, str]] | None = None,
    evaluation: Mapping[str, Any] | None = None,
    recipe_yaml: str | None = None,
    stock_format: bool = False,
) -> ModelCard:
    """The model card of a pruned model or checkpoint folder.

    Args:
        model_or_folder: a pruned model, or a folder written by ``save_pruned`` / ``DiEPPruner.save``.
        base_model: Hub id of the model that was pruned (front matter ``base_model``; its license is inherited
            when ``license`` is None and the Hub is reachable).
        eval_results: ``evaluate_model`` output for the pruned model, or ``{"base", "pruned", "comparison"}``.
        report: the pruning report (``DiEPPruner.report``); read from the folder when omitted.
        recipe_text: the recipe that produced the model (YAML or JSON text), shown under "How to reproduce".
        benchmarks: extra ``task -> (Hub dataset id, task id)`` pairs for ``.eval_results`` entries.
        evaluation, recipe_yaml: the recipe runner's names for ``eval_results`` and ``recipe_text``.
        stock_format: the model is saved as the stock architecture (``save_pruned(stock_format=True)``), so the
            card tells readers to load it without remote code.

    The returned card carries ``card.figures`` (path -> PNG bytes) and ``card.eval_entries``
    (file name -> EvalResultEntry list); :func:`write_card` / :func:`card_files` write them beside README.md.
    """
    if eval_results is not None and evaluation is not None:
        raise ConfigError("give eval_results or evaluation, not both (they are the same option)")
    if recipe_text is not None and recipe_yaml is not None:
        raise ConfigError("give recipe_text or recipe_yaml, not both (they are the same option)")
    inputs = card_inputs(
        model_or_folder, base_model=base_model, eval_results=eval_results if eval_results is not None else evaluation,
        report=report, recipe_text=recipe_text if recipe_text is not None else recipe_yaml, license=license,
        tags=tags, repo_id=repo_id, model_name=model_name, command=command, extra_markdown=extra_markdown,
        stock_format=stock_format,
    )
    card = render_card(inputs)
    card.inputs = inputs
    card.eval_entries = eval_result_entries(inputs, benchmarks)
    card.figures = _figures(inputs, report if report is not None else _folder_report(model_or_folder))
    return card


def _folder_report(model_or_folder) -> Mapping[str, Any] | None:
    if isinstance(model_or_folder, (str, os.PathLike)):
        path = _first_file(Path(model_or_folder), REPORT_FILES)
        return _read_json(path) if path else None
    return None


def _figures(inputs: CardInputs, report: Mapping[str, Any] | None) -> dict[str, bytes]:
    figures: dict[str, bytes] = {}
    if "experts" in inputs.figures:
        figures[EXPERTS_FIGURE] = experts_per_layer_png([asdict(r) for r in inputs.layers])
    if "scores" in inputs.figures and report and report.get("scores"):
        kept = {str(r.layer): r.kept_ids for r in inputs.layers}
        figures[SCORES_FIGURE] = scores_heatmap_png(report["scores"], kept)
    return figures


def card_files(card: ModelCard, eval_entries: Mapping[str, list[EvalResultEntry]] | None = None) -> dict[str, Any]:
    """README.md, figures and ``.eval_results/*.yaml`` as ``{relative path: text or bytes}`` (for ``extra_files``)."""
    entries = eval_entries if eval_entries is not None else getattr(card, "eval_entries", {})
    files: dict[str, Any] = {CARD_FILE: str(card)}
    files.update(getattr(card, "figures", {}) or {})
    for name, rows in sorted(entries.items()):
        safe = "".join(c if c.isalnum() or c in "-_." else "_" for c in name)
        files[f"{EVAL_RESULTS_DIR}/{safe}.yaml"] = yaml.safe_dump(_entries_to_yaml(list(rows)), sort_keys=False)
    return files


def write_card(
    folder: str | os.PathLike, card: ModelCard, eval_entries: Mapping[str, list[EvalResultEntry]] | None = None
) -> list[Path]:
    """Write README.md, the card's figures and ``.eval_results/*.yaml`` into ``folder``; return the paths."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ConfigError(f"{folder} is not a folder; write the checkpoint first, then its card")
    written = []
    for name, content in card_files(card, eval_entries).items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            path.write_text(content, encoding="utf-8")
        written.append(path)
    logger.info("wrote model card and %d companion file(s) to %s", len(written) - 1, folder)
    return written


__all__ = [
    "HUB_BENCHMARKS",
    "CardInputs",
    "LayerRow",
    "ResultRow",
    "build_model_card",
    "card_files",
    "card_inputs",
    "eval_result_entries",
    "load_template",
    "model_index_results",
    "render_card",
    "write_card",
]
