"""The DiEP alpha/beta search (diep_hub/criteria/diep.py): gradients, frozen weights, schedule, planted signals."""

from __future__ import annotations

import pytest
import torch

from diep_hub import ConfigError, get_family
from diep_hub.criteria import diep as diep_module
from diep_hub.selection import select_experts
from tests.helpers.scoring import score, scoring_context
from tests.helpers.tiny_models import sample_input_ids, tiny_model

SEARCH_FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3"]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


MODES = ["gated", "dense"]


def _search(model, input_ids, batch_size=4, seed=0, **options):
    return score("diep", scoring_context(model, input_ids, batch_size=batch_size, seed=seed, options=options))


@pytest.mark.parametrize(
    ("family_name", "overrides", "expected"),
    [
        ("mixtral", {}, "gated"),  # always renormalises the top-k weights
        ("gpt_oss", {}, "gated"),
        ("olmoe", {"norm_topk_prob": False}, "dense"),
        ("qwen2_moe", {"norm_topk_prob": False}, "dense"),
        ("qwen3_moe", {"norm_topk_prob": True}, "gated"),
        ("deepseek_v2", {}, "dense"),  # never renormalises
    ],
)
def test_auto_mode_follows_top_k_renormalisation(family_name, overrides, expected):
    model = tiny_model(family_name, **overrides)
    result = _search(model, sample_input_ids(4, 7), batch_size=4, epochs=1, lr=0.05)
    assert (result.details["requested_mode"], result.details["mode"]) == ("auto", expected)
    layer = get_family(model).moe_layers(model)[0]
    assert diep_module.resolve_mode("auto", layer, model.config) == expected
    assert diep_module.resolve_mode("dense", layer, model.config) == "dense"


def _snapshot(model):
    return {name: tensor.detach().clone() for name, tensor in model.state_dict().items()}


# ------------------------------------------------------------------------------------------------------------
# Mechanics
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family_name", SEARCH_FAMILIES)
def test_gradients_reach_alpha_and_beta(family_name, mode):
    model = tiny_model(family_name)
    family = get_family(model)
    layers = family.moe_layers(model)
    params = diep_module.SearchParameters(layers)
    with torch.no_grad():  # break the symmetry of alpha = 0 so every softmax entry has its own gradient
        for alpha in params.alpha:
            alpha.copy_(torch.linspace(-0.5, 0.5, alpha.numel()))
    ids = sample_input_ids(2, 9)
    with diep_module.frozen_weights(model), diep_module.search_hooks(params, layers, mode):
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        assert all(p.grad is None for p in model.parameters())
    for position, layer in enumerate(layers):
        alpha_grad, beta_grad = params.alpha[position].grad, params.log_beta[position].grad
        assert alpha_grad is not None and alpha_grad.shape == (layer.num_experts,)
        assert torch.isfinite(alpha_grad).all() and alpha_grad.abs().sum() > 0, f"layer {layer.index}"
        assert beta_grad is not None and torch.isfinite(beta_grad) and beta_grad.abs() > 0, f"layer {layer.index}"
    # frozen_weights restored the flags
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family_name", SEARCH_FAMILIES)
def test_search_leaves_weights_bit_identical(family_name, mode):
    model = tiny_model(family_name)
    before = _snapshot(model)
    flags = {name: p.requires_grad for name, p in model.named_parameters()}
    result = _search(model, sample_input_ids(8, 9), mode=mode, epochs=1, lr=0.05)
    after = model.state_dict()
    assert before.keys() == after.keys()
    assert all(torch.equal(before[name], after[name]) for name in before)
    assert {name: p.requires_grad for name, p in model.named_parameters()} == flags
    # the search moved its own parameters
    moved = [alpha for alpha in result.details["alpha"].values() if any(abs(a) > 1e-4 for a in alpha)]
    assert moved
    assert not model.training
    # no hook left behind: the model gives the same logits as a fresh copy
    ids = sample_input_ids(2, 7, seed=3)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, tiny_model(family_name)(ids).logits)


@pytest.mark.parametrize("family_name", SEARCH_FAMILIES)
def test_gated_mode_at_init_is_the_unmodified_model(family_name):
    model = tiny_model(family_name)
    layers = get_family(model).moe_layers(model)
    params = diep_module.SearchParameters(layers)
    ids = sample_input_ids(3, 11)
    with torch.no_grad():
        reference = model(ids).logits
        assert all(params.beta(i).item() == 1.0 for i in range(len(layers)))
        with diep_module.search_hooks(params, layers, "gated"):
            searched = model(ids).logits
    assert torch.equal(searched, reference)


