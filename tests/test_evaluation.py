"""Evaluation: lm-eval on local task files, perplexity, speed/memory probes, comparison, and numbers on the card."""

from __future__ import annotations

import json
import math

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, parse_eval_result_entries

import diep_hub
from diep_hub.card import build_model_card, write_card
from diep_hub.errors import ConfigError
from diep_hub.evaluation import (
    compare,
    evaluate_model,
    load_results,
    measure_memory,
    measure_speed,
    parameter_bytes,
    perplexity_of_ids,
    run_lm_eval,
    save_results,
)
from tests.helpers.numerics import near_tie
from tests.helpers.tiny_models import tiny_model
from tests.helpers.word_tokenizer import tiny_texts, tiny_tokenizer

TASK = "diep_test_mc"
KEEP = {0: [0, 2, 4, 6], 1: [1, 3], 2: [0, 1, 2, 3, 4, 5], 3: [5, 7]}
DOCS = [
    {"q": "the cat sees", "choices": ["the dog", "a fish", "it"], "gold": 0},
    {"q": "add 2 3 =", "choices": ["5", "6", "7"], "gold": 0},
    {"q": "the tree is", "choices": ["green", "red", "blue"], "gold": 0},
    {"q": "a bird likes", "choices": ["the house", "a tree", "fish"], "gold": 1},
    {"q": "add 1 1 =", "choices": ["3", "2", "1"], "gold": 1},
    {"q": "question : is it red ? answer :", "choices": ["yes", "no"], "gold": 1},
    {"q": "the dog finds", "choices": ["a cat", "the bird", "it"], "gold": 2},
    {"q": "add 4 4 =", "choices": ["9", "7", "8"], "gold": 2},
    {"q": "small fish are", "choices": ["blue", "big", "red"], "gold": 0},
    {"q": "question : true or false ? answer :", "choices": ["true", "false"], "gold": 0},
]


def write_task(folder) -> str:
    """A multiple-choice task over a local jsonl file, referenced by ABSOLUTE path (lm-eval resolves relative
    paths against the working directory)."""
    folder.mkdir(parents=True, exist_ok=True)
    data = folder / f"{TASK}.jsonl"
    data.write_text("".join(json.dumps(d) + "\n" for d in DOCS), encoding="utf-8")
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{q}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 3.0\n",
        encoding="utf-8",
    )
    return str(folder)


@torch.no_grad()
def expected_accuracy(model, tokenizer) -> dict:
    """Accuracy computed by hand: argmax over choices of sum log p(choice tokens | question tokens).

    lm-eval scores the same choices in another computation (batched, padded), so a document whose best and
    second-best choice are within float32 rounding (tests/helpers/numerics.py's tolerance on the two sums) could go
    either way there: those are counted apart as ``near_ties``; ``correct`` counts the decided documents."""
    correct = near_ties = 0
    for doc in DOCS:
        context = tokenizer(doc["q"])["input_ids"]
        scores = []
        for choice in doc["choices"]:
            continuation = tokenizer(choice)["input_ids"]
            ids = torch.tensor([context + continuation])
            logprobs = model(ids).logits.float().log_softmax(-1)[0]
            scores.append(sum(logprobs[len(context) - 1 + i, t].item() for i, t in enumerate(continuation)))
        if near_tie(*sorted(scores, reverse=True)[:2]):
            near_ties += 1
        else:
            correct += int(max(range(len(scores)), key=scores.__getitem__) == doc["gold"])
    return {"acc": correct / len(DOCS), "correct": correct, "near_ties": near_ties}


def lm_eval_acc(results) -> float:
    return results["lm_eval"]["tasks"][TASK]["metrics"]["acc"]


