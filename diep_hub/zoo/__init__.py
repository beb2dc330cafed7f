"""Reference model zoo: small MoEs trained offline on generated sub-languages, and their evaluation.

``build_zoo_model(name)`` trains (or loads from the cache) a zoo entry; ``evaluate_zoo(model, tokenizer)`` scores
per-domain loss, multiple choice and exact match; ``write_lm_eval_tasks(folder)`` writes the same items as
lm-eval tasks. ``python -m diep_hub.zoo.build`` builds every entry. ``ZOO`` holds the models defaults are tuned
on, ``HELDOUT`` the models they are confirmed on (never tuned on).
"""

from .domains import DOMAINS, build_tokenizer, corpus_texts, sample_examples
from .tasks import evaluate_zoo, retention, write_lm_eval_tasks
from .train import HELDOUT, ZOO, build_zoo_model

__all__ = [
    "DOMAINS",
    "HELDOUT",
    "ZOO",
    "build_tokenizer",
    "build_zoo_model",
    "corpus_texts",
    "evaluate_zoo",
    "retention",
    "sample_examples",
    "write_lm_eval_tasks",
]
