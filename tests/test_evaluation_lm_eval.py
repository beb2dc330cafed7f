"""Evaluation through lm-eval on a local task file: accuracy equal to a hand computation, recorded versions and
memory, retention from the comparison, the numbers on the card, and lm-eval's raw results saved beside them."""

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
    parameter_bytes,
    run_lm_eval,
    save_results,
)
from tests.helpers.numerics import near_tie
from tests.helpers.tiny_models import tiny_model
from tests.helpers.word_tokenizer import tiny_tokenizer

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


def test_unknown_task_names_the_task(tmp_path):
    tasks_dir = write_task(tmp_path / "tasks")
    with pytest.raises(ConfigError, match=r"unknown lm-eval task\(s\) \['no_such_task_xyz'\]"):
        run_lm_eval(tiny_model("mixtral"), tiny_tokenizer(), [TASK, "no_such_task_xyz"], include_path=tasks_dir)


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
