"""The tiny model's data, generated from rules: its corpus, its word-level tokenizer and its two lm-eval tasks.

- a corpus of four rule-based "domains" (addition of two digits, reversal and sorting of digit sequences, a tiny
  grammar of prose), common and rare, so that experts specialise and perplexity measures something
  (:func:`tiny_texts`; the calibration/perplexity source ``diep-hub/tiny-text`` in a recipe);
- a word-level tokenizer over that corpus (``tokenizers`` WordLevel wrapped in ``PreTrainedTokenizerFast``);
- two lm-eval multiple-choice tasks (:data:`TINY_TASKS`), written as local files (no Hub): the addition table
  (``diep_tiny_arith``; all 100 facts are in the corpus, the task asks whether the model still knows them) and
  reversal of digit sequences never seen in training (``diep_tiny_reverse``; the rule, not a table).

The model trained on it is :mod:`diep_hub.tiny`, which re-exports these names.
"""

from __future__ import annotations

import json
import os
import random
import zlib
from pathlib import Path

TINY_TEXT_ID = "diep-hub/tiny-text"
TINY_TASK = "diep_tiny_arith"
TINY_REVERSE_TASK = "diep_tiny_reverse"
TINY_TASKS = (TINY_TASK, TINY_REVERSE_TASK)
TASK_ITEMS = 200  # items a task: a standard error of about 0.02 at 90% accuracy

_WORDS = {
    "det": ["the", "a"],
    "noun": ["cat", "dog", "bird", "fish", "tree", "house"],
    "verb": ["sees", "likes", "finds", "chases"],
    "adj": ["big", "small", "red", "green"],
}
_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
# Domain weights: reversal (the rule takes the most steps to learn), arithmetic and prose are common, sorting is rare.
_DOMAINS = (("prose", 2), ("arith", 3), ("reverse", 4), ("sort", 1))
_DIGITS = [str(d) for d in range(10)]


def is_held_out(digits: list[str]) -> bool:
    """One digit sequence in eight (by checksum) never appears in the corpus: ``diep_tiny_reverse`` asks only these."""
    return zlib.crc32(" ".join(digits).encode()) % 8 == 0


def _reversal_input(rng: random.Random, *, held_out: bool) -> list[str]:
    while True:
        xs = [rng.choice(_DIGITS) for _ in range(rng.randint(3, 5))]
        if is_held_out(xs) == held_out:
            return xs


def _line(rng: random.Random, domain: str) -> str:
    if domain == "arith":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"add {a} {b} = {' '.join(f'{a + b:02d}')} ."  # two digits: every answer has the same length
    if domain == "reverse":
        xs = _reversal_input(rng, held_out=False)
        return f"rev {' '.join(xs)} > {' '.join(reversed(xs))} ."
    if domain == "sort":
        xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
        return f"sort {' '.join(map(str, xs))} > {' '.join(map(str, sorted(xs)))} ."
    w = {k: rng.choice(v) for k, v in _WORDS.items()}
    return f"{w['det']} {w['adj']} {w['noun']} {w['verb']} {rng.choice(_WORDS['det'])} {rng.choice(_WORDS['noun'])} ."


def _domain(rng: random.Random) -> str:
    return rng.choices([d for d, _ in _DOMAINS], [w for _, w in _DOMAINS])[0]


def tiny_texts(split: str = "train", num: int = 256, *, seed: int = 0) -> list[str]:
    """Generated documents of eight lines each; "train" and "test" use disjoint random streams."""
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r} is not available for {TINY_TEXT_ID}; use 'train' or 'test'")
    rng = random.Random(f"{seed}-{split}")
    return [" ".join(_line(rng, _domain(rng)) for _ in range(8)) for _ in range(num)]


def _vocab() -> list[str]:
    words = [w for group in _WORDS.values() for w in group]
    return _SPECIAL + _DIGITS + ["add", "rev", "sort", "=", ">", "."] + words


def build_tiny_tokenizer():
    """A word-level tokenizer over the tiny corpus (offline, deterministic ids)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {w: i for i, w in enumerate(_vocab())}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", vocab["<s>"])])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>",
        model_max_length=512,
    )


def tiny_task_items(task: str, num: int = TASK_ITEMS, *, seed: int = 0) -> list[dict]:
    """The items of a tiny task: ``{"query", "choices", "gold"}``, four choices of equal length, one right.

    ``diep_tiny_arith``: ``add A B =`` and two-digit sums (the distractors are other sums of two digits).
    ``diep_tiny_reverse``: ``rev X Y Z >`` on held-out sequences; the distractors are other orders of the same
    digits (or other digits where too few orders exist).
    """
    if task not in TINY_TASKS:
        raise ValueError(f"{task!r} is not a tiny task; available: {', '.join(TINY_TASKS)}")
    rng = random.Random(f"{seed}-task-{task}")
    rows = []
    for _ in range(num):
        if task == TINY_TASK:
            a, b = rng.randint(0, 9), rng.randint(0, 9)
            sums = [a + b, *rng.sample([s for s in range(19) if s != a + b], 3)]
            rng.shuffle(sums)
            choices = [" ".join(f"{s:02d}") for s in sums]
            query, answer = f"add {a} {b} =", " ".join(f"{a + b:02d}")
        else:
            xs = _reversal_input(rng, held_out=True)
            answer = " ".join(reversed(xs))
            wrong = {" ".join(rng.sample(xs, len(xs))) for _ in range(24)} - {answer}
            while len(wrong) < 3:
                wrong.add(" ".join(rng.choice(_DIGITS) for _ in xs))
                wrong.discard(answer)
            choices = [answer, *rng.sample(sorted(wrong), 3)]
            rng.shuffle(choices)
            query = f"rev {' '.join(xs)} >"
        rows.append({"query": query, "choices": choices, "gold": choices.index(answer)})
    return rows


def write_tiny_tasks(folder: str | os.PathLike, *, num: int = TASK_ITEMS, seed: int = 0) -> Path:
    """Write the lm-eval tasks :data:`TINY_TASKS` (4-way multiple choice) into ``folder``.

    Returns the folder, to pass as lm-eval's ``include_path``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    for task in TINY_TASKS:
        data = folder / f"{task}.jsonl"
        data.write_text("".join(json.dumps(r) + "\n" for r in tiny_task_items(task, num, seed=seed)), encoding="utf-8")
        yaml_text = (
            f"task: {task}\n"
            "dataset_path: json\n"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
            "test_split: test\n"
            "output_type: multiple_choice\n"
            'doc_to_text: "{{query}}"\n'
            'doc_to_choice: "{{choices}}"\n'
            'doc_to_target: "{{gold}}"\n'
            'target_delimiter: " "\n'
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
            "metadata:\n  version: 2.0\n"
        )
        (folder / f"{task}.yaml").write_text(yaml_text, encoding="utf-8")
    return folder


__all__ = [
    "TASK_ITEMS",
    "TINY_REVERSE_TASK",
    "TINY_TASK",
    "TINY_TASKS",
    "TINY_TEXT_ID",
    "build_tiny_tokenizer",
    "is_held_out",
    "tiny_task_items",
    "tiny_texts",
    "write_tiny_tasks",
]
