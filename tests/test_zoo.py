"""The reference zoo: generated domains, deterministic builds, and an evaluation that measures what it claims."""

from __future__ import annotations

import json
import math
import re
import types
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from diep_hub import prune_experts, tiny
from diep_hub.errors import ConfigError, KeepMapError
from diep_hub.families import get_family
from diep_hub.zoo import domains, tasks, train
from tests.helpers.numerics import near_tie


def test_domains_are_deterministic_disjoint_and_unequal():
    a = domains.sample_lines(50, seed=3, split="train")
    assert a == domains.sample_lines(50, seed=3, split="train")
    assert domains.sample_lines(10, seed=3, split="train", start=40) == a[40:]
    assert a != domains.sample_lines(50, seed=3, split="test")
    assert all(line.endswith(".") and " ." not in line for line in a if line.split()[0] in ("the", "one", "any", "her"))
    assert a != domains.sample_lines(50, seed=4, split="train")
    weights = sorted(d.weight for d in domains.DOMAINS.values())
    assert len(domains.DOMAINS) >= 6 and weights[-1] >= 4 * weights[0]
    assert math.isclose(sum(weights), 1.0)


@pytest.mark.parametrize("name", sorted(domains.DOMAINS))
def test_every_item_has_one_right_choice(name):
    for ex in domains.sample_examples(name, 60, seed=1):
        assert ex.choices[ex.gold] == ex.answer and len(set(ex.choices)) == 4
        assert len({len(c) for c in ex.choices}) == 1  # equal lengths: a flat model cannot prefer one
        rule = domains.DOMAINS[name].check
        assert [rule(ex, c) for c in ex.choices] == [i == ex.gold for i in range(4)]
        assert ex.text.startswith(ex.prompt + ex.answer) and "\n" not in ex.text
        assert set(ex.text) <= set(domains.CHARACTERS)  # no unknown tokens


def test_rules_compute_the_answers():
    ex = domains.sample_examples("arith", 1)[0]
    a, b = ex.prompt[4:-1].split("+")
    assert int(ex.answer) == int(a) + int(b)
    ex = domains.sample_examples("sort", 1)[0]
    assert ex.answer == "".join(sorted(ex.prompt[5:-1]))
    ex = domains.sample_examples("reverse", 1)[0]
    assert ex.answer == ex.prompt[4:-1][::-1]
    for ex in domains.sample_examples("code", 30):
        fn, args = ex.prompt[len("print(") : -len("))=")].split("(")
        values = [int(a) for a in args.split(",")]
        assert int(ex.answer) == {"max": max, "min": min, "len": len}[fn](values)
    for ex in domains.sample_examples("kv", 30):
        pairs = dict(p.split("=") for p in ex.prompt[3:].split(";")[0].split(","))
        assert ex.answer == pairs[ex.prompt.split(";")[1][0]]


def test_tokenizer_is_char_level_and_round_trips():
    tok = domains.build_tokenizer()
    text = domains.corpus_texts(2, seed=0)[1]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert len(ids) == len(text) and tok.decode(ids) == text
    assert tok.unk_token_id not in ids
    assert len(tok) == len(domains.SPECIAL_TOKENS) + len(domains.CHARACTERS)


def test_bad_inputs_are_refused():
    with pytest.raises(ConfigError, match="available"):
        domains.sample_examples("poetry", 3)
    with pytest.raises(ConfigError, match="split"):
        domains.sample_lines(3, split="dev")
    with pytest.raises(ConfigError, match="available"):
        train.get_entry("gpt-5")
    with pytest.raises(ConfigError, match="num"):
        tasks.eval_items(0)


def test_smoke_build_is_deterministic_and_cached(tmp_path):
    model_a, _ = train.build_zoo_model("smoke", seed=0, cache_dir=tmp_path / "a")
    model_b, _ = train.build_zoo_model("smoke", seed=0, cache_dir=tmp_path / "b")
    model_c, _ = train.build_zoo_model("smoke", seed=1, cache_dir=tmp_path / "a")
    digest = train.weights_hash(model_a)
    assert digest == train.weights_hash(model_b)
    assert digest != train.weights_hash(model_c)
    (cached,) = [p for p in (tmp_path / "a").iterdir() if "seed0" in p.name]
    assert cached.name.startswith("smoke-seed0-steps8-")
    reloaded, _ = train.build_zoo_model("smoke", seed=0, cache_dir=tmp_path / "a")
    assert train.weights_hash(reloaded) == digest
    # Training moved the weights away from the seeded initialisation.
    fresh, _, _ = train.train_model(train.SMOKE, seed=0, steps=1)
    assert train.weights_hash(fresh) != digest


