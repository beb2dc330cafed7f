"""The JSON layout of ``pruning_report.json``: one row a field (attribute, JSON key, decoder, encoder).

Decoders take the JSON form, or the already typed value (decoding is idempotent), and raise :class:`FieldProblem`
for a value of the wrong shape; :class:`~diep_hub.checkpoint.report.PruningReport` turns that into an error naming
the file. Encoders return the JSON form. The JSON keys are the file's layout since the first release: do not rename.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from ..jsonable import to_jsonable

CheckpointFormat = Literal["diep", "stock"]
FORMATS = ("diep", "stock")


class FieldProblem(ValueError):
    """One field of a report holds a value of the wrong shape (turned into CorruptFileError / ConfigError)."""

    def __init__(self, key: str, value: Any, expected: str):
        shown = repr(value)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        super().__init__(f"{key!r} is {shown}, expected {expected}")


# ------------------------------------------------------------------------------------------------ field codecs
# Each decoder takes the JSON form (or the already typed value: decoding is idempotent) and returns the typed
# value; each encoder returns the JSON form.
def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _str(key: str, value: Any) -> str:
    if not isinstance(value, str):
        raise FieldProblem(key, value, "a string")
    return value


def _int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise FieldProblem(key, value, "an integer")
    return value


def _number(key: str, value: Any) -> float:
    """A number; ``"nan"``/``"inf"`` strings are what :func:`to_jsonable` writes for non-finite floats."""
    if _is_number(value):
        return value
    if isinstance(value, str) and value.lower() in ("nan", "inf", "-inf", "infinity", "-infinity"):
        return float(value)
    raise FieldProblem(key, value, "a number")


def _format(key: str, value: Any) -> str:
    if value not in FORMATS:
        raise FieldProblem(key, value, f"one of {list(FORMATS)}")
    return value


def _list_of(item: Callable[[str, Any], Any], what: str) -> Callable[[str, Any], list]:
    def decode(key: str, value: Any) -> list:
        if not isinstance(value, (list, tuple)):
            raise FieldProblem(key, value, f"a list of {what}")
        return [item(f"{key}[{i}]", v) for i, v in enumerate(value)]

    return decode


def _layer_map(item: Callable[[str, Any], Any], what: str) -> Callable[[str, Any], dict[int, Any]]:
    """``{"<layer index>": value}`` -> ``{layer index: value}``, sorted by layer."""

    def decode(key: str, value: Any) -> dict[int, Any]:
        if not isinstance(value, Mapping):
            raise FieldProblem(key, value, f'an object {{"<layer index>": {what}}}')
        out = {}
        for layer, v in value.items():
            try:
                index = int(layer)
            except (TypeError, ValueError):
                raise FieldProblem(key, layer, "layer indices (0, 1, ...) as keys") from None
            out[index] = item(f"{key}.{layer}", v)
        return dict(sorted(out.items()))

    return decode


def _object(key: str, value: Any) -> dict[str, Any]:
    if not isinstance(value, Mapping):
        raise FieldProblem(key, value, "an object {...}")
    return to_jsonable(value)


def _objects(key: str, value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, Mapping) for v in value):
        raise FieldProblem(key, value, "a list of objects")
    return to_jsonable(list(value))


def _versions(key: str, value: Any) -> dict[str, str | None]:
    if not isinstance(value, Mapping) or not all(v is None or isinstance(v, str) for v in value.values()):
        raise FieldProblem(key, value, 'an object {"package": "version" or null}')
    return {str(k): v for k, v in value.items()}


def _json(value: Any) -> Any:
    return to_jsonable(value)


@dataclass
class Calibration:
    """The calibration data as the run names it: ``dataset`` is the Hub id, offline corpus name or path as written
    in the recipe, ``num_samples`` x ``seq_len`` tokens. ``loaded_from`` (the cache file an offline corpus became)
    is only read back from earlier reports: a path of the machine that ran is no longer recorded."""

    dataset: str | None = None
    num_samples: int | None = None
    seq_len: int | None = None
    loaded_from: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    _KEYS = ("dataset", "loaded_from", "num_samples", "seq_len")

    @classmethod
    def decode(cls, key: str, value: Any) -> Calibration:
        if isinstance(value, Calibration):
            return value
        if not isinstance(value, Mapping):
            raise FieldProblem(key, value, 'an object {"dataset", "num_samples", "seq_len"}')
        dataset = value.get("dataset")
        return cls(
            dataset=None if dataset is None else str(dataset),
            num_samples=None if value.get("num_samples") is None else _int(f"{key}.num_samples", value["num_samples"]),
            seq_len=None if value.get("seq_len") is None else _int(f"{key}.seq_len", value["seq_len"]),
            loaded_from=None if value.get("loaded_from") is None else str(value["loaded_from"]),
            extra={k: to_jsonable(v) for k, v in value.items() if k not in cls._KEYS},
        )

    def to_dict(self) -> dict[str, Any]:
        data = {"dataset": self.dataset}
        if self.loaded_from is not None:
            data["loaded_from"] = self.loaded_from
        data.update(num_samples=self.num_samples, seq_len=self.seq_len, **self.extra)
        return data


def _calibration(key: str, value: Any) -> Calibration:
    return Calibration.decode(key, value)


def _encode_calibration(value: Calibration) -> dict[str, Any]:
    return value.to_dict()


def _encode_layer_map(value: Mapping[int, Any]) -> dict[str, Any]:
    return {str(k): to_jsonable(v) for k, v in value.items()}


_INT_LIST = _list_of(_int, "integers")
_NUMBER_LIST = _list_of(_number, "numbers")


@dataclass(frozen=True)
class _Field:
    attr: str
    key: str  # the JSON key (the file's layout: do not rename)
    decode: Callable[[str, Any], Any]
    encode: Callable[[Any], Any] = _json


# The JSON layout, in the order the file lists it.
FIELDS = (
    _Field("pruner_config", "config", _object),
    _Field("base_model", "base_model", _str),
    _Field("family", "model_type", _str),
    _Field("format", "format", _format),
    _Field("method", "method", _str),
    _Field("reference", "reference", _str),
    _Field("ranking", "ranking", _str),
    _Field("seed", "seed", _int),
    _Field("sparsity", "sparsity", _number),
    _Field("selection", "selection", _str),
    _Field("num_removed", "num_removed", _int),
    _Field("num_total", "num_total", _int),
    _Field("rounding", "rounding", _str),
    _Field("selection_plan", "selection_plan", _object),
    _Field("experts_before", "experts_before", _layer_map(_int, "an integer"), _encode_layer_map),
    _Field("kept_ids", "kept_ids", _layer_map(_INT_LIST, "[ids]"), _encode_layer_map),
    _Field("kept_original_ids", "kept_original_ids", _layer_map(_INT_LIST, "[ids]"), _encode_layer_map),
    _Field("per_layer_kept", "per_layer_kept", _layer_map(_int, "an integer"), _encode_layer_map),
    _Field("scores", "scores", _layer_map(_NUMBER_LIST, "[scores]"), _encode_layer_map),
    _Field("details", "details", _object),
    _Field("calibration", "calibration", _calibration, _encode_calibration),
    _Field("calibration_shape", "calibration_shape", _INT_LIST),
    _Field("wall_seconds", "wall_seconds", _number),
    _Field("scoring_seconds", "scoring_seconds", _number),
    _Field("peak_memory", "peak_memory", _object),
    _Field("versions", "versions", _versions),
    _Field("previous_pruning", "previous_pruning", _object),
    _Field("alpha", "alpha", _layer_map(_NUMBER_LIST, "[alpha]"), _encode_layer_map),
    _Field("beta", "beta", _layer_map(_number, "a number"), _encode_layer_map),
    _Field("loss_curve", "loss_curve", _objects),
    _Field("skipping", "skipping", _object),
    _Field("merging", "merging", _object),
    _Field("recalibration", "recalibration", _object),
)
BY_KEY = {f.key: f for f in FIELDS}


__all__ = ["BY_KEY", "FIELDS", "FORMATS", "Calibration", "CheckpointFormat", "FieldProblem"]
