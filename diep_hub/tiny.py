"""The offline tiny model behind ``model.id: diep-hub/tiny-mixtral`` (recipes/tiny.yaml, the README, CI).

Nothing can be downloaded in CI, yet the whole recipe flow (load, calibrate, search, prune, evaluate, card, save)
must run end to end. This module builds everything that flow needs from code, deterministically for a seed:

- a small generated corpus of four rule-based "domains" (arithmetic, reversal, sorting, a tiny grammar of prose),
  rare and common, so that perplexity and the multiple-choice task measure something;
- a word-level tokenizer over that corpus (``tokenizers`` WordLevel wrapped in ``PreTrainedTokenizerFast``);
- a Mixtral-type MoE (8 experts, top-2, 4 layers; its shape and training settings are the zoo entry
  ``diep_hub.zoo.train.TINY``) briefly trained on the corpus (a few seconds on CPU), so that experts are not
  interchangeable and pruning changes the scores;
- an lm-eval multiple-choice task over held-out arithmetic, written as local files (no Hub).

The calibration/perplexity source name ``diep-hub/tiny-text`` selects this corpus in a recipe.
"""

from __future__ import annotations

import json
import logging
import os
import random
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

TINY_MODEL_ID = "diep-hub/tiny-mixtral"
TINY_TEXT_ID = "diep-hub/tiny-text"
TINY_TASK = "diep_tiny_arith"

_WORDS = {
    "det": ["the", "a"],
    "noun": ["cat", "dog", "bird", "fish", "tree", "house"],
    "verb": ["sees", "likes", "finds", "chases"],
    "adj": ["big", "small", "red", "green"],
}
_SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
# Domain weights: prose and arithmetic are common, sorting is rare.
_DOMAINS = (("prose", 4), ("arith", 3), ("reverse", 2), ("sort", 1))


def _line(rng: random.Random, domain: str) -> str:
    if domain == "arith":
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        return f"add {a} {b} = {' '.join(str(a + b))} ."
    if domain == "reverse":
        xs = [str(rng.randint(0, 9)) for _ in range(rng.randint(3, 5))]
        return f"rev {' '.join(xs)} > {' '.join(reversed(xs))} ."
    if domain == "sort":
        xs = [rng.randint(0, 9) for _ in range(rng.randint(3, 5))]
        return f"sort {' '.join(map(str, xs))} > {' '.join(map(str, sorted(xs)))} ."
    w = {k: rng.choice(v) for k, v in _WORDS.items()}
    return f"{w['det']} {w['adj']} {w['noun']} {w['verb']} {rng.choice(_WORDS['det'])} {rng.choice(_WORDS['noun'])} ."


def tiny_texts(split: str = "train", num: int = 256, *, seed: int = 0) -> list[str]:
    """Generated documents of several lines each; "train" and "test" use disjoint random streams."""
    if split not in ("train", "test"):
        raise ValueError(f"split {split!r} is not available for {TINY_TEXT_ID}; use 'train' or 'test'")
    rng = random.Random(f"{seed}-{split}")
    names = [d for d, _ in _DOMAINS]
    weights = [w for _, w in _DOMAINS]
    return [" ".join(_line(rng, d) for d in rng.choices(names, weights, k=8)) for _ in range(num)]


def _vocab() -> list[str]:
    words = [w for group in _WORDS.values() for w in group]
    return _SPECIAL + [str(d) for d in range(10)] + ["add", "rev", "sort", "=", ">", "."] + words


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


def tiny_config():
    """The tiny Mixtral configuration (8 experts, top-2): the zoo entry ``TINY`` over this module's vocabulary."""
    from .zoo.train import TINY, model_config

    return model_config(TINY, build_tiny_tokenizer())


def build_tiny_model(*, seed: int = 0, train_steps: int | None = None, dtype: torch.dtype = torch.float32):
    """The tiny Mixtral and its tokenizer, trained for ``train_steps`` steps (default: the zoo entry's 150).

    Deterministic for a seed (single-threaded-equivalent CPU ops are used), so that ``diep-hub reproduce`` can
    rebuild exactly the same base model.
    """
    from transformers import AutoModelForCausalLM

    from .zoo.train import TINY

    tokenizer = build_tiny_tokenizer()
    torch.manual_seed(seed)
    # No name_or_path: the tiny model is not a Hub repository, so cards must not name it as a base model.
    model = AutoModelForCausalLM.from_config(tiny_config())
    steps = TINY.steps if train_steps is None else train_steps
    if steps:
        _train(model, tokenizer, steps=steps, seed=seed, batch=TINY.batch_size, seq_len=TINY.seq_len, lr=TINY.lr)
    model.eval()
    return model.to(dtype), tokenizer


