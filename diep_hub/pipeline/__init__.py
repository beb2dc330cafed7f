"""A run as a pipeline of stages: the recipe resolved once into typed stage configs, then one stage after another.

::

    Recipe --resolve_plan--> RunPlan(load, prune, skipping, evaluation, card, save, push)
    load -> evaluate_base -> prune -> calibrate_skipping -> evaluate_pruned -> measure_skipping -> card -> save
    -> push

- ``plan``: :class:`RunPlan` and one frozen config a stage (:class:`LoadConfig`, :class:`PruneConfig` = the
  ``DiEPPruner`` settings, :class:`SkippingConfig`, :class:`EvaluationConfig`, :class:`CardConfig`,
  :class:`SaveConfig`, :class:`PushConfig`); :func:`resolve_plan` is the only reader of the recipe.
- ``stages``: the stage functions ``stage(config, state) -> result``, their typed results, :data:`STAGES` (the
  order) and :func:`run_stages`. Calibration, scoring, selection and surgery stay inside
  ``DiEPPruner.prune_model`` (the prune stage), so the Python API and the run prune the same way.

``diep_hub.runner.run_recipe`` checks everything that can fail before the load stage (output folder, push token,
data paths, model family, preflight), then runs :data:`STAGES` and, when pushing, ``PUBLISH_STAGES``. The dry run
(``diep_hub.dry_run.dry_run_summary``) reads the same plan, makes the prune stage's feasibility checks on a model of
FakeTensors (no memory) and estimates time and memory with a stated cost model.

Adding a stage (e.g. expert merging or router recalibration after surgery):

1. in ``plan.py``, a frozen ``XConfig`` dataclass, a ``x: XConfig`` field of :class:`RunPlan` (with a default, so
   code that builds a plan by hand keeps working) and its line in :func:`resolve_plan` (plus the recipe section
   in ``recipe.py`` if users set it);
2. in ``stages.py`` (or a module of its own), ``def x(config: XConfig, state: RunState) -> XResult | None``: it
   reads ``state.model`` and earlier results by type (``state.get(PruneResult)``), may replace ``state.model``,
   and returns its own frozen result dataclass (None when its config switches it off);
3. one ``Stage("x", x, "x")`` line in :data:`STAGES` where it belongs (after ``"prune"`` for merging).

No other stage changes: the card and the save stage read the model as the last stage left it and the report through
:func:`~diep_hub.pipeline.stages.final_report`; a stage that adds to the report extends that function.
"""

from . import plan
from .plan import *  # noqa: F403 - the package's names are the plan's, listed once (plan.__all__)

__all__ = plan.__all__
