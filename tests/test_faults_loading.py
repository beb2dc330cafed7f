"""Fault catalogue of loading: a pruned checkpoint that does not match its config is refused, naming the tensor.

Before, transformers only logged a report and initialised a missing router at random (logits off, no error). One
table covers every family (tests/helpers/tiny_models.py) x {missing router weight, missing expert tensor, unexpected
extra tensor, mis-shaped tensor} x {remote code (``trust_remote_code=True``), registered classes (``import diep_hub``)},
plus damaged ``kept_expert_ids`` / ``num_experts_per_layer`` / ``original_num_experts`` in config.json. The remote
code cannot import diep_hub, so it raises its own ``DiepCheckpointError(ValueError)``; the registered classes raise
a subclass of it that is also a ``CheckpointLoadError``.

With diep_hub imported, transformers prefers the registered classes even under ``trust_remote_code=True``, so the
remote rows are loaded in ONE fresh process without diep_hub (as a user without it would load them), and each row
replays the error that process recorded (class, module, message).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, PreTrainedModel

import diep_hub
from diep_hub.errors import CheckpointLoadError, DiEPError
from diep_hub.families import get_family
from diep_hub.modeling import DiepCheckpointError, modeling_diep
from tests.helpers.fault_catalogue import Fault, check_fault, ids
from tests.helpers.tiny_models import FAMILIES, sample_input_ids, tiny_model

# family -> (first MoE layer, router key on disk, its name in the model, expert tensor removed, the name reported).
# Disk and model names differ where transformers converts the family's original layout (Mixtral's block_sparse_moe,
# GraniteMoE's fused input/output_linear); a removed per-expert tensor is reported as stored on disk.
LAYOUT = {
    "deepseek_v2": (1, "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.weight",
                    "model.layers.1.mlp.experts.1.up_proj.weight", "model.layers.1.mlp.experts.1.up_proj.weight"),
    "deepseek_v3": (1, "model.layers.1.mlp.gate.weight", "model.layers.1.mlp.gate.weight",
                    "model.layers.1.mlp.experts.1.up_proj.weight", "model.layers.1.mlp.experts.1.up_proj.weight"),
    "gpt_oss": (0, "model.layers.0.mlp.router.weight", "model.layers.0.mlp.router.weight",
                "model.layers.0.mlp.experts.down_proj", "model.layers.0.mlp.experts.down_proj"),
    "granitemoe": (0, "model.layers.0.block_sparse_moe.router.layer.weight",
                   "model.layers.0.block_sparse_moe.router.weight",
                   "model.layers.0.block_sparse_moe.output_linear.weight",
                   "model.layers.0.block_sparse_moe.experts.down_proj"),
    "mixtral": (0, "model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.mlp.gate.weight",
                "model.layers.0.block_sparse_moe.experts.1.w2.weight",
                "model.layers.0.block_sparse_moe.experts.1.w2.weight"),
    "olmoe": (0, "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate.weight",
              "model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.0.mlp.experts.1.gate_proj.weight"),
    "phimoe": (0, "model.layers.0.block_sparse_moe.gate.weight", "model.layers.0.mlp.router.weight",
               "model.layers.0.block_sparse_moe.experts.1.w2.weight",
               "model.layers.0.block_sparse_moe.experts.1.w2.weight"),
    "qwen2_moe": (0, "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate.weight",
                  "model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.0.mlp.experts.1.gate_proj.weight"),
    "qwen3_moe": (0, "model.layers.0.mlp.gate.weight", "model.layers.0.mlp.gate.weight",
                  "model.layers.0.mlp.experts.1.gate_proj.weight", "model.layers.0.mlp.experts.1.gate_proj.weight"),
}
# the first MoE layer keeps 3 experts, in scrambled order (DeepSeek-V3: 2 per routing group); the others keep 8
KEEP = {family: [5, 0, 2] for family in FAMILIES} | {"deepseek_v3": [0, 1, 4, 5]}

_BASES: dict[str, Path] = {}


@pytest.fixture(scope="module", autouse=True)
def _bases_root(tmp_path_factory):
    _BASES["root"] = tmp_path_factory.mktemp("bases")
    yield
    _BASES.clear()


def _base(family: str) -> Path:
    """A good pruned checkpoint of ``family``, saved once per module."""
    path = _BASES["root"] / family
    if not path.exists():
        model = tiny_model(family)
        diep_hub.prune_experts(model, {LAYOUT[family][0]: KEEP[family]})
        diep_hub.save_pruned(model, path)
    return path


def _listing(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def _damaged(family: str, edit):
    """prepare(path): a copy of the family's checkpoint whose weights file went through ``edit(tensors)``."""

    def prepare(path: Path) -> dict:
        shutil.copytree(_base(family), path)
        weights = path / "model.safetensors"
        tensors = load_file(weights)
        edit(tensors)
        save_file(tensors, weights, metadata={"format": "pt"})
        return {"path": path, "before": _listing(path)}

    return prepare


