"""The dry run's cost model: time and peak memory of a run from its parameter counts and settings.

The formula is stated in :mod:`diep_hub.dry_run`'s docstring; its constants (:data:`DEVICE_COSTS`) were fitted on
the measured runs in :data:`CALIBRATION` (how close it came: docs/dry-run.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class DeviceCosts:
    """The measured constants of :func:`cost_model` for one device kind."""

    kind: str
    flops_per_second: float  # R: effective throughput of the run's torch work
    fixed_seconds: float  # T0: process start and imports, lm-eval task index, card figures, saving
    seconds_per_evaluation: float  # Te: lm-eval's own overhead per evaluated model (tasks, requests, metrics)
    baseline_bytes: float  # M0: resident memory with torch, transformers, lm-eval and datasets imported
    weight_copies: float  # k: copies of the weights alive at the peak
    measured: str  # where the constants come from
    build_seconds: float = 0.0  # Tb: building diep-hub/tiny-mixtral (trained at load time) instead of reading it
    # merging's neuron alignment (diep_hub.merge_alignment), per merged expert: a float64 affinity matmul and one
    # Hungarian assignment on the host CPU (scipy), whatever the device
    float64_flops_per_second: float = 20e9  # R64
    assignment_seconds_per_n2: float = 1.7e-7  # a: seconds of one I x I assignment per I^2


#: Constants per device kind. CPU: fitted on `diep-hub run` of three recipe sizes (:data:`CALIBRATION`: 0.65 M,
#: 13 M and 107 M parameters) with OMP_NUM_THREADS=1 on a shared 2-core machine, CPU time (user + sys) and maximum
#: RSS from /usr/bin/time -v, each measured twice; Te from the evaluation stage times (docs/dry-run.md).
#: CUDA: not measured on a GPU; the values are an assumption and the output says so.
DEVICE_COSTS: dict[str, DeviceCosts] = {
    "cpu": DeviceCosts(
        kind="cpu", flops_per_second=39e9, fixed_seconds=16.3, seconds_per_evaluation=3.3,
        baseline_bytes=568 * 2**20, weight_copies=2.0, build_seconds=41.0,
        # R64 = R x 0.53 and a = 2 x 8.5e-8 s: float64 against float32 matmul and the assignment measured on an idle
        # AMD EPYC, scaled to R's machine by 2, the factor between them on the counted passes (docs/dry-run.md, 4)
        float64_flops_per_second=20e9, assignment_seconds_per_n2=1.7e-7,
        measured="measured on 1 CPU thread, CPU time (user + sys), 3 recipe sizes, on a loaded shared machine: "
                 "an idle 2-core AMD EPYC ran the fitted recipes in 0.5-0.7 of the estimate (docs/dry-run.md, "
                 "section 4)",
    ),
    "cuda": DeviceCosts(
        kind="cuda", flops_per_second=100e12, fixed_seconds=30.0, seconds_per_evaluation=10.0,
        baseline_bytes=0, weight_copies=1.2, float64_flops_per_second=10e12, assignment_seconds_per_n2=8.5e-8,
        measured="NOT measured: assumed 100 TFLOP/s effective; the peak is GPU memory without the process",
    ),
}

#: How far the CPU constants may put a calibration run's estimate from its measurement (docs/dry-run.md).
TIME_TOLERANCE, MEMORY_TOLERANCE = 0.15, 0.08

_SMALL = dict(bytes_per_param=4, search_tokens=2048, search_passes=13, eval_tokens=1024, evaluations=2,
              skipping_tokens=512, batch_size=8, seq_len=64, vocab_size=36, eval_batch_size=16, eval_seq_len=64)
#: The measured runs behind the CPU constants: recipes/tiny.yaml, and the same recipe on random Mixtral-type models
#: (hidden 256 / intermediate 512 / 4 layers and 512 / 1024 / 8 layers, 8 experts top-2). CPU seconds and maximum
#: RSS are the means of two runs; tests/test_dry_run.py checks the model against them.
CALIBRATION: tuple[dict[str, Any], ...] = (
    # re-measured once (19:10, 2026-12-02) for the 600-step tiny model, its cache empty: training took 41 s of it
    {"name": "tiny (0.65 M parameters)", "cpu_seconds": 60.7, "max_rss_bytes": 618_792 * 1024,
     "inputs": dict(_SMALL, params_total=646_208, params_active=203_840, params_search=203_840, num_layers=4,
                    hidden_size=64, expert_width=192, search_parameters=64, builds_model=True)},
    {"name": "mid (13.4 M parameters)", "cpu_seconds": 28.8, "max_rss_bytes": 714_498 * 1024,
     "inputs": dict(_SMALL, params_total=13_398_272, params_active=3_961_088, params_search=3_961_088, num_layers=4,
                    hidden_size=256, expert_width=1024, search_parameters=64)},
    {"name": "large (107 M parameters)", "cpu_seconds": 69.8, "max_rss_bytes": 1_631_508 * 1024,
     "inputs": dict(_SMALL, params_total=107_033_088, params_active=31_535_616, params_search=31_535_616,
                    num_layers=8, hidden_size=512, expert_width=2048, search_parameters=128)},
)


@dataclass(frozen=True)
class CostInputs:
    """What the cost model reads, all taken from the config and the run's settings."""

    params_total: int
    params_active: int  # per token: top-k experts, attention, embeddings, head
    params_search: int  # per token during the search (all experts in dense mode)
    bytes_per_param: int
    search_tokens: int
    search_passes: int
    eval_tokens: int  # perplexity tokens of one evaluation
    evaluations: int  # 0, 1 (pruned) or 2 (base and pruned)
    skipping_tokens: int
    batch_size: int
    seq_len: int
    num_layers: int
    hidden_size: int
    expert_width: int  # FFN width a token passes through per layer (top-k or all experts x intermediate)
    vocab_size: int
    eval_batch_size: int
    eval_seq_len: int
    search_parameters: int  # the search's own trainable parameters (DiEP's alpha and beta)
    builds_model: bool = False  # the load stage trains the model (diep-hub/tiny-mixtral) rather than reading it
    cache_bytes: int = 0  # what the criterion keeps to avoid recomputing (validated_choice's MaskedKL caches)
    # the edits between selection and surgery's end (merging, router recalibration); 0 when the run has none
    edit_passes: float = 0.0  # passes of the active parameters over the calibration tokens
    merge_tokens: int = 0  # tokens per MoE layer on which merging runs every expert (its similarity)
    params_experts: int = 0  # every routed expert's parameters: what merging runs on merge_tokens
    teacher_bytes: int = 0  # recalibration's copy of the unpruned model's final hidden states
    aligned_merges: int = 0  # merged experts whose neurons merging aligns first (align="weights", gated layout)
    align_width: int = 0  # I: an aligned expert's intermediate neurons
    align_features: int = 0  # a neuron's features: its gate row, up row and down column (3 x hidden)


