"""How tests compare two computations of the same maths: one stated tolerance per dtype, plus checks of what
must not change between them (greedy tokens, generated text, skip decisions).

Why: two paths that compute the same function in another way (another load path, another experts backend,
masking instead of surgery, a reload in another process, a sum in another order) agree only up to rounding, and
which rounding depends on the CPU's kernels. Even the same kernels on the same weights can round differently: a
checkpoint loaded from safetensors may hand the model tensors that are only 8-byte aligned, and the SIMD kernels
then split their sums differently than on the 64-byte aligned tensors of the live model (measured on this
project: qwen2_moe fused weights, 6e-8 apart; bit-identical again once the loaded tensors are cloned). So
``torch.equal`` is right only where the computation is literally the same (kept weights vs slices of the
originals, keys, keep maps, counts, decisions made from the same numbers in the same process); everywhere else
compare with ``assert_close_logits`` AND assert the discrete result that must not change.

The tolerance, and why (float32, what the tiny test models use): unit roundoff u = 6e-8. Two paths computing a
float32 forward of the tiny models (4 layers, hidden 32, vocab 96, logits up to ~0.46) differ by a few ulps:
measured over all 293 comparisons these tests make, on AVX2 and on ``ATEN_CPU_CAPABILITY=default`` kernels, at
most 1.5e-7 on logits and 1.2e-7 on routing weights (up to 2.5). A real fault moves them much more: one expert
swapped in one layer moves logits by >= 9.6e-3 in every family, routing weights off by 1% in one layer by
>= 9e-5. rtol = atol = 1e-5 (a bound of 1.5e-5 at the largest logits, ~100 ulps) sits 100x above the rounding
seen and still 6x below that 1% error. The other rows follow "a few ulps of the output, atol of the same size for
values near 0": bf16 (eps 2^-8, every stored intermediate rounded) rtol 4 eps; fp16 (eps 2^-10) rtol 2 eps;
float64 (reference computations, eps 2^-52) 1e-10, room for long float64 sums.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Tolerance:
    """|actual - expected| <= atol + rtol * |expected|, elementwise (torch.testing.assert_close's rule)."""

    rtol: float
    atol: float

    def bound(self, expected: torch.Tensor) -> torch.Tensor:
        return self.atol + self.rtol * expected.abs()


TOLERANCES: dict[torch.dtype, Tolerance] = {
    torch.float64: Tolerance(rtol=1e-10, atol=1e-10),
    torch.float32: Tolerance(rtol=1e-5, atol=1e-5),
    torch.bfloat16: Tolerance(rtol=1.6e-2, atol=1e-2),
    torch.float16: Tolerance(rtol=2e-3, atol=1e-3),
}


def tolerance(dtype: torch.dtype) -> Tolerance:
    if dtype not in TOLERANCES:
        raise KeyError(f"no stated tolerance for {dtype}; known: {sorted(str(d) for d in TOLERANCES)}")
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    """Same shape and dtype, values within the dtype's stated tolerance (any computed tensor: logits, losses,
    routing weights, scores)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    tol = tolerance(expected.dtype)
    torch.testing.assert_close(
        actual, expected, rtol=tol.rtol, atol=tol.atol, msg=lambda m: f"{what} (rtol={tol.rtol}, atol={tol.atol}): {m}"
    )


def assert_close_logits(actual: torch.Tensor, expected: torch.Tensor, what: str = "logits") -> None:
    assert_close(actual, expected, what)


def differs_beyond_tolerance(a: torch.Tensor, b: torch.Tensor) -> bool:
    """True if some element of ``a`` is further from ``b`` than the dtype's tolerance allows: a reference that
    this does not separate from the thing it should differ from would make a closeness check vacuous."""
    return bool(((a - b).abs() > tolerance(b.dtype).bound(b)).any())


def near_tie(best: float, runner_up: float, dtype: torch.dtype = torch.float32) -> bool:
    """True if a best and a runner-up score are so close that another computation of both, each within the
    dtype's tolerance, could order them the other way (the scalar form of ``greedy_margin``'s rule)."""
    tol = tolerance(dtype)
    return best - runner_up <= 2 * (tol.atol + tol.rtol * max(abs(best), abs(runner_up)))


def greedy_margin(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(argmax, top-1 minus top-2 logit, the margin at or below which rounding can swap them) per position [...]

    If two logit rows agree within the dtype's tolerance, their argmax can differ only where the top-1 / top-2
    gap is at most 2 * (atol + rtol * max|logit|): beyond that gap the order is fixed whatever the rounding.
    """
    tol = tolerance(logits.dtype)
    values = logits.float()
    top = values.topk(2, dim=-1)
    margin = top.values[..., 0] - top.values[..., 1]
    flippable = 2 * (tol.atol + tol.rtol * values.abs().amax(dim=-1))
    return top.indices[..., 0], margin, flippable


