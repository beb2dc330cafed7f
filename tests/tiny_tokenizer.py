"""A tiny offline tokenizer matching tests/tiny_models (vocab_size=96): word-level, built with ``tokenizers``.

Importable by any test: ``from tiny_tokenizer import tiny_tokenizer``. No Hub access.
"""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
DIGITS = [str(d) for d in range(10)]
WORDS = [
    "the", "a", "is", "are", "of", "and", "to", "in", "on", "it", "yes", "no", "true", "false", "question",
    "answer", "cat", "dog", "bird", "fish", "tree", "house", "red", "green", "blue", "big", "small", "sees",
    "likes", "finds", "add", "=", "?", ".", ":",
]
VOCAB = SPECIAL + DIGITS + WORDS
VOCAB_SIZE = 96  # the tiny models' embedding size; the vocabulary uses the first len(VOCAB) ids


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    """ids: <pad>=0, <s>=1, </s>=2 (EOS), <unk>=3, digits 4..13, then WORDS; all below 96."""
    vocab = {token: i for i, token in enumerate(VOCAB)}
    assert len(vocab) <= VOCAB_SIZE
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=128,
    )


def tiny_texts(count: int = 16, words: int = 24, seed: int = 0) -> list[str]:
    """Deterministic documents over the vocabulary (for perplexity and speed probes)."""
    body = DIGITS + WORDS
    return [" ".join(body[(d * 7 + j * (1 + (d + seed) % 5)) % len(body)] for j in range(words)) for d in range(count)]
