"""Evaluation of a (pruned) zoo model: per-domain held-out loss, multiple choice and exact match.

Scoring is split from the model: every metric is computed from a *scorer*, an object with
``loglikelihood(pairs) -> list[float]`` (sum of log-probabilities of each continuation given its context, as in
lm-eval) and ``generate(prompts, max_new_tokens) -> list[str]`` (greedy). :class:`ModelScorer` wraps a
transformers causal LM; :class:`OracleScorer` knows the answers (it scores 100%) and :class:`UniformScorer`
gives every token the same probability (it scores chance), which is how the metrics themselves are tested.

- loss: mean negative log-likelihood per character of held-out lines of a domain, first character excluded
  (the zoo tokenizer is char-level, so this is the per-token loss);
- multiple choice (like MMLU): a prompt and four equal-length candidate answers, one right; the prediction is
  the candidate with the highest log-likelihood (ties go to the first candidate);
- exact match: greedy generation up to a newline, compared with the answer (for prose, whose right answers
  are many, the generated word's class is checked instead);
- macro averages over domains, and retention = pruned / unpruned per metric.

The same items are written as lm-eval tasks from local files (:func:`write_lm_eval_tasks`), so that the
project's lm-eval path (``diep_hub.evaluation.run_lm_eval``) can score them too; :func:`run_lm_eval_tasks`
runs them.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import torch

from ..errors import ConfigError
from ..machine import machine_description
from . import domains as zoo_domains
from .domains import DOMAINS, Example

logger = logging.getLogger(__name__)

METRICS = ("mc_acc", "em_acc", "loss")


class Scorer(Protocol):
    """What the metrics need from a language model."""

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[float]: ...

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]: ...


def eval_items(num: int = 100, *, seed: int = 0, domains: Sequence[str] | None = None) -> dict[str, list[Example]]:
    """Held-out items (the ``test`` split, disjoint from training) per domain."""
    if num < 1:
        raise ConfigError(f"num={num} must be >= 1")
    return {d: zoo_domains.sample_examples(d, num, seed=seed, split="test") for d in zoo_domains.check_domains(domains)}


def multiple_choice_outcomes(scorer: Scorer, items: dict[str, list[Example]]) -> dict[str, list[bool]]:
    """Per domain, whether each item was answered right: the candidate with the highest log-likelihood (the first
    of equal ones) must be the gold one. Item by item, so that two models can be compared on the same items."""
    pairs = [(ex.prompt, choice) for exs in items.values() for ex in exs for choice in ex.choices]
    scores = iter(scorer.loglikelihood(pairs))
    result = {}
    for domain, exs in items.items():
        outcomes = []
        for ex in exs:
            lls = [next(scores) for _ in ex.choices]
            outcomes.append(max(range(len(lls)), key=lambda i: (lls[i], -i)) == ex.gold)
        result[domain] = outcomes
    return result


def score_multiple_choice(scorer: Scorer, items: dict[str, list[Example]]) -> dict[str, float]:
    """Accuracy per domain (:func:`multiple_choice_outcomes`, averaged)."""
    return {d: sum(o) / len(o) for d, o in multiple_choice_outcomes(scorer, items).items()}


def score_exact_match(scorer: Scorer, items: dict[str, list[Example]]) -> dict[str, float]:
    """Accuracy per domain of greedy generation, checked by the domain's rule."""
    result = {}
    for domain, exs in items.items():
        max_new = max(len(ex.answer) for ex in exs) + 1
        outputs = scorer.generate([ex.prompt for ex in exs], max_new)
        checks = [DOMAINS[domain].check(ex, out.split("\n")[0]) for ex, out in zip(exs, outputs, strict=True)]
        result[domain] = sum(checks) / len(exs)
    return result


