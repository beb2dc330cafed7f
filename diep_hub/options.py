"""The typed pruning options shared by ``DiEPPruner``, the recipe and ``diep-hub prune``.

Every field's type, range, choices, default and one-line description is declared once, here (or, for a criterion
added later, in its own options model beside its scorer). ``DiEPPruner`` validates its keywords with these models,
the recipe's ``pruning`` section embeds them, and the CLI builds its flags and help from them; all three turn a
pydantic error into the same ``field: value -> what is allowed`` line (:func:`problems`), so one bad value gets one
verdict and one message wherever it is given.

This module imports pydantic only (no torch): the CLI parser is built from it in a fraction of a second.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, ValidationError, ValidationInfo, WrapValidator
from pydantic import field_validator as _field_validator

from .errors import ConfigError


# ------------------------------------------------------------------------------------------------ the rules
def _interval(lo, hi, lo_open: bool, hi_open: bool) -> str:
    left = "(" if lo_open else "["
    right = ")" if hi_open else "]"
    return f"{left}{lo}, {'inf)' if hi is None else f'{hi}{right}'}"


def number_problem(value, lo, hi=None, *, lo_open: bool = False, hi_open: bool = False,
                   integer: bool = False) -> str | None:
    """Why ``value`` is not allowed in the interval (NaN and inf included), or None when it is: the one wording of
    range and number-type errors."""
    allowed = _interval(lo, hi, lo_open, hi_open)
    if isinstance(value, float) and not math.isfinite(value):
        return f"must be a finite number{' (an integer)' if integer else ''} in {allowed}"
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (integer and not isinstance(value, int)):
        return f"must be {'an integer' if integer else 'a number'} in {allowed}"
    too_low = value < lo or (lo_open and value == lo)
    too_high = hi is not None and (value > hi or (hi_open and value == hi))
    if too_low or too_high:
        return f"is out of range; allowed: {allowed}"
    return None


def Number(lo, hi=None, *, lo_open: bool = False, hi_open: bool = False, integer: bool = False) -> WrapValidator:  # noqa: N802
    """A number in an interval, checked by :func:`number_problem` alone (pydantic's own coercion would accept the
    string "0.5" or 2.0 for an integer: the Python API does not)."""

    def check(value, _handler):
        problem = number_problem(value, lo, hi, lo_open=lo_open, hi_open=hi_open, integer=integer)
        if problem is not None:
            raise ValueError(problem)
        return value

    return WrapValidator(check)


def _flag(value, _handler):
    if not isinstance(value, bool):
        raise ValueError("must be true or false (a boolean)")
    return value


def quoted_choices(values) -> str:
    """``'a', 'b' or 'c'``: how pydantic lists a Literal's values, used for the registry's method names too."""
    quoted = [repr(v) for v in values]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def _registered_method(value, _handler):
    from .criteria.base import available_criteria  # the registry imports torch: only when a method is checked

    names = available_criteria()
    if not isinstance(value, str) or value not in names:
        raise ValueError(f"Input should be {quoted_choices(names)} (a registered criterion)")
    return value


ALTERNATION_RULE = ("expected 'A:B' (recipe, CLI) or (A, B) (Python): optimiser steps on alpha, then on beta, "
                    "integers >= 0 and not both 0, e.g. '3:1' (the paper) or '1:1'")


def _alternation(value, _handler):
    parts = value.split(":") if isinstance(value, str) else value
    if isinstance(value, str):
        parts = [int(p) if p.strip().isdigit() else p for p in parts]
    ok = (
        isinstance(parts, (list, tuple))
        and len(parts) == 2
        and all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in parts)
        and sum(parts) > 0
    )
    if not ok:
        raise ValueError(ALTERNATION_RULE)
    return int(parts[0]), int(parts[1])


# ------------------------------------------------------------------------------------------------ the fields
Fraction = Annotated[float, Number(0, 1, lo_open=True, hi_open=True)]  # 0 < x < 1
Count = Annotated[int, Number(1, integer=True)]
NonNegativeInt = Annotated[int, Number(0, integer=True)]
SeqLen = Annotated[int, Number(2, integer=True)]
Flag = Annotated[bool, WrapValidator(_flag)]
SELECTIONS = ("global", "uniform")

Sparsity = Annotated[Fraction, Field(description="fraction of routed experts to remove, 0 < s < 1")]
Method = Annotated[str, WrapValidator(_registered_method), Field(description="the scoring criterion")]
Selection = Annotated[
    Literal["global", "uniform"] | None,
    Field(validate_default=True, description="global (ranked across layers, non-uniform) or uniform; unset: the "
                                             "method's own default (global; uniform for naee)"),
]
Seed = Annotated[NonNegativeInt, Field(description="seeds data sampling and the search")]
NumSamples = Annotated[Count, Field(description="calibration sequences")]
SeqLength = Annotated[SeqLen, Field(description="tokens per calibration sequence")]
BatchSize = Annotated[Count, Field(description="sequences per forward/backward pass")]
MinExperts = Annotated[Count | None, Field(description="floor on experts kept per layer")]
MaxLayerSparsity = Annotated[Fraction | None, Field(description="cap on the fraction removed from any one layer")]
Regroup = Annotated[Flag, Field(description="reset grouped routing (DeepSeek) to one group instead of requiring "
                                            "kept counts divisible by n_group")]


class OptionsModel(BaseModel):
    """Base of every options model and recipe section: unknown keys are errors, assignments are re-validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, populate_by_name=True)