def assert_same_greedy(
    actual_logits: torch.Tensor,
    expected_logits: torch.Tensor,
    min_margin: float | None = None,
    min_decided: float = 0.9,
) -> int:
    """The greedy token (argmax over the last dim) is the same wherever both sides' top-1 / top-2 margin exceeds
    ``min_margin`` (default: the margin rounding within the dtype's tolerance could flip), and at least
    ``min_decided`` of the positions have that margin, so the check cannot pass vacuously. Returns the number of
    positions checked."""
    a_token, a_margin, a_flip = greedy_margin(actual_logits)
    e_token, e_margin, e_flip = greedy_margin(expected_logits)
    threshold = torch.maximum(a_flip, e_flip) if min_margin is None else torch.full_like(a_margin, min_margin)
    decided = (a_margin > threshold) & (e_margin > threshold)
    total = decided.numel()
    assert decided.sum() >= math.ceil(min_decided * total), (
        f"only {int(decided.sum())} of {total} positions have a top-1/top-2 margin above "
        f"{float(threshold.max()):.3g}; fewer than {min_decided:.0%}: the greedy check would be vacuous"
    )
    differ = decided & (a_token != e_token)
    assert not differ.any(), (
        f"greedy tokens differ at decided positions {differ.nonzero().tolist()[:8]}: "
        f"{a_token[differ].tolist()[:8]} != {e_token[differ].tolist()[:8]}"
    )
    return int(decided.sum())


def assert_same_generation(
    actual_ids: torch.Tensor,
    actual_step_logits: torch.Tensor,
    expected_ids: torch.Tensor,
    expected_step_logits: torch.Tensor,
    min_checked: float = 0.5,
) -> int:
    """Greedy generations agree token by token. ``*_ids`` are [B, prompt + steps]; ``*_step_logits`` the logits
    each step chose from, [B, steps, V] (``generate(..., output_logits=True)`` stacked on dim 1).

    At every step both sides conditioned on the same prefix, so their logits must agree within tolerance, and
    the chosen token must be the same unless that step's top-1 / top-2 margin is within rounding; after such a
    near-tie the continuations may legitimately part, so that row stops there. At least ``min_checked`` of all
    steps must have been checked. Returns the number of steps checked."""
    assert actual_ids.shape == expected_ids.shape and actual_step_logits.shape == expected_step_logits.shape
    batch, steps = expected_step_logits.shape[:2]
    prompt = expected_ids.shape[1] - steps
    assert torch.equal(actual_ids[:, :prompt], expected_ids[:, :prompt]), "the prompts differ"
    checked = 0
    for row in range(batch):
        for step in range(steps):
            a, e = actual_step_logits[row, step], expected_step_logits[row, step]
            assert_close_logits(a, e, what=f"row {row} step {step} logits")
            _, a_margin, a_flip = greedy_margin(a)
            _, e_margin, e_flip = greedy_margin(e)
            if not (a_margin > a_flip and e_margin > e_flip):
                break
            position = prompt + step
            assert actual_ids[row, position] == expected_ids[row, position], (
                f"row {row} step {step}: generated {int(actual_ids[row, position])} != "
                f"{int(expected_ids[row, position])} with margin {float(e_margin):.3g}"
            )
            checked += 1
    assert checked >= math.ceil(min_checked * batch * steps), (
        f"only {checked} of {batch * steps} generation steps had a decided top-1: the check would be vacuous"
    )
    return checked


def same_weights(actual: dict[str, torch.Tensor], expected: dict[str, torch.Tensor]) -> list[str]:
    """Names whose tensors are not bit-identical (or missing on one side): the bytes of a checkpoint must survive
    a save and reload exactly, whatever the kernels do with them afterwards."""
    names = sorted(set(actual) | set(expected))
    return [n for n in names if n not in actual or n not in expected or not torch.equal(actual[n], expected[n])]


# ---------------------------------------------------------------------------------------------- skip decisions


