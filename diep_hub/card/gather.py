"""Collecting what the card is built from: a live model or a checkpoint folder (its config, report, evaluation and
recipe files, each read with the file named if it is damaged) and the base model's license from its Hub card.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..checkpoint.layout import CONFIG_FILE, EVAL_FILE, RECIPE_FILES
from ..checkpoint.report import PruningReport
from ..errors import ConfigError
from ..files import read_json_object, read_text
from .inputs import CardInputs, card_inputs_from_report

logger = logging.getLogger(__name__)


def card_inputs(
    model_or_folder,
    *,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
    report: PruningReport | Mapping[str, Any] | None = None,
    recipe_text: str | None = None,
    license: str | None = None,
    **details: Any,
) -> CardInputs:
    """Gather what the card says. A folder supplies missing report, evaluation and recipe from its files; the base
    model's license is looked up on the Hub when not given (None offline). ``details``: the other keywords of
    :func:`~diep_hub.card.inputs.card_inputs_from_report` (tags, repo_id, model_name, command, extra_markdown,
    stock_format), passed on as they are."""
    config, folder = _config_dict(model_or_folder)
    if folder is not None:
        if report is None:
            report = PruningReport.load(folder)
        if eval_results is None and (folder / EVAL_FILE).is_file():
            eval_results = read_json_object(folder / EVAL_FILE, EVAL_FILE)
        if recipe_text is None and (path := next((folder / n for n in RECIPE_FILES if (folder / n).is_file()), None)):
            recipe_text = read_text(path, path.name)
    licensing: str | dict[str, str | None] | None = license
    if license is None and base_model:
        licensing = base_model_license(base_model)
    return card_inputs_from_report(
        report, eval_results, config=config, recipe_text=recipe_text, base_model=base_model, license=licensing,
        **details,
    )


def _config_dict(model_or_folder) -> tuple[dict[str, Any], Path | None]:
    if isinstance(model_or_folder, (str, os.PathLike)):
        folder = Path(model_or_folder)
        if not (folder / CONFIG_FILE).is_file():
            raise ConfigError(f"{folder} has no readable {CONFIG_FILE}; give a checkpoint folder or a model")
        return read_json_object(folder / CONFIG_FILE, CONFIG_FILE), folder
    config = getattr(model_or_folder, "config", None)
    if config is None:
        raise ConfigError(f"expected a model or a checkpoint folder, got {type(model_or_folder).__name__}")
    return config.to_dict(), None


def base_model_license(base_model: str) -> dict[str, str | None] | None:
    """``{"license", "license_name", "license_link"}`` from the base model's Hub card; None offline or when the
    look-up fails (the card then says the license is not recorded)."""
    from huggingface_hub import HfApi, constants

    if constants.is_offline_mode():
        return None
    try:
        info = HfApi().model_info(base_model)
    except Exception as exc:  # noqa: BLE001 - any failure means "unknown license", stated as such on the card
        logger.warning("could not read the license of %s: %s", base_model, type(exc).__name__)
        return None
    data = info.card_data
    found = {key: data.get(key) if data is not None else None for key in ("license", "license_name", "license_link")}
    found = {key: value if isinstance(value, str) else None for key, value in found.items()}
    return found if found["license"] else None
