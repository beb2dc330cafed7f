"""A tiny offline tokenizer for the pruner tests: word-level, built with ``tokenizers``, no Hub access."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]
WORDS = [f"t{i}" for i in range(60)]


def pruner_tokenizer() -> PreTrainedTokenizerFast:
    """ids: <pad>=0, <s>=1, </s>=2 (EOS), <unk>=3, t0..t59 = 4..63 (inside the tiny models' vocabulary of 96)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def pruner_texts(count: int = 40, words: int = 30, seed: int = 0) -> list[str]:
    """Deterministic documents with some structure (arithmetic progressions of word ids)."""
    return [
        " ".join(WORDS[(d * (seed + 3) + j * (1 + d % 5)) % len(WORDS)] for j in range(words)) for d in range(count)
    ]
