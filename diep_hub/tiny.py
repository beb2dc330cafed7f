"""The offline tiny model behind ``model.id: diep-hub/tiny-mixtral`` (recipes/tiny.yaml, the README, CI).

Nothing can be downloaded in CI, yet the whole recipe flow (load, calibrate, search, prune, evaluate, card, save)
must run end to end on a model that is good at something, or the card would show pruning noise. This module builds
that model from code, deterministically for a seed: a Mixtral-type MoE (8 experts, top-2, 4 layers: :data:`TINY`)
trained once (about a minute on one CPU core) on the generated corpus of :mod:`diep_hub.tiny_data` (which also holds
its tokenizer and its two lm-eval tasks, re-exported here), then kept in the user's cache folder under a fingerprint
of everything that decides its weights. It also resolves the reserved ids of offline models, texts and tasks.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import random
import time
from dataclasses import asdict, replace
from pathlib import Path

import torch

# _line and _domain: the corpus generators training_batch calls (its source text is part of the cache key)
from .tiny_data import (
    TASK_ITEMS,
    TINY_REVERSE_TASK,
    TINY_TASK,
    TINY_TASKS,
    TINY_TEXT_ID,
    _domain,
    _line,
    build_tiny_tokenizer,
    is_held_out,
    tiny_task_items,
    tiny_texts,
    write_tiny_tasks,
)
from .zoo import loop
from .zoo.configs import family_kwargs
from .zoo.loop import deterministic_training, optimise
from .zoo.train import ZooEntry

logger = logging.getLogger(__name__)

TINY_MODEL_ID = "diep-hub/tiny-mixtral"

# The tiny model: its shape and its training recipe (warmup, then cosine decay to 5% of ``lr``). Its own corpus
# and tokenizer (:mod:`diep_hub.tiny_data`), so not a ``diep-hub/zoo-<entry>`` id.
TINY = ZooEntry(
    "tiny-mixtral",
    "mixtral",
    family_kwargs("mixtral", experts=8, top_k=2, expert_ffn=96, hidden_size=64, max_position_embeddings=512),
    steps=600,
    batch_size=16,
    seq_len=48,
    lr=3e-3,
    warmup=30,
    description="the README's tiny model: Mixtral type, 8 experts top-2, 4 layers (built by diep_hub.tiny)",
)


def tiny_config():
    """The tiny Mixtral configuration (8 experts, top-2): :data:`TINY` over the tiny corpus's vocabulary."""
    from .zoo.train import model_config

    return model_config(TINY, build_tiny_tokenizer())


# ------------------------------------------------------------------------------------------------- the model
def tiny_cache_dir() -> Path:
    """``$DIEP_HUB_TINY_CACHE``, else ``tiny-mixtral`` in diep_hub's cache folder (``hub.cache_folder``:
    ``$DIEP_HUB_CACHE``, else beside huggingface_hub's caches under ``HF_HOME``), where the offline corpora are too."""
    if env := os.environ.get("DIEP_HUB_TINY_CACHE"):
        return Path(env)
    from .hub import cache_folder

    return cache_folder("tiny-mixtral")


def build_tiny_model(
    *,
    seed: int = 0,
    train_steps: int | None = None,
    dtype: torch.dtype = torch.float32,
    cache_dir: str | os.PathLike | None = None,
    rebuild: bool = False,
):
    """The tiny Mixtral and its tokenizer, trained for ``train_steps`` steps (default :data:`TINY`'s).

    Trained once, then loaded from ``cache_dir`` (default :func:`tiny_cache_dir`): the file is named by
    :func:`tiny_cache_key`, so a change to anything that decides the weights trains a new one. Training is
    deterministic for a seed (one thread, deterministic algorithms), so that ``diep-hub reproduce`` rebuilds the
    same base model from a cold cache. ``train_steps=0`` gives the seeded, untrained model (no cache).
    """
    from safetensors.torch import load_file

    tokenizer = build_tiny_tokenizer()
    entry = TINY if train_steps is None else replace(TINY, steps=train_steps)
    if entry.steps < 0:
        raise ValueError(f"train_steps={entry.steps} must be >= 0")
    if entry.steps == 0:
        return _initial_model(seed).eval().to(dtype), tokenizer
    path = tiny_cache_file(entry, seed, cache_dir=cache_dir)
    if path.is_file() and not rebuild:
        logger.info("loading %s from %s", TINY_MODEL_ID, path)
        model = _initial_model(seed)
        model.load_state_dict(load_file(path), strict=True)
    else:
        model = _train_and_cache(entry, seed, path)
    # No name_or_path: the tiny model is not a Hub repository (nor is the cache file), so cards must not name it.
    return model.eval().to(dtype), tokenizer