def domain_losses(scorer: Scorer, lines: dict[str, list[str]]) -> dict[str, float]:
    """Mean negative log-likelihood per character (first character excluded) of each domain's lines."""
    pairs = [(line[:1], line[1:]) for ls in lines.values() for line in ls]
    lls = iter(scorer.loglikelihood(pairs))
    return {d: -sum(next(lls) for _ in ls) / sum(len(line) - 1 for line in ls) for d, ls in lines.items()}


def evaluate_zoo(
    model_or_scorer,
    tokenizer=None,
    *,
    num_mc: int = 100,
    num_em: int = 50,
    num_loss: int = 100,
    seed: int = 0,
    batch_size: int = 128,
    domains: Sequence[str] | None = None,
) -> dict:
    """Every zoo metric of a model (with its tokenizer) or of a :class:`Scorer`.

    Returns ``{"domains": {domain: {"loss", "mc_acc", "em_acc"}}, "macro": {...}}``; metrics asked with
    ``num_* = 0`` are left out.
    """
    names = zoo_domains.check_domains(domains)
    if min(num_mc, num_em, num_loss) < 0 or max(num_mc, num_em, num_loss) == 0:
        raise ConfigError(f"num_mc={num_mc}, num_em={num_em}, num_loss={num_loss}: all >= 0, at least one > 0")
    scorer = model_or_scorer if tokenizer is None else ModelScorer(model_or_scorer, tokenizer, batch_size=batch_size)
    per: dict[str, dict[str, float]] = defaultdict(dict)
    if num_mc:
        for d, v in score_multiple_choice(scorer, eval_items(num_mc, seed=seed, domains=names)).items():
            per[d]["mc_acc"] = v
    if num_em:
        items = eval_items(num_em, seed=seed + 1, domains=names)
        for d, v in score_exact_match(scorer, items).items():
            per[d]["em_acc"] = v
    if num_loss:
        lines = {d: [ex.text for ex in exs] for d, exs in eval_items(num_loss, seed=seed + 2, domains=names).items()}
        for d, v in domain_losses(scorer, lines).items():
            per[d]["loss"] = v
    metrics = [m for m in METRICS if m in per[names[0]]]
    macro = {m: sum(per[d][m] for d in names) / len(names) for m in metrics}
    return {"domains": {d: dict(per[d]) for d in names}, "macro": macro}


def retention(pruned: dict, base: dict) -> dict[str, float]:
    """Pruned / unpruned for the macro accuracies; for loss, unpruned / pruned (so that 1.0 = nothing lost)."""
    out = {}
    for metric, value in pruned["macro"].items():
        ref = base["macro"].get(metric)
        if ref is None:
            continue
        if metric == "loss":
            out[metric] = ref / value if value > 0 else float("nan")
        else:
            out[metric] = value / ref if ref > 0 else float("nan")
    return out


