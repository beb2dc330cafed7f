"""The zoo's evaluation measures what it claims: an oracle scores perfectly, a uniform model at chance, the model
scorer matches a manual forward, and the lm-eval path agrees with the direct scorer."""

from __future__ import annotations

import json
import math
import types

import pytest
import torch
from transformers import AutoModelForCausalLM

from diep_hub.zoo import domains, tasks, train
from tests.helpers.numerics import near_tie


def _all_items(num_mc=100, num_em=50, num_loss=100, seed=0):
    return [
        tasks.eval_items(num_mc, seed=seed),
        tasks.eval_items(num_em, seed=seed + 1),
        tasks.eval_items(num_loss, seed=seed + 2),
    ]


def test_oracle_scores_perfectly_on_every_domain():
    oracle = tasks.OracleScorer()
    for items in _all_items():
        oracle.add(items)
    result = tasks.evaluate_zoo(oracle)
    for domain, metrics in result["domains"].items():
        assert metrics["mc_acc"] == 1.0 and metrics["em_acc"] == 1.0, domain
        assert metrics["loss"] == 0.0
    assert result["macro"]["mc_acc"] == 1.0


def test_uniform_model_scores_chance_on_every_domain():
    result = tasks.evaluate_zoo(tasks.UniformScorer(57), num_mc=200)
    for domain, metrics in result["domains"].items():
        assert abs(metrics["mc_acc"] - 0.25) < 0.1, (domain, metrics)
        assert metrics["em_acc"] == 0.0
        assert math.isclose(metrics["loss"], math.log(57), rel_tol=1e-9)


class _FirstChoiceScorer:
    """Prefers the first listed choice of every item: right exactly where the gold answer is listed first."""

    def __init__(self, items) -> None:
        self.first = {(ex.prompt, ex.choices[0]) for exs in items.values() for ex in exs}

    def loglikelihood(self, pairs):
        return [0.0 if pair in self.first else -1.0 for pair in pairs]


def test_multiple_choice_outcomes_are_item_by_item_and_average_to_the_accuracy():
    items = tasks.eval_items(40, seed=5)
    scorer = _FirstChoiceScorer(items)
    outcomes = tasks.multiple_choice_outcomes(scorer, items)
    accuracy = tasks.score_multiple_choice(scorer, items)
    for domain, exs in items.items():
        expected = [ex.gold == 0 for ex in exs]
        assert outcomes[domain] == expected, domain
        assert 0 < sum(expected) < len(exs), domain  # both outcomes occur, so the order is checked
        assert accuracy[domain] == sum(expected) / len(exs)


