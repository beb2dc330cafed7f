"""The YAML recipe: one file that says which model to prune, how, how to evaluate it and where to publish it.

A recipe is validated in full before anything is loaded: every problem is collected into one
:class:`RecipeError` whose lines read ``field.path: bad value -> what is allowed``, so a CI log is enough to fix
it. Unknown keys are errors (a typo must not silently fall back to a default), and so is a key given twice (YAML
would keep the last one silently). Numbers get exactly the pruner's range checks, in its words, with NaN and inf
refused as "must be a finite number": what a recipe accepts, :class:`~diep_hub.pruner.DiEPPruner` accepts. Recipes
never name Python objects to import: they run in CI next to Hub write tokens.

The schema, with defaults (``diep-hub run --help`` shows an example)::

    model:       {id, revision: null, dtype: auto, device_map: null, trust_remote_code: false}
    pruning:     {method: diep, sparsity: 0.5, selection: null (the method's default), seed: 0,
                  calibration: {dataset: allenai/c4, config: en, split: train, text_field: text,
                                path: null, num_samples: 128, seq_len: 2048},
                  search: {mode: auto, lr: 0.005, epochs: 10, batch_size: 16, lambda: 0.01, alternation: "3:1",
                           ranking: softmax},
                  floors: {min_experts_per_layer: null, max_layer_sparsity: null, regroup: false}}
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
from importlib import resources
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    WrapValidator,
    field_validator,
    model_validator,
)

from .criteria.base import available_criteria, get_criterion, selection_problem
from .criteria.diep import DEFAULT_OPTIONS as _DIEP_DEFAULTS
from .errors import ConfigError
from .files import read_text
from .hub import REPO_ID_ALLOWED, repo_id_problem
from .pruner import number_problem

logger = logging.getLogger(__name__)

METHODS = ("diep", "reap", "frequency", "soft_frequency", "naee", "random")
DTYPES = ("auto", "float32", "float16", "bfloat16")


class RecipeError(ConfigError):
    """A recipe file is missing, unreadable, or fails validation; the message lists every problem at once."""

    def __init__(self, source: str, problems: list[str], *, title: str | None = None):
        self.source = source
        self.problems = list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        head = title or f"invalid recipe {source} ({len(self.problems)} problem(s))"
        super().__init__(f"{head}:\n{lines}")


def _range(lo, hi=None, *, lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> WrapValidator:
    """The pruner's range check on a recipe number (NaN and inf included), so a value the pruner would refuse
    fails here, named by its recipe field, with the pruner's words (``pruning.search.lr: inf -> must be a finite
    number in (0, inf)``)."""

    def check(value, handler):
        # NaN, inf and 2.5-for-an-integer first: pydantic's own words for them differ from the pruner's.
        if isinstance(value, float) and (not math.isfinite(value) or (integer and not value.is_integer())):
            raise ValueError(number_problem(value, lo, hi, lo_open=lo_open, hi_open=hi_open, integer=integer))
        value = handler(value)
        problem = number_problem(value, lo, hi, lo_open=lo_open, hi_open=hi_open, integer=integer)
        if problem is not None:
            raise ValueError(problem)
        return value

    return WrapValidator(check)


def _check_limit(value, handler):
    """lm-eval's limit: a count >= 1 or a fraction in (0, 1] (the evaluation's own rule, see lm_eval_runner)."""
    allowed = "a count >= 1 or a fraction in (0, 1], or null for all examples"
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"must be a finite number: {allowed}")
    value = handler(value)
    if value <= 0 or (isinstance(value, float) and value > 1):
        raise ValueError(f"is out of range; allowed: {allowed}")
    return value


Count = Annotated[int, _range(1, integer=True)]  # num_samples, batch_size, epochs, ...
SeqLen = Annotated[int, _range(2, integer=True)]
NonNegativeInt = Annotated[int, _range(0, integer=True)]
Fraction = Annotated[float, _range(0, 1, lo_open=True, hi_open=True)]  # 0 < x < 1


class _Section(BaseModel):
    """Base of every recipe section: unknown keys are errors, values are re-validated on assignment."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class ModelSection(_Section):
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


class CalibrationSection(_Section):
    """Calibration text: a Hub dataset (``dataset``/``config``/``split``) or a local file (``path``)."""

    dataset: str | None = "allenai/c4"
    config: str | None = "en"
    split: str = "train"
    text_field: str = "text"
    path: str | None = None
    num_samples: Count = 128
    seq_len: SeqLen = 2048

    @model_validator(mode="after")
    def _one_source(self) -> CalibrationSection:
        return _one_text_source(self)

    @property
    def source(self) -> str:
        """What the calibration loader receives: the local path when set, else the Hub dataset name."""
        return self.path if self.path is not None else str(self.dataset)