# Held-out entries (issue 12): model type, MoE layer indices, experts, top-k, per-layer floor, router activation,
# and a 75% keep map (a quarter of the experts a layer) that the family's routing rules accept.
HELDOUT_SHAPES = {
    "mixtral-32e-top4-8l": ("mixtral", list(range(8)), 32, 4, 4, "softmax", list(range(0, 32, 4))),
    "deepseek-v3-16e-groups": ("deepseek_v3", [1, 2, 3], 16, 2, 4, "sigmoid", [0, 5, 8, 13]),
}


def test_heldout_entries_are_apart_from_the_tuning_models():
    assert sorted(train.HELDOUT) == sorted(HELDOUT_SHAPES)
    assert not set(train.HELDOUT) & (set(train.ZOO) | set(train.EXTRA))
    for name in train.HELDOUT:
        assert train.get_entry(name) is train.HELDOUT[name]
    tok = domains.build_tokenizer()
    count = {}
    for name in ("mixtral-8e", *train.HELDOUT):
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(train.model_config(train.get_entry(name), tok))
        count[name] = sum(p.numel() for n, p in model.named_parameters() if ".experts." in n)
    # As many expert weights as mixtral-8e (32 x 16 x 8 layers = 8 x 128 x 4), or fewer: sizes stay comparable.
    assert count["mixtral-32e-top4-8l"] == count["mixtral-8e"] == 8 * 4 * 3 * 96 * 128
    assert count["deepseek-v3-16e-groups"] == 16 * 3 * 3 * 96 * 64


