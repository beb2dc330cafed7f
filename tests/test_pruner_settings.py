"""DiEPPruner settings: bad values and infeasible targets refused before calibration (each message naming the field
and what is allowed), dense models refused, to_dict/from_dict round trips, and the defaults."""

from __future__ import annotations

import json

import pytest
import torch

from diep_hub import ConfigError, UnsupportedModelError
from diep_hub.pruner import DiEPPruner
from tests.helpers.pruning import fast_pruner
from tests.helpers.tiny_models import dense_model, tiny_model
from tests.helpers.word_tokenizer import pruner_tokenizer

pytestmark = pytest.mark.usefixtures("one_torch_thread")


# ------------------------------------------------------------------------------------------------------------
# Validation
@pytest.mark.parametrize(
    "field, value, expected",
    [
        ("sparsity", 1.0, r"sparsity: 1.0 -> is out of range; allowed: \(0, 1\)"),
        ("sparsity", -0.1, r"sparsity: -0.1 -> is out of range; allowed: \(0, 1\)"),
        ("sparsity", 0, r"sparsity: 0 -> is out of range; allowed: \(0, 1\)"),
        ("sparsity", "half", r"sparsity: 'half' -> must be a number in \(0, 1\)"),
        ("method", "magic", r"method: 'magic' -> Input should be .*'diep'.*'reap'.* \(a registered criterion\)"),
        ("selection", "local", r"selection: 'local' -> Input should be 'global' or 'uniform'"),
        ("num_samples", 0, r"num_samples: 0 -> is out of range; allowed: \[1, inf\)"),
        ("seq_len", 1, r"seq_len: 1 -> is out of range; allowed: \[2, inf\)"),
        ("batch_size", 2.5, r"batch_size: 2.5 -> must be an integer in \[1, inf\)"),
        ("seed", -1, r"seed: -1 -> is out of range"),
        ("search_mode", "sparse", r"search_mode: 'sparse' -> Input should be 'auto', 'gated' or 'dense'"),
        ("lr", 0.0, r"lr: 0.0 -> is out of range; allowed: \(0, inf\)"),
        ("epochs", 0, r"epochs: 0 -> is out of range; allowed: \[1, inf\)"),
        ("lambda_", -0.5, r"lambda_: -0.5 -> is out of range; allowed: \[0, inf\)"),
        ("alternation", (0, 0), r"alternation: \(0, 0\) -> expected 'A:B' .* integers >= 0 and not both 0"),
        ("alternation", (3,), r"alternation: \(3,\) -> expected 'A:B'"),
        ("ranking", "logit", r"ranking: 'logit' -> Input should be 'softmax' or 'raw'"),
        ("max_layer_sparsity", 1.0, r"max_layer_sparsity: 1.0 -> is out of range; allowed: \(0, 1\)"),
        ("min_experts_per_layer", 0, r"min_experts_per_layer: 0 -> is out of range; allowed: \[1, inf\)"),
        ("regroup", "yes", r"regroup: 'yes' -> must be true or false"),
        ("skipping", 1, r"skipping: 1 -> must be true or false"),
        ("naee_max_combinations", 0, r"naee_max_combinations: 0 -> is out of range"),
        ("dataset", [], r"dataset: \[\] -> give a Hub dataset name"),
        ("options", {"lr": 1}, r"options: \{'lr': 1\} -> diep takes its options as keywords: search_mode, lr"),
    ],
)
def test_bad_values_name_field_and_range(field, value, expected):
    with pytest.raises(ConfigError, match=expected):
        DiEPPruner(**{"method": "diep", field: value})


def test_every_problem_is_reported_at_once():
    with pytest.raises(ConfigError) as info:
        DiEPPruner(sparsity=2, epochs=0, selection="x")
    message = str(info.value)
    assert "sparsity: 2 ->" in message and "epochs: 0 ->" in message and "selection: 'x' ->" in message


