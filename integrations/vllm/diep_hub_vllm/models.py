# Copyright 2026 the diep_hub authors. Apache-2.0.
"""vLLM models of DiEP-pruned checkpoints: the family's own vLLM model with each MoE block at its layer's width.

How a model is built (so that no vLLM constructor body is copied): the family's vLLM class is constructed with a
placeholder config of one expert per MoE layer (cheap), then each MoE block is rebuilt by the family's own vLLM
block class from a per-layer copy of the config (that layer's expert count and top-k = min(top_k, kept)) and put
in place of the placeholder, keeping its position among vLLM's registered MoE layers. vLLM's routed-experts loader
builds its expert mapping per layer, so the checkpoint's per-expert keys load with no loader code of ours; we only
check them (weights.py). When skipping applies, the block is built with a custom routing function (routing.py).
"""

from __future__ import annotations

import contextlib
import copy

from torch import nn
from vllm.config import get_current_vllm_config
from vllm.logger import init_logger
from vllm.model_executor.models import mixtral, olmoe, qwen2_moe, qwen3_moe
from vllm.model_executor.models.utils import PPMissingLayer

from .plan import REFUSED, DiepServingError, LayerPlan, ServingPlan, read_plan, refusal_message
from .routing import SkippingRouter
from .weights import ExpertWeightCheck

logger = init_logger("vllm.diep_hub_vllm")  # under "vllm" so that vLLM's log handler shows it


@contextlib.contextmanager
def _hf_config(vllm_config, config):
    """Let vLLM constructors that read ``vllm_config.model_config.hf_config`` see ``config`` for a while."""
    configs = [vllm_config]
    current = get_current_vllm_config()
    if current is not vllm_config:
        configs.append(current)
    saved = [(c.model_config.hf_config, c.model_config.hf_text_config) for c in configs]
    try:
        for c in configs:
            c.model_config.hf_config = config
            c.model_config.hf_text_config = config
        yield
    finally:
        for c, (hf, text) in zip(configs, saved):
            c.model_config.hf_config = hf
            c.model_config.hf_text_config = text


@contextlib.contextmanager
def _custom_routing(module, router, **overrides):
    """Build one block with ``custom_routing_function=router`` (and ``overrides``, e.g. DeepSeek's
    ``use_grouped_topk=False``: vLLM routes groups itself otherwise) passed to the family module's FusedMoEFactory."""
    if router is None:
        yield
        return
    original = module.FusedMoEFactory
    calls = []

    def factory(*args, **kwargs):
        calls.append(kwargs.get("prefix"))
        return original(*args, **{**kwargs, **overrides, "custom_routing_function": router})

    module.FusedMoEFactory = factory
    try:
        yield
    finally:
        module.FusedMoEFactory = original
    if len(calls) != 1:
        raise RuntimeError(f"expected one FusedMoE in the block, {module.__name__} built {len(calls)}: {calls}")


def _refuse_expert_parallel(vllm_config) -> None:
    parallel = vllm_config.parallel_config
    if parallel.enable_expert_parallel or parallel.enable_eplb:
        raise DiepServingError(
            "diep-hub-vllm does not support expert parallelism or EPLB (enable_expert_parallel / enable_eplb): "
            "their expert placement assumes the same expert count in every layer; serve with tensor or pipeline "
            "parallelism instead"
        )


