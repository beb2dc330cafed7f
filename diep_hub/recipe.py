"""The YAML recipe: one file that says which model to prune, how, how to evaluate it and where to publish it.

A recipe is validated in full before anything is loaded: every problem is collected into one
:class:`RecipeError` whose lines read ``field.path: bad value -> what is allowed``, so a CI log is enough to fix
it. Unknown keys are errors (a typo must not silently fall back to a default), and so is a key given twice (YAML
would keep the last one silently; reading the file is :mod:`diep_hub.recipe_yaml`). The ``pruning`` section is made
of the models of :mod:`diep_hub.options` that :class:`~diep_hub.pruner.DiEPPruner` validates with, so what a recipe
accepts the pruner accepts, in the same words. Recipes never name Python objects to import: they run in CI next to
Hub write tokens.

The schema, with defaults (``diep-hub run --help`` shows an example)::

    model:       {id, revision: null, dtype: auto, device_map: null, trust_remote_code: false}
    pruning:     {method: diep, sparsity: 0.5, selection: null (the method's default), seed: 0,
                  calibration: {dataset: allenai/c4, config: en, split: train, text_field: text,
                                path: null, num_samples: 128, seq_len: 2048},
                  search: {mode: auto, lr: 0.005, epochs: 10, batch_size: 16, lambda: 0.01, alternation: "3:1",
                           ranking: softmax},
                  floors: {min_experts_per_layer: null, max_layer_sparsity: null, regroup: false},
                  merge: none, merge_alignment: weights,
                  recalibration: {enabled: false, steps: 32, lr: 0.001, output_scales: false, output_scale_lr: 0.03}}
    skipping:    {enabled: false, kernel: linear, num_samples: 32}
    evaluation:  {enabled: true, base: true, tasks: [], include_path: null, limit: null, batch_size: 8,
                  num_fewshot: 0, perplexity: null, speed: false, memory: false}
    output:      {dir: null, stock_format: false}
    publish:     {repo_id: null, push: false, private: false, create_pr: false, commit_message: null,
                  card: {license: null, tags: [], extra_markdown: null}}

``model.id: diep-hub/tiny-mixtral`` is special: a tiny Mixtral built offline by :mod:`diep_hub.tiny` (no
download), used by ``recipes/tiny.yaml``, the README's first command and CI; ``diep-hub/zoo-<entry>`` names a
trained model of :mod:`diep_hub.zoo`. The calibration/perplexity names ``diep-hub/tiny-text`` and
``diep-hub/zoo-text`` and the tasks ``diep_tiny_arith`` and ``zoo_*`` are their offline data.

Relative paths in a recipe (calibration ``path``, ``include_path``, ``output.dir``) resolve against the folder of
the recipe file, so a recipe runs the same from any working directory.
"""

from __future__ import annotations

import logging
import math
import os
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, WrapValidator, field_validator, model_validator

from .options import (
    BatchSize,
    Count,
    DiEPOptions,
    FloorsOptions,
    Merge,
    MergeAlignment,
    NonNegativeInt,
    NumSamples,
    OptionsModel,
    RecalibrationOptions,
    SeqLength,
    TargetOptions,
    problems,
)
from .recipe_yaml import RecipeError, line_of, read_recipe_with_lines, shipped_recipes

logger = logging.getLogger(__name__)


def _check_limit(value, handler):
    """lm-eval's limit: a count >= 1 or a fraction in (0, 1] (the evaluation's own rule, see lm_eval_runner)."""
    allowed = "a count >= 1 or a fraction in (0, 1], or null for all examples"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number: {allowed}")
    value = handler(value)
    if value <= 0 or (isinstance(value, float) and value > 1):
        raise ValueError(f"is out of range; allowed: {allowed}")
    return value


class ModelSection(OptionsModel):
    """Which checkpoint to prune and how to load it."""

    id: Annotated[str, Field(min_length=1)]
    revision: str | None = None
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    device_map: str | dict[str, int | str] | None = None
    trust_remote_code: bool = False


