# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Skipped experts cost no compute in vLLM's CPU MoE kernel, and skipping gives the same outputs as before.

Runs the plugin's router through vLLM's own CPU routing path (``cpu_router.select_experts`` with a custom routing
function, which is what ``CPURouter`` calls) and the routing it returns through the compiled kernel the CPU experts
call (``torch.ops._C.cpu_fused_moe``, weights prepacked by ``cpu_prepack_moe_weight`` for the ISA vLLM picks), no
engine needed. The kernel has no source in the wheel; what it does with the routing is stated in routing.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from vllm import _custom_ops as ops
from vllm.model_executor.layers.fused_moe.router.cpu_router import select_experts

from diep_hub_vllm.plan import LayerSkipping
from diep_hub_vllm.routing import SkippingRouter, reweight, skip_mask, softmax_top_k

HIDDEN, FFN = 64, 96  # the kernel wants both divisible by 32
ISA = "vec"  # what vLLM's CPU experts use for float32 (its "amx" experts take bfloat16 only)


class Experts:
    """E SiLU-gated experts: float32 weights, the kernel's prepacked copy, and a plain torch reference."""

    def __init__(self, num_experts: int, seed: int = 0, nan_expert: int | None = None):
        generator = torch.Generator().manual_seed(seed)
        self.w13 = torch.randn(num_experts, 2 * FFN, HIDDEN, generator=generator) * 0.1
        self.w2 = torch.randn(num_experts, HIDDEN, FFN, generator=generator) * 0.1
        if nan_expert is not None:
            self.w13[nan_expert] = float("nan")
            self.w2[nan_expert] = float("nan")
        self.packed13 = ops.cpu_prepack_moe_weight(self.w13, ISA)
        self.packed2 = ops.cpu_prepack_moe_weight(self.w2, ISA)

    def kernel(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        out = torch.empty_like(x)
        ops.cpu_fused_moe(out, x, self.packed13, self.packed2, None, None, weights.float().contiguous(),
                          ids.to(torch.int32).contiguous(), "silu", ISA, False)
        return out

    def reference(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Sum over slots with a nonzero weight only (a skipped expert is not evaluated at all)."""
        out = torch.zeros_like(x)
        for t in range(x.shape[0]):
            for slot in range(ids.shape[1]):
                if weights[t, slot] == 0:
                    continue
                gate, up = (self.w13[int(ids[t, slot])] @ x[t]).split(FFN)
                out[t] += weights[t, slot] * (self.w2[int(ids[t, slot])] @ (F.silu(gate) * up))
        return out


def _route(router: SkippingRouter, logits: torch.Tensor, top_k: int, renormalize: bool):
    """The routing vLLM's CPU MoE layer computes with the plugin's router (float32 weights, int32 ids)."""
    return select_experts(torch.zeros(logits.shape[0], HIDDEN), logits, top_k, use_grouped_topk=False,
                          renormalize=renormalize, custom_routing_function=router)


def _skipping(num_experts: int, gamma1: float, seed: int) -> LayerSkipping:
    ratio = 0.5 + torch.rand(num_experts, num_experts, generator=torch.Generator().manual_seed(seed))
    return LayerSkipping(gamma1=gamma1, cka_ratio=tuple(tuple(float(v) for v in row) for row in ratio))


@pytest.mark.parametrize(("top_k", "renormalize", "gamma1"), [(2, True, 0.6), (2, False, 0.6), (3, True, 0.3)])
def test_redirected_slots_give_the_zero_weight_output(top_k, renormalize, gamma1):
    """Skipped slots come back as the token's primary expert with weight 0; the kernel's output equals the output
    of the zero-weight routing (skipped expert ids kept) and the plain torch reference that evaluates kept slots."""
    num_experts, tokens = 6, 96
    router = SkippingRouter(0, _skipping(num_experts, gamma1, seed=1))
    logits = torch.randn(tokens, num_experts, generator=torch.Generator().manual_seed(2)) * 1.5
    weights, ids = _route(router, logits, top_k, renormalize)
    assert weights.dtype == torch.float32 and ids.dtype == torch.int32 and ids.is_contiguous()

    plain_weights, plain_ids = softmax_top_k(logits, top_k, renormalize)
    skip = skip_mask(plain_ids, plain_weights, router.gamma)
    assert 0.2 < skip.float().sum() / (tokens * (top_k - 1)) < 0.8  # both skipped and kept slots are exercised
    torch.testing.assert_close(weights, reweight(plain_weights, skip), rtol=0, atol=0)
    primary = plain_ids.gather(-1, plain_weights.argmax(-1, keepdim=True)).expand_as(plain_ids)
    assert torch.equal(ids.long(), torch.where(skip, primary, plain_ids))
    assert torch.equal(weights == 0, skip)

    experts = Experts(num_experts)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(3))
    redirected = experts.kernel(x, weights, ids)
    zero_weight = experts.kernel(x, weights, plain_ids)  # what the plugin emitted before: skipped ids kept
    # one row more or less in an expert's GEMM changes nothing per row, and 0 * y_e0 adds exactly 0
    torch.testing.assert_close(redirected, zero_weight, rtol=0, atol=1e-6)
    torch.testing.assert_close(redirected, experts.reference(x, weights, plain_ids), rtol=1e-4, atol=1e-5)


def test_an_expert_reached_only_through_skipped_slots_is_not_computed():
    """Expert 4 has NaN weights and is every token's second choice, always skipped: the redirected routing never
    gives it a row (finite output, equal to the primary-only reference); the zero-weight routing does (NaN)."""
    num_experts, tokens, nan_expert = 5, 24, 4
    logits = torch.full((tokens, num_experts), -2.0)
    logits[torch.arange(tokens), torch.arange(tokens) % 4] = 3.0  # primaries cycle through experts 0-3
    logits[:, nan_expert] = 1.0
    ones = tuple(tuple(1.0 for _ in range(num_experts)) for _ in range(num_experts))
    router = SkippingRouter(0, LayerSkipping(gamma1=1.0, cka_ratio=ones))  # skips every w_e < w_e0
    weights, ids = _route(router, logits, 2, True)
    plain_weights, plain_ids = softmax_top_k(logits, 2, True)
    assert torch.equal(plain_ids[:, 1], torch.full((tokens,), nan_expert))  # routed to the NaN expert ...
    assert torch.equal(weights[:, 1], torch.zeros(tokens))  # ... and skipped, for every token
    assert not (ids == nan_expert).any()

    experts = Experts(num_experts, nan_expert=nan_expert)
    x = torch.randn(tokens, HIDDEN, generator=torch.Generator().manual_seed(4))
    redirected = experts.kernel(x, weights, ids)
    assert torch.isfinite(redirected).all()
    torch.testing.assert_close(redirected, experts.reference(x, weights, plain_ids), rtol=1e-4, atol=1e-5)
    assert torch.isnan(experts.kernel(x, weights, plain_ids)).all(dim=-1).all()  # 0 * NaN: it was computed


def test_no_skipping_leaves_routing_untouched():
    """Rows where nothing is skipped keep the family's own ids and weights exactly (top-1 layers too)."""
    never = LayerSkipping(gamma1=0.0, cka_ratio=tuple(tuple(1.0 for _ in range(4)) for _ in range(4)))
    logits = torch.randn(32, 4, generator=torch.Generator().manual_seed(5))
    for top_k in (1, 2):
        weights, ids = _route(SkippingRouter(0, never), logits, top_k, True)
        plain_weights, plain_ids = softmax_top_k(logits, top_k, True)
        assert torch.equal(ids.long(), plain_ids)
        torch.testing.assert_close(weights, plain_weights, rtol=0, atol=0)