class _DiepModel:
    """Mixin over a family's vLLM ``XForCausalLM``; subclasses set the family module and block builder."""

    _diep_module = None  # the family's vLLM module (its FusedMoEFactory is what a block calls)
    _diep_block_class: type = nn.Module

    @staticmethod
    def _diep_build_block(layer_config, vllm_config, prefix):
        raise NotImplementedError

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        source = vllm_config.model_config.model
        plan = read_plan(config, source)
        _refuse_expert_parallel(vllm_config)
        family = plan.family
        self._diep_check_platform(vllm_config, plan)
        placeholder = copy.copy(config)
        setattr(placeholder, family.count_field, 1)
        placeholder.num_experts_per_tok = 1
        self._diep_layer_config(placeholder, None)
        with _hf_config(vllm_config, placeholder):
            super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.config = config
        if getattr(self.model, "config", None) is placeholder:
            self.model.config = config
        self._diep_plan = plan
        self._diep_source = source
        self._diep_rebuild(vllm_config, config, plan)
        skipped = sorted(p.index for p in plan.layers.values() if p.skipping is not None)
        counts = [plan.layers[i].num_experts if i in plan.layers else None for i in range(config.num_hidden_layers)]
        logger.info("diep-hub-vllm: %s with experts per layer %s", family.model_type, counts)
        if skipped:
            logger.info("diep-hub-vllm: expert skipping APPLIED in layers %s (%s)", skipped, plan.skipping_reason)
        else:
            logger.info("diep-hub-vllm: expert skipping NOT applied (%s)", plan.skipping_reason)

    def _diep_check_platform(self, vllm_config, plan: ServingPlan) -> None:
        """Refuse, before anything is built, what this vLLM installation would build unfaithfully."""

    @staticmethod
    def _diep_layer_config(layer_config, layer_plan: LayerPlan | None) -> None:
        """Adjust a per-layer config copy (the placeholder's when ``layer_plan`` is None) beyond count and top-k."""

    def _diep_router(self, layer_plan: LayerPlan, layer_config):
        """The block's custom routing function (skipping), or None for the family's own routing."""
        return SkippingRouter(layer_plan.index, layer_plan.skipping) if layer_plan.skipping is not None else None

    _diep_factory_overrides: dict = {}  # FusedMoEFactory arguments a block with a custom router needs

    def _diep_block_built(self, block, router) -> None:
        """Hook after a block is rebuilt (DeepSeek: hand its router the gate's selection bias)."""

    def _diep_rebuild(self, vllm_config, config, plan: ServingPlan) -> None:
        family = plan.family
        compilation = get_current_vllm_config().compilation_config
        moe_names = compilation.static_all_moe_layers
        rebuilt = []
        for index, layer in enumerate(self.model.layers):
            if isinstance(layer, PPMissingLayer):
                continue
            block = getattr(layer, family.block_attr)
            is_moe = isinstance(block, self._diep_block_class)
            if is_moe != (index in plan.layers):
                raise DiepServingError(
                    f"config.json num_experts_per_layer[{index}] is "
                    f"{plan.layers[index].num_experts if index in plan.layers else None} but vLLM builds layer "
                    f"{index} as {'a MoE' if is_moe else 'a dense'} layer (mlp_only_layers / decoder_sparse_step "
                    "disagree with the per-layer counts)"
                )
            if not is_moe:
                continue
            layer_plan = plan.layers[index]
            old_name = block.experts.layer_name
            position = moe_names.index(old_name)
            del compilation.static_forward_context[old_name]
            moe_names.remove(old_name)
            layer_config = copy.copy(config)
            setattr(layer_config, family.count_field, layer_plan.num_experts)
            layer_config.num_experts_per_tok = layer_plan.top_k
            self._diep_layer_config(layer_config, layer_plan)
            router = self._diep_router(layer_plan, layer_config)
            block_prefix = old_name.removesuffix(".experts")
            del block
            setattr(layer, family.block_attr, nn.Identity())  # drop the placeholder before allocating
            overrides = self._diep_factory_overrides
            with _hf_config(vllm_config, layer_config), _custom_routing(self._diep_module, router, **overrides):
                new_block = self._diep_build_block(layer_config, vllm_config, block_prefix)
            if new_block.experts.layer_name != old_name:
                raise RuntimeError(f"rebuilt block is named {new_block.experts.layer_name}, expected {old_name}")
            self._diep_block_built(new_block, router)
            moe_names.insert(position, moe_names.pop(moe_names.index(old_name)))
            setattr(layer, family.block_attr, new_block)
            rebuilt.append(new_block)
        self._diep_moe_metadata(rebuilt, plan)

    def _diep_moe_metadata(self, rebuilt: list, plan: ServingPlan) -> None:
        """Point the MixtureOfExperts metadata (used by EPLB, which is refused) at the rebuilt blocks."""
        if hasattr(self, "moe_layers"):
            self.moe_layers = [block.experts for block in rebuilt]
            self.num_moe_layers = len(rebuilt)
            for name in ("num_logical_experts", "num_physical_experts", "num_local_physical_experts",
                         "num_routed_experts"):
                if hasattr(self, name):
                    setattr(self, name, plan.widest)

    def load_weights(self, weights):
        check = ExpertWeightCheck(self._diep_plan, self.config, self._diep_source)
        loaded = super().load_weights(check.stream(weights))
        check.finish()
        return loaded