@pytest.fixture(scope="module")
def evaluated(tmp_path_factory):
    """Base and pruned tiny OLMoE evaluated once on the local task (plus small probes)."""
    tasks_dir = write_task(tmp_path_factory.mktemp("tasks"))
    tokenizer = tiny_tokenizer()
    base = tiny_model("olmoe", seed=1)
    probes = dict(speed={"prompt_len": 8, "new_tokens": 2, "repeats": 1}, memory={"seq_len": 8})
    base_results = evaluate_model(base, tokenizer, tasks=[TASK], include_path=tasks_dir, batch_size=4, seed=0,
                                  **probes)
    base_acc = expected_accuracy(base, tokenizer)
    base_bytes = parameter_bytes(base)
    pruned = diep_hub.prune_experts(base, KEEP)
    pruned_results = evaluate_model(pruned, tokenizer, tasks=[TASK], include_path=tasks_dir, batch_size=4, seed=0,
                                    **probes)
    return dict(tasks_dir=tasks_dir, tokenizer=tokenizer, model=pruned, base=base_results, pruned=pruned_results,
                base_acc=base_acc, pruned_acc=expected_accuracy(pruned, tokenizer), base_bytes=base_bytes)


def test_lm_eval_accuracy_equals_hand_computed_accuracy(evaluated):
    for side, hand in (("base", evaluated["base_acc"]), ("pruned", evaluated["pruned_acc"])):
        row = evaluated[side]["lm_eval"]["tasks"][TASK]
        # every decided document counts the same; a near-tie (at most one, or the check says little) either way
        assert hand["near_ties"] <= 1, hand
        correct = row["metrics"]["acc"] * len(DOCS)
        assert hand["correct"] - 1e-9 <= correct <= hand["correct"] + hand["near_ties"] + 1e-9, (side, row, hand)
        acc = row["metrics"]["acc"]
        assert row["primary_metric"] == "acc"
        assert row["version"] == 3.0
        assert row["num_fewshot"] == 0
        assert row["num_samples"] == len(DOCS)
        assert row["metrics"]["acc_stderr"] == pytest.approx(math.sqrt(acc * (1 - acc) / (len(DOCS) - 1)))


def test_results_record_versions_dtype_device_and_seed(evaluated, tmp_path):
    results = evaluated["pruned"]
    env = results["environment"]
    assert env["dtype"] == "float32" and env["device"] == "cpu" and env["seed"] == 0
    assert env["model_type"] == "diep_olmoe"
    assert env["versions"]["torch"] == torch.__version__
    assert env["versions"]["lm_eval"] == results["lm_eval"]["lm_eval_version"] == "0.4.13"
    path = save_results(results, tmp_path)
    assert path.name == "evaluation.json"
    # lm-eval's raw results go beside evaluation.json (lm_eval_results/model.json), everything else inside it
    slim = {**results, "lm_eval": {k: v for k, v in results["lm_eval"].items() if k != "raw"}}
    assert load_results(tmp_path) == json.loads(json.dumps(slim))


def test_memory_probe_counts_exact_bytes(evaluated):
    base, pruned = evaluated["base"]["memory"], evaluated["pruned"]["memory"]
    model = evaluated["model"]
    assert pruned["parameter_bytes"] == sum(p.numel() * 4 for p in model.parameters())
    assert base["parameter_bytes"] == evaluated["base_bytes"]["parameter_bytes"]
    # OLMoE experts: gate_up [E, 2I, H] + down [E, H, I] float32, I=48, H=32.
    per_expert = (2 * 48 * 32 + 32 * 48) * 4
    assert base["routed_expert_bytes"] == 4 * 8 * per_expert
    assert pruned["routed_expert_bytes"] == sum(len(v) for v in KEEP.values()) * per_expert
    assert base["parameter_bytes"] - pruned["parameter_bytes"] == (32 - 14) * per_expert + (32 - 14) * 32 * 4
    # the forward's own peak, not the process RSS: at least the float32 logits of the 1 x 8 token probe
    from diep_hub.evaluation.probes import ForwardMemoryMeter

    logits = 1 * 8 * model.config.vocab_size * 4
    for side in (base, pruned):
        assert side["forward_peak_bytes"] >= logits, side
        assert side["peak_bytes"] is None and side["peak_method"] == ForwardMemoryMeter.METHOD
        assert (side["batch_size"], side["seq_len"], side["device"]) == (1, 8, "cpu")