def tiny_cache_file(entry: ZooEntry = TINY, seed: int = 0, *, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the build of ``entry`` for ``seed`` is kept: if the file exists, loading the model trains nothing."""
    folder = Path(cache_dir) if cache_dir is not None else tiny_cache_dir()
    return folder / f"{tiny_cache_key(entry, seed)}.safetensors"


def _initial_model(seed: int):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(tiny_config())


def _train_and_cache(entry: ZooEntry, seed: int, path: Path):
    """Train, then write the weights next to ``path`` and move them in place (a reader never sees half a file)."""
    from safetensors.torch import save_file

    from .zoo.train import weights_hash

    logger.info("training %s once (seed %d, %d steps; about a minute on one CPU core), cached at %s",
                TINY_MODEL_ID, seed, entry.steps, path)
    started = time.perf_counter()
    model, log = train_tiny_model(entry, seed=seed)
    seconds = time.perf_counter() - started
    logger.info("trained %s in %.1f s (loss %.3f -> %.3f)", TINY_MODEL_ID, seconds, log[0]["loss"], log[-1]["loss"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    metadata = {"format": "pt", "entry": json.dumps(asdict(entry)), "seed": str(seed),
                "weights_sha256": weights_hash(model), "train_seconds": f"{seconds:.1f}",
                "torch": torch.__version__, "training_log": json.dumps(log)}
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)
    return model


def tiny_cache_key(entry: ZooEntry = TINY, seed: int = 0) -> str:
    """The cache file's name: entry, seed, steps and a hash of what decides the weights.

    Hashed: the entry (shape and training recipe), the full model config, the vocabulary, the first eight training
    batches (the data by what it generates, not by the generators' source), the training code's source (zoo/loop.py
    included), and the torch and transformers versions (initialisation and kernels).
    """
    import transformers

    tokenizer = build_tiny_tokenizer()
    h = hashlib.sha256()
    h.update(json.dumps(asdict(entry), sort_keys=True).encode())
    h.update(tiny_config().to_json_string().encode())
    h.update(json.dumps(tokenizer.get_vocab(), sort_keys=True).encode())
    rng = random.Random(f"{seed}-train-stream")
    for _ in range(8):
        h.update(json.dumps(training_batch(rng, tokenizer, entry.batch_size, entry.seq_len).tolist()).encode())
    for code in (train_tiny_model, training_batch, loop):
        h.update(inspect.getsource(code).encode())
    h.update(f"torch {torch.__version__} transformers {transformers.__version__}".encode())
    return f"{entry.name}-seed{seed}-steps{entry.steps}-{h.hexdigest()[:12]}"


def training_batch(rng: random.Random, tokenizer, batch_size: int, seq_len: int) -> torch.LongTensor:
    """``batch_size`` rows of ``seq_len`` tokens: ``<s>`` then corpus lines, as lm-eval presents a task item."""
    vocab = tokenizer.get_vocab()
    rows = []
    for _ in range(batch_size):
        ids = [tokenizer.bos_token_id]
        while len(ids) < seq_len:
            ids += [vocab[w] for w in _line(rng, _domain(rng)).split()]
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


def train_tiny_model(entry: ZooEntry = TINY, *, seed: int = 0):
    """Train the tiny model from its seeded initialisation (no cache); returns ``(model, loss log)``.

    One thread and deterministic algorithms (zoo/loop.py): ``reproduce`` must rebuild the same weights on any machine
    with the same torch build. Fresh lines every step (no epochs).
    """
    tokenizer = build_tiny_tokenizer()
    with deterministic_training(1):
        model = _initial_model(seed)
        rng = random.Random(f"{seed}-train-stream")
        log = optimise(
            model,
            lambda step: training_batch(rng, tokenizer, entry.batch_size, entry.seq_len),
            steps=entry.steps, lr=entry.lr, warmup=entry.warmup, weight_decay=0.0,
            desc=f"training {TINY_MODEL_ID} (once)",
        )
    return model, log


def is_offline_task(name: str) -> bool:
    """True for the task names written on the fly (the tiny tasks, ``zoo_*``): no include_path needed."""
    return name in TINY_TASKS or name.startswith("zoo_")


# ------------------------------------------------------------------------------------------ offline sources
# Recipes name offline models, texts and tasks with reserved ids, resolved here and nowhere else:
#   model.id           diep-hub/tiny-mixtral      this module's tiny model (a minute to train once, cached)
#                      diep-hub/zoo-<entry>       a trained model of diep_hub.zoo (minutes to train once, cached)
#   calibration/ppl    diep-hub/tiny-text         this module's corpus
#                      diep-hub/zoo-text          the zoo's domain corpus
#   evaluation.tasks   diep_tiny_arith,           task files written on the fly (no include_path needed)
#                      diep_tiny_reverse, zoo_*
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
    if any(t in TINY_TASKS for t in tasks):
        write_tiny_tasks(folder)
        wanted = True
    if any(t.startswith("zoo_") for t in tasks):
        from .zoo.tasks import write_lm_eval_tasks

        write_lm_eval_tasks(folder)
        wanted = True
    return Path(folder) if wanted else None


__all__ = [
    "TASK_ITEMS",
    "TINY",
    "TINY_MODEL_ID",
    "TINY_REVERSE_TASK",
    "TINY_TASK",
    "TINY_TASKS",
    "TINY_TEXT_ID",
    "ZOO_PREFIX",
    "ZOO_TEXT_ID",
    "build_offline_model",
    "build_tiny_model",
    "build_tiny_tokenizer",
    "is_held_out",
    "is_offline_model",
    "is_offline_task",
    "offline_config",
    "offline_text_file",
    "tiny_cache_dir",
    "tiny_cache_file",
    "tiny_cache_key",
    "tiny_config",
    "tiny_task_items",
    "tiny_texts",
    "train_tiny_model",
    "training_batch",
    "write_offline_tasks",
    "write_tiny_tasks",
]
