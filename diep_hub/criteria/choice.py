"""Validated choice: run several cheap criteria and keep the keep map that the held-out calibration tokens like best.

No single criterion wins on every model (benchmarks/VARIANTS.md: frequency on one zoo model, REAP on another, soft
frequency on a third), and which one wins shows in the pruned model's distance from the unpruned one. This criterion
measures that distance instead of guessing it:

1. the calibration sequences are split: the last ``ceil(validation_fraction * n)`` are held out, the rest "fit";
2. each candidate criterion scores the experts on the fit sequences with its own default options (the ones that
   are statistics of a routing pass, the three defaults among them, share one pass), and the run's
   own selection (``ScoringContext.select``: sparsity, global or uniform, floors, caps, group rules) turns its
   scores into a keep map; with global selection and ``compare_uniform`` (off by default: it did not keep more in
   benchmarks/CHOICE.md) its uniform keep map is judged too;
3. each keep map is applied by masking the router (``router_logit_bias`` at ``MIN_LOG_GATE`` for every removed
   expert: what surgery does to routing, checked against surgery in tests/test_choice_criterion.py) and its mean
   per-token KL(unpruned || pruned) of the next-token distribution is measured on the held-out sequences;
4. the keep map with the lowest KL wins (ties: the first listed);
5. the best ``refine_candidates`` keep maps (by default only the winner's, with each layer's four weakest kept and
   four strongest removed experts probed, ``probe_width``: benchmarks/CHOICE.md's ninth run measured that against
   refining every candidate's map with one probe) are refined (``refine_rounds`` > 0, the default) by greedy
   one-expert moves (swap an expert within a layer, or move one slot from one layer to another; under grouped
   routing a slot between layers is one expert of every group, as the selection's group rule needs) measured by the
   same masked KL on fit sequences (see :func:`refine_keep_map`; with ``min_move_gain_se`` > 0 only moves whose
   gain exceeds that many standard errors); the keep map applied is the one with the lowest held-out KL among the
   winner and the refined maps whose held-out KL is below the winner's by more than ``min_gain_se`` standard errors
   of the per-sequence difference (2 by default: a smaller gain is within what another sample of held-out
   sequences could reverse);
6. the returned scores rebuild that keep map under the run's selection: the candidate's own fit-sequence scores
   when they do, else scores that encode the map (:func:`keep_map_scores`).

Cost: one routing pass on the fit sequences for the routing-statistic candidates (a scoring pass for any other),
plus (keep maps judged + 1) forward passes over the held-out sequences, plus one refinement per refined keep map
(its docstring), plus one held-out pass per refined map that moved. The refinements together spend at most
``refine_budget`` passes over as many sequences as the calibration set has (16 by default; benchmarks/BUDGET.md):
on a model with many experts or many layers a round then probes fewer experts a layer, or the search stops.
:class:`MaskedKL` keeps the unpruned model's log-probabilities of the held-out and refine sequences, and the
refinements' decoder-layer outputs, within ``cache_mb``; beyond it they are computed one batch at a time, never
stored for the whole set.
``details`` records every candidate's KL and per-layer counts and every refinement, so the report shows what was
compared.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Annotated, Literal

import torch
from pydantic import Field, field_validator

from ..errors import ConfigError
from ..options import CriterionOptions, NonNegativeInt, Number
from .base import Criterion, ScoreResult, ScoringContext, get_criterion, parse_options, register_criterion
from .capture import RoutingStatisticCriterion, shared_routing_pass
from .masked_kl import MaskedKL
from .refinement import (
    BUDGET_SPENT,
    REFINING,
    gain_in_standard_errors,
    keep_map_scores,
    rebuilds_keep_map,
    refine_keep_map,
)
from .router_bias import check_router_bias

logger = logging.getLogger(__name__)

NAME = "validated_choice"


class ChoiceOptions(CriterionOptions):
    """Which criteria compete and how much calibration data judges them."""

    candidates: tuple[str, ...] = Field(
        ("reap", "frequency", "soft_frequency"),
        description="the criteria compared (each with its default options), the tie-break order "
                    "(benchmarks/REMOVAL_CANDIDATE.md: adding diep_removal kept no more)")
    validation_fraction: Annotated[float, Number(0, 1, lo_open=True, hi_open=True)] = Field(
        0.25, description="share of the calibration sequences held out to judge the candidates")
    compare_uniform: bool = Field(
        False, description="with global selection, also judge each candidate's uniform keep map (same total removed)")
    refine_rounds: NonNegativeInt = Field(
        8, description="greedy rounds of one-expert moves on each refined keep map, each kept only if it lowers "
                       "the masked KL on fit sequences; the result only if it lowers the held-out KL (0: none)")
    refine_sequences: Annotated[int, Number(1, integer=True)] = Field(
        16, description="fit sequences (the first ones) that measure the refinement moves")
    min_gain_se: Annotated[float, Number(0, None)] = Field(
        2.0, description="a refined keep map replaces the validated winner only if its held-out KL is lower by "
                         "more than this many standard errors of the per-sequence difference (0: any lower KL)")
    probe_width: NonNegativeInt = Field(
        4, description="experts a layer whose single removal and restoration each refinement round measures: the "
                       "weakest kept and strongest removed by the candidate's scores (0: every expert; 1: the "
                       "default before benchmarks/CHOICE.md's ninth run)")
    min_move_gain_se: Annotated[float, Number(0, None)] = Field(
        0.0, description="a refinement move is taken only if it lowers the fit KL by more than this many standard "
                         "errors of the per-sequence difference over the refine sequences (0: any lower KL)")
    refine_budget: Annotated[float, Number(0, None)] = Field(
        16.0, description="the most passes of the model over as many sequences as the calibration set has that the "
                          "refinements may spend together (REAP's scoring is one pass): a round that would not fit "
                          "probes fewer experts a layer, or the search stops; 0: no bound. benchmarks/BUDGET.md: 16 "
                          "binds on none of the zoo runs and bounds the search on many experts and many layers")
    refine_candidates: Annotated[int, Number(1, integer=True)] = Field(
        1, description="how many of the best-judged keep maps are refined (1: only the winner's; 3: every default "
                       "candidate's, the default before the ninth run); the lowest held-out KL among the validated "
                       "winner and the refined maps is applied")

    refine_objective: Literal["kl", "nll"] = Field(
        "kl", description="what the refinement climbs and what a refined map must beat the validated winner on, "
                          "held out: kl = the masked KL from the unpruned model (the candidates are always judged "
                          "by it); nll = the pruned model's own next-token NLL of the text "
                          "(benchmarks/NLL_REFINEMENT.md: behind kl on one zoo model, ahead on none)")

    cache_mb: NonNegativeInt = Field(
        1024, description="memory (MiB) that judging and refining may keep to avoid recomputing: the unpruned "
                          "log-probabilities of their sequences and the decoder-layer outputs a masked forward "
                          "resumes from; the keep maps and KLs are the same with any value (0: recompute all)")

    @field_validator("candidates", mode="before")
    @classmethod
    def _known_candidates(cls, value):
        from .base import available_criteria

        names = list(value) if isinstance(value, (list, tuple)) else value
        if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
            raise ValueError("must be a non-empty list of criterion names")
        unknown = [n for n in names if n not in available_criteria() or n == NAME]
        if unknown:
            allowed = [n for n in available_criteria() if n != NAME]
            raise ValueError(f"unknown or not allowed candidate(s) {unknown}; allowed: {allowed}")
        if len(set(names)) != len(names):
            raise ValueError(f"lists a candidate twice: {names}")
        needs_counts = [n for n in names if get_criterion(n).needs_target_counts]
        if needs_counts:
            raise ValueError(f"{needs_counts} search subsets of fixed sizes and cannot be compared here")
        return tuple(names)


def split_calibration(input_ids: torch.Tensor, validation_fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held-out) sequences: the last ceil(fraction * n) sequences are held out; both parts non-empty."""
    num = int(input_ids.shape[0])
    held_out = math.ceil(validation_fraction * num)
    if num < 2 or held_out >= num:
        raise ConfigError(
            f"{NAME} needs calibration sequences both to score and to judge: num_samples={num} with "
            f"validation_fraction={validation_fraction} leaves none to score with; use num_samples >= 2 and a "
            "smaller validation_fraction"
        )
    return input_ids[: num - held_out], input_ids[num - held_out :]


