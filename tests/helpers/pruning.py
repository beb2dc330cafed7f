"""A DiEPPruner with small settings for tests (test_pruner*.py, test_faults_tokenizer.py): 8 calibration sequences of
16 tokens in batches of 4, two search epochs, no progress bars."""

from __future__ import annotations

from diep_hub.pruner import DiEPPruner
from tests.helpers.word_tokenizer import pruner_texts

FAST = dict(num_samples=8, seq_len=16, batch_size=4, epochs=2, progress=False)


def fast_pruner(**overrides) -> DiEPPruner:
    """A pruner calibrating on pruner_texts() with FAST settings, ``overrides`` applied."""
    return DiEPPruner(**{"dataset": pruner_texts(), **FAST, **overrides})
