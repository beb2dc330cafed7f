"""The names of the files in a pruned checkpoint folder, defined once.

Every module that writes or reads one of these files imports its name from here, so a checkpoint written by
``DiEPPruner.save``, ``diep-hub run`` or ``diep-hub eval --save`` is read back by ``inspect``, ``card``,
``reproduce`` and ``push`` under the same names. What each file holds: docs/checkpoint-format.md.
"""

from __future__ import annotations

CONFIG_FILE = "config.json"  # transformers' config, with the diep per-layer fields and the diep_pruning record
REPORT_FILE = "pruning_report.json"  # the PruningReport (checkpoint/report.py)
PRUNER_CONFIG_FILE = "diep_recipe.json"  # DiEPPruner.to_dict(): the pruner settings, DiEPPruner.from_dict reads it
RECIPE_FILE = "recipe.yaml"  # the recipe `diep-hub run` ran (paths resolved); `diep-hub reproduce` re-runs it
EVAL_FILE = "evaluation.json"  # evaluate_model results: {"base", "pruned", "comparison"} or one model's results
CARD_FILE = "README.md"  # the model card
FIGURES_DIR = "assets"  # the card's figures
EXPERTS_FIGURE = f"{FIGURES_DIR}/experts_per_layer.png"
SCORES_FIGURE = f"{FIGURES_DIR}/expert_scores.png"
EVAL_RESULTS_DIR = ".eval_results"  # huggingface_hub EvalResultEntry files, one a benchmark
LM_EVAL_RESULTS_DIR = "lm_eval_results"  # lm-eval's own results dicts beside evaluation.json, one file a model

# The files a recipe can be read back from, preferred first (a `diep-hub run` folder has both).
RECIPE_FILES = (RECIPE_FILE, PRUNER_CONFIG_FILE)
# The folders a save may write besides the top level (overwrite=True accepts a checkpoint holding only these).
CHECKPOINT_SUBFOLDERS = (FIGURES_DIR, EVAL_RESULTS_DIR, LM_EVAL_RESULTS_DIR)

__all__ = [
    "CARD_FILE",
    "CHECKPOINT_SUBFOLDERS",
    "CONFIG_FILE",
    "EVAL_FILE",
    "EVAL_RESULTS_DIR",
    "EXPERTS_FIGURE",
    "FIGURES_DIR",
    "LM_EVAL_RESULTS_DIR",
    "PRUNER_CONFIG_FILE",
    "RECIPE_FILE",
    "RECIPE_FILES",
    "REPORT_FILE",
    "SCORES_FIGURE",
]