def cache_budgets(cache_mb: int) -> tuple[int, int]:
    """(judging, refining): the bytes of ``cache_mb`` each :class:`MaskedKL` may keep, half each (the dry run
    estimates the peak from the same split)."""
    total = int(cache_mb) * 2**20
    return total // 2, total - total // 2


def masked_kl(model, layers, keep_maps: list[dict[int, list[int]]], held_out: torch.Tensor, batch_size: int,
              progress: bool = False) -> list[float]:
    """Mean per-token KL(unpruned || pruned) of the next-token distribution on ``held_out``, one value per keep map
    (:class:`MaskedKL` with no cache: the unpruned logits of a batch are computed once and compared with every keep
    map before the next batch)."""
    return MaskedKL(model, layers, held_out, batch_size, desc=f"{NAME}: judging candidates").means(keep_maps, progress)


def masked_kl_per_sequence(model, layers, keep_maps: list[dict[int, list[int]]], held_out: torch.Tensor,
                           batch_size: int, progress: bool = False) -> list[tuple[float, torch.Tensor]]:
    """(:func:`masked_kl`'s mean, each sequence's mean per-token KL [num_sequences] float64) per keep map: the
    spread over sequences says how sure a difference between two keep maps is."""
    return MaskedKL(model, layers, held_out, batch_size, desc=f"{NAME}: judging candidates").per_sequence(
        keep_maps, progress)