def skip_decision_margin(index: torch.Tensor, weights: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """|w_e - gamma[e0, e] * w_e0| per routing slot [T, k] (inf on the primary slot, which is never skipped): how
    far each slot is from the skip rule's threshold. The primary is the first slot of the max weight."""
    weights = weights.float()
    primary = weights.argmax(dim=-1, keepdim=True)
    w0 = weights.gather(-1, primary)
    threshold = gamma[index.gather(-1, primary), index] * w0
    return (weights - threshold).abs().scatter(-1, primary, math.inf)


def skip_flippable(index: torch.Tensor, weights: torch.Tensor, gamma: torch.Tensor) -> torch.Tensor:
    """Per slot, the decision margin within which two sets of weights that agree to the float32 tolerance may
    decide differently: atol * (1 + g) + rtol * (|w_e| + g * |w_e0|), g = gamma[e0, e]."""
    tol = tolerance(torch.float32)
    weights = weights.float()
    primary = weights.argmax(dim=-1, keepdim=True)
    w0 = weights.gather(-1, primary)
    g = gamma[index.gather(-1, primary), index]
    return tol.atol * (1 + g) + tol.rtol * (weights.abs() + g * w0.abs())


@dataclass(frozen=True)
class SkipComparison:
    compared: int  # tokens compared (the caller's ``compare`` mask)
    rerouted: int  # compared tokens whose routed experts differ between the two runs (a top-k near-tie)
    decided: int  # non-primary slots whose decision was checked (same routing and primary, margin above rounding)
    skipped: int  # skipped slots among the decided ones (identical on both sides)
    diverged: torch.Tensor  # [T] bool: compared tokens whose computation legitimately parted (rerouted, or a
    # decision within rounding went the other way); their outputs, and what attends to them, may differ


def assert_same_skips(
    actual: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    expected: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    gamma: torch.Tensor,
    compare: torch.Tensor | None = None,
    min_decided: float = 0.9,
) -> SkipComparison:
    """Two runs of the skip rule on the same tokens skip the same slots, except where the decision margin
    |w_e - gamma * w_e0| is within rounding of the weights.

    ``actual`` / ``expected``: (top_k_index [T, k], top_k_weights [T, k], skip mask [T, k]) as one experts
    module received them before skipping and the mask it then produced; ``gamma`` the layer's [E, E] table;
    ``compare`` [T] bool the tokens whose inputs are comparable (default all; a caller excludes tokens that an
    earlier layer's legitimate divergence reached). Checks, on the compared tokens: they are routed to the same
    experts (a top-k near-tie may reroute at most 1 token or 2% of them) with weights within the float32
    tolerance; the masks agree on every slot whose margin exceeds ``skip_flippable``. And at least
    ``min_decided`` of ALL non-primary slots were checked, so exclusions cannot make the check vacuous."""
    a_index, a_weights, a_mask = actual
    e_index, e_weights, e_mask = expected
    assert a_index.shape == e_index.shape == a_mask.shape == e_mask.shape, "routing shapes differ"
    tokens, k = e_index.shape
    compare = torch.ones(tokens, dtype=torch.bool) if compare is None else compare
    same_route = (a_index == e_index).all(dim=-1) & compare
    rerouted = int((compare & ~same_route).sum())
    assert rerouted <= max(1, int(0.02 * int(compare.sum()))), (
        f"{rerouted} of {int(compare.sum())} tokens are routed to other experts: more than a top-k near-tie explains"
    )
    assert_close(a_weights[same_route].float(), e_weights[same_route].float(), "routing weights")
    flippable = torch.maximum(skip_flippable(e_index, e_weights, gamma), skip_flippable(a_index, a_weights, gamma))
    margin = torch.minimum(
        skip_decision_margin(e_index, e_weights, gamma), skip_decision_margin(a_index, a_weights, gamma)
    )
    primary = e_weights.float().argmax(dim=-1, keepdim=True)
    same_primary = primary.squeeze(-1) == a_weights.float().argmax(dim=-1)  # else the near-tied top-2 swapped
    non_primary = torch.ones_like(e_mask, dtype=torch.bool).scatter(-1, primary, False)
    decided = non_primary & (same_route & same_primary).unsqueeze(-1) & (margin > flippable)
    slots = tokens * (k - 1)
    assert int(decided.sum()) >= math.ceil(min_decided * slots), (
        f"only {int(decided.sum())} of {slots} routing slots have a skip margin above rounding: too few to compare"
    )
    differ = decided & (a_mask != e_mask)
    assert not differ.any(), f"skip decisions differ at decided slots {differ.nonzero().tolist()[:8]}"
    return SkipComparison(
        compared=int(compare.sum()),
        rerouted=rerouted,
        decided=int(decided.sum()),
        skipped=int((e_mask & decided).sum()),
        diverged=compare & (~same_route | (a_mask != e_mask).any(dim=-1)),
    )
