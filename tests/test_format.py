"""The pruned-checkpoint format, for every family: surgery exactness, save, and the three ways to load.

One table of families (tests/helpers/tiny_models.py) runs through every check, so a new family gets the whole suite.

Exactness: the weights a checkpoint holds are compared bit for bit (they must survive save and reload exactly);
logits of a reloaded model are another computation (loaded tensors may be aligned differently, so the kernels
round differently), compared within tests/helpers/numerics.py's tolerance AND on their greedy tokens.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

import diep_hub
from diep_hub.families import get_family
from tests.helpers.fresh_process import reload_each_family
from tests.helpers.numerics import (
    assert_close,
    assert_close_logits,
    assert_same_generation,
    assert_same_greedy,
    same_weights,
)
from tests.helpers.tiny_models import FAMILIES, sample_input_ids, tiny_model

REPO_ROOT = Path(__file__).resolve().parents[1]


def assert_same_model_output(reloaded, model, ids) -> None:
    """A reloaded model holds exactly the live model's weights and computes its logits up to rounding."""
    assert same_weights(reloaded.state_dict(), model.state_dict()) == []
    with torch.no_grad():
        actual, expected = reloaded(ids).logits, model(ids).logits
    assert_close_logits(actual, expected)
    assert_same_greedy(actual, expected)