def _bad_config(family: str, edit):
    """prepare(path): a copy of the family's checkpoint whose config.json went through ``edit(config)``."""

    def prepare(path: Path) -> dict:
        shutil.copytree(_base(family), path)
        config = json.loads((path / "config.json").read_text())
        edit(config)
        (path / "config.json").write_text(json.dumps(config, indent=2))
        return {"path": path, "before": _listing(path)}

    return prepare


def _unchanged(ctx):
    assert _listing(ctx["path"]) == ctx["before"]  # loading never rewrites a checkpoint


# ------------------------------------------------------------------------------------------- remote-code rows
class RemoteLoadError(ValueError):
    """The error a fresh process (no diep_hub, ``trust_remote_code=True``) raised, replayed here."""

    def __init__(self, outcome: dict):
        super().__init__(outcome["message"])
        self.outcome = outcome


_REMOTE_CASES: dict[str, object] = {}  # row id -> prepare(path), filled while the table is built
_REMOTE_OUTCOMES: dict[str, dict] = {}  # row id -> ctx with the fresh process's outcome, filled by the fixture

_REMOTE_SCRIPT = """
import json, sys
from transformers import AutoModelForCausalLM
cases, out = json.load(open(sys.argv[1])), {}
for row_id, path in cases.items():
    try:
        AutoModelForCausalLM.from_pretrained(path, trust_remote_code=True)
        out[row_id] = {"raised": False}
    except BaseException as exc:
        kind = type(exc)
        out[row_id] = {"raised": True, "class": kind.__name__, "module": kind.__module__, "message": str(exc),
                       "value_error": isinstance(exc, ValueError)}
out["__diep_hub_imported__"] = any(name.startswith("diep_hub") for name in sys.modules)
json.dump(out, open(sys.argv[2], "w"))
"""


@pytest.fixture(scope="module")
def remote_outcomes(tmp_path_factory):
    """Every remote row's checkpoint, loaded once in a fresh process that never imports diep_hub."""
    root = tmp_path_factory.mktemp("remote")
    prepared = {}
    for row_id, prepare in _REMOTE_CASES.items():
        (root / row_id).mkdir()
        prepared[row_id] = prepare(root / row_id / "ckpt")  # every folder is "ckpt": one remote-code module
    (root / "cases.json").write_text(json.dumps({row_id: str(ctx["path"]) for row_id, ctx in prepared.items()}))
    result = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(_REMOTE_SCRIPT), str(root / "cases.json"), str(root / "out.json")],
        cwd=root,
        env={**os.environ, "PYTHONPATH": ""},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    outcomes = json.loads((root / "out.json").read_text())
    assert outcomes.pop("__diep_hub_imported__") is False
    for row_id, ctx in prepared.items():
        _REMOTE_OUTCOMES[row_id] = {**ctx, "outcome": outcomes[row_id]}
    yield
    _REMOTE_OUTCOMES.clear()


def _replay(ctx):
    if ctx["outcome"]["raised"]:
        raise RemoteLoadError(ctx["outcome"])


