"""The README's tiny model (diep_hub.tiny): its shape, its tasks for lm-eval, its cache, a bit-deterministic build,
and competence on its tasks."""

from __future__ import annotations

import json
import re
from dataclasses import replace

import pytest
import torch

from diep_hub import tiny
from diep_hub.errors import ConfigError
from diep_hub.zoo import train


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
