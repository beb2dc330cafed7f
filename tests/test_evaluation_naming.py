"""What lm-eval names, as lm-eval names it: dataset ids from its task objects (its own boolq against a fake Hub),
metric names without the filter suffix, and the retention metric loaded offline by path."""

from __future__ import annotations

import json

import pytest
from huggingface_hub import ModelCard

from diep_hub.card import build_model_card
from diep_hub.evaluation import (
    compare,
    run_lm_eval,
)
from tests.helpers.tiny_models import tiny_model
from tests.helpers.word_tokenizer import tiny_tokenizer


def test_retention_metric_loads_offline_by_path_and_matches_compare():
    import evaluate

    from diep_hub.evaluation import RETENTION_METRIC

    metric = evaluate.load(RETENTION_METRIC)
    out = metric.compute(predictions=[0.38, 0.80], references=[0.40, 0.85])
    assert out["retention"] == pytest.approx([0.95, 0.80 / 0.85])
    row = {"lm_eval": {"tasks": {}}}
    base, pruned = json.loads(json.dumps(row)), json.loads(json.dumps(row))
    for name, b, p in (("t1", 0.40, 0.38), ("t2", 0.85, 0.80)):
        base["lm_eval"]["tasks"][name] = {"metrics": {"acc": b}, "primary_metric": "acc"}
        pruned["lm_eval"]["tasks"][name] = {"metrics": {"acc": p}, "primary_metric": "acc"}
    assert compare(base, pruned)["average_retention"] == pytest.approx(out["mean_retention"], abs=1e-15)
    with pytest.raises(ValueError, match="base scores at positions \\[1\\] are 0"):
        metric.compute(predictions=[0.1, 0.2], references=[0.5, 0.0])


# ------------------------------------------------------------------- issue 14: what lm-eval names, as lm-eval names it
def test_dataset_ids_come_from_lm_evals_task_objects(tmp_path):
    """The tiny task's real lm-eval task object (built offline from diep_hub.tiny's task files) names its data."""
    from lm_eval.tasks import TaskManager

    from diep_hub.evaluation.lm_eval_runner import task_datasets
    from diep_hub.tiny import TINY_TASK, write_tiny_tasks

    folder = write_tiny_tasks(tmp_path / "tasks")
    loaded = TaskManager(include_path=str(folder), include_defaults=False).load([TINY_TASK])
    assert task_datasets(loaded) == {TINY_TASK: {"dataset_path": "json", "dataset_name": None, "split": "test",
                                                 "dataset_revision": None}}


def _fake_hub_boolq(monkeypatch, tmp_path) -> str:
    """``datasets.load_dataset`` answering lm-eval's boolq task offline: 4 documents in an arrow file at the place
    ``datasets`` caches a Hub dataset (``<ns>___<name>/<config>/<version>/<commit>/``); other calls are refused."""
    import datasets

    commit = "3de24cf8022e94f4eb449e4ee1c4c6a5d9dc0d84"
    cache = tmp_path / "aps___super_glue" / "boolq" / "0.0.0" / commit
    cache.mkdir(parents=True)
    docs = {"passage": ["the cat sees the dog", "add 2 3 is 5", "the tree is green", "a bird likes fish"],
            "question": ["is it a dog", "is it 6", "is it green", "is it a tree"], "label": [1, 0, 1, 0],
            "idx": [0, 1, 2, 3]}
    from datasets.arrow_writer import ArrowWriter

    for split in ("train", "validation"):  # lm-eval's boolq YAML names both (train for few-shot examples)
        with ArrowWriter(path=str(cache / f"super_glue-{split}.arrow")) as writer:  # the file name datasets gives it
            writer.write_batch(docs)
            writer.finalize()

    def load_dataset(path, name=None, **kwargs):
        assert (path, name) == ("aps/super_glue", "boolq"), (path, name)
        return datasets.DatasetDict({split: datasets.Dataset.from_file(str(cache / f"super_glue-{split}.arrow"))
                                     for split in ("train", "validation")})

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    return commit


def test_lm_evals_own_boolq_names_its_hub_dataset_on_the_card(monkeypatch, tmp_path, caplog):
    """lm-eval's shipped boolq YAML, its data served offline: the result and the card's model-index name
    aps/super_glue, config boolq, the validation split and the commit loaded; HFLM is built as a causal LM."""
    import logging
    from pathlib import Path

    import lm_eval

    commit = _fake_hub_boolq(monkeypatch, tmp_path)
    boolq_tasks = Path(lm_eval.__file__).parent / "tasks" / "super_glue" / "boolq"
    caplog.set_level(logging.INFO, logger="lm_eval")
    model = tiny_model("mixtral")
    out = run_lm_eval(model, tiny_tokenizer(), ["boolq"], include_path=boolq_tasks, limit=4, batch_size=4)
    row = out["tasks"]["boolq"]
    assert (row["dataset_path"], row["dataset_name"], row["split"], row["dataset_revision"]) == (
        "aps/super_glue", "boolq", "validation", commit)
    assert row["filter"] == "none" and set(row["metrics"]) == {"acc", "acc_stderr"}
    messages = [r.getMessage() for r in caplog.records]
    assert not any("neither marked as CausalLM" in m for m in messages)
    assert any("using type 'causal'" in m for m in messages), messages
    card = build_model_card(model, eval_results={"pruned": {"lm_eval": out}}, license="mit")
    card.save(tmp_path / "README.md")
    [result] = ModelCard.load(tmp_path / "README.md").data.eval_results
    assert (result.dataset_type, result.dataset_name, result.dataset_config, result.dataset_split,
            result.dataset_revision) == ("aps/super_glue", "boolq", "boolq", "validation", commit)
    assert (result.metric_type, result.metric_value) == ("acc", row["metrics"]["acc"])


def test_metric_names_lose_the_filter_suffix():
    """lm-eval's gsm8k results (two filters, the first as the task lists it) as the results file records them."""
    from diep_hub.evaluation.lm_eval_runner import _summarise

    raw = {"results": {"gsm8k": {"alias": "gsm8k", "exact_match,strict-match": 0.25,
                                 "exact_match_stderr,strict-match": 0.012, "exact_match,flexible-extract": 0.5,
                                 "exact_match_stderr,flexible-extract": 0.014}},
           "configs": {"gsm8k": {"dataset_path": "openai/gsm8k", "dataset_name": "main"}},
           "n-shot": {"gsm8k": 5}, "n-samples": {"gsm8k": {"original": 1319, "effective": 1319}},
           "versions": {"gsm8k": 3.0}, "higher_is_better": {"gsm8k": {"exact_match": True}}, "date": 1768473000.0,
           "lm_eval_version": "0.4.13"}
    out = _summarise(raw, ["gsm8k"], {})
    row = out["tasks"]["gsm8k"]
    assert row["metrics"] == {"exact_match": 0.25, "exact_match_stderr": 0.012}
    assert (row["filter"], row["primary_metric"]) == ("strict-match", "exact_match")
    assert row["metrics_by_filter"]["flexible-extract"] == {"exact_match": 0.5, "exact_match_stderr": 0.014}
    assert (row["dataset_path"], row["dataset_name"]) == ("openai/gsm8k", "main")
    assert out["date"] == "2026-01-15T10:30:00Z"
    assert out["raw"]["results"]["gsm8k"]["exact_match,strict-match"] == 0.25  # lm-eval's own names kept there