class ModelScorer:
    """A transformers causal LM as a :class:`Scorer` (CPU, no gradients, right padding without a mask).

    Right padding is exact for causal models: a real token only attends to earlier (real) tokens, and MoE
    routing is per token, so pad positions cannot change real ones.
    """

    def __init__(self, model, tokenizer, *, batch_size: int = 128) -> None:
        if batch_size < 1:
            raise ConfigError(f"batch_size={batch_size} must be >= 1")
        self.model, self.tokenizer, self.batch_size = model, tokenizer, batch_size
        self.pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @torch.no_grad()
    def _logprobs(self, rows: list[list[int]]) -> torch.Tensor:
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r)
        logits = self.model(input_ids=ids).logits.float()
        return torch.log_softmax(logits, dim=-1)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        encoded = []
        for context, continuation in pairs:
            if not context:
                raise ConfigError("an empty context cannot be scored: the zoo models have no BOS token")
            encoded.append((self._encode(context), self._encode(continuation)))
        order = sorted(range(len(encoded)), key=lambda i: len(encoded[i][0]) + len(encoded[i][1]))
        out = [0.0] * len(encoded)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start : start + self.batch_size]
            rows = [encoded[i][0] + encoded[i][1] for i in chunk]
            logprobs = self._logprobs(rows)
            for b, i in enumerate(chunk):
                ctx, cont = encoded[i]
                positions = torch.arange(len(ctx) - 1, len(ctx) + len(cont) - 1)
                out[i] = logprobs[b, positions, torch.tensor(cont)].sum().item()
        return out

    @torch.no_grad()
    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        """Greedy decoding, prompts grouped by length so that no padding is needed."""
        newline = self._encode("\n")
        groups: dict[int, list[int]] = defaultdict(list)
        encoded = [self._encode(p) for p in prompts]
        for i, ids in enumerate(encoded):
            groups[len(ids)].append(i)
        out = [""] * len(prompts)
        for indices in groups.values():
            for start in range(0, len(indices), self.batch_size):
                chunk = indices[start : start + self.batch_size]
                ids = torch.tensor([encoded[i] for i in chunk])
                prompt_len = ids.shape[1]
                for _ in range(max_new_tokens):
                    next_ids = self.model(input_ids=ids).logits[:, -1].argmax(-1, keepdim=True)
                    ids = torch.cat([ids, next_ids], dim=1)
                    if newline and bool((ids[:, prompt_len:] == newline[0]).any(dim=1).all()):
                        break
                for b, i in enumerate(chunk):
                    out[i] = self.tokenizer.decode(ids[b, prompt_len:].tolist(), skip_special_tokens=True)
        return out


class OracleScorer:
    """Knows the rule of every domain: a continuation the rule accepts (or a known line) scores 0, else -100."""

    def __init__(self, items: dict[str, list[Example]] | None = None) -> None:
        self.by_prompt: dict[str, Example] = {}
        self.lines: set[str] = set()
        if items is not None:
            self.add(items)

    def add(self, items: dict[str, list[Example]]) -> OracleScorer:
        for exs in items.values():
            for ex in exs:
                self.by_prompt[ex.prompt] = ex
                self.lines.add(ex.text)
        return self

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        out = []
        for context, continuation in pairs:
            ex = self.by_prompt.get(context)
            ok = (context + continuation in self.lines) or (
                ex is not None and DOMAINS[ex.domain].check(ex, continuation)
            )
            out.append(0.0 if ok else -100.0)
        return out

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return [(self.by_prompt[p].answer + "\n")[:max_new_tokens] for p in prompts]