class CriterionOptions(OptionsModel):
    """Base of a criterion's options model (registered with the criterion: ``Criterion.options``)."""


class NoOptions(CriterionOptions):
    """For a criterion without options of its own (reap, frequency, soft_frequency, random)."""


class DiEPOptions(CriterionOptions):
    """DiEP's search hyper-parameters: the paper's (lr 5e-3, 10 epochs, lambda 0.01, 3:1), except the search mode,
    which the quality benchmark chose (benchmarks/RESULTS.md, "Defaults the pruner ships")."""

    mode: Literal["auto", "gated", "dense"] = Field(
        "auto", description="auto (gated where top-k weights are renormalised, else dense), gated (keeps the "
                            "router) or dense (the paper's Eq. 5: all experts mixed)")
    lr: Annotated[float, Number(0, lo_open=True)] = Field(5e-3, description="search learning rate (Adam, cosine)")
    epochs: Count = Field(10, description="search epochs over the calibration set")
    lambda_: Annotated[float, Number(0)] = Field(0.01, alias="lambda",
                                                 description="weight of the reconstruction loss (Eq. 7)")
    alternation: Annotated[
        tuple[int, int], WrapValidator(_alternation), PlainSerializer(lambda v: f"{v[0]}:{v[1]}", when_used="json")
    ] = Field((3, 1), description="optimiser steps on alpha, then on beta, per cycle ('A:B')")
    ranking: Literal["softmax", "raw"] = Field(
        "softmax", description="softmax(alpha)*beta (comparable across layers) or raw alpha*beta (the paper)")


class NAEEOptions(CriterionOptions):
    """NAEE's exhaustive subset search limits."""

    max_combinations: Count = Field(10_000, description="refuse a layer with more subsets than this")
    chunk_tokens: Count = Field(4096, description="tokens evaluated at once")


class TargetOptions(OptionsModel):
    """What to remove and how to decide it (the recipe's ``pruning`` keys and the same ``DiEPPruner`` keywords)."""

    method: Method = "validated_choice"
    sparsity: Sparsity = 0.5
    selection: Selection = None
    seed: Seed = 0

    @_field_validator("selection")
    @classmethod
    def _selection_for_method(cls, value: str | None, info: ValidationInfo) -> str | None:
        """Resolve an unset selection to the method's default; refuse one the method does not support."""
        method = info.data.get("method")  # absent when the method itself is invalid: that error is reported
        if method is None:
            return value
        from .criteria.base import get_criterion, selection_problem

        if value is None:
            return get_criterion(method).default_selection()
        problem = selection_problem(method, value)
        if problem is not None:
            raise ValueError(problem)
        return value


class FloorsOptions(OptionsModel):
    """Limits the paper does not set: per-layer minimum experts, per-layer maximum sparsity, group reset."""

    min_experts_per_layer: MinExperts = None
    max_layer_sparsity: MaxLayerSparsity = None
    regroup: Regroup = False


Merge = Annotated[
    Literal["none", "output_cosine", "output_cka"],
    Field(description="fold each removed expert into its most similar kept expert before surgery "
                      "(diep_hub.merging: output cosine or CKA, frequency-weighted, neuron-aligned)"),
]
MergeAlignment = Annotated[
    Literal["weights", "none"],
    Field(description="merging: permute each merged expert's neurons to match the kept expert's first (weights: "
                      "one float64 I x I affinity and Hungarian assignment a merged expert: minutes each on experts as "
                      "wide as Mixtral-8x7B's, hours for a whole model; the dry run counts it) or average them as "
                      "stored (none)"),
]


