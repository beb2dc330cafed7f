"""Generated text in several sub-languages ("domains"), each with a rule that can be checked.

Pruning methods can only be told apart on models whose experts have specialised, and experts only specialise
when the data has distinct parts. Every line of the zoo corpus belongs to one domain, recognisable from its
surface form, and ends in an answer that a rule determines (or, for prose, a word whose class the grammar
determines). Domains come at unequal frequencies, so that some are rare: a pruning method that keeps only
the experts of the common domains loses the rare ones, which an average perplexity would hide.

A line is ``prompt + answer``; lines are joined by ``"\\n"`` into training sequences. Everything is
deterministic for a seed (``random.Random`` seeded with a string), and the train and test streams of a seed
are disjoint random streams.
"""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import ConfigError

# Prose: four word classes, every word three letters long, so that multiple-choice options have equal length.
_PROSE_CLASSES: dict[str, tuple[str, ...]] = {
    "det": ("the", "one", "any", "her"),
    "adj": ("red", "big", "old", "shy", "wet", "odd"),
    "noun": ("cat", "dog", "fox", "owl", "ant", "bee", "cow", "elk"),
    "verb": ("saw", "met", "hit", "fed", "led", "won"),
}
_PROSE_TEMPLATE = ("det", "adj", "noun", "verb", "det", "adj", "noun")
_LETTERS = "abcdefgh"
_KEYS = "abcdefghij"
_OPEN, _CLOSE = "([{<", ")]}>"


@dataclass(frozen=True)
class Example:
    """One checkable item: the model sees ``prompt`` and should continue with ``answer``.

    ``choices`` (equal-length strings, exactly one right: ``choices[gold] == answer``) serve the
    multiple-choice task; ``exact`` says whether greedy generation can be scored by exact match (false for
    prose, where several words are right and only the word class is checked).
    """

    domain: str
    prompt: str
    answer: str
    choices: tuple[str, ...]
    gold: int
    exact: bool = True

    @property
    def text(self) -> str:
        return self.prompt + self.answer


@dataclass(frozen=True)
class Domain:
    """A sub-language: its sampling weight, a generator of examples, and the rule that checks an answer."""

    name: str
    weight: float
    sample: Callable[[random.Random], Example] = field(repr=False)
    check: Callable[[Example, str], bool] = field(repr=False)


def _distinct_choices(
    rng: random.Random, answer: str, candidates: list[str], n: int = 4
) -> tuple[tuple[str, ...], int]:
    """``n`` distinct options of ``answer``'s length, the answer among them at a uniformly random position."""
    pool = [c for c in dict.fromkeys(candidates) if c != answer and len(c) == len(answer)]
    if len(pool) < n - 1:
        raise RuntimeError(f"not enough distractors for {answer!r}: {pool}")
    options = [answer, *rng.sample(pool, n - 1)]
    rng.shuffle(options)
    return tuple(options), options.index(answer)


def _exact(example: Example, generated: str) -> bool:
    return generated.strip() == example.answer


def _arith(rng: random.Random) -> Example:
    a, b = rng.randint(0, 19), rng.randint(0, 9)
    answer = f"{a + b:02d}"
    near = [f"{a + b + d:02d}" for d in (-3, -2, -1, 1, 2, 3, 10, -10) if 0 <= a + b + d <= 99]
    choices, gold = _distinct_choices(rng, answer, near)
    return Example("arith", f"add {a}+{b}=", answer, choices, gold)


def _reverse(rng: random.Random) -> Example:
    xs = "".join(rng.choice(_LETTERS) for _ in range(4))
    answer = xs[::-1]
    perms = {"".join(rng.sample(xs, 4)) for _ in range(24)} | {xs, "".join(rng.choice(_LETTERS) for _ in range(4))}
    perms |= {"".join(rng.choice(_LETTERS) for _ in range(4)) for _ in range(4)}
    choices, gold = _distinct_choices(rng, answer, sorted(perms))
    return Example("reverse", f"rev {xs}>", answer, choices, gold)


def _sort(rng: random.Random) -> Example:
    xs = "".join(str(rng.randint(0, 9)) for _ in range(4))
    answer = "".join(sorted(xs))
    perms = {"".join(rng.sample(xs, 4)) for _ in range(24)}
    perms |= {"".join(sorted(str(rng.randint(0, 9)) for _ in range(4))) for _ in range(6)}
    choices, gold = _distinct_choices(rng, answer, sorted(perms))
    return Example("sort", f"sort {xs}>", answer, choices, gold)


def _brackets(rng: random.Random) -> Example:
    n = rng.randint(2, 4)
    kinds = [rng.randrange(4) for _ in range(n)]
    opened = "".join(_OPEN[k] for k in kinds)
    answer = "".join(_CLOSE[k] for k in reversed(kinds))
    wrong = {"".join(rng.sample(answer, n)) for _ in range(12)}
    wrong |= {"".join(rng.choice(_CLOSE) for _ in range(n)) for _ in range(12)}
    choices, gold = _distinct_choices(rng, answer, sorted(wrong))
    return Example("brackets", f"close {opened}:", answer, choices, gold)


def _kv(rng: random.Random) -> Example:
    keys = rng.sample(_KEYS, rng.randint(2, 3))
    values = [str(rng.randint(0, 9)) for _ in keys]
    query = rng.randrange(len(keys))
    pairs = ",".join(f"{k}={v}" for k, v in zip(keys, values, strict=True))
    answer = values[query]
    choices, gold = _distinct_choices(rng, answer, [*values, *(str(d) for d in rng.sample(range(10), 10))])
    return Example("kv", f"kv {pairs};{keys[query]}?", answer, choices, gold)


