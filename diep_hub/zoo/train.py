"""Small MoEs trained on CPU on the zoo domains: reference models whose experts have specialised.

Random-weight MoEs make every pruning criterion look the same (their experts are interchangeable). The zoo
trains a few small MoEs of different families on :mod:`diep_hub.zoo.domains`, deterministically for a seed,
and caches them on disk: the cache key holds the entry name, seed, steps and a hash of the configuration and
of this package's source, so that changing the recipe rebuilds the model instead of reusing a stale one.

Bit-reproducibility: training runs with ``torch.use_deterministic_algorithms(True)`` and a fixed thread count
(1 by default; CPU reductions can round differently with other thread counts), so the same seed gives the same
weights on the same torch build.
"""

from __future__ import annotations

import hashlib
import inspect
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from ..errors import ConfigError
from ..machine import machine_description
from . import domains, loop
from .configs import family_kwargs
from .loop import deterministic_training, optimise

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class ZooEntry:
    """A zoo model: its family (transformers ``model_type``), architecture overrides and training recipe."""

    name: str
    model_type: str
    config: dict = field(default_factory=dict)
    steps: int = 1200
    batch_size: int = 24
    seq_len: int = 96
    lr: float = 3e-3
    warmup: int = 50
    description: str = ""


_COMMON = dict(
    hidden_size=96,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
    tie_word_embeddings=False,
    router_aux_loss_coef=0.01,
    output_router_logits=False,
)

def _by_name(*entries: ZooEntry) -> dict[str, ZooEntry]:
    """A table of entries keyed by name: the name given to ``python -m diep_hub.zoo.build`` and to ``zoo:NAME``."""
    return {e.name: e for e in entries}


ZOO: dict[str, ZooEntry] = _by_name(
    ZooEntry(
        "mixtral-8e",
        "mixtral",
        family_kwargs("mixtral", experts=8, top_k=2, expert_ffn=128),
        description="Mixtral type, 8 experts top-2, 4 layers",
    ),
    ZooEntry(
        "olmoe-16e",
        "olmoe",
        family_kwargs("olmoe", experts=16, top_k=2, expert_ffn=64, norm_topk_prob=False),
        description="OLMoE type, 16 experts top-2, 4 layers",
    ),
    ZooEntry(
        "qwen2moe-8e-shared",
        "qwen2_moe",
        family_kwargs(
            "qwen2_moe",
            experts=8,
            top_k=2,
            expert_ffn=96,
            intermediate_size=128,
            shared_expert_intermediate_size=64,
            norm_topk_prob=False,
        ),
        description="Qwen2-MoE type, 8 routed experts top-2 plus a gated shared expert, 4 layers",
    ),
)

# Built on request, not part of the quality benchmark's default set: experts 4x wider than mixtral-8e, so that
# expert GEMMs dominate a forward pass on CPU and expert skipping's saved compute shows up as speed
# (benchmarks/skipping_speed.py --model zoo:mixtral-8e-wide), on a model whose accuracy means something.
EXTRA: dict[str, ZooEntry] = _by_name(
    ZooEntry(
        "mixtral-8e-wide",
        "mixtral",
        family_kwargs("mixtral", experts=8, top_k=2, expert_ffn=512),
        description="Mixtral type, 8 wide experts (FFN 512) top-2, 4 layers",
    ),
)

# Held out (issue 12): shapes no default is chosen on, to confirm the defaults picked on ZOO before they ship.
HELDOUT: dict[str, ZooEntry] = _by_name(
    ZooEntry(
        "mixtral-32e-top4-8l",
        "mixtral",
        # 8 layers x 32 experts of FFN 16: as many expert weights as mixtral-8e (4 x 8 x 128), cut finer.
        family_kwargs("mixtral", experts=32, top_k=4, expert_ffn=16, num_hidden_layers=8),
        description="Mixtral type, 32 narrow experts (FFN 16) top-4, 8 layers",
    ),
    ZooEntry(
        "deepseek-v3-16e-groups",
        "deepseek_v3",
        # Two groups of 8, one picked a token: the group floor (2 groups x 2) allows 25%, 50% and 75%.
        family_kwargs(
            "deepseek_v3",
            experts=16,
            top_k=2,
            expert_ffn=64,
            attention=(_COMMON["num_attention_heads"], 16),
            intermediate_size=256,
            n_shared_experts=1,
            first_k_dense_replace=1,
            n_group=2,
            topk_group=1,
        ),
        description="DeepSeek-V3 type: sigmoid routing, 16 experts top-2 in 2 groups (1 picked), a shared "
        "expert, dense first layer, 4 layers",
    ),
)