@register_criterion
class ValidatedChoiceCriterion(Criterion):
    """The candidate criterion whose keep map stays closest to the unpruned model on held-out calibration tokens."""

    name = NAME
    reference = ""  # diep_hub's own: model selection on held-out calibration tokens
    options = ChoiceOptions
    needs_sparsity = True  # the keep maps compared depend on the sparsity

    def check_feasible(self, context: ScoringContext) -> None:
        parse_options(type(self), context.options, {"progress": True})
        if context.select is None:
            raise ConfigError(f"{NAME} compares keep maps of the run's selection: ScoringContext.select must be set "
                              "(DiEPPruner sets it)")
        placeholder = {layer.index: torch.linspace(1.0, 2.0, layer.num_experts) for layer in context.layers}
        if context.select(placeholder).regroup:
            raise ConfigError(
                f"{NAME} judges keep maps by masking the router, which routes as surgery does only when grouped "
                "routing keeps its groups; regroup=True resets them: use regroup=False or another criterion"
            )

    @staticmethod
    def _keep_maps(context: ScoringContext, results: dict[str, ScoreResult], compare_uniform: bool):
        """``(label, candidate, keep map)`` to judge: each candidate's keep map under the run's selection and, when
        that is global and ``compare_uniform``, its uniform one too ("reap (uniform)") where that removes the same
        total, differs from the global map and the global selection can rebuild it (the pruner applies the winner
        through the run's selection)."""
        entries = []
        for name, result in results.items():
            selection = context.select(result.scores)
            entries.append((name, name, selection.keep))
            if not compare_uniform or selection.mode != "global":
                continue
            try:
                uniform = context.select(result.scores, mode="uniform")
            except ConfigError as exc:  # the run's caps or floors cannot hold uniform counts
                logger.debug("%s: no uniform keep map for %s: %s", NAME, name, exc)
                continue
            if uniform.num_removed != selection.num_removed or uniform.keep == selection.keep:
                continue
            if not rebuilds_keep_map(context.select, keep_map_scores(uniform.keep, result.scores), uniform.keep):
                continue
            entries.append((f"{name} (uniform)", name, uniform.keep))
        return entries

    @staticmethod
    def _refine(context: ScoringContext, opts: ChoiceOptions, scores, keep, validation_kl: float,
                fit_kl: MaskedKL, judge: MaskedKL, progress: bool, max_passes: float | None,
                ) -> tuple[dict[int, list[int]], dict, torch.Tensor | None]:
        """(the refined keep map, what the refinement did, its per-sequence held-out KL: None without a move); the
        report's ``accepted`` says whether its held-out KL is below the unrefined map's ``validation_kl``.
        ``fit_kl`` measures on the refine sequences, ``judge`` on the held-out ones; ``max_passes``: what is left of
        the run's budget of passes over the refine sequences (``refine_keep_map``'s units). With
        ``refine_objective="nll"`` both measure the NLL, and every "KL" here is that."""
        refinement = refine_keep_map(context.model, context.layers, keep, scores, context.select, fit_kl.sequences,
                                     opts.refine_rounds, int(context.batch_size), progress=progress, kl=fit_kl,
                                     probe_width=opts.probe_width, min_move_gain_se=opts.min_move_gain_se,
                                     max_passes=max_passes)
        refined, moves, fit_kls = refinement.keep, refinement.moves, refinement.history
        if refinement.stopped == BUDGET_SPENT or any(w < max(refinement.probe_widths) for w in refinement.probe_widths):
            logger.info("%s: the refinement's budget of %g calibration passes (refine_budget) bounded it: probe "
                        "widths %s, %s", NAME, opts.refine_budget, refinement.probe_widths, refinement.stopped)
        refined_kl, refined_per_sequence = judge.per_sequence([refined])[0] if moves else (None, None)
        accepted = refined_kl is not None and refined_kl < validation_kl
        logger.info("%s: refinement made %d move(s), held-out %s %s -> %s: %s", NAME, len(moves),
                    opts.refine_objective.upper(), round(validation_kl, 5),
                    None if refined_kl is None else round(refined_kl, 5),
                    "kept" if accepted else "discarded")
        # with refine_objective="nll" the "kl" entries hold the NLL ("objective" says which)
        report = {"objective": opts.refine_objective, "moves": moves, "fit_kl": fit_kls, "validation_kl": refined_kl,
                  "accepted": accepted,
                  "per_layer_kept": {str(k): len(v) for k, v in sorted(refined.items())},
                  "stopped": refinement.stopped, "probe_widths": refinement.probe_widths,
                  "passes": refinement.passes}
        return refined, report, refined_per_sequence

    def score(self, context: ScoringContext) -> ScoreResult:
        self.check_feasible(context)
        opts, run = parse_options(type(self), context.options, {"progress": True})
        model, layers = context.model, context.layers
        hidden_size = model.config.get_text_config().hidden_size
        for layer in layers:
            check_router_bias(layer, hidden_size)
        fit, held_out = split_calibration(context.input_ids, opts.validation_fraction)

        sub = dataclasses.replace(context, input_ids=fit, options={"progress": False})
        criteria = {name: get_criterion(name)() for name in opts.candidates}
        sharing = [name for name, c in criteria.items() if isinstance(c, RoutingStatisticCriterion)]
        shared = dict(zip(sharing, shared_routing_pass([criteria[n] for n in sharing], sub))) if sharing else {}
        results = {name: shared[name] if name in shared else criteria[name].score(sub) for name in opts.candidates}
        entries = self._keep_maps(context, results, opts.compare_uniform)
        labels = [label for label, _, _ in entries]
        judging_bytes, refining_bytes = cache_budgets(opts.cache_mb)
        judge = MaskedKL(model, layers, held_out, int(context.batch_size), judging_bytes,
                         desc=f"{NAME}: judging candidates")
        judged = judge.per_sequence([keep for _, _, keep in entries], bool(run["progress"]))
        kls = [mean for mean, _ in judged]
        best = min(range(len(kls)), key=lambda i: (kls[i], i))
        chosen_keep = entries[best][2]
        logger.info("%s: held-out KL per candidate %s; best %s",
                    NAME, {n: round(k, 5) for n, k in zip(labels, kls)}, entries[best][0])
        # the keep maps refined: the best refine_candidates judged (the winner first)
        refined_indices = sorted(range(len(kls)), key=lambda i: (kls[i], i))[: opts.refine_candidates]
        # what a refined map must beat the winner on: the held-out KL, or with refine_objective="nll" the held-out
        # NLL, measured only for the maps refined (the winner among them; nothing cached: no unpruned pass needed)
        accept_measure, held_out_values = judge, dict(enumerate(judged))
        if opts.refine_rounds and opts.refine_objective != "kl":
            accept_measure = MaskedKL(model, layers, held_out, int(context.batch_size), 0,
                                      desc=f"{NAME}: judging refinements", objective=opts.refine_objective)
            measured = accept_measure.per_sequence([entries[i][2] for i in refined_indices])
            held_out_values = dict(zip(refined_indices, measured))
        # (entry, keep map, held-out value of the refine objective, refinement report)
        final = (best, chosen_keep, held_out_values[best][0], None)
        refinements = {}
        if opts.refine_rounds:  # the refinements share one measure of the refine sequences (and its cache)
            fit_kl = MaskedKL(model, layers, fit[: opts.refine_sequences], int(context.batch_size),
                              refining_bytes, desc=REFINING, objective=opts.refine_objective)
            # refine_budget is in passes over the calibration set, the refinement counts passes over its sequences
            budget = (opts.refine_budget * context.input_ids.shape[0] / fit_kl.num_sequences
                      if opts.refine_budget else None)
            for index in refined_indices:
                label, source, keep = entries[index]
                spent = sum(r["passes"] for r in refinements.values())
                refined, report, per_sequence = self._refine(context, opts, results[source].scores, keep,
                                                             held_out_values[index][0], fit_kl, accept_measure,
                                                             bool(run["progress"]),
                                                             None if budget is None else budget - spent)
                refinements[label] = report
                if not report["accepted"]:
                    continue
                gain_se = gain_in_standard_errors(held_out_values[best][1], per_sequence)
                report["gain_se"] = gain_se if math.isfinite(gain_se) else None  # None: every sequence gained alike
                sure = opts.min_gain_se == 0 or gain_se > opts.min_gain_se
                if sure and report["validation_kl"] < final[2]:
                    final = (index, refined, report["validation_kl"], report)
        for report in refinements.values():  # accepted: beat its own map's held-out KL; applied: the map used
            report["applied"] = report is final[3]
        chosen, source, validated_keep = entries[final[0]]
        final_keep, refinement = final[1], final[3]
        raw = results[source].scores
        ranking = f"{chosen} ({results[source].ranking}), lowest held-out KL of {labels}"
        if refinement is not None:
            ranking += f", refined by {len(refinement['moves'])} one-expert move(s)"
            if final[0] != best:
                ranking += f" (the refinements of the best {len(refinements)} judged)"
        elif refinements:
            refinement = refinements[entries[best][0]]
        if final_keep is validated_keep and rebuilds_keep_map(context.select, raw, validated_keep):
            scores = raw  # the candidate's own scores rebuild the keep map: report them as they are
        else:
            scores = {index: s.to(torch.float32) for index, s in keep_map_scores(final_keep, raw).items()}
            ranking += " (scores encode that keep map)"
        details = {
            "chosen": chosen,
            "refinement": refinement,
            "refinements": refinements,
            "candidates": {
                label: {"validation_kl": kls[i], "per_layer_kept": {str(k): len(v) for k, v in sorted(keep.items())},
                        "ranking": results[source].ranking}
                for i, (label, source, keep) in enumerate(entries)
            },
            # passes of the whole model over the held-out sequences (judging) and over the refine sequences
            # (refining), the unpruned ones included; a resumed forward counts the share of layers it computed
            "forward_passes": {"judging": round(judge.forwards, 2),
                               "refining": round(fit_kl.forwards, 2) if opts.refine_rounds else 0.0},
            # refine_budget in passes over the refine sequences, counted as each refinement's "passes" (None: none)
            "refine_budget_passes": budget if opts.refine_rounds else None,
            "fit_sequences": int(fit.shape[0]),
            "validation_sequences": int(held_out.shape[0]),
            "chosen_details": results[source].details,
        }
        return ScoreResult(scores=scores, ranking=ranking, details=details)
