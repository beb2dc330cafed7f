"""Fault catalogue of a tokenizer of another model: VOCAB_FAULTS, ids beyond the model's vocabulary refused before
scoring or a forward pass (pruning, calibration data, perplexity), and a matching tokenizer still prunes.
"""

from __future__ import annotations

import pytest
import torch

from diep_hub.calibration import load_calibration_data
from diep_hub.criteria import base as criteria_base
from diep_hub.errors import ConfigError
from diep_hub.evaluation.perplexity import perplexity
from tests.helpers.fault_catalogue import Fault, check_fault, ids
from tests.helpers.pruning import fast_pruner
from tests.helpers.tiny_models import tiny_model
from tests.helpers.word_tokenizer import pruner_tokenizer, wide_tokenizer

# ============================================================================ tokenizer of another model
WIDE_TEXTS = [" ".join(f"v{(d * 37 + j * 11) % 200}" for j in range(30)) for d in range(20)]


@pytest.fixture
def never_scored(monkeypatch):
    """Fail the test if a criterion starts scoring."""
    original = criteria_base.get_criterion

    def guarded(name):
        cls = original(name)

        class Guarded(cls):
            def score(self, context):
                raise AssertionError("scoring started with out-of-vocabulary token ids")

        return Guarded

    monkeypatch.setattr(criteria_base, "get_criterion", guarded)


def _prune_with_wide_tokenizer(ctx):
    model = ctx["model"]
    fast_pruner(dataset=WIDE_TEXTS).prune_model(model, wide_tokenizer())


def _model_ctx(tmp_path):
    model = tiny_model("mixtral")
    return {"model": model, "before": {k: v.clone() for k, v in model.state_dict().items()}}


def _model_untouched(ctx):
    model = ctx["model"]
    assert all(torch.equal(ctx["before"][k], v) for k, v in model.state_dict().items())
    assert not hasattr(model.config, "diep_pruning")


VOCAB_FAULTS = [
    Fault("prune-model", _model_ctx, _prune_with_wide_tokenizer, ConfigError,
          ["token id", "out of range", "vocabulary size is 96", "ids 0..95", "tokenizer does not belong to this model",
           "calibration text"],
          on_disk=_model_untouched),
    Fault("load-calibration-data", lambda tmp: {},
          lambda ctx: load_calibration_data(WIDE_TEXTS, wide_tokenizer(), num_samples=4, seq_len=16,
                                            vocab_size=96, progress=False),
          ConfigError, ["token id", "vocabulary size is 96", "a list of 20 strings"]),
    Fault("perplexity", _model_ctx,
          lambda ctx: perplexity(ctx["model"], wide_tokenizer(), WIDE_TEXTS, num_samples=2, seq_len=16),
          ConfigError, ["token id", "vocabulary size is 96", "perplexity text"], on_disk=_model_untouched),
]


@pytest.mark.parametrize("row", VOCAB_FAULTS, ids=ids(VOCAB_FAULTS))
def test_tokenizer_of_another_model(row, tmp_path, never_scored):
    error = check_fault(row, tmp_path)
    assert "IndexError" not in str(error)


def test_a_matching_tokenizer_still_prunes(never_scored, monkeypatch):
    """The vocabulary check passes in-range ids through: with a tokenizer of the model, scoring starts."""
    with pytest.raises(AssertionError, match="scoring started"):
        fast_pruner().prune_model(tiny_model("mixtral"), pruner_tokenizer())