def greedy_generation(model, ids) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequences, the logits each greedy step chose from [B, steps, V])."""
    out = model.generate(
        ids, max_new_tokens=6, do_sample=False, pad_token_id=0, return_dict_in_generate=True, output_logits=True
    )
    return out.sequences, torch.stack(out.logits, dim=1)


def nonuniform_keep(model) -> dict[int, list[int]]:
    """Layers keep 5, 3, 8... experts, in scrambled order, so ids and order both matter."""
    layers = [layer.index for layer in get_family(model).moe_layers(model)]
    choices = [[6, 0, 3, 5, 1, 2], [7, 2, 4, 1], list(range(8)), [1, 3, 4, 6]]
    if model.config.model_type == "deepseek_v3":  # n_group=2 (experts 0-3, 4-7): equal counts, group by group
        choices = [[3, 0, 2, 6, 4, 5], [1, 3, 7, 4], list(range(8))]
    return {index: choices[i % len(choices)] for i, index in enumerate(layers)}


def expert_param_count(layer) -> int:
    """Parameters one routed expert owns in a layer (fused expert rows plus its router rows)."""
    family = layer.family
    total = 0
    for name in family.expert_tensors:
        tensor = getattr(layer.experts, name, None)
        if tensor is not None:
            total += tensor[0].numel()
    for name in family.router_expert_tensors:
        tensor = getattr(layer.router, name, None)
        if isinstance(tensor, torch.nn.Parameter):
            total += tensor[0].numel()
    return total


@pytest.fixture(scope="module")
def pruned_checkpoints(tmp_path_factory):
    """Every family pruned non-uniformly, saved, and reloaded ONCE in a fresh process without diep_hub."""
    root = tmp_path_factory.mktemp("pruned")
    ids = sample_input_ids()
    expected = {}
    for family in FAMILIES:
        model = tiny_model(family)
        keep = nonuniform_keep(model)
        diep_hub.prune_experts(model, keep)
        with torch.no_grad():
            logits = model(ids).logits
            generated, step_logits = greedy_generation(model, ids[:1])
        diep_hub.save_pruned(model, root / family)
        expected[family] = {
            "logits": logits,
            "generated": generated,
            "step_logits": step_logits,
            "keep": keep,
            "model": model,
        }
    remote, _ = reload_each_family(
        root,
        FAMILIES,
        ids,
        """
        with torch.no_grad():
            generated = model.generate(ids[:1], max_new_tokens=6, do_sample=False, pad_token_id=0,
                                       return_dict_in_generate=True, output_logits=True)
            out[family] = {
                "logits": model(ids).logits,
                "generated": generated.sequences,
                "step_logits": torch.stack(generated.logits, dim=1),
                "state_dict": model.state_dict(),
                "class_module": type(model).__module__,
                "experts_implementation": model.config._experts_implementation,
            }
        """,
    )
    return root, ids, expected, remote


def test_remote_process_never_imported_diep_hub(pruned_checkpoints):
    _, _, _, remote = pruned_checkpoints
    assert remote["diep_hub_imported"] is False


@pytest.mark.parametrize("family", FAMILIES)
def test_keep_all_experts_is_bit_identical(family):
    model = tiny_model(family)
    ids = sample_input_ids()
    with torch.no_grad():
        before = model(ids).logits
    keep = {layer.index: list(range(layer.num_experts)) for layer in get_family(model).moe_layers(model)}
    diep_hub.prune_experts(model, keep)
    assert type(model).__name__.startswith("Diep")
    with torch.no_grad():
        after = model(ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("family", FAMILIES)
def test_kept_tensors_are_original_slices_and_removed_are_gone(family):
    original = tiny_model(family)
    model = tiny_model(family)
    keep = nonuniform_keep(model)
    adapter = get_family(model)
    original_layers = {layer.index: layer for layer in adapter.moe_layers(original)}
    removed_params = sum(
        (original_layers[i].num_experts - len(ids)) * expert_param_count(original_layers[i]) for i, ids in keep.items()
    )
    params_before = sum(p.numel() for p in original.parameters())

    diep_hub.prune_experts(model, keep)

    for layer in adapter.moe_layers(model):
        source = original_layers[layer.index]
        index = torch.tensor(keep[layer.index])
        for owner, source_owner, names in (
            (layer.experts, source.experts, adapter.expert_tensors),
            (layer.router, source.router, adapter.router_expert_tensors),
        ):
            for name in names:
                tensor, source_tensor = getattr(owner, name), getattr(source_owner, name)
                assert tensor.shape[0] == len(keep[layer.index])
                assert torch.equal(tensor, source_tensor.index_select(0, index)), (layer.index, name)
        assert layer.router.top_k == min(source.top_k, len(keep[layer.index]))
        assert layer.experts.num_experts == len(keep[layer.index])
    assert sum(p.numel() for p in model.parameters()) == params_before - removed_params
    counts = model.config.num_experts_per_layer
    for index, ids in keep.items():
        assert counts[index] == len(ids)
        assert model.config.kept_expert_ids[index] == ids
        assert model.config.original_num_experts[index] == 8


@pytest.mark.parametrize("family", FAMILIES)
def test_saved_state_dict_has_only_kept_experts(pruned_checkpoints, family):
    root, _, expected, _ = pruned_checkpoints
    keep = expected[family]["keep"]
    files = list((root / family).glob("*.safetensors"))
    keys = {k: v.shape for f in files for k, v in load_file(f).items()}
    for index, ids in keep.items():
        per_expert = {
            k for k in keys if f"layers.{index}." in k and ".experts." in k and k.split(".experts.")[1][0].isdigit()
        }
        if per_expert:  # original per-expert layout on disk
            expert_ids = {int(k.split(".experts.")[1].split(".")[0]) for k in per_expert}
            assert expert_ids == set(range(len(ids)))
        else:  # fused layouts on disk (GPT-OSS experts.*, GraniteMoE input_linear / output_linear)
            fused = [shape for k, shape in keys.items() if f"layers.{index}." in k and len(shape) == 3]
            assert len(fused) >= 2 and all(shape[0] == len(ids) for shape in fused)
    config = json.loads((root / family / "config.json").read_text())
    assert config["model_type"] == f"diep_{family}"
    assert config["auto_map"]["AutoModelForCausalLM"].startswith("modeling_diep.")
    assert (root / family / "modeling_diep.py").is_file() and (root / family / "configuration_diep.py").is_file()


@pytest.mark.parametrize("family", FAMILIES)
def test_trust_remote_code_reload_in_fresh_process(pruned_checkpoints, family):
    _, _, expected, remote = pruned_checkpoints
    got, want = remote[family], expected[family]
    assert got["class_module"].startswith("transformers_modules")
    assert same_weights(got["state_dict"], want["model"].state_dict()) == []
    assert_close_logits(got["logits"], want["logits"])
    assert_same_greedy(got["logits"], want["logits"])
    assert_same_generation(got["generated"], got["step_logits"], want["generated"], want["step_logits"])
    # The fast experts backend, not a silent fall-back to the eager loop.
    assert remote[family]["experts_implementation"] == "grouped_mm"


@pytest.mark.parametrize("family", FAMILIES)
def test_registered_classes_load_without_remote_code(pruned_checkpoints, family):
    root, ids, expected, _ = pruned_checkpoints
    model = AutoModelForCausalLM.from_pretrained(root / family).eval()
    assert type(model).__module__ == "diep_hub.modeling.modeling_diep"
    assert same_weights(model.state_dict(), expected[family]["model"].state_dict()) == []
    with torch.no_grad():
        logits = model(ids).logits
    assert_close_logits(logits, expected[family]["logits"])
    assert_same_greedy(logits, expected[family]["logits"])
    assert model.config._experts_implementation == "grouped_mm"


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe", "deepseek_v3"])
def test_fused_layout_on_disk_also_loads(tmp_path, family):
    model = tiny_model(family)
    diep_hub.prune_experts(model, nonuniform_keep(model))
    ids = sample_input_ids()
    diep_hub.save_pruned(model, tmp_path / "fused", fused_weights=True)
    keys = {k for f in (tmp_path / "fused").glob("*.safetensors") for k in load_file(f)}
    assert any(k.endswith("experts.gate_up_proj") for k in keys)
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "fused").eval()
    assert_same_model_output(reloaded, model, ids)


@pytest.mark.parametrize("family", ["mixtral", "deepseek_v3"])
def test_plain_save_pretrained_of_a_pruned_model_writes_the_remote_code(tmp_path, family):
    """`model.save_pretrained` (transformers' own writer) also produces a loadable diep_<family> checkpoint."""
    model = tiny_model(family)
    diep_hub.prune_experts(model, nonuniform_keep(model))
    model.save_pretrained(tmp_path / "plain")
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert config["model_type"] == f"diep_{family}" and "AutoModelForCausalLM" in config["auto_map"]
    assert {"configuration_diep.py", "modeling_diep.py"} <= {p.name for p in (tmp_path / "plain").iterdir()}
    assert config["num_experts_per_layer"] == model.config.num_experts_per_layer
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "plain").eval()
    assert_same_model_output(reloaded, model, sample_input_ids())