def test_infeasible_sparsity_is_refused_before_calibration(calibration_calls):
    model = tiny_model("mixtral")  # 4 layers x 8 experts, top-2: at most 24 of 32 can go (75%)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(ConfigError, match=r"sparsity=0.9 cannot be reached on this mixtral model .*32 routed experts"):
        fast_pruner(sparsity=0.9).prune_model(model, pruner_tokenizer())
    assert calibration_calls == []
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model.config, "diep_pruning")


def test_cap_makes_sparsity_infeasible_before_calibration(calibration_calls):
    with pytest.raises(ConfigError, match="cannot be reached"):
        fast_pruner(sparsity=0.5, max_layer_sparsity=0.25).prune_model(tiny_model("mixtral"), pruner_tokenizer())
    assert calibration_calls == []


def test_dense_model_is_refused_before_calibration(calibration_calls):
    with pytest.raises(UnsupportedModelError):
        fast_pruner().prune_model(dense_model(), pruner_tokenizer())
    assert calibration_calls == []


def test_save_before_prune_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="call prune_model"):
        fast_pruner().save(tiny_model("mixtral"), tmp_path / "out")
    assert not (tmp_path / "out").exists()


# ------------------------------------------------------------------------------------------------------------
# to_dict / from_dict
def test_to_dict_from_dict_round_trip():
    pruner = DiEPPruner(
        sparsity=0.25,
        method="reap",
        selection="uniform",
        dataset="data/calib.jsonl",
        dataset_config=None,
        num_samples=32,
        seq_len=512,
        batch_size=8,
        seed=3,
        search_mode="dense",
        lr=1e-2,
        epochs=4,
        lambda_=0.1,
        alternation=(1, 1),
        ranking="raw",
        max_layer_sparsity=0.75,
        min_experts_per_layer=3,
        regroup=True,
        naee_max_combinations=50,
        skipping=True,
        progress=False,
    )
    data = pruner.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert data["alternation"] == [1, 1] and data["lambda_"] == 0.1 and "report" not in data
    again = DiEPPruner.from_dict(json.loads(json.dumps(data)))
    assert again == pruner
    assert again.to_dict() == data
    assert DiEPPruner.from_dict(DiEPPruner().to_dict()) == DiEPPruner()


def test_from_dict_rejects_unknown_keys_naming_them():
    data = DiEPPruner().to_dict() | {"sparsty": 0.5, "temperature": 1}
    with pytest.raises(ConfigError, match=r"unknown DiEPPruner key\(s\) \['sparsty', 'temperature'\]"):
        DiEPPruner.from_dict(data)
    with pytest.raises(ConfigError, match="epochs: -1 -> is out of range"):
        DiEPPruner.from_dict(DiEPPruner().to_dict() | {"epochs": -1})


def test_defaults_follow_the_paper_except_where_the_benchmark_chose():
    pruner = DiEPPruner()
    # The method is the benchmark's choice (benchmarks/CHOICE.md); the paper's search is method="diep".
    assert (pruner.sparsity, pruner.method, pruner.selection) == (0.5, "validated_choice", "global")
    calibration = (pruner.dataset, pruner.dataset_config, pruner.num_samples, pruner.seq_len)
    assert calibration == ("allenai/c4", "en", 128, 2048)
    search = (pruner.batch_size, pruner.lr, pruner.lambda_, pruner.alternation, pruner.ranking)
    assert search == (16, 5e-3, 0.01, (3, 1), "softmax")
    # benchmarks/RESULTS.md: gated search where the family renormalises its top-k weights, dense search where it
    # does not; the paper's 10 epochs
    assert (pruner.search_mode, pruner.epochs) == ("auto", 10)
    assert DiEPPruner(method="diep").criterion_options()["mode"] == pruner.search_mode
    # the default method's own options: the three cheap candidates, a quarter of the tokens held out to judge them
    options = pruner.criterion_options()
    assert (options["candidates"], options["validation_fraction"]) == (("reap", "frequency", "soft_frequency"), 0.25)


