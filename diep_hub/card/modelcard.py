"""The model card of a pruned checkpoint: :class:`DiepModelCard`, a ``huggingface_hub.ModelCard`` whose default
template is the shipped ``templates/modelcard.md.j2``, filled from typed :class:`CardInputs`.

The front matter is a ``ModelCardData`` (base_model, license, tags, pipeline_tag, library_name, a ``model-index``
of ``EvalResult`` and ``experts_per_layer``); the body is the template. :func:`write_card` writes README.md, the
figures and the ``.eval_results/*.yaml`` entries (huggingface_hub's ``EvalResultEntry`` format) for benchmarks the
Hub tracks. Nothing here touches the network except the optional license look-up of the base model.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping, Sequence
from dataclasses import asdict
from importlib import resources
from pathlib import Path
from typing import Any

import yaml
from huggingface_hub import EvalResultEntry, ModelCard, ModelCardData
from huggingface_hub import eval_result_entries_to_yaml as _entries_to_yaml

from ..checkpoint.layout import CARD_FILE, EVAL_RESULTS_DIR
from ..checkpoint.report import PruningReport
from ..errors import ConfigError
from .gather import card_inputs
from .inputs import CardInputs
from .tables import MEMORY_LABELS, eval_result_entries, human_bytes, model_index_results

logger = logging.getLogger(__name__)

TEMPLATE = "modelcard.md.j2"


def load_template() -> str:
    """The card template shipped in the package (``diep_hub.templates/modelcard.md.j2``)."""
    return (resources.files("diep_hub.templates") / TEMPLATE).read_text(encoding="utf-8")


class DiepModelCard(ModelCard):
    """A ``ModelCard`` with diep_hub's template, built from :class:`CardInputs` (:meth:`from_inputs`).

    Besides ``data`` and ``text`` it carries ``inputs`` (what it was built from; None for a loaded card),
    ``eval_entries`` (benchmark -> ``EvalResultEntry`` list) and ``figures`` (path -> PNG bytes, drawn on first
    use so that a card printed to the terminal never imports matplotlib).
    """

    default_template_path = str(resources.files("diep_hub.templates") / TEMPLATE)

    def __init__(self, content: str, ignore_metadata_errors: bool = False):
        super().__init__(content, ignore_metadata_errors=ignore_metadata_errors)
        self.inputs: CardInputs | None = None
        self.eval_entries: dict[str, list[EvalResultEntry]] = {}
        self._figures: dict[str, bytes] | None = None

    @classmethod
    def from_inputs(
        cls,
        inputs: CardInputs,
        *,
        template_str: str | None = None,
        template_path: str | os.PathLike | None = None,
        benchmarks: Mapping[str, tuple[str, str]] | None = None,
    ) -> DiepModelCard:
        """Fill the template (the shipped one unless given) from ``inputs`` through ``ModelCard.from_template``."""
        card = cls.from_template(card_data(inputs), template_path=None if template_path is None else str(template_path),
                                 template_str=template_str, **template_context(inputs))
        card.inputs = inputs
        card.eval_entries = eval_result_entries(inputs, benchmarks)
        return card

    @property
    def figures(self) -> dict[str, bytes]:
        if self._figures is None:
            from .figures import card_figures

            self._figures = card_figures(self.inputs) if self.inputs is not None else {}
        return self._figures

    @figures.setter
    def figures(self, value: Mapping[str, bytes]) -> None:
        self._figures = dict(value)


def card_data(inputs: CardInputs) -> ModelCardData:
    """The front matter: ``model-index`` only when there are results (model_name with it)."""
    results = model_index_results(inputs)
    return ModelCardData(
        base_model=inputs.base_model,
        license=inputs.license,
        license_name=inputs.license_name,
        license_link=inputs.license_link,
        tags=inputs.tags,
        datasets=[inputs.calibration["dataset"]] if _hub_dataset(inputs.calibration) else None,
        pipeline_tag=inputs.pipeline_tag,
        library_name=inputs.library_name,
        model_name=inputs.model_name if results else None,
        eval_results=results or None,
        experts_per_layer={str(r.layer): r.kept for r in inputs.layers} or None,
    )


def _hub_dataset(calibration: Mapping[str, Any] | None) -> bool:
    """The calibration data names a Hub dataset (namespace/name or a canonical name), not a local file."""
    name = (calibration or {}).get("dataset")
    if not isinstance(name, str) or not name or name.startswith((".", "/", "~")) or os.path.exists(name):
        return False
    return name.count("/") <= 1 and not name.endswith((".txt", ".json", ".jsonl", ".parquet", ".csv"))


def template_context(inputs: CardInputs) -> dict[str, Any]:
    """The template's variables: the inputs' fields plus the totals and strings the template shows.
    (``from_template`` merges ``ModelCardData.to_dict()`` under these, so ours win.)"""
    context = asdict(inputs)
    context.pop("scores")  # figures only: a large model's scores would only slow the template down
    context.update(
        has_results=inputs.has_results,
        has_retention=any(r.retention is not None for r in inputs.results),
        pct=None if inputs.sparsity is None else round(100 * inputs.sparsity, 2),
        kept_total=sum(r.kept for r in inputs.layers),
        original_total=sum(r.original for r in inputs.layers),
        floor_layers=inputs.floor_layers,
        memory_human=human_bytes(inputs.memory),
        memory_labels=MEMORY_LABELS,
    )
    return context


def render_card(inputs: CardInputs, *, template: str | None = None) -> DiepModelCard:
    """Fill the template (``template``: a jinja2 string replacing the shipped one)."""
    return DiepModelCard.from_inputs(inputs, template_str=template)


def build_model_card(
    model_or_folder,
    *,
    base_model: str | None = None,
    eval_results: Mapping[str, Any] | None = None,
    report: PruningReport | Mapping[str, Any] | None = None,
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
) -> DiepModelCard:
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
    return DiepModelCard.from_inputs(inputs, benchmarks=benchmarks)


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
