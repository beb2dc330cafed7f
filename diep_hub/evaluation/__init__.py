"""Evaluation of base and pruned models: lm-eval tasks, perplexity, speed and memory probes, JSON results.

Typical use::

    from diep_hub.evaluation import evaluate_model, compare
    base = evaluate_model(base_model, tokenizer)            # the paper's zero-shot set by default
    pruned = evaluate_model(pruned_model, tokenizer)
    comparison = compare(base, pruned)                      # retention = pruned / base

The same retention is packaged as an ``evaluate`` metric that loads offline by path:
``evaluate.load(diep_hub.evaluation.RETENTION_METRIC)``.
"""

from pathlib import Path

from .comparison import compare
from .lm_eval_runner import DEFAULT_TASKS, primary_metric, run_lm_eval
from .perplexity import perplexity, perplexity_of_ids
from .probes import PeakMemory, measure_memory, measure_speed, parameter_bytes
from .results import (
    LM_EVAL_RESULTS_DIR,
    RESULTS_FILE,
    evaluation_files,
    load_results,
    model_environment,
    package_versions,
    save_results,
    split_raw,
)
from .suite import evaluate_model

RETENTION_METRIC = str(Path(__file__).with_name("retention.py"))

__all__ = [
    "DEFAULT_TASKS",
    "LM_EVAL_RESULTS_DIR",
    "RESULTS_FILE",
    "RETENTION_METRIC",
    "PeakMemory",
    "compare",
    "evaluate_model",
    "evaluation_files",
    "load_results",
    "measure_memory",
    "measure_speed",
    "model_environment",
    "package_versions",
    "parameter_bytes",
    "perplexity",
    "perplexity_of_ids",
    "primary_metric",
    "run_lm_eval",
    "save_results",
    "split_raw",
]