def _one_text_source(section):
    """A text section reads a Hub dataset or a local file: refuse both (an explicit dataset next to a path) and
    neither."""
    if section.path is not None and "dataset" in section.model_fields_set and section.dataset is not None:
        raise ValueError("give either 'dataset' (a Hub dataset) or 'path' (a local file), not both")
    if section.path is None and section.dataset is None:
        raise ValueError("give 'dataset' (a Hub dataset name) or 'path' (a local json/jsonl/parquet/txt file)")
    return section


class CalibrationSection(OptionsModel):
    """Calibration text: a Hub dataset (``dataset``/``config``/``split``) or a local file (``path``)."""

    dataset: str | None = Field("allenai/c4", description="calibration Hub dataset (or diep-hub/tiny-text)")
    config: str | None = Field("en", description="dataset configuration name")
    split: str = Field("train", description="split holding the text")
    text_field: str = Field("text", description="column holding the text")
    path: str | None = Field(None, description="local calibration file (json/jsonl/parquet/txt) instead")
    num_samples: NumSamples = 128
    seq_len: SeqLength = 2048

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationSection:
        return _one_text_source(self)

    @property
    def source(self) -> str:
        """What the calibration loader receives: the local path when set, else the Hub dataset name."""
        return self.path if self.path is not None else str(self.dataset)


class SearchSection(DiEPOptions):
    """DiEP's search options (:class:`~diep_hub.options.DiEPOptions`, the pruner's very model) plus the batch size
    of the search passes."""

    batch_size: BatchSize = 16

    @property
    def alternation_steps(self) -> tuple[int, int]:
        """(alpha steps, beta steps) of one alternation cycle."""
        return self.alternation


class PruningSection(TargetOptions):
    """What to remove and how to decide it: method, sparsity, selection and seed
    (:class:`~diep_hub.options.TargetOptions`), calibration, search and floors (the pruner's own models)."""

    calibration: CalibrationSection = CalibrationSection()
    search: SearchSection = SearchSection()
    floors: FloorsOptions = FloorsOptions()
    merge: Merge = "none"
    merge_alignment: MergeAlignment = "weights"
    recalibration: RecalibrationOptions = RecalibrationOptions()
    options: dict[str, Any] | None = Field(
        None, description="options of a method without keys of its own here (e.g. diep_removal: {lr: 0.3})")

    @field_validator("options")
    @classmethod
    def _options_of_the_method(cls, value: dict[str, Any] | None, info) -> dict[str, Any] | None:
        """Checked against the method's own options model (``Criterion.options``), in the API's words."""
        method = info.data.get("method")
        if value is None or method is None:
            return value
        from .options import criterion_options_problems

        found = criterion_options_problems(method, value)
        if found:
            raise ValueError("; ".join(found))
        return value


class SkippingSection(OptionsModel):
    """Adaptive expert skipping at inference (paper section 3.3), calibrated after pruning."""

    enabled: bool = False
    kernel: Literal["linear", "rbf"] = "linear"
    num_samples: Count = 32


class PerplexitySection(OptionsModel):
    """Perplexity on a text set: a Hub dataset or a local file, like calibration."""

    dataset: str | None = "wikitext"
    config: str | None = "wikitext-2-raw-v1"
    split: str = "test"
    text_field: str = "text"
    path: str | None = None
    num_samples: Count = 64
    seq_len: SeqLength = 2048

    @model_validator(mode="after")
    def _one_source(self) -> PerplexitySection:
        return _one_text_source(self)

    @property
    def source(self) -> str:
        return self.path if self.path is not None else str(self.dataset)


class EvaluationSection(OptionsModel):
    """How the base and the pruned model are compared (lm-eval tasks, perplexity, speed, memory)."""

    enabled: bool = True
    base: bool = True
    tasks: list[Annotated[str, Field(min_length=1)]] = []
    include_path: str | None = None
    limit: Annotated[int | float, WrapValidator(_check_limit)] | None = None
    batch_size: Count = 8
    num_fewshot: NonNegativeInt = 0
    perplexity: PerplexitySection | None = None
    speed: bool = False
    memory: bool = False


