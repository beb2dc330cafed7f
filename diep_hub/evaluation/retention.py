"""Retention as an ``evaluate`` metric: how much of the base model's score a pruned model keeps.

retention_i = pruned_i / base_i for each task score; ``mean_retention`` averages them (the paper's headline
number). Loadable offline by path, without the Hub::

    import evaluate, diep_hub.evaluation.retention as r
    metric = evaluate.load(r.__file__)
    metric.compute(predictions=[0.38, 0.80], references=[0.40, 0.85])

``predictions`` are the pruned model's scores, ``references`` the base model's, in the same task order. This file
imports only ``evaluate`` and ``datasets`` because ``evaluate.load`` copies it on its own into a module cache.
"""

import datasets
import evaluate

_CITATION = """\
@article{diep2025,
  title={DiEP: Adaptive Mixture-of-Experts Compression through Differentiable Expert Pruning},
  journal={arXiv preprint arXiv:2509.16105},
  year={2025}
}
"""

_DESCRIPTION = "Retention = pruned score / base score, per task and averaged (diep_hub)."

_KWARGS_DESCRIPTION = """
Args:
    predictions (list of float): scores of the pruned model, one a task.
    references (list of float): scores of the base model, same order; must be non-zero.
Returns:
    retention (list of float): pruned / base for each task.
    mean_retention (float): their mean.
"""


def retention_ratios(predictions, references):
    """pruned / base for each pair; a zero base score has no retention and is refused."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} pruned scores but {len(references)} base scores; give one of each a task")
    zero = [i for i, base in enumerate(references) if base == 0]
    if zero:
        raise ValueError(f"base scores at positions {zero} are 0: retention (pruned / base) is undefined there")
    return [float(p) / float(b) for p, b in zip(predictions, references)]


@evaluate.utils.file_utils.add_start_docstrings(_DESCRIPTION, _KWARGS_DESCRIPTION)
class Retention(evaluate.Metric):
    """How much of each base score the pruned model keeps."""

    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION,
            citation=_CITATION,
            inputs_description=_KWARGS_DESCRIPTION,
            features=datasets.Features({"predictions": datasets.Value("float64"),
                                        "references": datasets.Value("float64")}),
        )

    def _compute(self, predictions, references):
        ratios = retention_ratios(predictions, references)
        return {"retention": ratios, "mean_retention": sum(ratios) / len(ratios) if ratios else None}
