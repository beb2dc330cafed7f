"""Atomic saving: a failure never leaves a half-written checkpoint, and never damages an existing one."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

import diep_hub
from diep_hub import DiEPError
from tests.helpers.numerics import assert_close_logits, assert_same_greedy, same_weights
from tests.helpers.tiny_models import sample_input_ids, tiny_model


@pytest.fixture
def pruned():
    model = tiny_model("mixtral")
    return diep_hub.prune_experts(model, {0: [0, 1, 2], 1: [4, 5, 6, 7]})


def test_failure_during_save_leaves_nothing(tmp_path, pruned):
    def explode(staging):
        assert (staging / "config.json").is_file()  # it was all written ...
        raise RuntimeError("disk full")  # ... and then something failed

    with pytest.raises(RuntimeError, match="disk full"):
        diep_hub.save_pruned(pruned, tmp_path / "out", before_commit=explode)
    assert list(tmp_path.iterdir()) == []


def test_failure_while_overwriting_keeps_the_previous_checkpoint(tmp_path, pruned):
    target = tmp_path / "out"
    diep_hub.save_pruned(pruned, target)
    before = {p.name: p.read_bytes() for p in target.iterdir()}
    other = diep_hub.prune_experts(tiny_model("mixtral", seed=3), {0: [1, 2]})
    with pytest.raises(RuntimeError, match="interrupted"):
        diep_hub.save_pruned(
            other, target, overwrite=True, before_commit=lambda _: (_ for _ in ()).throw(RuntimeError("interrupted"))
        )
    assert {p.name: p.read_bytes() for p in target.iterdir()} == before
    assert [p.name for p in tmp_path.iterdir()] == ["out"]


def test_existing_folder_needs_overwrite(tmp_path, pruned):
    target = tmp_path / "out"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(DiEPError, match=r"already exists and is not empty; pass overwrite=True"):
        diep_hub.save_pruned(pruned, target)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    # overwrite=True replaces only a checkpoint: a folder of the user's own files is refused, untouched
    with pytest.raises(DiEPError, match=r"does not look like a checkpoint folder.*keep\.txt"):
        diep_hub.save_pruned(pruned, target, overwrite=True)
    assert [p.name for p in target.iterdir()] == ["keep.txt"]
    (target / "keep.txt").unlink()
    diep_hub.save_pruned(pruned, target, overwrite=True)  # an empty folder is replaced
    other = diep_hub.prune_experts(tiny_model("mixtral", seed=3), {0: [1, 2]})
    diep_hub.save_pruned(other, target, overwrite=True, extra_files={"README.md": "card", "assets/a.png": b"png"})
    diep_hub.save_pruned(pruned, target, overwrite=True)  # a checkpoint with a card and figures is replaced
    assert not (target / "README.md").exists() and not (target / "assets").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    reloaded = AutoModelForCausalLM.from_pretrained(target)
    ids = sample_input_ids()
    assert same_weights(reloaded.state_dict(), pruned.state_dict()) == []
    with torch.no_grad():  # same weights, another load path: equal within the stated tolerance, same greedy tokens
        got, want = reloaded(ids).logits, pruned(ids).logits
    assert_close_logits(got, want)
    assert_same_greedy(got, want)


def test_extra_files_are_written(tmp_path, pruned):
    diep_hub.save_pruned(
        pruned, tmp_path / "out", extra_files={"pruning_report.json": {"method": "diep"}, "notes/a.txt": "hi"}
    )
    assert (tmp_path / "out" / "pruning_report.json").read_text().strip() == '{\n  "method": "diep"\n}'
    assert (tmp_path / "out" / "notes" / "a.txt").read_text() == "hi"


def test_unpruned_model_is_refused(tmp_path):
    with pytest.raises(DiEPError, match="is not a pruned model"):
        diep_hub.save_pruned(tiny_model("mixtral"), tmp_path / "out")
    assert not (tmp_path / "out").exists()