class _FlatLM(torch.nn.Module):
    """A transformers-shaped LM whose logits are all equal: the model path must also score chance."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    def forward(self, input_ids, **kwargs):
        return types.SimpleNamespace(logits=torch.zeros(*input_ids.shape, self.vocab))


def test_model_scorer_on_a_flat_model_matches_the_uniform_scorer():
    tok = domains.build_tokenizer()
    via_model = tasks.evaluate_zoo(_FlatLM(len(tok)), tok, num_mc=60, num_em=10, num_loss=20, batch_size=37)
    direct = tasks.evaluate_zoo(tasks.UniformScorer(len(tok)), num_mc=60, num_em=10, num_loss=20)
    for domain in domains.DOMAINS:
        for metric in ("mc_acc", "em_acc"):
            assert via_model["domains"][domain][metric] == direct["domains"][domain][metric]
        assert math.isclose(via_model["domains"][domain]["loss"], direct["domains"][domain]["loss"], rel_tol=1e-5)


def test_model_scorer_loglikelihood_matches_a_manual_forward():
    tok = domains.build_tokenizer()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(train.model_config(train.SMOKE, tok)).eval()
    scorer = tasks.ModelScorer(model, tok, batch_size=2)
    pairs = [("add 1+2=", "03"), ("kv a=1;a?", "1"), ("rev abcd>", "dcba")]
    got = scorer.loglikelihood(pairs)
    for (ctx, cont), value in zip(pairs, got, strict=True):
        ids = torch.tensor([tok(ctx + cont, add_special_tokens=False)["input_ids"]])
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=ids).logits[0], -1)
        n = len(ctx)
        expected = sum(logp[n - 1 + j, ids[0, n + j]].item() for j in range(len(cont)))
        assert math.isclose(value, expected, rel_tol=1e-4, abs_tol=1e-4)
    # Greedy generation equals step-by-step argmax.
    (out,) = scorer.generate(["add 1+2="], 3)
    ids = tok("add 1+2=", add_special_tokens=False)["input_ids"]
    manual = []
    for _ in range(3):
        with torch.no_grad():
            nxt = model(input_ids=torch.tensor([ids])).logits[0, -1].argmax().item()
        ids.append(nxt)
        manual.append(nxt)
        if nxt == tok.convert_tokens_to_ids("\n"):
            break
    assert out == tok.decode(manual, skip_special_tokens=True)


def test_retention():
    base = {"macro": {"mc_acc": 0.8, "em_acc": 0.5, "loss": 1.0}}
    pruned = {"macro": {"mc_acc": 0.4, "em_acc": 0.5, "loss": 2.0}}
    assert tasks.retention(pruned, base) == {"mc_acc": 0.5, "em_acc": 1.0, "loss": 0.5}


def test_lm_eval_task_files(tmp_path):
    names = tasks.write_lm_eval_tasks(tmp_path, num=5)
    assert "zoo_sort_mc" in names and "zoo_sort_em" in names and "zoo_prose_em" not in names
    yaml_text = (tmp_path / "zoo_arith_mc.yaml").read_text()
    assert "dataset_path: json" in yaml_text and str(tmp_path.resolve()) in yaml_text

    rows = [json.loads(line) for line in (tmp_path / "zoo_arith_mc.jsonl").read_text().splitlines()]
    items = tasks.eval_items(5, seed=0, domains=["arith"])["arith"]
    assert [r["gold"] for r in rows] == [ex.gold for ex in items]


def _near_ties(model, tok, num: int, domains_: list[str]) -> dict[str, dict[str, int]]:
    """Per domain, the items a rounding-level difference could flip (counted from the direct computation):
    multiple choice whose best two choices' log-likelihoods are a near-tie, and exact match whose greedy
    answer passes through a step with a near-tied top-1 / top-2 logit."""
    scorer = tasks.ModelScorer(model, tok)
    ties: dict[str, dict[str, int]] = {d: {"mc": 0, "em": 0} for d in domains_}
    for domain, exs in tasks.eval_items(num, seed=0, domains=domains_).items():
        lls = iter(scorer.loglikelihood([(ex.prompt, choice) for ex in exs for choice in ex.choices]))
        for ex in exs:
            ties[domain]["mc"] += near_tie(*sorted((next(lls) for _ in ex.choices), reverse=True)[:2])
    newline = tok("\n", add_special_tokens=False)["input_ids"][0]
    for domain, exs in tasks.eval_items(num, seed=1, domains=domains_).items():
        for ex in exs:
            ids = tok(ex.prompt, add_special_tokens=False)["input_ids"]
            for _ in range(max(len(e.answer) for e in exs) + 1):
                with torch.no_grad():
                    top = model(input_ids=torch.tensor([ids])).logits[0, -1].float().topk(2)
                if near_tie(float(top.values[0]), float(top.values[1])):
                    ties[domain]["em"] += 1
                    break
                ids.append(int(top.indices[0]))
                if ids[-1] == newline:
                    break
    return ties


@pytest.mark.slow
def test_lm_eval_path_agrees_with_the_direct_scorer(tmp_path):
    """lm-eval (HFLM over the in-memory model) and ModelScorer give the same accuracies on the same items.

    The two paths batch and pad differently, so their log-likelihoods agree up to rounding only: an item whose
    decision is a near-tie may go either way (at most one per task, or the comparison would say little); every
    other item must count the same on both paths."""
    tok = domains.build_tokenizer()
    model, _, _ = train.train_model(train.SMOKE, seed=0, steps=30)
    names = tasks.write_lm_eval_tasks(tmp_path, num=12, domains=["arith", "kv", "prose"])
    got = tasks.run_lm_eval_tasks(model, tok, tmp_path, names, batch_size=16)
    direct = tasks.evaluate_zoo(model, tok, num_mc=12, num_em=12, num_loss=0, domains=["arith", "kv", "prose"])
    ties = _near_ties(model, tok, 12, ["arith", "kv", "prose"])
    for domain, kind, lm_eval_metric, metric in [
        ("arith", "mc", "acc", "mc_acc"),
        ("kv", "mc", "acc", "mc_acc"),
        ("prose", "mc", "acc", "mc_acc"),
        ("arith", "em", "exact_match", "em_acc"),
        ("kv", "em", "exact_match", "em_acc"),
    ]:
        near = ties[domain][kind]
        assert near <= 1, (domain, kind, ties)
        difference = abs(got[f"zoo_{domain}_{kind}"][lm_eval_metric] - direct["domains"][domain][metric]) * 12
        assert difference <= near + 1e-9, (domain, kind, got, direct["domains"][domain], near)