@pytest.mark.parametrize("name", sorted(HELDOUT_SHAPES))
def test_heldout_entry_builds_routes_and_prunes(name):
    """Two training steps on small batches (not the entry's recipe), then the family adapter's view, a forward, a
    group rule refused and a 75% prune that runs."""
    model_type, indices, experts, top_k, floor, activation, keep = HELDOUT_SHAPES[name]
    model, tok, log = train.train_model(replace(train.get_entry(name), batch_size=2, seq_len=16), seed=0, steps=2)
    assert [row["step"] for row in log] == [0, 1] and all(math.isfinite(row["loss"]) for row in log)
    family = get_family(model)
    layers = family.moe_layers(model)
    assert (model.config.model_type, family.router_activation) == (model_type, activation)
    assert [(m.index, m.num_experts, m.top_k) for m in layers] == [(i, experts, top_k) for i in indices]
    assert {family.routing_rules(m, model.config).floor() for m in layers} == {floor}
    ids = torch.tensor([tok("add 1+2=03\nrev abcd>dcba", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], len(tok)) and torch.isfinite(logits).all()
    if family.routing_rules(layers[0], model.config).grouped:
        with pytest.raises(KeepMapError, match="group"):  # all four from group 0: grouped routing refuses it
            prune_experts(model, {indices[0]: [0, 1, 2, 3]})
    prune_experts(model, {i: keep for i in indices})
    assert [m.num_experts for m in family.moe_layers(model)] == [len(keep)] * len(indices)
    with torch.no_grad():
        pruned = model(input_ids=ids).logits
    assert pruned.shape == logits.shape and torch.isfinite(pruned).all()
    assert not torch.equal(pruned, logits)  # three quarters of the experts are gone: the output moved


def test_tiny_model_keeps_its_shape():
    """The README's tiny model: diep_hub.tiny builds it from its entry TINY (its own corpus, so not a zoo entry)."""
    cfg = tiny.tiny_config()
    assert cfg.to_dict() == train.model_config(tiny.TINY, tiny.build_tiny_tokenizer()).to_dict()
    assert (cfg.model_type, cfg.vocab_size, cfg.hidden_size, cfg.intermediate_size, cfg.num_hidden_layers) == (
        "mixtral", 36, 64, 96, 4
    )
    assert (cfg.num_local_experts, cfg.num_experts_per_tok, cfg.num_attention_heads, cfg.num_key_value_heads) == (
        8, 2, 4, 2
    )
    assert (cfg.max_position_embeddings, cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id) == (512, 0, 1, 2)
    assert (cfg.tie_word_embeddings, cfg.router_aux_loss_coef) == (False, 0.01)
    with pytest.raises(ConfigError, match="available"):  # not a diep-hub/zoo-<entry>: it has its own corpus
        train.get_entry(tiny.TINY.name)


@pytest.mark.parametrize("task", tiny.TINY_TASKS)
def test_tiny_task_items_have_one_right_choice(task):
    rows = tiny.tiny_task_items(task)
    assert len(rows) == tiny.TASK_ITEMS >= 200
    assert rows == tiny.tiny_task_items(task) and rows != tiny.tiny_task_items(task, seed=1)
    vocab = tiny.build_tiny_tokenizer().get_vocab()
    for row in rows:
        choices, words = row["choices"], row["query"].split()
        assert len(set(choices)) == 4 and len({len(c.split()) for c in choices}) == 1  # equal lengths
        assert all(w in vocab for text in (row["query"], *choices) for w in text.split())  # no unknown tokens
        right = choices[row["gold"]].split()
        if task == tiny.TINY_TASK:
            assert words[0] == "add" and words[-1] == "=" and int("".join(right)) == int(words[1]) + int(words[2])
            assert all(len(c.split()) == 2 for c in choices)
        else:
            assert words[0] == "rev" and words[-1] == ">" and right == words[1:-1][::-1]
    golds = [row["gold"] for row in rows]
    assert {golds.count(i) for i in range(4)} <= set(range(35, 66))  # the right answer's position is not a cue


def test_tiny_reversal_items_never_occur_in_the_corpus():
    """diep_tiny_reverse asks for the rule on sequences the model never saw: none is in the training stream or in
    either split of diep-hub/tiny-text (calibration and perplexity)."""
    import random

    asked = {" ".join(row["query"].split()[1:-1]) for row in tiny.tiny_task_items(tiny.TINY_REVERSE_TASK)}
    assert len(asked) > 150  # mostly distinct sequences, not a handful asked again and again
    tok = tiny.build_tiny_tokenizer()
    rng = random.Random("0-train-stream")
    batches = [tiny.training_batch(rng, tok, 16, 48) for _ in range(40)]  # the first 40 steps' batches
    rows = [tok.decode(row, skip_special_tokens=True) for batch in batches for row in batch]
    texts = " | ".join(rows + tiny.tiny_texts("train") + tiny.tiny_texts("test"))
    seen = {m.group(1).strip() for m in re.finditer(r"rev ((?:\d )+)> (?:\d )+\.", texts)}  # complete lines only
    assert len(seen) > 500 and not asked & seen
    assert all(tiny.is_held_out(s.split()) for s in asked) and not any(tiny.is_held_out(s.split()) for s in seen)


def test_tiny_tasks_are_written_for_lm_eval(tmp_path):
    assert tiny.write_offline_tasks([tiny.TINY_REVERSE_TASK], tmp_path) == tmp_path
    for task in tiny.TINY_TASKS:  # either name writes both tasks
        rows = [json.loads(line) for line in (tmp_path / f"{task}.jsonl").read_text().splitlines()]
        assert rows == tiny.tiny_task_items(task)
        text = (tmp_path / f"{task}.yaml").read_text()
        assert f"task: {task}\n" in text and "output_type: multiple_choice" in text
        assert str((tmp_path / f"{task}.jsonl").resolve()) in text
    assert tiny.write_offline_tasks(["boolq"], tmp_path / "none") is None
    assert [tiny.is_offline_task(t) for t in ("diep_tiny_arith", "diep_tiny_reverse", "zoo_sort_mc", "boolq")] == [
        True, True, True, False
    ]


def test_tiny_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.delenv("DIEP_HUB_TINY_CACHE", raising=False)
    monkeypatch.delenv("DIEP_HUB_CACHE", raising=False)
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_ASSETS_CACHE", str(tmp_path / "hf_home" / "assets"))
    assert tiny.tiny_cache_dir() == tmp_path / "hf_home" / "assets" / "diep_hub" / "tiny-mixtral"
    monkeypatch.setenv("DIEP_HUB_CACHE", str(tmp_path / "cache"))
    assert tiny.tiny_cache_dir() == tmp_path / "cache" / "tiny-mixtral"
    monkeypatch.setenv("DIEP_HUB_TINY_CACHE", str(tmp_path / "tiny"))
    assert tiny.tiny_cache_dir() == tmp_path / "tiny"


def test_tiny_cache_key_names_what_decides_the_weights():
    key = tiny.tiny_cache_key(tiny.TINY, 0)
    assert key.startswith(f"tiny-mixtral-seed0-steps{tiny.TINY.steps}-") and key == tiny.tiny_cache_key(tiny.TINY, 0)
    others = [tiny.tiny_cache_key(tiny.TINY, 1), tiny.tiny_cache_key(replace(tiny.TINY, lr=1e-3), 0),
              tiny.tiny_cache_key(replace(tiny.TINY, steps=7), 0), tiny.tiny_cache_key(replace(tiny.TINY, warmup=3), 0)]
    assert len({key, *others}) == 5


def _same_state(a, b) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]) for k in sa)