class UniformScorer:
    """Every token equally likely (vocabulary ``vocab_size``): what an untrained, uninformed model scores."""

    def __init__(self, vocab_size: int) -> None:
        self.log_p = -math.log(vocab_size)

    def loglikelihood(self, pairs: Sequence[tuple[str, str]]) -> list[float]:
        return [len(continuation) * self.log_p for _, continuation in pairs]

    def generate(self, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
        return ["" for _ in prompts]  # argmax of a flat distribution is token 0, a special token


def write_lm_eval_tasks(
    folder: str | os.PathLike, *, num: int = 100, seed: int = 0, domains: Sequence[str] | None = None
) -> list[str]:
    """Write the zoo items as lm-eval tasks (YAML + jsonl, absolute data paths) into ``folder``.

    Per domain: ``zoo_<domain>_mc`` (multiple_choice, acc) and, for rule-exact domains, ``zoo_<domain>_em``
    (generate_until, exact_match). The items are those :func:`evaluate_zoo` scores (same seeds), so the two
    paths can be compared. Returns the task names; pass ``folder`` as lm-eval's ``include_path``.
    """
    folder = Path(folder).resolve()
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    mc_items = eval_items(num, seed=seed, domains=domains)
    em_items = eval_items(num, seed=seed + 1, domains=domains)
    common = "dataset_path: json\ntest_split: test\nmetadata:\n  version: 1.0\n"
    for domain, exs in mc_items.items():
        data = folder / f"zoo_{domain}_mc.jsonl"
        rows = [{"prompt": ex.prompt, "choices": list(ex.choices), "gold": ex.gold} for ex in exs]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        task = f"zoo_{domain}_mc"
        (folder / f"{task}.yaml").write_text(
            f"task: {task}\n{common}"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            "output_type: multiple_choice\ndoc_to_text: prompt\ndoc_to_choice: choices\ndoc_to_target: gold\n"
            'target_delimiter: ""\n'
            "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n",
            encoding="utf-8",
        )
        names.append(task)
    for domain, exs in em_items.items():
        if not all(ex.exact for ex in exs):
            continue
        data = folder / f"zoo_{domain}_em.jsonl"
        rows = [{"prompt": ex.prompt, "answer": ex.answer} for ex in exs]
        data.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        task = f"zoo_{domain}_em"
        max_new = max(len(ex.answer) for ex in exs) + 1
        (folder / f"{task}.yaml").write_text(
            f"task: {task}\n{common}"
            f"dataset_kwargs:\n  data_files:\n    test: {json.dumps(str(data))}\n"
            "output_type: generate_until\ndoc_to_text: prompt\ndoc_to_target: answer\n"
            'target_delimiter: ""\n'
            'generation_kwargs:\n  until: ["\\n"]\n  do_sample: false\n'
            f"  max_gen_toks: {max_new}\n"
            "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n",
            encoding="utf-8",
        )
        names.append(task)
    return names


def run_lm_eval_tasks(
    model, tokenizer, folder: str | os.PathLike, tasks: Sequence[str], *, limit: int | None = None, batch_size: int = 32
) -> dict[str, dict]:
    """Run zoo tasks written by :func:`write_lm_eval_tasks` through lm-eval; ``{task: {metric: value}}``.

    Goes through ``diep_hub.evaluation.run_lm_eval``, the project's one lm-eval path (the same one that serves
    real benchmarks such as MMLU).
    """
    from ..evaluation import run_lm_eval

    results = run_lm_eval(model, tokenizer, list(tasks), include_path=str(folder), limit=limit, batch_size=batch_size)
    raw = {name: entry["metrics"] for name, entry in results["tasks"].items()}
    return {
        task: {k.split(",")[0]: v for k, v in metrics.items() if k.split(",")[0] in ("acc", "exact_match")}
        for task, metrics in raw.items()
        if task in tasks
    }


def zoo_markdown(rows: list[tuple[str, dict]], *, command: str) -> str:
    """The ZOO.md table: per model and domain, loss, multiple-choice and exact-match accuracy."""
    vocab = len(zoo_domains.build_tokenizer())
    lines = [
        "# Reference model zoo: per-domain quality of the trained models",
        "",
        f"Command: `{command}`.  ",
        f"Machine: {machine_description()}.  ",
        "Held-out items (test split, seed 0): 100 multiple-choice items (4 options: chance 25%), 50 exact-match items",
        "(chance ~0) and 100 lines (loss, nats per character; a uniform model scores "
        f"ln({vocab}) = {math.log(vocab):.2f}) per domain.",
        "",
    ]
    for name, result in rows:
        lines += [f"## {name}", ""]
        extra = ", ".join(
            f"{k}: {v}" for k, v in result.items() if k not in ("domains", "macro") and v is not None
        )
        if extra:
            lines += [extra, ""]
        lines += ["| domain | weight | loss | MC acc | EM acc |", "|---|---|---|---|---|"]
        for d, m in result["domains"].items():
            lines.append(
                f"| {d} | {DOMAINS[d].weight:.2f} | {m.get('loss', float('nan')):.3f} | "
                f"{m.get('mc_acc', float('nan')):.2f} | {m.get('em_acc', float('nan')):.2f} |"
            )
        mac = result["macro"]
        lines.append(
            f"| **macro** | | {mac.get('loss', float('nan')):.3f} | {mac.get('mc_acc', float('nan')):.2f} | "
            f"{mac.get('em_acc', float('nan')):.2f} |"
        )
        lines.append("")
    return "\n".join(lines)