#: activation values a decoder layer keeps per token for the backward pass, in units of hidden_size (norms,
#: q/k/v/o, residuals), on top of 3 x the expert width (gate, up, act) - a stated approximation.
ACT_HIDDEN_UNITS = 12


def cost_model(x: CostInputs, c: DeviceCosts) -> dict[str, float]:
    """Time (seconds) and peak memory (bytes) of a run, by the formula in :mod:`diep_hub.dry_run`'s docstring."""
    search_flops = 2.0 * x.params_search * x.search_tokens * x.search_passes
    other_flops = 2.0 * x.params_active * (x.eval_tokens * x.evaluations + x.skipping_tokens)
    edit_flops = 2.0 * (x.params_active * x.search_tokens * x.edit_passes + x.params_experts * x.merge_tokens)
    compute = (search_flops + other_flops + edit_flops) / c.flops_per_second
    alignment = x.aligned_merges * (2.0 * x.align_width**2 * x.align_features / c.float64_flops_per_second
                                    + c.assignment_seconds_per_n2 * x.align_width**2)
    build = c.build_seconds if x.builds_model else 0.0
    seconds = c.fixed_seconds + build + c.seconds_per_evaluation * x.evaluations + compute + alignment
    weights = x.params_total * x.bytes_per_param
    search_act = x.batch_size * x.seq_len * (
        x.num_layers * (ACT_HIDDEN_UNITS * x.hidden_size + 3 * x.expert_width) + 2 * x.vocab_size) * 4
    eval_act = x.eval_batch_size * x.eval_seq_len * 2 * x.vocab_size * 4  # logits and their log-softmax
    optimizer = 4 * 4 * x.search_parameters  # value, gradient, Adam's two moments, fp32
    peak = (c.baseline_bytes + c.weight_copies * weights + max(search_act, eval_act) + optimizer + x.cache_bytes
            + x.teacher_bytes + _alignment_bytes(x))
    return {
        "seconds": seconds,
        "search_seconds": search_flops / c.flops_per_second,
        "edit_seconds": edit_flops / c.flops_per_second + alignment,
        "alignment_seconds": alignment,
        "flops": search_flops + other_flops + edit_flops,
        "peak_bytes": peak,
        "weight_bytes": weights,
        "activation_bytes": max(search_act, eval_act),
        "optimizer_bytes": optimizer,
        "cache_bytes": x.cache_bytes,
        "teacher_bytes": x.teacher_bytes,
    }


