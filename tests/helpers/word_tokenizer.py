"""Offline word-level tokenizers for tests (``tokenizers`` WordLevel, no Hub access) and documents over them.

One builder, three vocabularies: every id is below the tiny models' vocabulary of 96 (tests/helpers/tiny_models.py),
and the special tokens come first: <pad>=0, <s>=1, </s>=2 (EOS), <unk>=3, then the vocabulary's words from 4.

- ``tiny_tokenizer`` / ``tiny_texts``: digits and a few English words (evaluation, saving and publishing tests);
- ``pruner_tokenizer`` / ``pruner_texts``: t0..t59, documents of arithmetic progressions (pruner tests);
- ``make_tokenizer`` / ``make_documents``: w0..w39, documents of known length (calibration tests);
- ``wide_tokenizer``: the exception, a tokenizer of another model (204 ids), for the out-of-vocabulary checks.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
DIGITS = [str(d) for d in range(10)]
ENGLISH = [
    "the", "a", "is", "are", "of", "and", "to", "in", "on", "it", "yes", "no", "true", "false", "question",
    "answer", "cat", "dog", "bird", "fish", "tree", "house", "red", "green", "blue", "big", "small", "sees",
    "likes", "finds", "add", "=", "?", ".", ":",
]  # fmt: skip
TINY_WORDS = DIGITS + ENGLISH
PRUNER_WORDS = [f"t{i}" for i in range(60)]
CALIB_WORDS = [f"w{i}" for i in range(40)]
VOCAB_SIZE = 96  # the tiny models' embedding size; a vocabulary uses the first len(SPECIAL + words) ids


def _word_level(tokens: Sequence[str], **limits) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer over ``tokens`` (ids in that order), the SPECIAL tokens named."""
    backend = Tokenizer(models.WordLevel(vocab={token: i for i, token in enumerate(tokens)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>", **limits
    )


def word_tokenizer(words: Sequence[str], *, model_max_length: int | None = None) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer over ``SPECIAL + words`` (ids in that order)."""
    tokens = [*SPECIAL, *words]
    assert len(tokens) <= VOCAB_SIZE, f"{len(tokens)} tokens do not fit the tiny models' vocabulary of {VOCAB_SIZE}"
    return _word_level(tokens, **({} if model_max_length is None else {"model_max_length": model_max_length}))


def wide_tokenizer() -> PreTrainedTokenizerFast:
    """A tokenizer of another model: 204 ids where the tiny models have 96 (its words v92..v199 get ids 96..203)."""
    return _word_level([*SPECIAL, *(f"v{i}" for i in range(200))])


def documents(words: Sequence[str], count: int, length: int, index: Callable[[int, int], int]) -> list[str]:
    """``count`` documents of ``length`` words: word j of document d is ``words[index(d, j) % len(words)]``."""
    return [" ".join(words[index(d, j) % len(words)] for j in range(length)) for d in range(count)]


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """Digits at ids 4..13, then the English words; 128 tokens at most."""
    return word_tokenizer(TINY_WORDS, model_max_length=128)


def tiny_texts(count: int = 16, words: int = 24, seed: int = 0) -> list[str]:
    """Deterministic documents over the tiny vocabulary (for perplexity and speed probes)."""
    return documents(TINY_WORDS, count, words, lambda d, j: d * 7 + j * (1 + (d + seed) % 5))


def pruner_tokenizer() -> PreTrainedTokenizerFast:
    """t0..t59 at ids 4..63."""
    return word_tokenizer(PRUNER_WORDS)


def pruner_texts(count: int = 40, words: int = 30, seed: int = 0) -> list[str]:
    """Deterministic documents with some structure (arithmetic progressions of word ids)."""
    return documents(PRUNER_WORDS, count, words, lambda d, j: d * (seed + 3) + j * (1 + d % 5))


def make_tokenizer() -> PreTrainedTokenizerFast:
    """w0..w39 at ids 4..43."""
    return word_tokenizer(CALIB_WORDS)


def make_documents(count: int, words_per_doc: int, seed: int = 0) -> list[str]:
    """Deterministic documents of known length: word j of document d is w((7d + j + seed) % 40)."""
    return documents(CALIB_WORDS, count, words_per_doc, lambda d, j: d * 7 + j + seed)