def test_speed_probe_reports_consistent_throughput():
    model = tiny_model("mixtral")
    speed = measure_speed(model, batch_size=2, prompt_len=8, new_tokens=3, repeats=2)
    assert speed["prefill_tokens_per_s"] == pytest.approx(16 / speed["prefill_seconds"])
    assert speed["decode_tokens_per_s"] == pytest.approx(6 / speed["decode_seconds"])
    assert speed["prefill_seconds"] > 0 and speed["decode_seconds"] > 0
    with pytest.raises(ConfigError, match="new_tokens=0"):
        measure_speed(model, new_tokens=0)
    with pytest.raises(ConfigError, match="seq_len"):
        measure_memory(model, seq_len=-1)


def test_perplexity_matches_hand_computation():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    result = perplexity_of_ids(model, ids, batch_size=2)
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
    assert result["tokens"] == 27
    assert result["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_evaluate_model_perplexity_from_text_source():
    model = tiny_model("mixtral")
    tokenizer = tiny_tokenizer()
    spec = {"source": tiny_texts(8, 20), "num_samples": 4, "seq_len": 12}
    out = evaluate_model(model, tokenizer, tasks=[], perplexity_data=spec, speed=False, memory=False, seed=5)
    assert out["lm_eval"] is None and out["speed"] is None and out["memory"] is None
    from diep_hub.calibration import load_calibration_data

    ids = load_calibration_data(spec["source"], tokenizer, num_samples=4, seq_len=12, seed=5)
    assert out["perplexity"]["perplexity"] == pytest.approx(perplexity_of_ids(model, ids)["perplexity"], rel=1e-6)
    assert out["perplexity"]["num_samples"] == 4 and out["perplexity"]["seq_len"] == 12


def test_compare_gives_retention_pruned_over_base(evaluated):
    comparison = compare(evaluated["base"], evaluated["pruned"])
    acc = comparison["tasks"][TASK]["metrics"]["acc"]
    assert acc["base"] == lm_eval_acc(evaluated["base"]) and acc["pruned"] == lm_eval_acc(evaluated["pruned"])
    assert acc["base"] > 0  # the fixture's task is learnable, so retention is defined
    assert acc["retention"] == pytest.approx(acc["pruned"] / acc["base"])
    assert comparison["average_retention"] == acc["retention"]
    mem = comparison["memory"]["parameter_bytes"]
    assert mem["ratio"] == pytest.approx(mem["pruned"] / mem["base"]) and mem["ratio"] < 1
    synthetic = compare(
        {"lm_eval": {"tasks": {"t": {"metrics": {"acc": 0.8, "acc_stderr": 0.1}, "primary_metric": "acc"}}},
         "perplexity": {"perplexity": 10.0}},
        {"lm_eval": {"tasks": {"t": {"metrics": {"acc": 0.6, "acc_stderr": 0.1}, "primary_metric": "acc"}}},
         "perplexity": {"perplexity": 12.5}},
    )
    assert synthetic["tasks"]["t"]["metrics"] == {"acc": {"base": 0.8, "pruned": 0.6, "retention": 0.6 / 0.8}}
    assert synthetic["average_retention"] == 0.6 / 0.8
    assert synthetic["perplexity"]["ratio"] == 1.25
    # lower is better (lm-eval's higher_is_better: false): retention = base / pruned, so < 1 still means worse
    lower = {"word_perplexity": False}
    wikitext = compare(
        {"lm_eval": {"tasks": {"w": {"metrics": {"word_perplexity": 20.0}, "primary_metric": "word_perplexity",
                                     "higher_is_better": lower}}}},
        {"lm_eval": {"tasks": {"w": {"metrics": {"word_perplexity": 25.0}, "primary_metric": "word_perplexity",
                                     "higher_is_better": lower}}}},
    )
    assert wikitext["tasks"]["w"]["metrics"]["word_perplexity"]["retention"] == 0.8
    assert wikitext["average_retention"] == 0.8


def test_lm_eval_numbers_reach_the_card_unchanged(evaluated, tmp_path):
    results = {"base": evaluated["base"], "pruned": evaluated["pruned"]}
    results["comparison"] = compare(results["base"], results["pruned"])
    folder = tmp_path / "ckpt"
    diep_hub.save_pruned(evaluated["model"], folder, extra_files={"evaluation.json": results})
    card = build_model_card(folder, base_model="allenai/OLMoE-1B-7B-0924", license="apache-2.0",
                            repo_id="tester/olmoe-diep", benchmarks={TASK: ("tester/tiny-bench", "mc")})
    write_card(folder, card)
    loaded = ModelCard.load(folder / "README.md")
    pruned_acc = evaluated["pruned"]["lm_eval"]["tasks"][TASK]["metrics"]["acc"]
    [entry] = loaded.data.eval_results
    assert entry.metric_value == pruned_acc  # exact, not rounded
    assert (entry.dataset_name, entry.metric_type, entry.dataset_type) == (TASK, "acc", TASK)
    [bench] = parse_eval_result_entries(yaml.safe_load((folder / ".eval_results" / f"{TASK}.yaml").read_text()))
    assert (bench.dataset_id, bench.task_id, bench.value) == ("tester/tiny-bench", "mc", pruned_acc)
    base_acc = evaluated["base"]["lm_eval"]["tasks"][TASK]["metrics"]["acc"]
    assert f"| {TASK} | json (test) | acc (0-shot) | {base_acc:.4f} | {pruned_acc:.4f}" in loaded.text
    assert (entry.dataset_config, entry.dataset_split, entry.dataset_revision) == (None, "test", None)


def test_bad_arguments_are_refused_before_work(tmp_path):
    model, tokenizer = tiny_model("mixtral"), tiny_tokenizer()
    with pytest.raises(ConfigError, match="must be a list of lm-eval task names"):
        run_lm_eval(model, tokenizer, "boolq")
    with pytest.raises(ConfigError, match="limit=0"):
        run_lm_eval(model, tokenizer, ["boolq"], limit=0)
    with pytest.raises(ConfigError, match="limit=1.5"):
        run_lm_eval(model, tokenizer, ["boolq"], limit=1.5)
    with pytest.raises(ConfigError, match="num_fewshot=-1"):
        run_lm_eval(model, tokenizer, ["boolq"], num_fewshot=-1)
    with pytest.raises(ConfigError, match="include_path="):
        run_lm_eval(model, tokenizer, ["boolq"], include_path=tmp_path / "nope")
    with pytest.raises(ConfigError, match="tasks is empty"):
        run_lm_eval(model, tokenizer, [])
    with pytest.raises(ConfigError, match="not both"):
        evaluate_model(model, tokenizer, tasks=[], perplexity_data=["a"], perplexity=["a"])
    with pytest.raises(ConfigError, match="speed="):
        evaluate_model(model, tokenizer, tasks=[], speed="fast")
    with pytest.raises(ConfigError, match="allowed keys"):
        evaluate_model(model, tokenizer, tasks=[], perplexity={"source": ["x"], "bogus": 1}, speed=False,
                       memory=False)


def test_unknown_task_names_the_task(tmp_path):
    tasks_dir = write_task(tmp_path / "tasks")
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['no_such_task_xyz'\]"):
        run_lm_eval(tiny_model("mixtral"), tiny_tokenizer(), [TASK, "no_such_task_xyz"], include_path=tasks_dir)


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


def test_to_jsonable_is_the_one_json_conversion(tmp_path):
    """Reports, evaluation results and saved summaries share one conversion: values, not just 'it dumps'."""
    import numpy as np

    from diep_hub import pruner, runner
    from diep_hub.evaluation import results
    from diep_hub.jsonable import to_jsonable

    assert results.to_jsonable is to_jsonable and pruner.to_jsonable is to_jsonable
    assert runner.to_jsonable is to_jsonable
    value = {1: torch.tensor([1.5, float("nan")]), "n": np.int64(3), "f": np.float32(0.25), "p": tmp_path,
             "t": (torch.tensor(2), float("inf")), "none": None, "ok": True}
    assert to_jsonable(value) == {"1": [1.5, "nan"], "n": 3, "f": 0.25, "p": str(tmp_path), "t": [2, "inf"],
                                  "none": None, "ok": True}
    assert json.loads(json.dumps(to_jsonable(value), allow_nan=False)) == to_jsonable(value)


def test_peak_memory_is_one_meter_for_report_and_probe():
    """The evaluation probe's PeakMemory is the pruning report's one; on CPU its bytes are RSS and see a block."""
    from diep_hub.evaluation import PeakMemory as EvaluationPeakMemory
    from diep_hub.memory import PeakMemory

    assert EvaluationPeakMemory is PeakMemory
    size = 64 * 1024 * 1024
    with PeakMemory("cpu") as peak:
        block = torch.ones(size // 4)  # 64 MiB, written so the pages are resident
        peak.measure()
        del block
    assert not peak.cuda and peak.start_bytes == peak.start_rss and peak.peak_bytes == peak.peak_rss
    assert peak.peak_bytes - peak.start_bytes >= size * 0.9
    summary = peak.summary()
    assert summary["cpu_rss_peak_bytes"] == peak.peak_rss and "cuda_max_memory_allocated_bytes" not in summary
    if peak.heap_increase is not None:
        assert summary["cpu_heap_peak_increase_bytes"] >= size * 0.9


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


def test_lm_evals_raw_results_are_kept_and_saved_beside_evaluation_json(evaluated, tmp_path):
    from diep_hub.evaluation import LM_EVAL_RESULTS_DIR, evaluation_files

    results = {"base": evaluated["base"], "pruned": evaluated["pruned"],
               "comparison": compare(evaluated["base"], evaluated["pruned"])}
    path = save_results(results, tmp_path)
    saved = json.loads(path.read_text())
    assert "raw" not in saved["base"]["lm_eval"] and "raw" not in saved["pruned"]["lm_eval"]
    assert saved["pruned"]["lm_eval"]["tasks"] == evaluated["pruned"]["lm_eval"]["tasks"]
    assert sorted(p.name for p in (tmp_path / LM_EVAL_RESULTS_DIR).iterdir()) == ["base.json", "pruned.json"]
    for side in ("base", "pruned"):
        raw = json.loads((tmp_path / LM_EVAL_RESULTS_DIR / f"{side}.json").read_text())
        assert raw == evaluated[side]["lm_eval"]["raw"]
        assert raw["results"][TASK]["acc,none"] == evaluated[side]["lm_eval"]["tasks"][TASK]["metrics"]["acc"]
        assert raw["configs"][TASK]["dataset_path"] == "json" and raw["lm_eval_version"] == "0.4.13"
        assert raw["n-samples"][TASK]["effective"] == len(DOCS)
    assert set(evaluation_files(results)) == {"evaluation.json", f"{LM_EVAL_RESULTS_DIR}/base.json",
                                              f"{LM_EVAL_RESULTS_DIR}/pruned.json"}
    single = save_results(evaluated["pruned"], tmp_path / "one")  # one model's results: lm_eval_results/model.json
    assert single.parent == tmp_path and single.name == "one"
    assert json.loads((tmp_path / LM_EVAL_RESULTS_DIR / "model.json").read_text()) == evaluated["pruned"]["lm_eval"][
        "raw"]


def test_forward_meter_counts_what_the_block_allocates_at_its_peak():
    """12 MB live at the peak (4 + 8 MB, then 4 freed and 2 allocated): the meter reads it after every op."""
    from diep_hub.evaluation.probes import ForwardMemoryMeter
    from diep_hub.memory import live_heap_bytes

    if live_heap_bytes is None:
        pytest.skip("malloc's live bytes are readable on glibc only")

    def block():
        a = torch.ones(1_000_000)
        b = torch.ones(2_000_000)
        del a
        c = torch.ones(500_000)
        return float(b.sum() + c.sum())

    with torch.inference_mode():
        with ForwardMemoryMeter():  # warm-up: the dispatch machinery's one-time allocations
            block()
        with ForwardMemoryMeter() as meter:
            block()
    assert 12_000_000 <= meter.peak_increase <= 12_000_000 + 256 * 1024, meter.peak_increase
