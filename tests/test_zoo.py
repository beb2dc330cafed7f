"""The reference zoo: generated domains, deterministic builds and the held-out entries (the README's tiny model is
in test_zoo_tiny.py, the zoo's scorers in test_zoo_scoring.py)."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from transformers import AutoModelForCausalLM

from diep_hub import prune_experts
from diep_hub.errors import ConfigError, KeepMapError
from diep_hub.families import get_family
from diep_hub.zoo import domains, tasks, train


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