def test_dense_mode_is_the_all_expert_mixture():
    """Dense mode (Eq. 5): block output = beta * sum_i softmax(alpha)_i FFN_i(x), computed here by hand."""
    model = tiny_model("mixtral")
    layers = get_family(model).moe_layers(model)
    params = diep_module.SearchParameters(layers)
    with torch.no_grad():
        params.alpha[0].copy_(torch.linspace(-1, 1, layers[0].num_experts))
        params.log_beta[0].fill_(0.3)
    experts = layers[0].experts
    x = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(0))
    with torch.no_grad(), diep_module.search_hooks(params, layers, "dense"):
        out = layers[0].block(x.unsqueeze(0)).squeeze(0)
        mix = params.mixture(0)
        expected = torch.zeros_like(x)
        for i in range(experts.num_experts):
            gate, up = torch.nn.functional.linear(x, experts.gate_up_proj[i]).chunk(2, dim=-1)
            expected += mix[i] * torch.nn.functional.linear(experts.act_fn(gate) * up, experts.down_proj[i])
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    assert torch.isclose(mix.sum(), torch.tensor(0.3).exp())


def test_alternating_schedule_counts_optimizer_steps(monkeypatch):
    """3:1 means three Adam steps on alpha for each on beta; counted on the optimisers themselves."""
    calls: list[str] = []
    original = torch.optim.Adam.step

    def counting_step(self, *args, **kwargs):
        sizes = {p.dim() for group in self.param_groups for p in group["params"]}
        calls.append("alpha" if sizes == {1} else "beta" if sizes == {0} else "mixed")
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.Adam, "step", counting_step)
    model = tiny_model("mixtral")
    # 16 sequences, batch 2 -> 8 steps an epoch, 2 epochs -> 16 steps: 12 on alpha, 4 on beta
    result = _search(model, sample_input_ids(16, 7), batch_size=2, epochs=2)
    assert calls == ["alpha", "alpha", "alpha", "beta"] * 4
    assert result.details["alpha_optimizer_steps"] == 12
    assert result.details["beta_optimizer_steps"] == 4
    assert result.details["schedule"] == "aaab" * 4
    assert len(result.details["loss_curve"]) == 16

    calls.clear()
    result = _search(model, sample_input_ids(12, 7), batch_size=4, epochs=2, alternation=(1, 2))
    assert calls == ["alpha", "beta", "beta"] * 2
    assert (result.details["alpha_optimizer_steps"], result.details["beta_optimizer_steps"]) == (2, 4)


def test_beta_frozen_during_alpha_steps_and_alpha_during_beta_steps():
    model = tiny_model("mixtral")
    # one step only: an alpha step, so beta must stay exactly 1
    result = _search(model, sample_input_ids(4, 7), batch_size=4, epochs=1, lr=0.05)
    assert result.details["schedule"] == "a"
    assert all(beta == 1.0 for beta in result.details["beta"].values())
    # only beta steps: alpha must stay exactly 0, scores stay uniform within each layer
    result = _search(model, sample_input_ids(8, 7), batch_size=4, epochs=1, lr=0.05, alternation=(0, 1))
    assert all(a == 0.0 for alpha in result.details["alpha"].values() for a in alpha)
    assert all(beta != 1.0 for beta in result.details["beta"].values())
    for index, scores in result.scores.items():
        assert torch.allclose(scores, torch.full_like(scores, result.details["beta"][str(index)] / scores.numel()))


def test_scores_ranking_and_details():
    model = tiny_model("qwen2_moe")
    ids = sample_input_ids(8, 9)
    soft = _search(model, ids, epochs=1, lr=0.05, mode="gated")
    raw = _search(model, ids, epochs=1, lr=0.05, ranking="raw", mode="gated")
    assert soft.ranking == "softmax(alpha)*beta" and raw.ranking == "alpha*beta"
    for index in soft.scores:
        alpha = torch.tensor(soft.details["alpha"][str(index)])
        beta = soft.details["beta"][str(index)]
        assert soft.scores[index].dtype == torch.float32 and soft.scores[index].device.type == "cpu"
        torch.testing.assert_close(soft.scores[index], torch.softmax(alpha, 0) * beta)
        torch.testing.assert_close(raw.scores[index], alpha * beta)
        assert beta > 0
    details = soft.details
    assert details["mode"] == details["requested_mode"] == "gated"
    assert details["hyperparameters"]["lr"] == 0.05 and details["hyperparameters"]["epochs"] == 1
    assert details["hyperparameters"]["batch_size"] == 4
    curve = details["loss_curve"]
    assert len(curve) == 2 and set(curve[0]) == {"total", "ce", "recon"}
    # gated at init reproduces the cached reference (up to float noise: the shuffled batch differs from the
    # batch the reference was computed in)
    assert curve[0]["recon"] < 1e-4
    for point in curve:
        assert point["total"] == pytest.approx(point["ce"] + 0.01 * point["recon"], rel=1e-5)