class RecalibrationOptions(OptionsModel):
    """Router recalibration after surgery (``diep_hub.recalibration``): the recipe's ``pruning.recalibration``;
    ``DiEPPruner`` takes the same fields as ``recalibrate_router`` and ``recalibration_*``."""

    enabled: Flag = Field(False, description="distil the pruned layers' router rows towards the unpruned model")
    steps: Count = Field(32, description="router recalibration: optimiser steps")
    lr: Fraction = Field(1e-3, description="router recalibration: Adam learning rate (cosine decay)")
    output_scales: Flag = Field(False, description="router recalibration: also train one output scale per kept "
                                                   "expert, folded into its down_proj")
    output_scale_lr: Fraction = Field(3e-2, description="router recalibration: Adam learning rate of the output "
                                                        "scales (cosine decay)")

    @_field_validator("output_scales")
    @classmethod
    def _scales_need_recalibration(cls, value: bool, info: ValidationInfo) -> bool:
        if value and not info.data.get("enabled", False):
            raise ValueError("needs router recalibration on (enabled: true; diep-hub prune: --recalibrate): the "
                             "scales are trained with the routers")
        return value


_RECALIBRATION = RecalibrationOptions.model_fields


class PrunerSettings(TargetOptions, FloorsOptions):
    """Every ``DiEPPruner`` keyword that is not a criterion's option, flat as the Python API takes them."""

    dataset: Any = Field("allenai/c4", description="Hub dataset, local file, datasets.Dataset or list of strings")
    dataset_config: str | None = Field("en", description="dataset configuration name")
    split: str = Field("train", description="split holding the text")
    text_field: str = Field("text", description="column holding the text")
    num_samples: NumSamples = 128
    seq_len: SeqLength = 2048
    batch_size: BatchSize = 16
    skipping: Flag = Field(False, description="calibrate adaptive expert skipping after pruning")
    merge: Merge = "none"
    merge_alignment: MergeAlignment = "weights"
    recalibrate_router: Flag = Field(False, description="distil the pruned layers' router rows towards the unpruned "
                                                        "model after surgery (diep_hub.recalibration)")
    recalibration_steps: Count = Field(_RECALIBRATION["steps"].default, description=_RECALIBRATION["steps"].description)
    recalibration_lr: Fraction = Field(_RECALIBRATION["lr"].default, description=_RECALIBRATION["lr"].description)
    recalibration_output_scales: Flag = Field(
        _RECALIBRATION["output_scales"].default, description=_RECALIBRATION["output_scales"].description)
    recalibration_output_scale_lr: Fraction = Field(
        _RECALIBRATION["output_scale_lr"].default, description=_RECALIBRATION["output_scale_lr"].description)
    progress: Flag = Field(True, description="show progress bars")

    @_field_validator("dataset")
    @classmethod
    def _some_text(cls, value):
        if value is None or (isinstance(value, (str, list)) and len(value) == 0):
            raise ValueError("give a Hub dataset name, a local file, a Dataset or a list of strings")
        return value


#: DiEPPruner keywords that hold a criterion's option: keyword -> (criterion, its options model, field name)
OPTION_KEYWORDS = {
    "search_mode": ("diep", DiEPOptions, "mode"),
    "lr": ("diep", DiEPOptions, "lr"),
    "epochs": ("diep", DiEPOptions, "epochs"),
    "lambda_": ("diep", DiEPOptions, "lambda_"),
    "alternation": ("diep", DiEPOptions, "alternation"),
    "ranking": ("diep", DiEPOptions, "ranking"),
    "naee_max_combinations": ("naee", NAEEOptions, "max_combinations"),
}


def check_pruner_keywords(values: Mapping[str, Any]) -> str:
    """Validate ``DiEPPruner``'s keywords (flat, as the Python API takes them) with the models above; one
    ConfigError lists every problem in the ``keyword: value -> allowed`` words of the recipe. Returns the
    selection, an unset one resolved to the method's default."""
    lines: list[str] = []
    settings = None
    try:
        settings = PrunerSettings.model_validate({name: values[name] for name in PrunerSettings.model_fields})
    except ValidationError as exc:
        lines += problems(exc, PrunerSettings)
    for model in (DiEPOptions, NAEEOptions):
        keywords = {kw: name for kw, (_, m, name) in OPTION_KEYWORDS.items() if m is model}
        shown = {model.model_fields[name].alias or name: kw for kw, name in keywords.items()}
        try:
            model.model_validate({name: values[kw] for kw, name in keywords.items()})
        except ValidationError as exc:
            lines += problems(exc, model, names=shown)
    if values.get("recalibration_output_scales") and not values.get("recalibrate_router"):
        lines.append("recalibration_output_scales: True -> needs recalibrate_router: True (the scales are trained "
                     "with the routers)")
    if not lines and values.get("options") is not None:
        lines += criterion_options_problems(values["method"], values["options"])
    if lines:
        raise ConfigError("invalid DiEPPruner configuration: " + "; ".join(lines))
    return settings.selection