def test_tiny_build_is_bit_deterministic_and_cached(tmp_path, monkeypatch):
    """Two cold builds of a seed give bit-identical weights (whatever the caller's thread count); the second call
    on a folder loads its file (no training, file untouched); another seed gives other weights. A few steps: the
    code path of the default build, with fewer steps."""
    steps = 4
    previous = torch.get_num_threads()
    a, _ = tiny.build_tiny_model(seed=0, train_steps=steps, cache_dir=tmp_path / "a")
    torch.set_num_threads(2)
    try:
        b, _ = tiny.build_tiny_model(seed=0, train_steps=steps, cache_dir=tmp_path / "b")
    finally:
        torch.set_num_threads(previous)
    assert _same_state(a, b) and torch.get_num_threads() == previous
    (file,) = (tmp_path / "a").iterdir()
    assert file.name == tiny.tiny_cache_key(replace(tiny.TINY, steps=steps), 0) + ".safetensors"
    from safetensors import safe_open

    with safe_open(str(file), framework="pt") as f:
        meta = f.metadata()
    assert meta["weights_sha256"] == train.weights_hash(a) and json.loads(meta["entry"])["steps"] == steps
    assert [row["step"] for row in json.loads(meta["training_log"])] == [0, steps - 1]

    stat = file.stat()

    def no_training(*args, **kwargs):
        raise AssertionError("a cache hit must not train")

    monkeypatch.setattr(tiny, "_train_and_cache", no_training)
    again, _ = tiny.build_tiny_model(seed=0, train_steps=steps, cache_dir=tmp_path / "a")
    assert _same_state(again, a) and again.config.name_or_path == ""  # no cache path leaks into a saved config
    assert (file.stat().st_mtime_ns, file.stat().st_ino) == (stat.st_mtime_ns, stat.st_ino)
    assert [p.name for p in (tmp_path / "a").iterdir()] == [file.name]
    with pytest.raises(AssertionError, match="must not train"):  # rebuild=True trains again
        tiny.build_tiny_model(seed=0, train_steps=steps, cache_dir=tmp_path / "a", rebuild=True)
    monkeypatch.undo()

    other, _ = tiny.build_tiny_model(seed=1, train_steps=steps, cache_dir=tmp_path / "a")
    untrained, _ = tiny.build_tiny_model(seed=0, train_steps=0, cache_dir=tmp_path / "none")
    assert not _same_state(other, a) and not _same_state(untrained, a)
    assert not (tmp_path / "none").exists()  # the untrained model is never cached


@pytest.mark.slow
@pytest.mark.usefixtures("one_torch_thread")
def test_tiny_model_is_competent_on_its_tasks(tmp_path):
    """The README's model is good at its tasks, through the run's own lm-eval path: >= 0.9 accuracy on each of
    the 200-item tasks (chance is 0.25). Uses the cached build (trained here on a cold cache)."""
    from diep_hub.evaluation import run_lm_eval

    model, tokenizer = tiny.build_offline_model(tiny.TINY_MODEL_ID)
    folder = tiny.write_offline_tasks(list(tiny.TINY_TASKS), tmp_path)
    result = run_lm_eval(model, tokenizer, list(tiny.TINY_TASKS), include_path=folder, batch_size=64)
    for task in tiny.TINY_TASKS:
        entry = result["tasks"][task]
        assert entry["num_samples"] == tiny.TASK_ITEMS >= 200, entry
        assert entry["metrics"]["acc"] >= 0.9, (task, entry["metrics"])


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
    import json

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