def test_same_seed_same_scores_and_seed_changes_order():
    ids = sample_input_ids(8, 9)
    first = _search(tiny_model("mixtral"), ids, batch_size=2, epochs=2, lr=0.05, seed=7)
    second = _search(tiny_model("mixtral"), ids, batch_size=2, epochs=2, lr=0.05, seed=7)
    other = _search(tiny_model("mixtral"), ids, batch_size=2, epochs=2, lr=0.05, seed=8)
    assert first.scores.keys() == second.scores.keys()
    assert all(torch.equal(first.scores[i], second.scores[i]) for i in first.scores)
    assert first.details["loss_curve"] == second.details["loss_curve"]
    assert first.details["loss_curve"] != other.details["loss_curve"]  # another shuffling order


@pytest.mark.parametrize(
    "options, message",
    [
        # the fields of diep_hub.options.DiEPOptions, in the words of the API and the recipe
        ({"mode": "sparse"}, "mode: 'sparse' -> Input should be 'auto', 'gated' or 'dense'"),
        ({"lr": 0}, r"lr: 0 -> is out of range; allowed: \(0, inf\)"),
        ({"epochs": 0}, r"epochs: 0 -> is out of range; allowed: \[1, inf\)"),
        ({"lambda_": -1.0}, r"lambda_: -1.0 -> is out of range; allowed: \[0, inf\)"),
        ({"alternation": (0, 0)}, "not both 0"),
        ({"ranking": "logit"}, "ranking: 'logit' -> Input should be 'softmax' or 'raw'"),
        ({"temperature": 2}, r"unknown diep option\(s\) \['temperature'\]"),
    ],
)
def test_bad_options_are_refused_before_any_work(options, message):
    model = tiny_model("mixtral")
    calls = []
    handle = model.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ConfigError, match=message):
        _search(model, sample_input_ids(2, 5), **options)
    handle.remove()
    assert calls == []