class SearchSection(_Section):
    """DiEP's alpha/beta search hyper-parameters (paper: dense, lr 5e-3, 10 epochs, batch 16, lambda 0.01, 3:1).

    Defaults are the search's own (``diep_hub.criteria.diep.DEFAULT_OPTIONS``), so a recipe that leaves a field out
    gets what the Python API would give.
    """

    mode: Literal["auto", "gated", "dense"] = _DIEP_DEFAULTS["mode"]
    lr: Annotated[float, _range(0, lo_open=True)] = _DIEP_DEFAULTS["lr"]
    epochs: Count = _DIEP_DEFAULTS["epochs"]
    batch_size: Count = 16
    lambda_: Annotated[float, _range(0), Field(alias="lambda")] = _DIEP_DEFAULTS["recon_weight"]
    alternation: str = f"{_DIEP_DEFAULTS['alpha_steps']}:{_DIEP_DEFAULTS['beta_steps']}"
    ranking: Literal["softmax", "raw"] = _DIEP_DEFAULTS["ranking"]

    @field_validator("alternation")
    @classmethod
    def _ratio(cls, value: str) -> str:
        parts = str(value).split(":")
        if len(parts) != 2 or not all(p.strip().isdigit() and int(p) >= 0 for p in parts) or parts == ["0", "0"]:
            raise ValueError("expected 'A:B', optimiser steps on alpha then on beta, e.g. '3:1' (paper) or '1:1'")
        return f"{int(parts[0])}:{int(parts[1])}"

    @property
    def alternation_steps(self) -> tuple[int, int]:
        """(alpha steps, beta steps) of one alternation cycle."""
        a, b = self.alternation.split(":")
        return int(a), int(b)


class FloorsSection(_Section):
    """Limits the paper does not set: per-layer minimum experts, per-layer maximum sparsity, group reset."""

    min_experts_per_layer: Count | None = None
    max_layer_sparsity: Fraction | None = None
    regroup: bool = False