def _row(row_id: str, prepare, remote: bool, words) -> Fault:
    if remote:
        _REMOTE_CASES[row_id] = prepare
        return Fault(
            id=row_id,
            setup=lambda tmp_path: dict(_REMOTE_OUTCOMES[row_id]),
            call=_replay,
            error=RemoteLoadError,
            words=words,
            on_disk=_unchanged,
        )
    return Fault(
        id=row_id,
        setup=lambda tmp_path: prepare(tmp_path / "ckpt"),
        call=lambda ctx: AutoModelForCausalLM.from_pretrained(ctx["path"]),
        error=CheckpointLoadError,
        words=words,
        on_disk=_unchanged,
    )


PATHS = {"remote": True, "registered": False}


# ------------------------------------------------------------------------------------------------------ table
def _tensor_rows(family: str) -> list[Fault]:
    layer, router_disk, router_model, expert_disk, expert_named = LAYOUT[family]
    kept = len(KEEP[family])
    extra = f"model.layers.{layer}.diep_test_extra.weight"

    def reshape_router(tensors):
        tensors[router_disk] = torch.zeros(kept + 1, tensors[router_disk].shape[1])

    cases = {
        "missing-router": (lambda t: t.pop(router_disk), [router_model, "is missing"]),
        "missing-expert-tensor": (lambda t: t.pop(expert_disk), [expert_named, "is missing"]),
        "unexpected-tensor": (lambda t: t.__setitem__(extra, torch.zeros(4)), [extra, "is unexpected"]),
        "mis-shaped-router": (reshape_router, [router_model, f"shape [{kept + 1}, 32]", f"config gives [{kept}, 32]"]),
    }
    return [
        _row(f"{family}-{case}-{path}", _damaged(family, edit), remote, ["ckpt", "incomplete or corrupt", *words])
        for case, (edit, words) in cases.items()
        for path, remote in PATHS.items()
    ]


def _set(field: str, index: int, value):
    def edit(config):
        config[field][index] = value

    return edit


CONFIG_CASES = [
    # (id, family, edit of config.json, words)
    ("kept-ids-too-many-and-out-of-range", "mixtral", _set("kept_expert_ids", 0, [5, 0, 2, 3, 4, 9]),
     ["kept_expert_ids[0]", "[5, 0, 2, 3, 4, 9]", "6 ids for 3 experts", "out of range: [9]", "3 unique ids",
      "[0, 8)"]),
    ("kept-ids-too-few", "qwen2_moe", _set("kept_expert_ids", 0, [5, 0]),
     ["kept_expert_ids[0]", "[5, 0]", "2 ids for 3 experts", "[0, 8)"]),
    ("kept-ids-duplicate", "mixtral", _set("kept_expert_ids", 0, [5, 0, 5]),
     ["kept_expert_ids[0]", "[5, 0, 5]", "repeated: [5]", "3 unique ids"]),
    ("kept-ids-out-of-range", "deepseek_v3", _set("kept_expert_ids", 1, [0, 1, 4, 8]),
     ["kept_expert_ids[1]", "[0, 1, 4, 8]", "out of range: [8]", "[0, 8)"]),
    ("kept-ids-negative", "olmoe", _set("kept_expert_ids", 0, [5, -1, 2]),
     ["kept_expert_ids[0]", "out of range: [-1]"]),
    ("kept-ids-on-dense-layer", "deepseek_v2", _set("kept_expert_ids", 0, [0, 1]),
     ["kept_expert_ids[0]", "layer 0 is dense"]),
    ("counts-wrong-length", "mixtral", lambda c: c.__setitem__("num_experts_per_layer", [3, 8, 8]),
     ["num_experts_per_layer", "3 entries", "4 layers"]),
    ("count-zero", "mixtral", _set("num_experts_per_layer", 1, 0), ["num_experts_per_layer[1]", "integer >= 1"]),
    ("original-below-kept", "mixtral", _set("original_num_experts", 1, 6),
     ["original_num_experts[1]", "= 6", "smaller than the 8 experts"]),
]

LOAD_FAULTS = [row for family in FAMILIES for row in _tensor_rows(family)] + [
    _row(f"{family}-{case}-{path}", _bad_config(family, edit), remote, words)
    for case, family, edit, words in CONFIG_CASES
    for path, remote in PATHS.items()
]