def _code(rng: random.Random) -> Example:
    fn = rng.choice(("max", "min", "len"))
    args = [rng.randint(0, 9) for _ in range(rng.randint(2, 4))]
    value = {"max": max, "min": min, "len": len}[fn](args)
    answer = str(value)
    candidates = [str(a) for a in args] + [str(d) for d in rng.sample(range(10), 10)]
    choices, gold = _distinct_choices(rng, answer, candidates)
    return Example("code", f"print({fn}({','.join(map(str, args))}))=", answer, choices, gold)


def _prose(rng: random.Random) -> Example:
    words = [rng.choice(_PROSE_CLASSES[c]) for c in _PROSE_TEMPLATE]
    slot = rng.randint(1, len(words) - 1)
    answer = words[slot]
    right_class = _PROSE_TEMPLATE[slot]
    # One option a class: exactly one option has the class the grammar wants at this slot.
    options = [answer] + [rng.choice(_PROSE_CLASSES[c]) for c in _PROSE_CLASSES if c != right_class]
    rng.shuffle(options)
    prompt = " ".join(words[:slot]) + " "
    rest = "".join(" " + w for w in words[slot + 1 :]) + "."
    # The line continues after the answer; the example's answer is the word at the slot.
    return _ProseExample("prose", prompt, answer, tuple(options), options.index(answer), False, rest=rest)


@dataclass(frozen=True)
class _ProseExample(Example):
    """A prose item: the full sentence continues after the asked word."""

    rest: str = ""

    @property
    def text(self) -> str:
        return self.prompt + self.answer + self.rest


def _prose_check(example: Example, generated: str) -> bool:
    slot = example.prompt.count(" ")
    word = generated[:3]
    return word in _PROSE_CLASSES[_PROSE_TEMPLATE[slot]]


# Unequal frequencies: prose and code are common; reversal and sorting are rare.
DOMAINS: dict[str, Domain] = {
    d.name: d
    for d in (
        Domain("prose", 0.28, _prose, _prose_check),
        Domain("code", 0.20, _code, _exact),
        Domain("arith", 0.17, _arith, _exact),
        Domain("kv", 0.13, _kv, _exact),
        Domain("brackets", 0.10, _brackets, _exact),
        Domain("reverse", 0.07, _reverse, _exact),
        Domain("sort", 0.05, _sort, _exact),
    )
}
SPLITS = ("train", "calibration", "test")


def _rng(seed: int, split: str, *extra: object) -> random.Random:
    if split not in SPLITS:
        raise ConfigError(f"split={split!r} is not a zoo split; use one of {SPLITS}")
    return random.Random("|".join(map(str, ("diep-zoo", seed, split, *extra))))


def check_domains(domains: list[str] | tuple[str, ...] | None) -> list[str]:
    """Validate a list of domain names (None = all), naming the unknown ones and the allowed ones."""
    if domains is None:
        return list(DOMAINS)
    unknown = [d for d in domains if d not in DOMAINS]
    if unknown:
        raise ConfigError(f"unknown zoo domain(s) {unknown}; available: {sorted(DOMAINS)}")
    return list(domains)


def sample_examples(domain: str, num: int, *, seed: int = 0, split: str = "test") -> list[Example]:
    """``num`` examples of one domain, deterministic for (seed, split, domain)."""
    (domain,) = check_domains([domain])
    rng = _rng(seed, split, domain)
    return [DOMAINS[domain].sample(rng) for _ in range(num)]


def sample_lines(num: int, *, seed: int = 0, split: str = "train", start: int = 0) -> list[str]:
    """``num`` corpus lines in domain proportions; line ``start + i`` depends only on (seed, split, index).

    Indexing lines lets training draw batch ``s`` without generating the batches before it.
    """
    names = list(DOMAINS)
    weights = [DOMAINS[n].weight for n in names]
    lines = []
    for i in range(start, start + num):
        rng = _rng(seed, split, "line", i)
        (name,) = rng.choices(names, weights)
        lines.append(DOMAINS[name].sample(rng).text)
    return lines


def corpus_texts(num: int, *, seed: int = 0, split: str = "calibration", lines_per_text: int = 8) -> list[str]:
    """``num`` documents of ``lines_per_text`` lines each (joined by newlines), e.g. calibration data."""
    if num < 1 or lines_per_text < 1:
        raise ConfigError(f"num={num} and lines_per_text={lines_per_text} must both be >= 1")
    lines = sample_lines(num * lines_per_text, seed=seed, split=split)
    return ["\n".join(lines[i : i + lines_per_text]) + "\n" for i in range(0, len(lines), lines_per_text)]


SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
CHARACTERS = "\n abcdefghijklmnopqrstuvwxyz0123456789+=;:,?.()[]{}<>"


def build_tokenizer():
    """A character-level tokenizer over the zoo alphabet, built offline (``tokenizers`` BPE with no merges).

    Every character is one token, so that a context and its continuation tokenise independently (what
    log-likelihood multiple choice assumes). No BOS is added: lines appear at sequence starts in training.
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {t: i for i, t in enumerate((*SPECIAL_TOKENS, *CHARACTERS))}
    assert len(vocab) == len(SPECIAL_TOKENS) + len(CHARACTERS), "duplicate characters in the zoo alphabet"
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        model_max_length=1024,
        clean_up_tokenization_spaces=False,
    )