class PruningSection(_Section):
    """What to remove and how to decide it."""

    method: Literal["diep", "reap", "frequency", "soft_frequency", "naee", "random"] = "diep"
    sparsity: Fraction = 0.5
    # null/unset: the method's own default (global; uniform for naee), resolved at validation so the loaded
    # recipe, the pruner and the saved recipe all hold the concrete mode.
    selection: Annotated[Literal["global", "uniform"] | None, Field(validate_default=True)] = None
    seed: NonNegativeInt = 0
    calibration: CalibrationSection = CalibrationSection()
    search: SearchSection = SearchSection()
    floors: FloorsSection = FloorsSection()

    @field_validator("selection")
    @classmethod
    def _selection_for_method(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Resolve an unset selection to the method's default; refuse one the method does not support, in the
        words ``DiEPPruner`` uses."""
        method = info.data.get("method")  # absent when the method itself is invalid: that error is reported
        if method not in available_criteria():
            return value
        if value is None:
            return get_criterion(method).default_selection()
        problem = selection_problem(method, value)
        if problem is not None:
            raise ValueError(problem)
        return value


class SkippingSection(_Section):
    """Adaptive expert skipping at inference (paper section 3.3), calibrated after pruning."""

    enabled: bool = False
    kernel: Literal["linear", "rbf"] = "linear"
    num_samples: Count = 32


class PerplexitySection(_Section):
    """Perplexity on a text set: a Hub dataset or a local file, like calibration."""

    dataset: str | None = "wikitext"
    config: str | None = "wikitext-2-raw-v1"
    split: str = "test"
    text_field: str = "text"
    path: str | None = None
    num_samples: Count = 64
    seq_len: SeqLen = 2048

    @model_validator(mode="after")
    def _one_source(self) -> PerplexitySection:
        return _one_text_source(self)

    @property
    def source(self) -> str:
        return self.path if self.path is not None else str(self.dataset)


class EvaluationSection(_Section):
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


class OutputSection(_Section):
    """Where the checkpoint goes and in which format."""

    dir: str | None = None
    stock_format: bool = False


class CardSection(_Section):
    """Extras for the model card: the license is the base model's unless overridden here."""

    license: str | None = None
    tags: list[str] = []
    extra_markdown: str | None = None


class PublishSection(_Section):
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
        problem = None if value is None else repo_id_problem(value)
        if problem is not None:
            raise ValueError(f"not a valid Hub model id ({problem}); use {REPO_ID_ALLOWED}")
        return value

    @model_validator(mode="after")
    def _repo_when_pushing(self) -> PublishSection:
        if self.push and not self.repo_id:
            raise ValueError("push: true needs publish.repo_id ('namespace/name')")
        return self


class Recipe(_Section):
    """A whole recipe. Build one with :func:`load_recipe` (a file) or :meth:`Recipe.from_dict`."""

    model: ModelSection
    pruning: PruningSection = PruningSection()
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
    def from_dict(cls, data: Any, *, source: str = "<recipe>", base_dir: str | os.PathLike | None = None) -> Recipe:
        """Validate a parsed recipe, raising one :class:`RecipeError` listing every problem."""
        if not isinstance(data, dict):
            raise RecipeError(source, [f"<top level>: {type(data).__name__} -> a mapping with a 'model' section"])
        try:
            recipe = cls.model_validate(data)
        except ValidationError as exc:
            raise RecipeError(source, _problems(exc)) from None
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
        """Keyword arguments of :class:`diep_hub.pruner.DiEPPruner` for this recipe."""
        p = self.pruning
        cal = p.calibration
        alpha_steps, beta_steps = p.search.alternation_steps
        return {
            "sparsity": p.sparsity,
            "method": p.method,
            "selection": p.selection,
            "dataset": self.calibration_source(),
            "dataset_config": cal.config if cal.path is None else None,
            "split": cal.split,
            "text_field": cal.text_field,
            "num_samples": cal.num_samples,
            "seq_len": cal.seq_len,
            "batch_size": p.search.batch_size,
            "seed": p.seed,
            "search_mode": p.search.mode,
            "lr": p.search.lr,
            "epochs": p.search.epochs,
            "lambda_": p.search.lambda_,
            "alternation": (alpha_steps, beta_steps),
            "ranking": p.search.ranking,
            "min_experts_per_layer": p.floors.min_experts_per_layer,
            "max_layer_sparsity": p.floors.max_layer_sparsity,
            "regroup": p.floors.regroup,
            # Skipping is calibrated by the runner, which honours skipping.kernel and skipping.num_samples.
            "skipping": False,
        }


def _section_keys(model_cls: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model_cls.model_fields.items()]


def _model_at(loc: tuple) -> type[BaseModel] | None:
    """The pydantic model class that owns the field at ``loc`` (for listing allowed keys)."""
    cls: type[BaseModel] = Recipe
    for part in loc:
        field = next((f for n, f in cls.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return cls
        annotation = field.annotation
        candidates = [annotation, *getattr(annotation, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return cls
        cls = nxt
    return cls


def _problems(exc: ValidationError) -> list[str]:
    """Turn pydantic's errors into ``field.path: value -> allowed`` lines, unknown keys with the allowed list."""
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(str(p) for p in err["loc"] if not str(p).startswith(("function-", "constrained-")))
        # Union members add their type names to the location (e.g. "int", "dict[str,...]"): drop them.
        loc = tuple(p for p in loc if not any(ch in p for ch in "[]") and p not in ("int", "float", "str", "bool"))
        path = ".".join(loc) or "<top level>"
        kind = err["type"]
        if kind == "extra_forbidden":
            owner = _model_at(loc[:-1])
            allowed = ", ".join(_section_keys(owner)) if owner else "see the recipe schema"
            problems.append(f"{path}: unknown key -> allowed keys: {allowed}")
        elif kind == "missing":
            problems.append(f"{path}: missing -> required")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            problems.append(f"{path}: {err.get('input')!r} -> {msg}")
    # Union branches report the same field several times: keep the first line per path, in order.
    seen: dict[str, str] = {}
    for line in problems:
        key = line.split(":", 1)[0] + ("" if "unknown key" not in line else line)
        seen.setdefault(key, line)
    return list(seen.values())


def shipped_recipes() -> dict[str, Path]:
    """Recipes shipped with the package (the top-level ``recipes/`` folder), by name without ``.yaml``."""
    root = resources.files("diep_hub.recipes")
    return {p.name.removesuffix(".yaml"): Path(str(p)) for p in root.iterdir() if p.name.endswith(".yaml")}


class _DuplicateKey(yaml.YAMLError):
    """A key given twice in one mapping (raised by :class:`UniqueKeyLoader`, turned into a RecipeError)."""

    def __init__(self, field: str, first: yaml.Mark, second: yaml.Mark):
        self.field, self.first, self.second = field, first, second
        super().__init__(f"{field}: duplicate key at line {second.line + 1} (first at line {first.line + 1})")


class UniqueKeyLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses a key given twice in one mapping.

    Plain PyYAML keeps the last value: a second ``pruning:`` block would silently replace the first, and a recipe
    would run with settings its author never saw. Merge keys (``<<: *anchor``) may still be overridden.
    """

    def get_single_data(self):
        node = self.get_single_node()
        if node is None:
            return None
        self._paths: dict[int, tuple[str, ...]] = {}
        self._index(node, ())
        return self.construct_document(node)

    def _index(self, node, path: tuple[str, ...]) -> None:
        """Remember each mapping's field path (``pruning.search``) so a duplicate is named in full."""
        if id(node) in self._paths:
            return  # an alias of a node already seen (or a recursive anchor)
        if isinstance(node, yaml.MappingNode):
            self._paths[id(node)] = path
            for key, value in node.value:
                self._index(value, (*path, str(key.value)) if isinstance(key, yaml.ScalarNode) else path)
        elif isinstance(node, yaml.SequenceNode):
            self._paths[id(node)] = path
            for i, value in enumerate(node.value):
                self._index(value, (*path, str(i)))

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, yaml.Mark] = {}
            for key_node, _ in node.value:
                if key_node.tag == "tag:yaml.org,2002:merge":
                    continue
                key = self.construct_object(key_node, deep=deep)
                try:
                    first = seen.get(key)
                except TypeError:  # unhashable key: the base class reports it
                    continue
                if first is not None:
                    field = ".".join((*getattr(self, "_paths", {}).get(id(node), ()), str(key)))
                    raise _DuplicateKey(field, first, key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def parse_recipe_text(text: str, source: str = "<recipe>") -> Any:
    """Parse recipe YAML with :class:`UniqueKeyLoader`; syntax errors and duplicate keys name the line."""
    try:
        return yaml.load(text, Loader=UniqueKeyLoader)  # noqa: S506 - a SafeLoader subclass
    except _DuplicateKey as exc:
        raise RecipeError(
            source,
            [f"{exc.field}: key given twice, at line {exc.first.line + 1} and again at line {exc.second.line + 1} "
             "-> give each key once (YAML would silently keep only the last)"],
            title=f"cannot parse recipe {source}",
        ) from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark is not None else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        context = getattr(exc, "context", None)
        detail = f"{problem} ({context})" if context else problem
        raise RecipeError(source, [f"yaml: {detail}{where}"], title=f"cannot parse recipe {source}") from None


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file; a bare name (``tiny``) finds a recipe shipped with the package.

    Raises:
        RecipeError: a missing file, malformed YAML, a duplicated key, a top level that is not a mapping, or any
            invalid field (all of them listed at once).
        CorruptFileError: the file is not UTF-8 text (the message names the byte and line).
    """
    file = Path(path)
    if not file.exists():
        shipped = shipped_recipes()
        name = str(path).removesuffix(".yaml")
        if name in shipped and os.sep not in name:
            file = shipped[name]
        else:
            names = ", ".join(sorted(shipped)) or "none"
            raise RecipeError(
                str(path),
                [f"file: {str(path)!r} does not exist -> an existing YAML file, or a shipped recipe: {names}"],
                title=f"cannot read recipe {path}",
            )
    if file.is_dir():
        raise RecipeError(str(path), [f"file: {str(path)!r} is a folder -> a YAML recipe file"],
                          title=f"cannot read recipe {path}")
    try:
        text = read_text(file, "recipe")
    except OSError as exc:
        raise RecipeError(str(path), [f"file: {str(path)!r} cannot be read ({exc.strerror or exc})"],
                          title=f"cannot read recipe {path}") from None
    data = parse_recipe_text(text, str(path))
    if data is None:
        raise RecipeError(str(path), ["<top level>: the file is empty -> a mapping with a 'model' section"])
    recipe = Recipe.from_dict(data, source=str(path), base_dir=file.resolve().parent)
    logger.info("loaded recipe %s: %s, %s at %.0f%% sparsity", file, recipe.model.id, recipe.pruning.method,
                100 * recipe.pruning.sparsity)
    return recipe