@pytest.mark.parametrize("row", LOAD_FAULTS, ids=ids(LOAD_FAULTS))
def test_load_fault(row, tmp_path, remote_outcomes):
    error = check_fault(row, tmp_path)
    if isinstance(error, RemoteLoadError):  # raised by the checkpoint's own code, which never imports diep_hub
        assert error.outcome["class"] == "DiepCheckpointError" and error.outcome["value_error"]
        assert error.outcome["module"].startswith("transformers_modules."), error.outcome["module"]
    else:
        assert isinstance(error, DiepCheckpointError) and isinstance(error, DiEPError)
        assert type(error).__module__ == "diep_hub.modeling"


# --------------------------------------------------------------------------------------------- what still loads
def test_layout_table_covers_every_family():
    assert set(LAYOUT) == set(FAMILIES)
    for family in FAMILIES:  # the table matches what save_pruned writes
        layer, router_disk, _, expert_disk, _ = LAYOUT[family]
        keys = load_file(_base(family) / "model.safetensors")
        assert router_disk in keys and expert_disk in keys
        assert keys[router_disk].shape[0] == len(KEEP[family])
        model = tiny_model(family)
        assert layer == min(moe.index for moe in get_family(model).moe_layers(model))


def test_tied_embeddings_are_not_reported_missing(tmp_path):
    """lm_head is not stored when tie_word_embeddings is set: transformers ties it, and that is no error."""
    model = tiny_model("qwen3_moe", tie_word_embeddings=True)
    diep_hub.prune_experts(model, {0: [5, 0, 2]})
    diep_hub.save_pruned(model, tmp_path / "tied")
    assert "lm_head.weight" not in load_file(tmp_path / "tied" / "model.safetensors")
    reloaded = AutoModelForCausalLM.from_pretrained(tmp_path / "tied").eval()
    assert reloaded.lm_head.weight.data_ptr() == reloaded.model.embed_tokens.weight.data_ptr()
    ids_ = sample_input_ids()
    with torch.no_grad():
        assert torch.equal(reloaded(ids_).logits, model(ids_).logits)


def test_loading_info_is_still_returned_on_request():
    model, info = AutoModelForCausalLM.from_pretrained(_base("mixtral"), output_loading_info=True)
    assert type(model).__name__ == "DiepMixtralForCausalLM"
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]


def test_missing_tensor_refused_even_if_transformers_skips_the_hook(tmp_path, monkeypatch):
    """from_pretrained re-reads transformers' final loading report, so a later transformers that stops calling
    ``_finalize_model_loading`` still cannot hand back a randomly initialised router."""
    monkeypatch.setattr(
        modeling_diep.DiepForCausalLMMixin,
        "_finalize_model_loading",
        staticmethod(PreTrainedModel._finalize_model_loading),
    )
    ctx = _damaged("mixtral", lambda t: t.pop(LAYOUT["mixtral"][1]))(tmp_path / "ckpt")
    with pytest.raises(CheckpointLoadError, match=r"model\.layers\.0\.mlp\.gate\.weight is missing"):
        AutoModelForCausalLM.from_pretrained(ctx["path"])


def test_ignore_mismatched_sizes_keeps_its_transformers_meaning(tmp_path):
    """The one explicit opt-out: a mis-shaped tensor is reinitialised, as transformers documents."""
    router = LAYOUT["mixtral"][1]
    ctx = _damaged("mixtral", lambda t: t.__setitem__(router, torch.zeros(4, 32)))(tmp_path / "ckpt")
    model = AutoModelForCausalLM.from_pretrained(ctx["path"], ignore_mismatched_sizes=True)
    assert tuple(model.model.layers[0].mlp.gate.weight.shape) == (3, 32)
    with pytest.raises(CheckpointLoadError, match="missing"):  # but a missing tensor is still refused
        ctx = _damaged("mixtral", lambda t: t.pop(router))(tmp_path / "second")
        AutoModelForCausalLM.from_pretrained(ctx["path"], ignore_mismatched_sizes=True)
