"""Reading a checkpoint folder (or a Hub snapshot of one) and describing it: experts kept per layer, how it was
made, its recorded results.

Shared by ``diep-hub inspect``, ``push`` (which reads the recorded publish settings), ``eval --save`` and the
reproduction, which all read the same small files; every one of them is parsed here, so a damaged file is named with
its line and column before anything is uploaded or re-run. The names of those files are defined here too.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from .errors import ConfigError, CorruptFileError, DiEPError
from .files import read_json_object, read_yaml
from .hub import repo_id_problem
from .jsonable import to_jsonable

RECIPE_FILE = "recipe.yaml"
REPORT_FILE = "pruning_report.json"
EVAL_FILE = "evaluation.json"
CARD_FILE = "README.md"


def experts_table(config, report: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per MoE layer: experts kept, originally, and the kept original ids (dense layers are left out).

    From config.json's per-layer fields; where they are absent (a stock-format checkpoint, uniform counts), from
    the pruning report's plan. A figure neither records is None. The one reading of "which experts are left",
    for ``inspect``, the run summary and the model card.
    """
    cfg = config if isinstance(config, Mapping) else config.to_dict()
    kept = cfg.get("num_experts_per_layer") or []
    original = cfg.get("original_num_experts") or []
    ids = cfg.get("kept_expert_ids") or []
    rows = []
    for i, n in enumerate(kept):
        if n is None:
            continue
        rows.append({"layer": i, "kept": n, "original": original[i] if i < len(original) else None,
                     "kept_ids": ids[i] if i < len(ids) else None})
    if rows or not report:
        return rows
    before = report.get("experts_before") or {}
    plan = report.get("kept_original_ids") or report.get("kept_ids") or {}
    return [{"layer": int(i), "kept": len(layer_ids), "original": before.get(str(i)), "kept_ids": layer_ids}
            for i, layer_ids in sorted(plan.items(), key=lambda kv: int(kv[0]))]


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
    """The small files of a checkpoint folder, parsed: ``config`` (config.json), ``report`` (pruning_report.json),
    ``evaluation`` (evaluation.json) and ``recipe`` (recipe.yaml, as plain data); None for a file that is absent.

    Raises:
        CorruptFileError: a file that is not UTF-8, not valid JSON/YAML (file, line and column named), or whose top
            level is not a mapping.
    """
    folder = Path(folder)
    data: dict[str, Any] = {}
    for key, name in (("config", "config.json"), ("report", REPORT_FILE), ("evaluation", EVAL_FILE)):
        path = folder / name
        data[key] = read_json_object(path, name) if path.is_file() else None
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
    if not (folder / "config.json").exists():
        raise DiEPError(f"{repo_or_dir}: no config.json -> not a model checkpoint")
    metadata = read_checkpoint_metadata(folder)
    config, report = metadata["config"], metadata["report"]
    rows = experts_table(config, report)
    if not rows:
        raise DiEPError(
            f"{repo_or_dir}: neither config.json (num_experts_per_layer) nor {REPORT_FILE} lists experts per layer "
            "-> not a diep_hub pruned checkpoint"
        )
    kept = sum(r["kept"] for r in rows)
    original = sum(r["original"] or r["kept"] for r in rows)
    pruning = config.get("diep_pruning") or {}
    info: dict[str, Any] = {
        "source": str(repo_or_dir),
        "model_type": config.get("model_type"),
        "base_model": pruning.get("base_model") or (report or {}).get("base_model"),
        "method": pruning.get("method") or (report or {}).get("method"),
        "selection": pruning.get("selection") or (report or {}).get("selection"),
        "target_sparsity": pruning.get("sparsity") or (report or {}).get("sparsity"),
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


def write_json_atomic(path: str | os.PathLike, data: Any) -> None:
    """Write JSON beside ``path`` and rename it into place: a failure never leaves a half-written file."""
    path = Path(path)
    staging = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        staging.write_text(json.dumps(to_jsonable(data), indent=2) + "\n", encoding="utf-8")
        os.replace(staging, path)
    finally:
        staging.unlink(missing_ok=True)


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