# ------------------------------------------------------------------------------------------------------------
# Gradient checkpointing and accelerate
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing_enable` is deprecated:FutureWarning")
def test_gradient_checkpointing_gives_the_same_search():
    ids = sample_input_ids(8, 9)
    plain = _search(tiny_model("mixtral"), ids, epochs=1, lr=0.05)
    model = tiny_model("mixtral")
    model.gradient_checkpointing_enable()
    recomputed = []
    layer = get_family(model).moe_layers(model)[0]
    handle = layer.experts.register_forward_pre_hook(lambda *_: recomputed.append(1))
    checkpointed = _search(model, ids, epochs=1, lr=0.05)
    handle.remove()
    # reference pass (2 batches, not checkpointed) + 2 steps x (forward + recompute in backward)
    assert len(recomputed) == 2 + 2 * 2
    for index in plain.scores:
        torch.testing.assert_close(checkpointed.scores[index], plain.scores[index], rtol=1e-5, atol=1e-7)
    assert not model.training and all(not m.training for m in model.modules())


def test_reentrant_checkpointing_still_reaches_alpha():
    model = tiny_model("qwen2_moe")
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": True})
    result = _search(model, sample_input_ids(4, 9), epochs=1, lr=0.05)
    assert any(abs(a) > 1e-4 for alpha in result.details["alpha"].values() for a in alpha)


def test_accelerate_dispatched_model_with_cpu_offload(tmp_path):
    import accelerate

    ids = sample_input_ids(8, 9)
    plain = _search(tiny_model("mixtral"), ids, epochs=1, lr=0.05)
    model = tiny_model("mixtral")
    # every decoder layer's weights live in an offload store and are moved in by accelerate's hooks per forward
    model = accelerate.cpu_offload(model, execution_device=torch.device("cpu"))
    experts = get_family(model).moe_layers(model)[0].experts
    assert hasattr(experts, "_hf_hook") and experts.down_proj.device.type == "meta"
    dispatched = _search(model, ids, epochs=1, lr=0.05)
    for index in plain.scores:
        torch.testing.assert_close(dispatched.scores[index], plain.scores[index], rtol=1e-5, atol=1e-7)


def test_disk_offloaded_model_from_pretrained(tmp_path):
    from transformers import AutoModelForCausalLM

    ids = sample_input_ids(8, 9)
    original = tiny_model("mixtral")
    original.save_pretrained(tmp_path / "model")
    plain = _search(original, ids, epochs=1, lr=0.05)
    layers = [f"model.layers.{i}" for i in range(original.config.num_hidden_layers)]
    device_map = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    device_map.update({name: "disk" for name in layers})
    model = AutoModelForCausalLM.from_pretrained(
        tmp_path / "model", device_map=device_map, offload_folder=str(tmp_path / "offload")
    )
    assert get_family(model).moe_layers(model)[0].experts.down_proj.device.type == "meta"
    offloaded = _search(model, ids, epochs=1, lr=0.05)
    for index in plain.scores:
        torch.testing.assert_close(offloaded.scores[index], plain.scores[index], rtol=1e-5, atol=1e-7)


# ------------------------------------------------------------------------------------------------------------
# Planted signals
USELESS = [1, 4, 6]


def _planted_mixtral(expert_scale: dict[int, torch.Tensor], seed: int = 0, layers: int = 3):
    """A tiny Mixtral whose experts matter: embeddings and head are sharp, expert outputs are moderate and
    scaled per (layer, expert) by ``expert_scale`` (~0 makes an expert useless)."""
    model = tiny_model("mixtral", seed=seed, num_hidden_layers=layers)
    generator = torch.Generator().manual_seed(seed + 5)
    with torch.no_grad():
        for layer in get_family(model).moe_layers(model):
            experts = layer.experts
            experts.gate_up_proj.copy_(torch.randn(experts.gate_up_proj.shape, generator=generator) * 0.15)
            experts.down_proj.copy_(torch.randn(experts.down_proj.shape, generator=generator) * 0.15)
            experts.down_proj.mul_(expert_scale[layer.index].view(-1, 1, 1))
        model.lm_head.weight.mul_(40)
        model.model.embed_tokens.weight.mul_(50)
    return model


def _sample(model, num: int = 64, length: int = 32, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, model.config.vocab_size, (num, 1), generator=generator)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = torch.softmax(model(ids).logits[:, -1], dim=-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=generator)], dim=1)
    return ids


@pytest.mark.parametrize("seed", [0, 1])
def test_planted_useless_experts_are_ranked_lowest(seed):
    """Experts 1, 4, 6 of every layer output ~0; the rest carry the function that generated the calibration
    text (the text comes from the same model with those experts at full strength x3, so the loss asks for more
    of them). DiEP must rank the useless three lowest in every layer."""
    useful = torch.ones(8)
    useful[USELESS] = 1e-4
    teacher = _planted_mixtral({i: useful * 3 for i in range(3)}, seed=seed)
    model = _planted_mixtral({i: useful for i in range(3)}, seed=seed)
    result = _search(model, _sample(teacher), batch_size=8, epochs=10, lr=0.1)
    for index, scores in result.scores.items():
        assert sorted(scores.argsort()[:3].tolist()) == USELESS, f"layer {index}: {scores.tolist()}"
        assert scores[USELESS].max() < scores[[i for i in range(8) if i not in USELESS]].min()


def test_planted_unimportant_layer_loses_more_experts_globally():
    """The calibration text comes from the model with layer 1's experts at 0.2x (the others at 1.5x): layer 1 is
    the one the data can do without. DiEP's beta for it drops, and a global selection of the 8 lowest scores
    (of 24) takes most of them from layer 1."""
    teacher = _planted_mixtral({0: torch.full((8,), 1.5), 1: torch.full((8,), 0.2), 2: torch.full((8,), 1.5)})
    model = _planted_mixtral({i: torch.ones(8) for i in range(3)})
    result = _search(model, _sample(teacher), batch_size=8, epochs=10, lr=0.1)
    betas = result.details["beta"]
    assert betas["1"] < min(betas["0"], betas["2"])
    all_scores = torch.cat([result.scores[i] for i in range(3)])
    removed = all_scores.argsort()[:8] // 8
    removed_per_layer = [int((removed == i).sum()) for i in range(3)]
    assert removed_per_layer[1] > max(removed_per_layer[0], removed_per_layer[2]), removed_per_layer
    selection = select_experts(result.scores, model, sparsity=8 / 24, mode="global")
    kept = {index: len(ids) for index, ids in selection.keep.items()}
    assert kept[1] < min(kept[0], kept[2]), kept
