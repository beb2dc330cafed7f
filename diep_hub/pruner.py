"""``DiEPPruner``: the whole pruning configuration in one object, shaped like optimum's ``GPTQQuantizer``.

The constructor holds and validates every setting (so a bad value fails before a model is loaded or a token is
read); ``prune_model`` runs calibration -> scoring -> selection -> surgery on a live model; ``save`` writes the
checkpoint with ``pruning_report.json`` and the recipe that made it; ``to_dict`` / ``from_dict`` round-trip the
configuration, so a report is enough to reproduce a pruned model.

Example::

    pruner = DiEPPruner(sparsity=0.5, method="diep", dataset="allenai/c4", num_samples=128, seq_len=2048)
    model = pruner.prune_model(model, tokenizer)
    pruner.save(model, "out/", tokenizer=tokenizer)
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .calibration_sources import describe_source
from .checkpoint.layout import PRUNER_CONFIG_FILE, REPORT_FILE
from .checkpoint.report import PruningReport
from .checkpoint.saving import save_pruned
from .criteria import base as criteria_base  # importing the package registers every criterion
from .errors import ConfigError, DiEPError, UnsupportedModelError
from .families import get_family
from .jsonable import to_jsonable
from .memory import PeakMemory
from .model_loading import base_model_name, source_name
from .options import OPTION_KEYWORDS, DiEPOptions, NAEEOptions, PrunerSettings, check_pruner_keywords
from .pruning_record import record_pruning
from .selection_limits import unreachable_sparsity
from .surgery import prune_experts

logger = logging.getLogger(__name__)

_SETTINGS, _DIEP = PrunerSettings.model_fields, DiEPOptions.model_fields


@dataclass
class DiEPPruner:
    """Expert-pruning configuration and runner.

    Attributes:
        sparsity: fraction of routed experts to remove, 0 < s < 1 (shared experts and dense layers not counted).
        method: a registered criterion (``diep_hub.criteria.available_criteria()``), "validated_choice" by default
            (benchmarks/CHOICE.md: at 50% ahead of the best baseline or within the seed spread on every zoo
            model, at 25% within 0.008 of it, ahead of it on mixtral-8e at both; "diep" is the paper's search).
        selection: "global" (rank all experts of all layers together, non-uniform: DiEP's way) or "uniform"; None
            (default) means the method's own default, the first of its criterion's ``selections`` ("global", but
            "uniform" for naee, which supports nothing else). A selection the method does not support is refused.
        dataset: calibration source: Hub dataset name, local file (json/jsonl/parquet/txt), ``datasets.Dataset``
            or a list of strings.
        dataset_config: Hub dataset config name ("en" for C4).
        split, text_field: which split and column hold the text.
        num_samples, seq_len: calibration sequences and their length in tokens (paper: 128 x 2048).
        batch_size: sequences per forward/backward pass.
        seed: seeds data sampling and the search; same seed, same keep map.
        search_mode: DiEP's search-time MoE output: "gated" (router kept), "dense" (paper Eq. 5), or "auto" (default:
            gated for families that renormalise the top-k weights, dense for the others; benchmarks/RESULTS.md).
        lr, epochs, lambda_, alternation, ranking: DiEP search hyper-parameters (see ``criteria/diep.py``);
            ``alternation`` = (optimiser steps on alpha, steps on beta) per cycle.
        max_layer_sparsity: optional cap on the fraction removed from any one layer, 0 < c < 1.
        min_experts_per_layer: optional floor on experts kept per layer (on top of top-k and family minimums).
        regroup: reset grouped routing (DeepSeek) to n_group = topk_group = 1 instead of requiring kept counts
            divisible by n_group.
        naee_max_combinations: NAEE refuses a layer with more subsets than this.
        skipping: calibrate and enable adaptive expert skipping after pruning (``diep_hub.skipping``).
        merge: "none" (default), or fold each removed expert into its most similar kept expert before surgery,
            by "output_cosine" or "output_cka" (``diep_hub.merging``); recorded in the report's ``merging``.
        merge_alignment: "weights" (default: each merged expert's neurons are matched to the kept expert's first,
            one Hungarian assignment a merged expert) or "none" (averaged as stored: for wide experts, where the
            assignment takes minutes each).
        recalibrate_router: after surgery, distil the pruned layers' router rows towards the unpruned model's
            next-token distribution on the calibration tokens for ``recalibration_steps`` Adam steps at
            ``recalibration_lr`` (``diep_hub.recalibration``); recorded in the report's ``recalibration``.
        recalibration_output_scales: with ``recalibrate_router``, also train one output scale per kept expert
            (Adam at ``recalibration_output_scale_lr``) and fold it into the expert's ``down_proj`` (the report
            records the scales).
        progress: show tqdm progress bars.
        options: the options of a criterion that has no keyword here (a dict of its options model's fields, e.g.
            a newly registered criterion); diep and naee take theirs as the keywords above.

    Types, ranges, choices and defaults are those of ``diep_hub.options`` (``PrunerSettings`` and the criterion
    options models): the very models the recipe embeds and the CLI's flags come from.
    """

    sparsity: float = _SETTINGS["sparsity"].default
    method: str = _SETTINGS["method"].default
    selection: str | None = None
    dataset: Any = _SETTINGS["dataset"].default
    dataset_config: str | None = _SETTINGS["dataset_config"].default
    split: str = _SETTINGS["split"].default
    text_field: str = _SETTINGS["text_field"].default
    num_samples: int = _SETTINGS["num_samples"].default
    seq_len: int = _SETTINGS["seq_len"].default
    batch_size: int = _SETTINGS["batch_size"].default
    seed: int = _SETTINGS["seed"].default
    search_mode: str = _DIEP["mode"].default
    lr: float = _DIEP["lr"].default
    epochs: int = _DIEP["epochs"].default
    lambda_: float = _DIEP["lambda_"].default
    alternation: tuple[int, int] = _DIEP["alternation"].default
    ranking: str = _DIEP["ranking"].default
    max_layer_sparsity: float | None = None
    min_experts_per_layer: int | None = None
    regroup: bool = False
    naee_max_combinations: int = NAEEOptions.model_fields["max_combinations"].default
    skipping: bool = False
    merge: str = _SETTINGS["merge"].default
    merge_alignment: str = _SETTINGS["merge_alignment"].default
    recalibrate_router: bool = False
    recalibration_steps: int = _SETTINGS["recalibration_steps"].default
    recalibration_lr: float = _SETTINGS["recalibration_lr"].default
    recalibration_output_scales: bool = False
    recalibration_output_scale_lr: float = _SETTINGS["recalibration_output_scale_lr"].default
    progress: bool = True
    options: dict[str, Any] | None = None
    report: PruningReport | None = field(default=None, init=False, repr=False, compare=False)

    # --------------------------------------------------------------------------------------------------------
    # Validation
    def __post_init__(self) -> None:
        self._validate()

    def _validate(self) -> None:
        """Check every field with the shared models (``diep_hub.options``), all problems in one ConfigError.

        Run by the constructor and again before pruning (a dataclass field can be reassigned); fills an unset
        selection with the method's default and normalises ``alternation`` to a tuple.
        """
        self.selection = check_pruner_keywords({f.name: getattr(self, f.name) for f in fields(self) if f.init})
        self.alternation = tuple(self.alternation)

    def criterion_settings(self):
        """The method's options model instance (``diep_hub.options.DiEPOptions`` for diep, ...): the keywords
        that belong to it, or ``options`` for a criterion without keywords here."""
        model = criteria_base.get_criterion(self.method).options
        values = {name: getattr(self, kw) for kw, (c, _, name) in OPTION_KEYWORDS.items() if c == self.method}
        return model.model_validate(values or dict(self.options or {}))

    # --------------------------------------------------------------------------------------------------------
    # Serialisation
    def to_dict(self) -> dict[str, Any]:
        """The configuration as JSON-able data (``from_dict`` restores it). A non-string dataset is described."""
        data = {f.name: getattr(self, f.name) for f in fields(self) if f.init}
        data["alternation"] = list(self.alternation)
        data["dataset"] = describe_source(self.dataset)
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiEPPruner:
        """Rebuild a pruner from ``to_dict`` output; unknown keys are an error that names them."""
        allowed = {f.name for f in fields(cls) if f.init}
        unknown = sorted(set(data) - allowed)
        if unknown:
            raise ConfigError(f"unknown DiEPPruner key(s) {unknown}; allowed keys: {sorted(allowed)}")
        return cls(**dict(data))

    # --------------------------------------------------------------------------------------------------------
    # Running
    def criterion_options(self) -> dict[str, Any]:
        """What the criterion receives as ``ScoringContext.options``: its options model's fields plus the run
        settings it reads (``progress``; NAEE also ``regroup``)."""
        data = {**self.criterion_settings().model_dump(), "progress": self.progress}
        if self.method == "naee":
            data["regroup"] = self.regroup
        return data

    def calibration_source(self) -> tuple[Any, str | None, str]:
        """(source, dataset config, split) the calibration loader reads.

        An offline corpus name (``diep-hub/tiny-text``) is written to diep_hub's cache and read from there as a
        local file; anything else is read as given. The settings keep the name, so ``to_dict`` (and so
        ``diep_recipe.json``, the report and ``config.json``) never records a cache path of this machine.
        """
        if isinstance(self.dataset, str):
            from .model_loading import text_source

            source, local = text_source(self.dataset, None, self.split)
            if local:
                return source, None, "train"
        return self.dataset, self.dataset_config, self.split

    def _select(self, scores: dict[int, torch.Tensor], model: nn.Module, mode: str | None = None):
        """The run's selection of ``scores``; ``mode`` overrides global/uniform, every other setting is the run's."""
        from .selection import select_experts

        return select_experts(
            scores,
            model,
            sparsity=self.sparsity,
            mode=mode or self.selection,
            max_layer_sparsity=self.max_layer_sparsity,
            min_experts_per_layer=self.min_experts_per_layer,
            regroup=self.regroup,
        )

    def check_feasible(self, model: nn.Module):
        """Refuse, before any calibration, a model or sparsity that cannot be pruned as configured.

        Runs the selection on placeholder scores: it applies exactly the floors, caps and group rules the real
        selection will, so an impossible request fails now rather than after an hour of search.
        Returns that dry-run selection (its per-layer counts tell NAEE the subset sizes).
        """
        self._validate()
        family = get_family(model)
        layers = family.moe_layers(model)
        if not layers:
            raise UnsupportedModelError(f"{type(model).__name__} ({family.model_type}) has no MoE layers to prune")
        offloaded = [layer.index for layer in layers if layer.experts.down_proj.device.type == "meta"]
        if offloaded:
            raise ConfigError(
                f"MoE layers {offloaded} have expert weights offloaded to disk (meta device): surgery cannot slice "
                "them; load with a device_map that keeps experts on CPU or GPU (device_map={'': 'cpu'})"
            )
        placeholder = {layer.index: torch.linspace(1.0, 2.0, layer.num_experts) for layer in layers}
        try:
            return self._select(placeholder, model)
        except DiEPError as exc:
            raise unreachable_sparsity(self.sparsity, family, layers, exc) from exc

    def _target_counts(self, dry_run) -> dict[int, int]:
        """Per-layer kept counts for criteria that search subsets of a given size (NAEE).

        Such a criterion supports only selections whose counts are fixed before scoring (``selections``, checked
        at registration and by ``_validate``), so the dry run's counts are exactly what the real selection
        will keep.
        """
        counts = dict(dry_run.per_layer_kept)
        logger.info("%s searches subsets of these sizes per layer: %s", self.method, counts)
        return counts

    def prepare_scoring(self, model: nn.Module):
        """Every check ``prune_model`` makes before a calibration token is read, and what the criterion gets.

        ``check_feasible`` (the real selection on placeholder scores), then the criterion's own ``check_feasible``
        on the :class:`~diep_hub.criteria.base.ScoringContext` it will score with, tokens still missing. The dry
        run calls this on a model of FakeTensors, so it refuses exactly what ``prune`` refuses.

        Returns:
            ``(placeholder selection, criterion, context)``.
        """
        dry_run = self.check_feasible(model)
        family = get_family(model)
        criterion = criteria_base.get_criterion(self.method)()
        # Counts fixed before scoring (uniform selection) are told to every criterion: NAEE needs them, the
        # removal-aware search budgets per layer with them, the others ignore them.
        counts_fixed = self.selection in criteria_base.COUNTS_BEFORE_SCORING
        num_to_keep = self._target_counts(dry_run) if criterion.needs_target_counts or counts_fixed else None
        context = criteria_base.ScoringContext(
            model=model,
            family=family,
            layers=family.moe_layers(model),
            input_ids=None,
            batch_size=self.batch_size,
            seed=self.seed,
            num_to_keep=num_to_keep,
            sparsity=self.sparsity,
            options=self.criterion_options(),
            select=lambda scores, mode=None: self._select(scores, model, mode),
        )
        criterion.check_feasible(context)
        return dry_run, criterion, context

    def prune_model(self, model: nn.Module, tokenizer, *, base_model: str | None = None) -> nn.Module:
        """Score, select and remove experts in place; return the ``diep_<family>`` model.

        The configuration used is recorded in ``model.config.diep_pruning``; ``self.report`` (a
        :class:`~diep_hub.checkpoint.report.PruningReport`) holds what ``pruning_report.json`` will contain.
        ``base_model``: the name the model goes by (a Hub id), recorded in both; by default the id it was loaded
        from (``model.name_or_path``), never a local path.
        """
        from .calibration import load_calibration_data, vocab_size_of

        started = time.perf_counter()
        family = get_family(model)
        _, criterion, context = self.prepare_scoring(model)
        layers, num_to_keep = context.layers, context.num_to_keep
        experts_before = {layer.index: layer.num_experts for layer in layers}
        previous = getattr(model.config, "diep_pruning", None)

        with PeakMemory() as memory:
            source, config_name, split = self.calibration_source()
            input_ids = load_calibration_data(
                source,
                tokenizer,
                num_samples=self.num_samples,
                seq_len=self.seq_len,
                seed=self.seed,
                config_name=config_name,
                split=split,
                text_field=self.text_field,
                progress=self.progress,
                # A tokenizer of another model gives ids past the embedding: refuse them here, not as an
                # IndexError deep inside the first forward pass of the scoring.
                vocab_size=vocab_size_of(model),
            )
            memory.measure()
            context = dataclasses.replace(context, input_ids=input_ids)
            logger.info(
                "scoring %d MoE layers with %r on %s calibration tokens",
                len(layers),
                self.method,
                tuple(input_ids.shape),
            )
            score_started = time.perf_counter()
            result = criterion.score(context)
            score_seconds = time.perf_counter() - score_started
            memory.measure()
            selection = self._select(result.scores, model)
            if num_to_keep is not None and dict(selection.per_layer_kept) != num_to_keep:
                # Cannot happen while the selections declaration holds; if it ever did, the keep map would hold
                # subsets the criterion never evaluated, so refuse before surgery.
                raise DiEPError(
                    f"{self.method} scored subsets of sizes {num_to_keep} per layer but {self.selection} selection "
                    f"keeps {dict(selection.per_layer_kept)}; refusing a keep map the criterion did not evaluate"
                )
            teacher = None
            if self.recalibrate_router:  # the unpruned model's outputs, cached before merging and surgery
                from .recalibration import teacher_hidden_states

                teacher = teacher_hidden_states(model, input_ids, batch_size=self.batch_size, progress=self.progress)
            merging = None
            if self.merge != "none":
                from .merging import merge_removed_experts

                merging = merge_removed_experts(
                    model, selection.keep, input_ids, batch_size=self.batch_size, similarity=self.merge,
                    align=self.merge_alignment,
                    regroup=bool(selection.regroup), progress=self.progress,
                ).to_dict()
            model = prune_experts(model, selection.keep, regroup=bool(selection.regroup))
            recalibration = None
            if self.recalibrate_router:
                from .recalibration import recalibrate_routers

                recalibration = recalibrate_routers(
                    model, teacher, input_ids, batch_size=self.batch_size, steps=self.recalibration_steps,
                    lr=self.recalibration_lr, seed=self.seed, output_scales=self.recalibration_output_scales,
                    output_scale_lr=self.recalibration_output_scale_lr, progress=self.progress,
                ).to_dict()
                del teacher
            memory.measure()
            skipping_summary = self._skip(model, input_ids) if self.skipping else None

        base_model = source_name(base_model) if base_model is not None else base_model_name(model)
        self.report = record_pruning(
            self, model, family=family, reference=getattr(criterion, "reference", ""), result=result,
            selection=selection, experts_before=experts_before, previous=previous, base_model=base_model,
            calibration_shape=list(input_ids.shape), started=started,
            scoring_seconds=score_seconds, peak_memory=memory.summary(),
            edits={"skipping": skipping_summary, "merging": merging, "recalibration": recalibration},
        )
        logger.info(
            "removed %d of %d routed experts (%s selection); kept per layer: %s",
            selection.num_removed,
            selection.num_total,
            self.selection,
            self.report.per_layer_kept,
        )
        return model

    def _skip(self, model: nn.Module, input_ids: torch.Tensor) -> dict[str, Any]:
        from .skipping import calibrate_skipping, enable_skipping

        calibration = calibrate_skipping(model, input_ids, batch_size=self.batch_size, seed=self.seed)
        enable_skipping(model, calibration)
        return to_jsonable(calibration.summary())

    def save(
        self,
        model: nn.Module,
        save_directory: str | os.PathLike,
        tokenizer=None,
        overwrite: bool = False,
        extra_files: Mapping[str, str | bytes | dict] | None = None,
        stock_format: bool = False,
        report: PruningReport | None = None,
    ) -> Path:
        """Write the pruned checkpoint plus ``pruning_report.json`` and ``diep_recipe.json`` (atomically).

        ``stock_format``: save as the family's own architecture (``save_pruned(stock_format=True)``; every layer
        must keep the same number of experts), recorded as ``format: "stock"`` in the report.
        ``report``: the report to write instead of ``self.report`` (the run's, completed by later stages).
        """
        report = report if report is not None else self.report
        if report is None:
            raise ConfigError("nothing to save yet: call prune_model(model, tokenizer) first")
        # ``skipping`` as the saved model has it: the run's skipping stage (or enable/disable_skipping after
        # pruning) may have switched it since these settings were made, and config.json records the model's state.
        from .skipping import skipping_enabled

        settings = {**self.to_dict(), "skipping": skipping_enabled(model)}
        report = dataclasses.replace(report, format="stock" if stock_format else "diep",
                                     pruner_config={**(report.pruner_config or {}), "skipping": settings["skipping"]})
        files: dict[str, Any] = {REPORT_FILE: report.to_dict(), PRUNER_CONFIG_FILE: settings}
        files.update(extra_files or {})
        return save_pruned(model, save_directory, tokenizer=tokenizer, overwrite=overwrite, extra_files=files,
                           stock_format=stock_format)


__all__ = ["DiEPPruner", "OPTION_KEYWORDS", "unreachable_sparsity"]