def _quant(vllm_config):
    return vllm_config.quant_config


class DiepMixtralForCausalLM(_DiepModel, mixtral.MixtralForCausalLM):
    _diep_module = mixtral
    _diep_block_class = mixtral.MixtralMoE

    @staticmethod
    def _diep_build_block(layer_config, vllm_config, prefix):
        return mixtral.MixtralMoE(
            num_experts=layer_config.num_local_experts,
            top_k=layer_config.num_experts_per_tok,
            hidden_size=layer_config.hidden_size,
            intermediate_size=layer_config.intermediate_size,
            quant_config=_quant(vllm_config),
            prefix=prefix,
            enable_eplb=False,
        )


class DiepQwen2MoeForCausalLM(_DiepModel, qwen2_moe.Qwen2MoeForCausalLM):
    _diep_module = qwen2_moe
    _diep_block_class = qwen2_moe.Qwen2MoeSparseMoeBlock

    @staticmethod
    def _diep_build_block(layer_config, vllm_config, prefix):
        return qwen2_moe.Qwen2MoeSparseMoeBlock(config=layer_config, quant_config=_quant(vllm_config), prefix=prefix)


class DiepQwen3MoeForCausalLM(_DiepModel, qwen3_moe.Qwen3MoeForCausalLM):
    _diep_module = qwen3_moe
    _diep_block_class = qwen3_moe.Qwen3MoeSparseMoeBlock

    @staticmethod
    def _diep_build_block(layer_config, vllm_config, prefix):
        return qwen3_moe.Qwen3MoeSparseMoeBlock(vllm_config=vllm_config, prefix=prefix)


class DiepOlmoeForCausalLM(_DiepModel, olmoe.OlmoeForCausalLM):
    _diep_module = olmoe
    _diep_block_class = olmoe.OlmoeMoE

    @staticmethod
    def _diep_build_block(layer_config, vllm_config, prefix):
        return olmoe.OlmoeMoE(
            num_experts=layer_config.num_experts,
            top_k=layer_config.num_experts_per_tok,
            hidden_size=layer_config.hidden_size,
            intermediate_size=layer_config.intermediate_size,
            quant_config=_quant(vllm_config),
            prefix=prefix,
        )


class _Refused(mixtral.MixtralForCausalLM):
    """Registered for diep families the plugin cannot serve, so vLLM never falls back to a one-count model."""

    def __init__(self, *, vllm_config, prefix: str = ""):
        config = vllm_config.model_config.hf_config
        raise DiepServingError(refusal_message(getattr(config, "model_type", "?"), vllm_config.model_config.model))


# DeepSeek's classes live in deepseek.py (built on this module); register() adds them.
MODEL_CLASSES = {
    cls.__name__: cls
    for cls in (DiepMixtralForCausalLM, DiepQwen2MoeForCausalLM, DiepQwen3MoeForCausalLM, DiepOlmoeForCausalLM)
}
for _architecture, _ in REFUSED.values():
    MODEL_CLASSES[_architecture] = type(_architecture, (_Refused,), {"__module__": __name__})
    globals()[_architecture] = MODEL_CLASSES[_architecture]
