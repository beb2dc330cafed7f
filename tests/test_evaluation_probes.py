"""Evaluation probes and plumbing: speed, perplexity against a hand computation, the peak-memory meters, the one
JSON conversion, and bad arguments refused before any work."""

from __future__ import annotations

import json
import math

import pytest
import torch

from diep_hub.errors import ConfigError
from diep_hub.evaluation import (
    evaluate_model,
    measure_memory,
    measure_speed,
    perplexity_of_ids,
    run_lm_eval,
)
from tests.helpers.tiny_models import tiny_model
from tests.helpers.word_tokenizer import tiny_texts, tiny_tokenizer


def test_speed_probe_reports_consistent_throughput():
    model = tiny_model("mixtral")
    speed = measure_speed(model, batch_size=2, prompt_len=8, new_tokens=3, repeats=2)
    assert speed["prefill_tokens_per_s"] == pytest.approx(16 / speed["prefill_seconds"])
    assert speed["decode_tokens_per_s"] == pytest.approx(6 / speed["decode_seconds"])
    assert speed["prefill_seconds"] > 0 and speed["decode_seconds"] > 0
    with pytest.raises(ConfigError, match="new_tokens=0"):
        measure_speed(model, new_tokens=0)
    with pytest.raises(ConfigError, match="seq_len"):
        measure_memory(model, seq_len=-1)


def test_perplexity_matches_hand_computation():
    model = tiny_model("qwen3_moe")
    ids = torch.randint(3, 96, (3, 10), generator=torch.Generator().manual_seed(0))
    result = perplexity_of_ids(model, ids, batch_size=2)
    with torch.no_grad():
        logits = model(ids).logits
    nll = torch.nn.functional.cross_entropy(logits[:, :-1].reshape(-1, 96), ids[:, 1:].reshape(-1))
    assert result["tokens"] == 27
    assert result["perplexity"] == pytest.approx(math.exp(nll.item()), rel=1e-5)


def test_evaluate_model_perplexity_from_text_source():
    model = tiny_model("mixtral")
    tokenizer = tiny_tokenizer()
    spec = {"source": tiny_texts(8, 20), "num_samples": 4, "seq_len": 12}
    out = evaluate_model(model, tokenizer, tasks=[], perplexity_data=spec, speed=False, memory=False, seed=5)
    assert out["lm_eval"] is None and out["speed"] is None and out["memory"] is None
    from diep_hub.calibration import load_calibration_data

    ids = load_calibration_data(spec["source"], tokenizer, num_samples=4, seq_len=12, seed=5)
    assert out["perplexity"]["perplexity"] == pytest.approx(perplexity_of_ids(model, ids)["perplexity"], rel=1e-6)
    assert out["perplexity"]["num_samples"] == 4 and out["perplexity"]["seq_len"] == 12


def test_bad_arguments_are_refused_before_work(tmp_path):
    model, tokenizer = tiny_model("mixtral"), tiny_tokenizer()
    with pytest.raises(ConfigError, match="must be a list of lm-eval task names"):
        run_lm_eval(model, tokenizer, "boolq")
    with pytest.raises(ConfigError, match="limit=0"):
        run_lm_eval(model, tokenizer, ["boolq"], limit=0)
    with pytest.raises(ConfigError, match="limit=1.5"):
        run_lm_eval(model, tokenizer, ["boolq"], limit=1.5)
    with pytest.raises(ConfigError, match="num_fewshot=-1"):
        run_lm_eval(model, tokenizer, ["boolq"], num_fewshot=-1)
    with pytest.raises(ConfigError, match="include_path="):
        run_lm_eval(model, tokenizer, ["boolq"], include_path=tmp_path / "nope")
    with pytest.raises(ConfigError, match="tasks is empty"):
        run_lm_eval(model, tokenizer, [])
    with pytest.raises(ConfigError, match="not both"):
        evaluate_model(model, tokenizer, tasks=[], perplexity_data=["a"], perplexity=["a"])
    with pytest.raises(ConfigError, match="speed="):
        evaluate_model(model, tokenizer, tasks=[], speed="fast")
    with pytest.raises(ConfigError, match="allowed keys"):
        evaluate_model(model, tokenizer, tasks=[], perplexity={"source": ["x"], "bogus": 1}, speed=False,
                       memory=False)


def test_to_jsonable_is_the_one_json_conversion(tmp_path):
    """Reports, evaluation results and saved summaries share one conversion: values, not just 'it dumps'."""
    import numpy as np

    from diep_hub import pruner, runner
    from diep_hub.evaluation import results
    from diep_hub.jsonable import to_jsonable

    assert results.to_jsonable is to_jsonable and pruner.to_jsonable is to_jsonable
    assert runner.to_jsonable is to_jsonable
    value = {1: torch.tensor([1.5, float("nan")]), "n": np.int64(3), "f": np.float32(0.25), "p": tmp_path,
             "t": (torch.tensor(2), float("inf")), "none": None, "ok": True}
    assert to_jsonable(value) == {"1": [1.5, "nan"], "n": 3, "f": 0.25, "p": str(tmp_path), "t": [2, "inf"],
                                  "none": None, "ok": True}
    assert json.loads(json.dumps(to_jsonable(value), allow_nan=False)) == to_jsonable(value)


def test_peak_memory_is_one_meter_for_report_and_probe():
    """The evaluation probe's PeakMemory is the pruning report's one; on CPU its bytes are RSS and see a block."""
    from diep_hub.evaluation import PeakMemory as EvaluationPeakMemory
    from diep_hub.memory import PeakMemory

    assert EvaluationPeakMemory is PeakMemory
    size = 64 * 1024 * 1024
    with PeakMemory("cpu") as peak:
        block = torch.ones(size // 4)  # 64 MiB, written so the pages are resident
        peak.measure()
        del block
    assert not peak.cuda and peak.start_bytes == peak.start_rss and peak.peak_bytes == peak.peak_rss
    assert peak.peak_bytes - peak.start_bytes >= size * 0.9
    summary = peak.summary()
    assert summary["cpu_rss_peak_bytes"] == peak.peak_rss and "cuda_max_memory_allocated_bytes" not in summary
    if peak.heap_increase is not None:
        assert summary["cpu_heap_peak_increase_bytes"] >= size * 0.9


def test_forward_meter_counts_what_the_block_allocates_at_its_peak():
    """12 MB live at the peak (4 + 8 MB, then 4 freed and 2 allocated): the meter reads it after every op."""
    from diep_hub.evaluation.probes import ForwardMemoryMeter
    from diep_hub.memory import live_heap_bytes

    if live_heap_bytes is None:
        pytest.skip("malloc's live bytes are readable on glibc only")

    def block():
        a = torch.ones(1_000_000)
        b = torch.ones(2_000_000)
        del a
        c = torch.ones(500_000)
        return float(b.sum() + c.sum())

    with torch.inference_mode():
        with ForwardMemoryMeter():  # warm-up: the dispatch machinery's one-time allocations
            block()
        with ForwardMemoryMeter() as meter:
            block()
    assert 12_000_000 <= meter.peak_increase <= 12_000_000 + 256 * 1024, meter.peak_increase