def _alignment_bytes(x: CostInputs) -> int:
    """One alignment's float64 buffers: both experts' neuron features, the I x I affinity and the negated copy the
    assignment maximises on (0 without alignment)."""
    if not x.aligned_merges:
        return 0
    return 8 * (2 * x.align_width * x.align_features + 2 * x.align_width**2)


def describe_cost_model(c: DeviceCosts, x: CostInputs) -> str:
    """The formula with this run's numbers, for the dry run's output."""
    build = f" + Tb {c.build_seconds:g} s" if x.builds_model else ""
    edits = (f" + N_active x {x.search_tokens:,} calibration tokens x {x.edit_passes:g} merging/recalibration passes "
             f"+ N_experts {x.params_experts:,} x {x.merge_tokens:,} merging tokens"
             if x.edit_passes or x.merge_tokens else "")
    alignment = (f" + {x.aligned_merges} aligned merges x (2 x I {x.align_width:,}^2 x {x.align_features:,} / R64 "
                 f"{c.float64_flops_per_second / 1e9:g} GFLOP/s + a {c.assignment_seconds_per_n2:g} s x I^2)"
                 if x.aligned_merges else "")
    memory_extras = ((" + recalibration's teacher states" if x.teacher_bytes else "")
                     + (" + one alignment's float64 buffers" if x.aligned_merges else ""))
    return (
        f"time = T0 {c.fixed_seconds:g} s{build} + Te {c.seconds_per_evaluation:g} s x {x.evaluations} evaluations + "
        f"2 x (N_search {x.params_search:,} x {x.search_tokens:,} calibration tokens x {x.search_passes} passes + "
        f"N_active {x.params_active:,} x {x.eval_tokens * x.evaluations + x.skipping_tokens:,} evaluation/skipping "
        f"tokens{edits}) / R {c.flops_per_second / 1e9:g} GFLOP/s{alignment}; "
        f"peak = M0 {c.baseline_bytes / 2**20:.0f} MiB + {c.weight_copies:g} x weights + max(search activations, "
        f"evaluation logits) + search optimizer state + criterion caches{memory_extras}; "
        f"{c.kind} constants {c.measured}; lm-eval compute on large tasks is not counted"
    )


__all__ = [
    "ACT_HIDDEN_UNITS",
    "CALIBRATION",
    "DEVICE_COSTS",
    "MEMORY_TOLERANCE",
    "TIME_TOLERANCE",
    "CostInputs",
    "DeviceCosts",
    "cost_model",
    "describe_cost_model",
]