def test_per_expert_base_checkpoint_prunes_and_reloads(tmp_path):
    """A base model stored with per-expert keys (as Mixtral is on the Hub) -> prune -> save -> reload."""
    tiny_model("mixtral").save_pretrained(tmp_path / "base")
    keys = set(load_file(tmp_path / "base" / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" in keys
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "base").eval()
    assert torch.equal(
        model.model.layers[0].mlp.experts.gate_up_proj, tiny_model("mixtral").model.layers[0].mlp.experts.gate_up_proj
    )
    diep_hub.prune_experts(model, {0: [3, 1, 2], 2: [0, 7]})
    diep_hub.save_pruned(model, tmp_path / "pruned")
    saved = set(load_file(tmp_path / "pruned" / "model.safetensors"))
    assert "model.layers.0.block_sparse_moe.experts.2.w1.weight" in saved
    assert "model.layers.0.block_sparse_moe.experts.3.w1.weight" not in saved
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "pruned").eval()
    assert torch.equal(reloaded.model.layers[0].mlp.experts.down_proj, model.model.layers[0].mlp.experts.down_proj)
    assert_same_model_output(reloaded, model, sample_input_ids())


def test_per_layer_aux_loss_with_uneven_expert_counts():
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    model = tiny_model("mixtral", num_hidden_layers=1)
    ids = sample_input_ids()
    stock = model(ids, output_router_logits=True, labels=ids)
    diep_hub.prune_experts(model, {0: list(range(8))})
    one_layer = model(ids, output_router_logits=True, labels=ids)
    # One MoE layer: transformers' global formula (another implementation, so equal up to rounding).
    assert_close(one_layer.aux_loss, stock.aux_loss, "aux loss")
    assert_close(one_layer.loss, stock.loss, "loss")
    expected = load_balancing_loss_func(stock.router_logits, 8, 2)
    assert_close(one_layer.aux_loss, expected, "aux loss")

    uneven = tiny_model("mixtral")
    diep_hub.prune_experts(uneven, {0: [0, 1, 2, 3, 4], 1: [5, 6, 7], 3: [1, 2]})
    out = uneven(ids, output_router_logits=True, labels=ids)
    manual = []
    for logits in out.router_logits:
        width = logits.shape[-1]
        manual.append(load_balancing_loss_func((logits,), width, min(2, width)))
    assert [t.shape[-1] for t in out.router_logits] == [5, 3, 8, 2]
    assert_close(out.aux_loss, torch.stack(manual).mean(), "aux loss")
    ce = uneven(ids, labels=ids).loss
    assert_close(out.loss, ce + uneven.config.router_aux_loss_coef * out.aux_loss, "loss")


