"""Reading a checkpoint folder (or a Hub snapshot of one) and describing it: experts kept per layer, how it was
made, its recorded results.

Shared by ``diep-hub inspect``, ``push`` (which reads the recorded publish settings), ``eval --save`` and the
reproduction, which all read the same small files; every one of them is parsed here, so a damaged file is named with
its line and column before anything is uploaded or re-run. The file names are :mod:`diep_hub.checkpoint.layout`.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from ..errors import ConfigError, CorruptFileError, DiEPError
from ..files import read_json_object, read_yaml
from ..hub import repo_id_problem
from .layout import CARD_FILE, CONFIG_FILE, EVAL_FILE, RECIPE_FILE, REPORT_FILE
from .report import PruningReport, experts_table


def local_folder(repo_or_dir: str | os.PathLike, *, revision: str | None = None, weights: bool = False) -> Path:
    """A local folder for a checkpoint: the folder itself, or a Hub snapshot (metadata only unless ``weights``)."""
    path = Path(os.path.expanduser(str(repo_or_dir)))
    if path.is_dir():
        return path
    if path.exists():
        raise ConfigError(f"{repo_or_dir} is a file -> give a checkpoint folder or a Hub repo id (namespace/name)")
    if repo_id_problem(str(repo_or_dir)) is not None:
        raise ConfigError(f"{repo_or_dir!r} is neither a folder nor a Hub repo id -> give DIR or namespace/name")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError, RepositoryNotFoundError

    patterns = None if weights else ["*.json", "*.md", "*.yaml", "*.py"]
    try:
        return Path(snapshot_download(str(repo_or_dir), revision=revision, allow_patterns=patterns))
    except (RepositoryNotFoundError, LocalEntryNotFoundError, HfHubHTTPError) as exc:
        raise DiEPError(f"cannot fetch {repo_or_dir!r} from the Hub: {type(exc).__name__}: {exc}") from None


def read_checkpoint_metadata(folder: str | os.PathLike) -> dict[str, Any]:
    """The small files of a checkpoint folder, parsed: ``config`` (config.json, a dict), ``report``
    (pruning_report.json, a :class:`PruningReport`), ``evaluation`` (evaluation.json, a dict) and ``recipe``
    (recipe.yaml, as plain data); None for a file that is absent.

    Raises:
        CorruptFileError: a file that is not UTF-8, not valid JSON/YAML (file, line and column named), whose top
            level is not a mapping, or a report field of the wrong shape.
    """
    folder = Path(folder)
    data: dict[str, Any] = {}
    config_path, eval_path = folder / CONFIG_FILE, folder / EVAL_FILE
    data["config"] = read_json_object(config_path, CONFIG_FILE) if config_path.is_file() else None
    data["report"] = PruningReport.load(folder)
    data["evaluation"] = read_json_object(eval_path, EVAL_FILE) if eval_path.is_file() else None
    recipe_path = folder / RECIPE_FILE
    recipe = read_yaml(recipe_path, RECIPE_FILE) if recipe_path.is_file() else None
    if recipe_path.is_file() and not isinstance(recipe, dict):
        raise CorruptFileError(
            f"{RECIPE_FILE} {recipe_path} holds a YAML {type(recipe).__name__}, expected a mapping with a 'model' "
            "section (the recipe `diep-hub run` saved)"
        )
    data["recipe"] = recipe
    return data


def inspect_checkpoint(repo_or_dir: str | os.PathLike, *, revision: str | None = None) -> dict[str, Any]:
    """What a pruned checkpoint holds: experts per layer, how it was made, and its evaluation results."""
    folder = local_folder(repo_or_dir, revision=revision)
    if not (folder / CONFIG_FILE).exists():
        raise DiEPError(f"{repo_or_dir}: no {CONFIG_FILE} -> not a model checkpoint")
    metadata = read_checkpoint_metadata(folder)
    config = metadata["config"]
    report = PruningReport.for_checkpoint(config, metadata["report"])
    rows = experts_table(config, report)
    if not rows:
        raise DiEPError(
            f"{repo_or_dir}: neither {CONFIG_FILE} (num_experts_per_layer) nor {REPORT_FILE} lists experts per "
            "layer -> not a diep_hub pruned checkpoint"
        )
    kept = sum(r["kept"] for r in rows)
    original = sum(r["original"] or r["kept"] for r in rows)
    info: dict[str, Any] = {
        "source": str(repo_or_dir),
        "model_type": config.get("model_type"),
        "base_model": report.base_model,
        "method": report.method,
        "selection": report.selection,
        "target_sparsity": report.sparsity,
        "experts_kept": kept,
        "experts_original": original,
        "sparsity": round(1 - kept / original, 6) if original else None,
        "layers": rows,
        "skipping": bool(config.get("diep_skipping")),
        "has_recipe": (folder / RECIPE_FILE).exists(),
        "results": [],
    }
    card_file = folder / CARD_FILE
    if card_file.exists():
        from huggingface_hub import ModelCard

        card = ModelCard.load(card_file)
        for r in card.data.eval_results or []:
            info["results"].append({"task": r.task_type, "dataset": r.dataset_name or r.dataset_type,
                                    "metric": r.metric_name or r.metric_type, "value": r.metric_value})
        info["base_model"] = info["base_model"] or card.data.base_model
    if not info["base_model"] and info["has_recipe"]:
        model = metadata["recipe"].get("model")
        info["base_model"] = model.get("id") if isinstance(model, dict) else None
    return info


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_checkpoint` (the CLI's default output)."""
    lines = [
        f"checkpoint:  {info['source']}",
        f"model type:  {info['model_type']}   base model: {info['base_model'] or 'unknown'}",
        f"method:      {info['method'] or 'unknown'} ({info['selection'] or '?'} selection), "
        f"target sparsity {info['target_sparsity']}",
        f"experts:     {info['experts_kept']} of {info['experts_original']} kept "
        f"(sparsity {info['sparsity']:.1%}); skipping {'on' if info['skipping'] else 'off'}",
        "",
        "layer  kept/orig  kept ids",
    ]
    for r in info["layers"]:
        lines.append(f"{r['layer']:>5}  {r['kept']:>4}/{r['original']:<4}  {r['kept_ids']}")
    if info["results"]:
        lines += ["", "results:"]
        for r in info["results"]:
            lines.append(f"  {r['dataset']} {r['metric']}: {r['value']}")
    else:
        lines += ["", "results: none recorded in the card"]
    return "\n".join(lines)


__all__ = ["format_inspection", "inspect_checkpoint", "local_folder", "read_checkpoint_metadata"]