class OutputSection(OptionsModel):
    """Where the checkpoint goes and in which format."""

    dir: str | None = None
    stock_format: bool = False


class CardSection(OptionsModel):
    """Extras for the model card: the license is the base model's unless overridden here."""

    license: str | None = None
    tags: list[str] = []
    extra_markdown: str | None = None


class PublishSection(OptionsModel):
    """Where the checkpoint is pushed; ``push`` can be overridden by ``diep-hub run --push/--no-push``."""

    repo_id: str | None = None
    push: bool = False
    private: bool = False
    create_pr: bool = False
    commit_message: str | None = None
    card: CardSection = CardSection()

    @field_validator("repo_id")
    @classmethod
    def _hub_repo_id(cls, value: str | None) -> str | None:
        """The rule ``push`` applies (``diep_hub.hub.repo_id_problem``), checked before any work is done."""
        from .hub import REPO_ID_ALLOWED, repo_id_problem

        problem = None if value is None else repo_id_problem(value)
        if problem is not None:
            raise ValueError(f"not a valid Hub model id ({problem}); use {REPO_ID_ALLOWED}")
        return value

    @model_validator(mode="after")
    def _repo_when_pushing(self) -> PublishSection:
        if self.push and not self.repo_id:
            raise ValueError("push: true needs publish.repo_id ('namespace/name')")
        return self


