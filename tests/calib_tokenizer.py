"""A tiny offline tokenizer for calibration tests: word-level over a fixed vocabulary, no Hub access."""

from __future__ import annotations

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

WORDS = [f"w{i}" for i in range(40)]
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]


def make_tokenizer() -> PreTrainedTokenizerFast:
    """ids: <pad>=0, <s>=1, </s>=2 (EOS), <unk>=3, then w0..w39 = 4..43 (fits the tiny models' vocab of 96)."""
    vocab = {token: i for i, token in enumerate(SPECIAL + WORDS)}
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def make_documents(count: int, words_per_doc: int, seed: int = 0) -> list[str]:
    """Deterministic documents of known length: document d is words w(d+j) % 40."""
    return [" ".join(WORDS[(d * 7 + j + seed) % len(WORDS)] for j in range(words_per_doc)) for d in range(count)]
