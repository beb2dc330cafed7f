"""Inputs of the model-card tests (tests/test_card_*.py): a report, evaluation results in lm-eval's shape, a pruned tiny
model with its keep map, and readers of the card's markdown tables."""

from __future__ import annotations

import diep_hub
from diep_hub.families import get_family
from tests.helpers.tiny_models import tiny_model

PNG = b"\x89PNG\r\n\x1a\n"
FORWARD_METHOD = "bytes live in malloc, read after every aten op of the forward, above those live before it"

REPORT = {
    "method": "diep",
    "sparsity": 0.5,
    "selection": "global",
    "ranking": "softmax",
    "seed": 7,
    "num_removed": 16,
    "num_total": 32,
    "calibration": {"dataset": "allenai/c4", "num_samples": 128, "seq_len": 2048},
    "wall_seconds": 12.5,
    "scores": {str(i): [float((i * 3 + e) % 8) for e in range(8)] for i in range(4)},
    "versions": {"python": "3.11.7", "diep_hub": "0.1.0", "torch": "2.13.0", "transformers": "5.23.0"},
    "alpha": {"0": [0.1] * 8},
    # the shape of SkippingCalibration.summary() plus the rates the runner measures during evaluation
    "skipping": {
        "kernel": "linear",
        "calibration_tokens": 4096,
        "cka_tokens": 512,
        "measured_on": "the pruned model's evaluation",
        "layers": {
            "0": {"gamma1": 0.4375, "mean_pairwise_cka": 0.3125, "calibration_skip_rate": 0.5,
                  "measured_skip_rate": 0.125, "measured_slots": 800},
            "1": {"gamma1": 0.25, "mean_pairwise_cka": 0.5, "calibration_skip_rate": 0.375},
        },
    },
}


def results(acc_base: float, acc_pruned: float, boolq_p: float) -> dict:
    """evaluation.json of a base and a pruned model: two lm-eval tasks, perplexity, speed and memory."""
    def side(acc, boolq, speed, params, ppl):
        return {
            "lm_eval": {"tasks": {
                # dataset fields as lm-eval 0.4.13's task objects give them (test_evaluation_naming.py checks that)
                "openbookqa": {"metrics": {"acc": acc, "acc_stderr": 0.02, "acc_norm": acc + 0.01},
                               "filter": "none", "primary_metric": "acc", "version": 1.0, "num_fewshot": 0,
                               "num_samples": 500, "dataset_path": "allenai/openbookqa", "dataset_name": "main",
                               "split": "test", "dataset_revision": None, "requested": True},
                "boolq": {"metrics": {"acc": boolq, "acc_stderr": 0.01}, "filter": "none", "primary_metric": "acc",
                          "version": 2.0, "num_fewshot": 0, "num_samples": 3270, "dataset_path": "aps/super_glue",
                          "dataset_name": "boolq", "split": "validation", "dataset_revision": None,
                          "requested": True},
            }, "lm_eval_version": "0.4.13", "date": "2026-01-15T10:30:00Z", "limit": None, "batch_size": 8,
                "num_fewshot": 0},
            "perplexity": {"perplexity": ppl, "mean_nll": 2.0, "tokens": 8192, "source": "wikitext"},
            "speed": {"prefill_tokens_per_s": speed * 10, "decode_tokens_per_s": speed},
            "memory": {"parameter_bytes": params, "routed_expert_bytes": params // 2,
                       "forward_peak_bytes": params // 50, "peak_bytes": None, "peak_method": FORWARD_METHOD,
                       "batch_size": 1, "seq_len": 128, "device": "cpu"},
            "environment": {"versions": {"lm_eval": "0.4.13"}},
        }

    base = side(acc_base, 0.85, 20.0, 93_000_000_000, 8.0)
    pruned = side(acc_pruned, boolq_p, 26.0, 49_000_000_000, 10.0)
    average = (acc_pruned / acc_base + boolq_p / 0.85) / 2
    return {"base": base, "pruned": pruned, "comparison": {"average_retention": average}}


KEEP = {0: [0, 1, 2, 5], 1: [1, 3, 4, 6, 7], 2: [0, 2, 3], 3: [1, 2, 4, 5]}
RECIPE = "model:\n  id: mistralai/Mixtral-8x7B-v0.1\npruning:\n  method: diep\n  sparsity: 0.5\n  seed: 7\n"


def pruned_with_keep(family: str, seed: int = 0):
    """A tiny ``family`` model pruned to KEEP (DeepSeek-V3: a grouped-routing keep map), and that keep map."""
    model = tiny_model(family, seed=seed)
    layers = get_family(model).moe_layers(model)
    keep = {layer.index: KEEP[layer.index] for layer in layers}
    if family == "deepseek_v3":  # grouped routing: keep a multiple of n_group=2 per layer, one group each side
        keep = {layer.index: [0, 1, 4, 5] if layer.index % 2 else [0, 3, 4, 7] for layer in layers}
    return diep_hub.prune_experts(model, keep), keep


def evaluation_section(text: str) -> str:
    return text[text.index("## Evaluation"):text.index("## How to load")]


def table(section: str, header: str) -> list[list[str]]:
    lines = section[section.index(header):].splitlines()
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[2:] if line.startswith("|")]