# A seconds-long entry for tests and CI (tiny dims, few steps): checks the build, not the quality.
SMOKE = ZooEntry(
    "smoke",
    "mixtral",
    family_kwargs("mixtral", experts=4, top_k=2, expert_ffn=32, hidden_size=32, num_hidden_layers=2),
    steps=8,
    batch_size=4,
    seq_len=48,
    description="tiny smoke-test entry",
)

def get_entry(name: str) -> ZooEntry:
    """The zoo entry ``name`` (``"smoke"`` included), or a ConfigError listing the entries."""
    if name == SMOKE.name:
        return SMOKE
    for table in (ZOO, EXTRA, HELDOUT):
        if name in table:
            return table[name]
    raise ConfigError(
        f"unknown zoo model {name!r}; available: {sorted(ZOO) + sorted(EXTRA) + sorted(HELDOUT)} "
        f"(and {SMOKE.name!r} for tests)"
    )


def default_cache_dir() -> Path:
    """``$DIEP_HUB_ZOO_CACHE``, else ``benchmarks/zoo_cache`` of a source checkout, else ``~/.cache``."""
    if env := os.environ.get("DIEP_HUB_ZOO_CACHE"):
        return Path(env)
    repo = Path(__file__).resolve().parents[2]
    if (repo / "benchmarks").is_dir():
        return repo / "benchmarks" / "zoo_cache"
    return Path.home() / ".cache" / "diep_hub" / "zoo"


def model_config(entry: ZooEntry, tokenizer):
    """The transformers config of a zoo entry (vocabulary and special ids from the zoo tokenizer)."""
    from transformers import AutoConfig

    kwargs = {**_COMMON, **entry.config}
    return AutoConfig.for_model(
        entry.model_type,
        vocab_size=len(tokenizer),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        **kwargs,
    )


def cache_key(entry: ZooEntry, seed: int, threads: int) -> str:
    """Directory name for a build: name, seed, steps and a hash of the recipe and of the zoo source."""
    h = hashlib.sha256(json.dumps({**asdict(entry), "common": _COMMON, "threads": threads}, sort_keys=True).encode())
    h.update(_code_fingerprint().encode())
    h.update(torch.__version__.encode())
    return f"{entry.name}-seed{seed}-steps{entry.steps}-{h.hexdigest()[:12]}"


def _code_fingerprint() -> str:
    """What decides the weights: the training code's source (with the shared loop), and samples of the data and of
    the tokenizer.

    The data is fingerprinted by what it generates (not by the generators' source), so reformatting the zoo
    code keeps the cache while any change to a domain's output invalidates it.
    """
    parts = [inspect.getsource(f) for f in (train_model, training_batch, model_config)]
    parts.append(inspect.getsource(loop))
    parts += domains.sample_lines(256, seed=0, split="train")
    parts += [repr(ex) for name in domains.DOMAINS for ex in domains.sample_examples(name, 8, seed=0, split="train")]
    parts.append(json.dumps(domains.build_tokenizer().get_vocab(), sort_keys=True))
    return "\n".join(parts)


