"""Family-specific config fields of a small MoE, from one table: the zoo's entries, the README's tiny model
(:mod:`diep_hub.tiny`) and the tests' per-family models all spell their configs through :func:`family_kwargs`.

A small MoE is described generically (experts, top-k, one expert's FFN width, heads and head size); each family
names those fields its own way (``num_local_experts`` / ``num_experts`` / ``n_routed_experts``, ``intermediate_size``
/ ``moe_intermediate_size``) and some need extra attention fields to be small (DeepSeek's MLA ranks, an explicit
``head_dim``). The expert-count and top-k names come from the family adapters; the rest is the table below.
"""

from __future__ import annotations

from collections.abc import Callable

from ..families import get_family

#: families whose routed experts' FFN width is ``moe_intermediate_size`` (``intermediate_size`` is then the width of
#: dense layers and shared experts); every other family's experts use ``intermediate_size``
_MOE_FFN_FAMILIES = frozenset({"qwen2_moe", "qwen3_moe", "deepseek_v2", "deepseek_v3"})


def _mla(heads: int, head_dim: int) -> dict:
    """DeepSeek's multi-head latent attention at a small size (no query compression, one KV head a query head)."""
    return dict(
        kv_lora_rank=2 * head_dim,
        q_lora_rank=None,
        qk_rope_head_dim=head_dim,
        qk_nope_head_dim=head_dim,
        v_head_dim=head_dim,
        num_key_value_heads=heads,
    )


#: per family, the attention fields a small instance needs (defaults are sized for the released models)
_ATTENTION: dict[str, Callable[[int, int], dict]] = {
    "deepseek_v2": _mla,
    "deepseek_v3": lambda heads, head_dim: {**_mla(heads, head_dim), "head_dim": head_dim},
    "qwen3_moe": lambda heads, head_dim: dict(head_dim=head_dim),
    "gpt_oss": lambda heads, head_dim: dict(head_dim=head_dim, sliding_window=2 * head_dim),
}


def expert_ffn_field(model_type: str) -> str:
    """The config field that holds one routed expert's FFN width."""
    return "moe_intermediate_size" if model_type in _MOE_FFN_FAMILIES else "intermediate_size"


def family_kwargs(
    model_type: str,
    *,
    experts: int,
    top_k: int,
    expert_ffn: int | None = None,
    attention: tuple[int, int] | None = None,
    **extra,
) -> dict:
    """Config keyword arguments of a small ``model_type`` MoE, in the family's own field names.

    Args:
        experts: routed experts a layer.
        top_k: experts each token uses.
        expert_ffn: one routed expert's FFN width (None: leave the field to the caller's common settings).
        attention: ``(heads, head_dim)`` for families that need explicit attention fields to be small
            (None: no attention fields).
        extra: the family's own switches (shared experts, grouped routing, dense first layers...), passed through.
    """
    family = get_family(model_type)
    kwargs = {family.num_experts_field: experts, family.top_k_field: top_k}
    if expert_ffn is not None:
        kwargs[expert_ffn_field(model_type)] = expert_ffn
    if attention is not None and model_type in _ATTENTION:
        kwargs.update(_ATTENTION[model_type](*attention))
    return {**kwargs, **extra}
