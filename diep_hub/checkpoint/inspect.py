"""Reading a checkpoint folder (or a Hub snapshot of one) and describing it: experts kept per layer, how it was
made, its recorded results.

Shared by ``diep-hub inspect``, ``push`` (which reads the recorded publish settings), ``eval --save`` and the
reproduction, which all read the same small files; every one of them is parsed here, so a damaged file is named with
its line and column before anything is uploaded or re-run. The file names are :mod:`diep_hub.checkpoint.layout`.
"""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from ..errors import ConfigError, CorruptFileError, DiEPError
from ..files import read_json_object, read_yaml
from ..hub import repo_id_problem
from .layout import CARD_FILE, CONFIG_FILE, EVAL_FILE, RECIPE_FILE, REPORT_FILE
from .report import PruningReport, experts_table

# What the vLLM plugin (integrations/vllm, ``diep_hub_vllm``) serves and refuses. diep_hub cannot import the plugin
# (it lives in a vLLM environment with an older transformers), so the lists are repeated here as plain literals;
# integrations/vllm/tests/test_units.py parses this file and checks they equal the plugin's own (plan.py).
VLLM_PLUGIN_SERVES = (
    "diep_mixtral", "diep_qwen2_moe", "diep_qwen3_moe", "diep_olmoe", "diep_deepseek_v2", "diep_deepseek_v3"
)
VLLM_PLUGIN_REFUSES = {
    "diep_gpt_oss": "the plugin has no per-layer GPT-OSS model",
    "diep_phimoe": "the plugin has no per-layer PhiMoE model",
    "diep_granitemoe": "the plugin has no per-layer GraniteMoE model",
}


def _routing_group_problem(config: dict[str, Any]) -> str | None:
    """Why a served family's grouped routing (DeepSeek) cannot be served as saved, or None.

    The plugin builds each layer's groups as the checkpoint's remote code does (the layer's ``n_group_per_layer`` /
    ``topk_group_per_layer`` entry, else the config's ``n_group`` / ``topk_group``; DeepSeek-V2 groups only with
    ``topk_method: group_limited_greedy``) and refuses a layer whose kept count does not split into n_group equal
    groups (of at least the family's ``min_per_group``) or whose topk_group groups cannot supply top-k.
    """
    from ..families import get_family
    from ..families.base import RoutingRules

    family = get_family(str(config.get("model_type")))
    grouping = family.grouped_routing
    if grouping is None:
        return None
    if grouping.active_when is not None and not grouping.active_when(SimpleNamespace(**config)):
        return None
    top_k = config.get(family.top_k_field)
    for index, count in enumerate(config.get("num_experts_per_layer") or []):
        if count is None:
            continue
        groups = []
        for field in ("n_group", "topk_group"):
            per_layer = config.get(f"{field}_per_layer") or []
            value = per_layer[index] if index < len(per_layer) and per_layer[index] is not None else config.get(field)
            groups.append(value)
        n_group, topk_group = groups
        valid = isinstance(n_group, int) and isinstance(topk_group, int) and 1 <= topk_group <= n_group
        layer_top_k = min(top_k, count) if isinstance(top_k, int) else top_k
        rules = RoutingRules(top_k=layer_top_k, n_group=n_group, topk_group=topk_group,
                             min_per_group=grouping.min_per_group) if valid else None
        if rules is None or (rules.grouped and not rules.accepts(count)) or count < grouping.min_per_group:
            return (
                f"layer {index} keeps {count} experts but routes with n_group={n_group}, topk_group={topk_group}: "
                f"grouped routing needs the kept count split into n_group equal groups of at least "
                f"{grouping.min_per_group} and topk_group groups that supply top-k={layer_top_k}; prune with the "
                "same count from every group, or regroup the layer"
            )
    return None


def serving_support(config: dict[str, Any]) -> dict[str, Any]:
    """Whether vLLM can serve a checkpoint with this config.json: ``servable``, ``needs_plugin`` and ``reason``.

    A ``diep_<family>`` checkpoint needs the diep-hub-vllm plugin, which serves some families (DeepSeek when every
    layer's kept count fills its routing groups) and refuses the others at load; a stock-format export (the
    family's own architecture, the same count in every layer) is plain vLLM's own model.
    """
    model_type = str(config.get("model_type"))
    if not model_type.startswith("diep_"):
        return {"servable": True, "needs_plugin": False,
                "reason": f"stock {model_type} format: vLLM's own model, no plugin needed"}
    if model_type in VLLM_PLUGIN_SERVES:
        problem = _routing_group_problem(config)
        if problem is not None:
            return {"servable": False, "needs_plugin": True,
                    "reason": f"diep-hub-vllm refuses this {model_type} checkpoint: {problem}"}
        return {"servable": True, "needs_plugin": True,
                "reason": "install the diep-hub-vllm plugin (integrations/vllm), then vllm serve DIR "
                          "--trust-remote-code"}
    reason = VLLM_PLUGIN_REFUSES.get(model_type, "the plugin does not know this family")
    return {"servable": False, "needs_plugin": True,
            "reason": f"diep-hub-vllm refuses {model_type}: {reason}; it serves {', '.join(VLLM_PLUGIN_SERVES)}"}


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
        "serving": serving_support(config),
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


def _serving_line(serving: dict[str, Any]) -> str:
    if not serving["servable"]:
        verdict = "not servable by vLLM"
    elif serving["needs_plugin"]:
        verdict = "servable by vLLM with the diep-hub-vllm plugin"
    else:
        verdict = "servable by vLLM without a plugin"
    return f"serving:     {verdict} ({serving['reason']})"


def format_inspection(info: dict[str, Any]) -> str:
    """Human-readable text of :func:`inspect_checkpoint` (the CLI's default output)."""
    lines = [
        f"checkpoint:  {info['source']}",
        f"model type:  {info['model_type']}   base model: {info['base_model'] or 'unknown'}",
        f"method:      {info['method'] or 'unknown'} ({info['selection'] or '?'} selection), "
        f"target sparsity {info['target_sparsity']}",
        f"experts:     {info['experts_kept']} of {info['experts_original']} kept "
        f"(sparsity {info['sparsity']:.1%}); skipping {'on' if info['skipping'] else 'off'}",
        _serving_line(info["serving"]),
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


__all__ = [
    "VLLM_PLUGIN_REFUSES",
    "VLLM_PLUGIN_SERVES",
    "format_inspection",
    "inspect_checkpoint",
    "local_folder",
    "read_checkpoint_metadata",
    "serving_support",
]