def weights_hash(model) -> str:
    """SHA-256 over every parameter and buffer (name, dtype, shape, bytes): the determinism fingerprint."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)}".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def training_batch(tokenizer, step: int, *, seed: int, batch_size: int, seq_len: int) -> torch.LongTensor:
    """Batch ``step`` of the training stream: packed lines, each row starting at a line start."""
    newline = tokenizer.convert_tokens_to_ids("\n")
    rows = []
    for row in range(batch_size):
        ids: list[int] = []
        start = (step * batch_size + row) * 16
        while len(ids) < seq_len:
            for line in domains.sample_lines(16, seed=seed, split="train", start=start):
                ids += tokenizer(line, add_special_tokens=False)["input_ids"] + [newline]
            start += 10**9  # a fresh, disjoint index range if 16 lines were not enough
        rows.append(ids[:seq_len])
    return torch.tensor(rows, dtype=torch.long)


def train_model(entry: ZooEntry, *, seed: int = 0, steps: int | None = None, threads: int = 1):
    """Train ``entry`` from scratch (no cache) and return ``(model, tokenizer, log)``; deterministic for a seed."""
    from transformers import AutoModelForCausalLM

    if steps is not None:
        entry = replace(entry, steps=steps)
    if entry.steps < 1:
        raise ConfigError(f"steps={entry.steps} must be >= 1")
    tokenizer = domains.build_tokenizer()
    with deterministic_training(threads):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(model_config(entry, tokenizer))
        log = optimise(
            model,
            lambda step: training_batch(tokenizer, step, seed=seed, batch_size=entry.batch_size, seq_len=entry.seq_len),
            steps=entry.steps, lr=entry.lr, warmup=entry.warmup, weight_decay=0.01, desc=f"training zoo/{entry.name}",
        )
        model.config.output_router_logits = False
    return model, tokenizer, log


def build_record(
    name: str, *, seed: int = 0, steps: int | None = None, cache_dir: str | os.PathLike | None = None, threads: int = 1
) -> dict | None:
    """The cached build's ``zoo_build.json`` (weights hash, training time and machine, loss log), or None."""
    entry = get_entry(name)
    if steps is not None:
        entry = replace(entry, steps=steps)
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    record = folder / cache_key(entry, seed, threads) / "zoo_build.json"
    return json.loads(record.read_text(encoding="utf-8")) if record.is_file() else None


def build_zoo_model(
    name: str,
    *,
    seed: int = 0,
    steps: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    threads: int = 1,
    rebuild: bool = False,
):
    """The trained zoo model ``name`` and its tokenizer, loaded from the cache or trained (then cached).

    Args:
        name: a key of :data:`ZOO` (or ``"smoke"``).
        seed: seeds initialisation and the data stream.
        steps: training steps (default: the entry's).
        cache_dir: where builds are kept (default :func:`default_cache_dir`); ``None`` env-free default.
        threads: torch threads during training; part of the cache key (reductions depend on it).
        rebuild: train again even when a cached build exists.
    """
    from transformers import AutoModelForCausalLM

    entry = get_entry(name)
    if steps is not None:
        entry = replace(entry, steps=steps)
    if threads < 1:
        raise ConfigError(f"threads={threads} must be >= 1")
    folder = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    target = folder / cache_key(entry, seed, threads)
    if target.is_dir() and (target / "zoo_build.json").is_file() and not rebuild:
        logger.info("loading zoo/%s from %s", name, target)
        model = AutoModelForCausalLM.from_pretrained(target).eval()
        tokenizer = domains.build_tokenizer()
        return model, tokenizer
    logger.info("training zoo/%s (seed %d, %d steps); cached at %s", name, seed, entry.steps, target)
    started = time.perf_counter()
    model, tokenizer, log = train_model(entry, seed=seed, threads=threads)
    train_seconds = time.perf_counter() - started
    tmp = target.with_name(target.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    build = {
        "entry": asdict(entry),
        "seed": seed,
        "threads": threads,
        "torch": torch.__version__,
        "weights_sha256": weights_hash(model),
        "train_seconds": round(train_seconds, 1),
        "machine": machine_description(),
        "training_log": log,
    }
    (tmp / "zoo_build.json").write_text(json.dumps(build, indent=2), encoding="utf-8")
    if target.exists():
        import shutil

        shutil.rmtree(target)
    tmp.rename(target)
    return model, tokenizer
