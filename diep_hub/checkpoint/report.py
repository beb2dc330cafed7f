"""``pruning_report.json`` as a typed object: what a pruning run did, read and written in one place.

:class:`PruningReport` is what ``DiEPPruner.prune_model`` fills (``pruner.report``), ``DiEPPruner.save`` writes,
and ``inspect``, ``reproduce``, ``push`` and the model card read. Its JSON form is the file's layout since the first
release (layer indices as string keys, ``config`` for the pruner settings, ``model_type`` for the family), so
checkpoints written before this class existed load unchanged; a field they lack is None. A key this version does
not know is kept in ``extra`` and written back as it was.

Readers that also have ``config.json`` use :meth:`PruningReport.for_checkpoint`: the report completed by the
config's ``diep_pruning`` record, so that a checkpoint with a partial report (or none: ``save_pruned`` without a
pruner) still answers ``method``, ``sparsity``, ``selection``...

The report is also a mapping of its JSON form (``report["kept_ids"]`` is ``{"0": [...]}``), the shape
``DiEPPruner.report`` had when it was a dict; new code reads the typed attributes.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import ConfigError, CorruptFileError
from ..files import read_json_object
from ..jsonable import to_jsonable
from .layout import REPORT_FILE
from .report_fields import BY_KEY, FIELDS, Calibration, CheckpointFormat, FieldProblem


@dataclass(repr=False)
class PruningReport(Mapping):
    """What a pruning run did (``pruning_report.json``). Every field is optional: None means "not recorded".

    Attributes:
        pruner_config: ``DiEPPruner.to_dict()`` (JSON key ``config``): enough to re-run the pruning.
        base_model: Hub id of the model that was pruned, when the run knew it (recipes of Hub models).
        family: the family's ``model_type`` (JSON key ``model_type``), e.g. "mixtral".
        format: "diep" (``diep_<family>`` with remote code) or "stock" (the family's own architecture).
        method, reference, ranking: the criterion, its paper, and how its scores rank experts.
        seed, sparsity, selection: as configured ("global" or "uniform" selection).
        num_removed, num_total: routed experts removed, and before pruning.
        rounding, selection_plan: how the removal count was rounded and the selection's own record.
        experts_before: layer -> routed experts before this pruning.
        kept_ids: layer -> kept ids in the numbering of the model this run pruned.
        kept_original_ids: layer -> kept ids in the original model's numbering (differs after a second pruning).
        per_layer_kept: layer -> experts kept.
        scores: layer -> one score per expert (higher: more important).
        details: the criterion's own record (JSON-able); DiEP's ``alpha``, ``beta``, ``loss_curve`` have fields.
        calibration: the calibration data as the run names it; calibration_shape: [sequences, tokens].
        wall_seconds, scoring_seconds, peak_memory: what the run cost on this machine.
        versions: package -> version of the run.
        previous_pruning: the ``diep_pruning`` record of an earlier pruning of the same model.
        skipping: ``SkippingCalibration.summary()`` plus the rates measured during evaluation.
        merging: ``MergeRecord.to_dict()`` when removed experts were merged into kept ones (``merges``: layer ->
            kept id -> {weight, merged: [{expert, weight, similarity}]}, ids numbered as in ``kept_ids``).
        recalibration: ``RecalibrationRecord.to_dict()`` when the routers were recalibrated (steps, loss before
            and after, applied).
        extra: keys this version does not know, kept as read.
    """

    pruner_config: dict[str, Any] | None = None
    base_model: str | None = None
    family: str | None = None
    format: CheckpointFormat | None = None
    method: str | None = None
    reference: str | None = None
    ranking: str | None = None
    seed: int | None = None
    sparsity: float | None = None
    selection: str | None = None
    num_removed: int | None = None
    num_total: int | None = None
    rounding: str | None = None
    selection_plan: dict[str, Any] | None = None
    experts_before: dict[int, int] | None = None
    kept_ids: dict[int, list[int]] | None = None
    kept_original_ids: dict[int, list[int]] | None = None
    per_layer_kept: dict[int, int] | None = None
    scores: dict[int, list[float]] | None = None
    details: dict[str, Any] | None = None
    calibration: Calibration | None = None
    calibration_shape: list[int] | None = None
    wall_seconds: float | None = None
    scoring_seconds: float | None = None
    peak_memory: dict[str, Any] | None = None
    versions: dict[str, str | None] | None = None
    previous_pruning: dict[str, Any] | None = None
    alpha: dict[int, list[float]] | None = None
    beta: dict[int, float] | None = None
    loss_curve: list[dict[str, Any]] | None = None
    skipping: dict[str, Any] | None = None
    merging: dict[str, Any] | None = None
    recalibration: dict[str, Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def __repr__(self) -> str:
        """The headline only: a full report holds a score per expert and can run to megabytes."""
        shown = ("family", "format", "method", "sparsity", "selection", "num_removed", "num_total")
        parts = [f"{name}={getattr(self, name)!r}" for name in shown if getattr(self, name) is not None]
        if self.per_layer_kept:
            parts.append(f"per_layer_kept={self.per_layer_kept!r}")
        return f"PruningReport({', '.join(parts)})"

    def __post_init__(self) -> None:
        try:
            for f in FIELDS:
                value = getattr(self, f.attr)
                if value is not None:
                    setattr(self, f.attr, f.decode(f.key, value))
        except FieldProblem as exc:
            raise ConfigError(f"PruningReport: {exc}") from None
        self.extra = {str(k): to_jsonable(v) for k, v in self.extra.items()}

    # ------------------------------------------------------------------------------------------ JSON form
    @classmethod
    def from_dict(cls, data: Mapping[str, Any], *, source: str = "pruning report") -> PruningReport:
        """The report of a JSON object; a field of the wrong shape is a CorruptFileError naming ``source``."""
        if not isinstance(data, Mapping):
            raise CorruptFileError(f"{source} holds a {type(data).__name__}, expected a JSON object {{...}}")
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        try:
            for key, value in data.items():
                spec = BY_KEY.get(key)
                if spec is None:
                    extra[key] = value
                elif value is not None:
                    values[spec.attr] = spec.decode(key, value)
        except FieldProblem as exc:
            raise CorruptFileError(
                f"{source}: {exc}; restore the file or re-save the checkpoint (DiEPPruner.save / diep-hub run)"
            ) from None
        return cls(**values, extra=extra)

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, in the file's layout (fields that are None are left out; ``extra`` keys last)."""
        data = {f.key: f.encode(getattr(self, f.attr)) for f in FIELDS if getattr(self, f.attr) is not None}
        data.update(self.extra)
        return data

    # ------------------------------------------------------------------------------------------ files
    @classmethod
    def read(cls, path: str | os.PathLike) -> PruningReport:
        """Parse one report file: damaged JSON or a field of the wrong shape is a CorruptFileError naming it."""
        path = Path(path)
        data = read_json_object(path, REPORT_FILE)
        return cls.from_dict(data, source=f"{REPORT_FILE} {path}")

    @classmethod
    def load(cls, folder: str | os.PathLike) -> PruningReport | None:
        """The report of a checkpoint folder, or None when it has no ``pruning_report.json``."""
        path = Path(folder) / REPORT_FILE
        return cls.read(path) if path.is_file() else None

    def save(self, folder: str | os.PathLike) -> Path:
        """Write ``pruning_report.json`` into ``folder`` atomically (a failure leaves the previous file)."""
        from .atomic import write_json_atomic

        path = Path(folder) / REPORT_FILE
        write_json_atomic(path, self.to_dict())
        return path

    # ------------------------------------------------------------------------------------------ readers' view
    @classmethod
    def for_checkpoint(cls, config: Any, report: PruningReport | Mapping[str, Any] | None = None) -> PruningReport:
        """The report as ``inspect``, ``push`` and the card read it: ``report`` (the file) completed by the
        ``diep_pruning`` record of ``config`` (config.json as a dict, or a live model's config) for the fields it
        lacks, and ``family``/``format`` from the config's ``model_type``. ``report`` itself is not changed."""
        config = _config_mapping(config)
        if report is None:
            view = cls()
        elif isinstance(report, PruningReport):
            view = cls.from_dict(report.to_dict())
        else:
            view = cls.from_dict(report)
        record = config.get("diep_pruning")
        record = record if isinstance(record, Mapping) else {}
        for attr in ("base_model", "method", "reference", "ranking", "seed", "sparsity", "selection", "num_removed",
                     "num_total", "versions"):
            if getattr(view, attr) is None and record.get(attr) is not None:
                spec = next(f for f in FIELDS if f.attr == attr)
                try:
                    setattr(view, attr, spec.decode(f"diep_pruning.{attr}", record[attr]))
                except FieldProblem:
                    continue  # a record this version cannot read: the field stays unknown
        if view.calibration is None:
            from_config = {k: view.pruner_config[k] for k in ("dataset", "num_samples", "seq_len")
                           if k in (view.pruner_config or {})}
            source = from_config or record.get("calibration")
            if source:
                try:
                    view.calibration = Calibration.decode("calibration", source)
                except FieldProblem:
                    pass
        model_type = config.get("model_type")
        if isinstance(model_type, str):
            view.family = view.family or model_type.removeprefix("diep_")
            view.format = view.format or ("diep" if model_type.startswith("diep_") else "stock")
        return view

    @property
    def removed_fraction(self) -> float | None:
        """Routed experts removed / routed experts before (the achieved sparsity), when both are recorded."""
        if self.num_removed is None or not self.num_total:
            return None
        return self.num_removed / self.num_total

    # ------------------------------------------------------------------------------ mapping of the JSON form
    # ``DiEPPruner.report`` was a dict of the JSON form: reading it by key (and ``to_jsonable(report)``) still
    # works, and so does setting a key (decoded into its field), for code written against that dict.
    def __getitem__(self, key: str) -> Any:
        spec = BY_KEY.get(key)
        if spec is None:
            return self.extra[key]
        value = getattr(self, spec.attr)
        if value is None:
            raise KeyError(key)
        return spec.encode(value)

    def __setitem__(self, key: str, value: Any) -> None:
        spec = BY_KEY.get(key)
        if spec is None:
            self.extra[key] = to_jsonable(value)
            return
        try:
            setattr(self, spec.attr, None if value is None else spec.decode(key, value))
        except FieldProblem as exc:
            raise ConfigError(f"PruningReport: {exc}") from None

    def __iter__(self) -> Iterator[str]:
        yield from (f.key for f in FIELDS if getattr(self, f.attr) is not None)
        yield from self.extra

    def __len__(self) -> int:
        return sum(getattr(self, f.attr) is not None for f in FIELDS) + len(self.extra)


def _config_mapping(config: Any) -> Mapping[str, Any]:
    if config is None:
        return {}
    if isinstance(config, Mapping):
        return config
    if hasattr(config, "to_dict"):
        return config.to_dict()
    raise ConfigError(f"expected config.json as a dict or a model config, got {type(config).__name__}")


def experts_table(config: Any, report: PruningReport | Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Per MoE layer: experts kept, originally, and the kept original ids (dense layers are left out).

    From config.json's per-layer fields; where they are absent (a stock-format checkpoint, uniform counts), from
    the pruning report's plan. A figure neither records is None. The one reading of "which experts are left",
    for ``inspect``, the run summary and the model card.
    """
    cfg = _config_mapping(config)
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
    if not isinstance(report, PruningReport):
        report = PruningReport.from_dict(report)
    before = report.experts_before or {}
    plan = report.kept_original_ids or report.kept_ids or {}
    return [{"layer": i, "kept": len(layer_ids), "original": before.get(i), "kept_ids": layer_ids}
            for i, layer_ids in sorted(plan.items())]


__all__ = ["Calibration", "CheckpointFormat", "PruningReport", "experts_table"]
