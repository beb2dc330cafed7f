"""A saved pruned tiny checkpoint to push (weights, remote code, tokenizer, report, card), for the push tests
(test_faults_push.py, test_push_guards.py): ``template`` is saved once a module, ``folder`` is a fresh copy a test.
Bind them in a module with ``template, folder = push_checkpoint.template, push_checkpoint.folder``."""

from __future__ import annotations

import shutil

import pytest

import diep_hub
from diep_hub.card import build_model_card, write_card
from tests.helpers.tiny_models import tiny_model
from tests.helpers.word_tokenizer import tiny_tokenizer

REPO = "tester/tiny-diep-faults"
KEEP = {0: [0, 1, 2], 1: [1, 2, 5, 6], 2: [0, 1], 3: [2, 3, 7]}


@pytest.fixture(scope="module")
def template(tmp_path_factory):
    """One saved pruned tiny Mixtral (weights, remote code, tokenizer, report, card), copied by each row."""
    folder = tmp_path_factory.mktemp("template") / "ckpt"
    model = diep_hub.prune_experts(tiny_model("mixtral"), KEEP)
    report = {"method": "frequency", "sparsity": 0.5, "selection": "global", "seed": 3}
    diep_hub.save_pruned(model, folder, tokenizer=tiny_tokenizer(), extra_files={"pruning_report.json": report})
    write_card(folder, build_model_card(folder, base_model="mistralai/Mixtral-8x7B-v0.1", repo_id=REPO))
    return folder


@pytest.fixture
def folder(template, tmp_path):
    return shutil.copytree(template, tmp_path / "ckpt")