def _train(model, tokenizer, *, steps: int, seed: int, batch: int, seq_len: int, lr: float) -> None:
    """A short language-model training run at a constant learning rate: enough for experts to specialise.

    Runs on one thread: CPU reductions depend on the thread count, and ``reproduce`` must rebuild the same weights
    on any machine.
    """
    from tqdm.auto import tqdm

    ids = [t for text in tiny_texts("train", 512, seed=seed) for t in tokenizer(text)["input_ids"]]
    data = torch.tensor(ids[: (len(ids) // seq_len) * seq_len]).view(-1, seq_len)
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    model.train()
    try:
        for _ in tqdm(range(steps), desc="training tiny-mixtral", leave=False):
            rows = torch.randint(0, data.shape[0], (batch,), generator=generator)
            out = model(input_ids=data[rows], labels=data[rows], output_router_logits=True)
            optimizer.zero_grad(set_to_none=True)
            out.loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    logger.info("trained %s for %d steps (last loss %.3f)", TINY_MODEL_ID, steps, out.loss.item())


def write_tiny_tasks(folder: str | os.PathLike, *, num: int = 60, seed: int = 0) -> Path:
    """Write the ``diep_tiny_arith`` lm-eval task (4-way multiple choice on held-out sums) into ``folder``.

    Returns the folder, to pass as lm-eval's ``include_path``.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = random.Random(f"{seed}-task")
    rows = []
    for _ in range(num):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        wrong = rng.sample([s for s in range(19) if s != a + b], 3)
        choices = [a + b, *wrong]
        rng.shuffle(choices)
        rows.append({"query": f"add {a} {b} =", "choices": [" ".join(str(c)) for c in choices],
                     "gold": choices.index(a + b)})
    data = folder / f"{TINY_TASK}.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    yaml_text = (
        f"task: {TINY_TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data.resolve()))}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "{{query}}"\n'
        'doc_to_choice: "{{choices}}"\n'
        'doc_to_target: "{{gold}}"\n'
        'target_delimiter: " "\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n"
    )
    (folder / f"{TINY_TASK}.yaml").write_text(yaml_text, encoding="utf-8")
    return folder


# ------------------------------------------------------------------------------------------ offline sources
# Recipes name offline models, texts and tasks with reserved ids, resolved here and nowhere else:
#   model.id           diep-hub/tiny-mixtral      this module's tiny model (seconds to build)
#                      diep-hub/zoo-<entry>       a trained model of diep_hub.zoo (minutes to train once, cached)
#   calibration/ppl    diep-hub/tiny-text         this module's corpus
#                      diep-hub/zoo-text          the zoo's domain corpus
#   evaluation.tasks   diep_tiny_arith, zoo_*     task files written on the fly (no include_path needed)
ZOO_PREFIX = "diep-hub/zoo-"
ZOO_TEXT_ID = "diep-hub/zoo-text"


def is_offline_model(model_id: str) -> bool:
    """True for the reserved ids above (built locally, never downloaded)."""
    return model_id == TINY_MODEL_ID or model_id.startswith(ZOO_PREFIX)


def _zoo_entry(model_id: str) -> str:
    return model_id[len(ZOO_PREFIX) :]


def offline_config(model_id: str):
    """The config of an offline model, without building or training it (for dry runs)."""
    if model_id == TINY_MODEL_ID:
        return tiny_config()
    from .zoo import domains as zoo_domains
    from .zoo.train import get_entry, model_config

    return model_config(get_entry(_zoo_entry(model_id)), zoo_domains.build_tokenizer())


def build_offline_model(model_id: str, *, dtype: torch.dtype = torch.float32):
    """The offline model and its tokenizer: built here, or taken from the zoo's cache (trained on first use)."""
    if model_id == TINY_MODEL_ID:
        return build_tiny_model(seed=0, dtype=dtype)
    from .zoo.train import build_zoo_model

    model, tokenizer = build_zoo_model(_zoo_entry(model_id), seed=0)
    return model.eval().to(dtype), tokenizer


def offline_text_file(name: str, split: str, folder: str | os.PathLike) -> Path | None:
    """Write an offline corpus as JSONL (``{"text": ...}`` lines) into ``folder``; None if ``name`` is not one."""
    if name == TINY_TEXT_ID:
        texts = tiny_texts(split, 256)
    elif name == ZOO_TEXT_ID:
        from .zoo.domains import corpus_texts

        texts = corpus_texts(256, split="calibration" if split == "train" else split)
    else:
        return None
    path = Path(folder) / f"{name.replace('/', '--')}-{split}.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    content = "".join(json.dumps({"text": t}) + "\n" for t in texts)
    if not path.exists() or path.read_text(encoding="utf-8") != content:
        path.write_text(content, encoding="utf-8")
    return path


def write_offline_tasks(tasks: list[str], folder: str | os.PathLike) -> Path | None:
    """Write the task files of offline tasks named in ``tasks`` into ``folder``; None when there are none."""
    wanted = False
    if TINY_TASK in tasks:
        write_tiny_tasks(folder)
        wanted = True
    if any(t.startswith("zoo_") for t in tasks):
        from .zoo.tasks import write_lm_eval_tasks

        write_lm_eval_tasks(folder)
        wanted = True
    return Path(folder) if wanted else None