class Recipe(OptionsModel):
    """A whole recipe. Build one with :func:`load_recipe` (a file) or :meth:`Recipe.from_dict`."""

    model: ModelSection
    pruning: PruningSection = Field(default_factory=PruningSection)  # built when used: it asks the registry
    skipping: SkippingSection = SkippingSection()
    evaluation: EvaluationSection = EvaluationSection()
    output: OutputSection = OutputSection()
    publish: PublishSection = PublishSection()
    # Folder of the recipe file; relative paths resolve against it. Not part of the YAML.
    _base_dir: str = PrivateAttr("")

    @model_validator(mode="after")
    def _stock_format_rules(self) -> Recipe:
        if self.output.stock_format and self.pruning.selection != "uniform":
            raise ValueError(
                "output.stock_format: true needs pruning.selection: uniform (the stock architecture holds one "
                "expert count for every layer; global selection gives different counts)"
            )
        if self.output.stock_format and self.skipping.enabled:
            raise ValueError("output.stock_format: true cannot carry skipping (it ships in the diep remote code)")
        return self

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "<recipe>", base_dir: str | os.PathLike | None = None,
                  lines: dict[tuple[str, ...], int] | None = None) -> Recipe:
        """Validate a parsed recipe, raising one :class:`RecipeError` listing every problem.

        ``lines`` (field path -> line of its key, from :func:`~diep_hub.recipe_yaml.read_recipe_with_lines`) adds
        "(line N)" to each problem the file can place.
        """
        if not isinstance(data, dict):
            raise RecipeError(source, [f"<top level>: {type(data).__name__} -> a mapping with a 'model' section"])
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            found = problems(exc, cls)
            if lines:
                found = [_with_line(problem, lines) for problem in found]
            raise RecipeError(source, found) from None
        recipe._base_dir = str(base_dir or "")
        return recipe

    @property
    def base_dir(self) -> str:
        """Folder of the recipe file ("" when built from a dict): relative paths resolve against it."""
        return self._base_dir

    def resolve_path(self, value: str | None) -> str | None:
        """A path from the recipe, made absolute against the recipe's folder (Hub names are left alone)."""
        if value is None:
            return None
        path = Path(os.path.expanduser(value))
        if path.is_absolute() or not self.base_dir:
            return str(path)
        return str((Path(self.base_dir) / path).resolve())

    @property
    def is_offline(self) -> bool:
        """True for the reserved offline model ids (``diep-hub/tiny-mixtral``, ``diep-hub/zoo-<entry>``)."""
        from .tiny import is_offline_model

        return is_offline_model(self.model.id)

    def to_yaml(self, *, resolve_paths: bool = False) -> str:
        """The recipe as YAML (defaults filled in), the text saved beside every checkpoint."""
        return yaml.safe_dump(self.to_dict(resolve_paths=resolve_paths), sort_keys=False)

    def to_dict(self, *, resolve_paths: bool = False) -> dict:
        """Plain data with the YAML key names (``lambda``, not ``lambda_``).

        ``resolve_paths`` makes local data paths absolute: a recipe saved into a checkpoint folder must still find
        its calibration file and task folder when ``diep-hub reproduce`` reads it from there.
        """
        data = self.model_dump(mode="json", by_alias=True)
        # A local file replaces the Hub dataset: dump the default dataset name as null, or the file would not load
        # back ("give either 'dataset' or 'path'").
        sources = [data["pruning"]["calibration"], data["evaluation"].get("perplexity") or {}]
        for source in sources:
            if source.get("path") is not None:
                source["dataset"] = source["config"] = None
        if resolve_paths:
            cal, ev = data["pruning"]["calibration"], data["evaluation"]
            cal["path"] = self.resolve_path(cal["path"])
            ev["include_path"] = self.resolve_path(ev["include_path"])
            if ev.get("perplexity"):
                ev["perplexity"]["path"] = self.resolve_path(ev["perplexity"]["path"])
        return data

    def calibration_source(self) -> str:
        """The calibration source handed to the loader: an absolute local path or a Hub dataset name."""
        cal = self.pruning.calibration
        return self.resolve_path(cal.path) if cal.path is not None else str(cal.dataset)

    def to_pruner_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of :class:`diep_hub.pruner.DiEPPruner` for this recipe: the same models, flattened
        (the calibration source resolved against the recipe's folder)."""
        from .options import OPTION_KEYWORDS

        p, cal = self.pruning, self.pruning.calibration
        search = {kw: getattr(p.search, name) for kw, (criterion, _, name) in OPTION_KEYWORDS.items()
                  if criterion == "diep"}
        return {
            **p.model_dump(include=set(TargetOptions.model_fields)),
            **p.floors.model_dump(),
            **search,
            "dataset": self.calibration_source(),
            "dataset_config": cal.config if cal.path is None else None,
            "split": cal.split,
            "text_field": cal.text_field,
            "num_samples": cal.num_samples,
            "seq_len": cal.seq_len,
            "batch_size": p.search.batch_size,
            "options": p.options,
            "merge": p.merge,
            "merge_alignment": p.merge_alignment,
            "recalibrate_router": p.recalibration.enabled,
            "recalibration_steps": p.recalibration.steps,
            "recalibration_lr": p.recalibration.lr,
            "recalibration_output_scales": p.recalibration.output_scales,
            "recalibration_output_scale_lr": p.recalibration.output_scale_lr,
            # Skipping is calibrated by the runner, which honours skipping.kernel and skipping.num_samples.
            "skipping": False,
        }


def _with_line(problem: str, lines: dict[tuple[str, ...], int]) -> str:
    """``field.path: value -> allowed (line N)``."""
    line = line_of(problem.split(":", 1)[0], lines)
    return problem if line is None else f"{problem} (line {line})"


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file; a bare name (``tiny``) finds a recipe shipped with the package.

    Raises:
        RecipeError: a missing file, malformed YAML, a duplicated key, a top level that is not a mapping, or any
            invalid field (all of them listed at once).
        CorruptFileError: the file is not UTF-8 text (the message names the byte and line).
    """
    data, file, lines = read_recipe_with_lines(path)
    recipe = Recipe.from_dict(data, source=str(path), base_dir=file.resolve().parent, lines=lines)
    logger.info("loaded recipe %s: %s, %s at %.0f%% sparsity", file, recipe.model.id, recipe.pruning.method,
                100 * recipe.pruning.sparsity)
    return recipe


__all__ = ["Recipe", "RecipeError", "load_recipe", "shipped_recipes"]
