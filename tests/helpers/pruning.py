"""A DiEPPruner with small settings for tests (test_pruner*.py, test_faults_tokenizer.py): 8 calibration sequences of
16 tokens in batches of 4, two search epochs, no progress bars."""

from __future__ import annotations

import copy

import diep_hub
from diep_hub.pruner import DiEPPruner
from tests.helpers.word_tokenizer import pruner_texts

FAST = dict(num_samples=8, seq_len=16, batch_size=4, epochs=2, progress=False)


def fast_pruner(**overrides) -> DiEPPruner:
    """A pruner calibrating on pruner_texts() with FAST settings, ``overrides`` applied."""
    return DiEPPruner(**{"dataset": pruner_texts(), **FAST, **overrides})


def surgically_pruned(model, keep: dict[int, list[int]]):
    """A pruned copy of ``model`` (``diep_hub.prune_experts``) that runs the same experts implementation: the
    reference that the masked router's measures (criteria/masked_kl.py) must match."""
    pruned = diep_hub.prune_experts(copy.deepcopy(model), keep)
    pruned.config._experts_implementation = model.config._experts_implementation
    return pruned