def criterion_options_problems(method: str, options: Any) -> list[str]:
    """``options`` is for a criterion without keywords of its own: refused for diep/naee, checked otherwise."""
    own = [kw for kw, (criterion, _, _) in OPTION_KEYWORDS.items() if criterion == method]
    if own:
        return [f"options: {options!r} -> {method} takes its options as keywords: {', '.join(own)}"]
    from .criteria.base import get_criterion

    model = get_criterion(method).options
    if not isinstance(options, Mapping):
        return [f"options: {options!r} -> a mapping of {method} options: {', '.join(model.model_fields) or 'none'}"]
    try:
        model.model_validate(dict(options))
    except ValidationError as exc:
        return problems(exc, model, prefix="options.")
    return []


# ---------------------------------------------------------------------------------------------- the messages
def _keys(model_cls: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model_cls.model_fields.items()]


def _model_at(root: type[BaseModel], loc: tuple) -> type[BaseModel]:
    """The model class that owns the field at ``loc`` (for listing allowed keys)."""
    cls = root
    for part in loc:
        field = next((f for n, f in cls.model_fields.items() if part in (n, f.alias)), None)
        if field is None:
            return cls
        candidates = [field.annotation, *getattr(field.annotation, "__args__", ())]
        nxt = next((c for c in candidates if isinstance(c, type) and issubclass(c, BaseModel)), None)
        if nxt is None:
            return cls
        cls = nxt
    return cls


def problems(exc: ValidationError, root: type[BaseModel], *, prefix: str = "",
             names: Mapping[str, str] | None = None) -> list[str]:
    """pydantic's errors as ``field.path: value -> allowed`` lines (unknown keys with the allowed list).

    ``prefix`` is prepended to each path (``pruning.``); ``names`` renames a top-level field (``mode`` ->
    ``search_mode`` for the Python API's keyword).
    """
    lines = []
    for err in exc.errors(include_url=False):
        loc = tuple(str(p) for p in err["loc"] if not str(p).startswith(("function-", "constrained-")))
        # Union members add their type names to the location (e.g. "int", "dict[str,...]"): drop them.
        loc = tuple(p for p in loc if not any(ch in p for ch in "[]") and p not in ("int", "float", "str", "bool"))
        shown = ((names or {}).get(loc[0], loc[0]), *loc[1:]) if loc else loc
        path = prefix + ".".join(shown) if shown else (prefix.rstrip(".") or "<top level>")
        if err["type"] == "extra_forbidden":
            keys = _keys(_model_at(root, loc[:-1]))
            close = difflib.get_close_matches(loc[-1], keys, n=1, cutoff=0.6) if loc else []
            guess = f"did you mean {close[0]!r}? " if close else ""
            lines.append(f"{path}: unknown key -> {guess}allowed keys: {', '.join(keys) or 'none'}")
        elif err["type"] == "missing":
            lines.append(f"{path}: missing -> required")
        else:
            lines.append(f"{path}: {err.get('input')!r} -> {err['msg'].removeprefix('Value error, ')}")
    # Union branches report the same field several times: keep the first line per path, in order.
    seen: dict[str, str] = {}
    for line in lines:
        seen.setdefault(line.split(":", 1)[0] + ("" if "unknown key" not in line else line), line)
    return list(seen.values())


def validate(model_cls: type[BaseModel], data: Mapping[str, Any], *, what: str,
             names: Mapping[str, str] | None = None) -> BaseModel:
    """``model_cls`` built from ``data``, or one ConfigError ``invalid <what>: line; line``."""
    try:
        return model_cls.model_validate(dict(data))
    except ValidationError as exc:
        raise ConfigError(f"invalid {what}: " + "; ".join(problems(exc, model_cls, names=names))) from None


def field_help(model_cls: type[BaseModel], name: str) -> str:
    """A field's one-line description with its choices and default, for ``--help``."""
    info = model_cls.model_fields[name]
    text = info.description or name
    args = [a for a in getattr(info.annotation, "__args__", ()) if a is not type(None)]
    literal = next((a for a in args if getattr(a, "__origin__", None) is Literal), None)
    if getattr(info.annotation, "__origin__", None) is Literal:
        literal = info.annotation
    if literal is not None:
        text += f"; one of: {', '.join(map(str, literal.__args__))}"
    default = info.default
    if isinstance(default, tuple):
        default = ":".join(map(str, default))
    return f"{text} (default: {'unset' if default is None else default})"


__all__ = [
    "ALTERNATION_RULE",
    "CriterionOptions",
    "DiEPOptions",
    "FloorsOptions",
    "NAEEOptions",
    "NoOptions",
    "OPTION_KEYWORDS",
    "OptionsModel",
    "PrunerSettings",
    "SELECTIONS",
    "TargetOptions",
    "check_pruner_keywords",
    "field_help",
    "number_problem",
    "problems",
    "quoted_choices",
    "validate",
]