def test_pruning_twice_composes_original_ids(tmp_path):
    model = tiny_model("qwen2_moe")
    diep_hub.prune_experts(model, {0: [7, 5, 3, 1, 0], 1: [2, 3, 4]})
    diep_hub.save_pruned(model, tmp_path / "once")
    again = AutoModelForCausalLM.from_pretrained(tmp_path / "once").eval()
    diep_hub.prune_experts(again, {0: [4, 1, 0]})
    assert again.config.kept_expert_ids[0] == [0, 5, 7]
    assert again.config.kept_expert_ids[1] == [2, 3, 4]
    assert again.config.original_num_experts[:2] == [8, 8]
    original = tiny_model("qwen2_moe")
    assert torch.equal(
        again.model.layers[0].mlp.experts.gate_up_proj,
        original.model.layers[0].mlp.experts.gate_up_proj[[0, 5, 7]],
    )


def test_uniform_prune_saves_as_stock_architecture(tmp_path):
    model = tiny_model("mixtral")
    diep_hub.prune_experts(model, {i: [0, 2, 4, 6] for i in range(4)})
    ids = sample_input_ids()
    with torch.no_grad():
        expected = model(ids).logits
    diep_hub.save_pruned(model, tmp_path / "stock", stock_format=True)
    config = json.loads((tmp_path / "stock" / "config.json").read_text())
    assert config["model_type"] == "mixtral" and config["num_local_experts"] == 4
    assert "auto_map" not in config and "num_experts_per_layer" not in config
    assert not list((tmp_path / "stock").glob("*.py"))
    torch.save(ids, tmp_path / "ids.pt")
    script = (
        "import torch; from transformers import AutoModelForCausalLM, MixtralForCausalLM;"
        f"m = AutoModelForCausalLM.from_pretrained({str(tmp_path / 'stock')!r}).eval();"
        "assert type(m) is MixtralForCausalLM;"
        f"logits = m(torch.load({str(tmp_path / 'ids.pt')!r})).logits;"
        f"torch.save((logits, m.state_dict()), {str(tmp_path / 'out.pt')!r})"
    )
    result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    logits, state = torch.load(tmp_path / "out.pt")
    assert same_weights(state, model.state_dict()) == []
    assert_close_logits(logits, expected)
    assert_same_greedy(logits, expected)


def test_stock_format_refused_for_uneven_counts_before_writing(tmp_path):
    model = tiny_model("mixtral")
    diep_hub.prune_experts(model, {0: [0, 1, 2]})
    with pytest.raises(diep_hub.DiEPError, match=r"same expert count in every MoE layer.*\[3, 8, 8, 8\]"):
        diep_hub.save_pruned(model, tmp_path / "out", stock_format=True)
    assert not (tmp_path / "out").exists()
    assert list(tmp_path.iterdir()) == []


def test_deepseek_v3_regroup_is_explicit_and_recorded(tmp_path):
    model = tiny_model("deepseek_v3")
    with pytest.raises(diep_hub.KeepMapError, match=r"layer 1 would keep 3 experts.*n_group=2.*regroup=\[1\]"):
        diep_hub.prune_experts(model, {1: [0, 1, 5]})
    diep_hub.prune_experts(model, {1: [0, 1, 5]}, regroup=[1])
    assert model.config.n_group_per_layer[1] == 1 and model.config.topk_group_per_layer[1] == 1
    assert model.config.n_group_per_layer[2] == 2
    assert model.model.layers[1].mlp.gate.num_group == 1
    ids = sample_input_ids()
    diep_hub.save_pruned(model, tmp_path / "regrouped")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "regrouped").eval()
    assert reloaded.model.layers[1].mlp.gate.num_group == 1
    assert reloaded.model.layers[2].mlp.gate.num_group == 2
    assert_same_model_output(reloaded, model, ids)
