# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Models of DiEP-pruned MoE checkpoints (travels with every pruned checkpoint as remote code).

Each ``DiepXForCausalLM`` is the family's own causal LM whose MoE blocks are rebuilt, layer by layer, with
that layer's expert count, so layers may keep different numbers of experts. The blocks, routers and fused
experts are the family's own transformers classes (decorated with ``@use_experts_implementation``), so the
fast experts backends (grouped_mm by default) serve them. Imports only torch and transformers.

Why the causal-LM forward is redefined here: the stock heads compute the router auxiliary loss with one
global expert count, which fails when layers differ; ``per_layer_load_balancing_loss`` computes it per layer.

Adaptive expert skipping (DiEP section 3.3): ``skipping_diep.DiepExpertSkipping``. Loading checks (a checkpoint
must hold exactly the tensors its config describes): ``loading_diep``. Both travel with this file.
"""

import copy
import dataclasses
import functools
import inspect

import torch
from transformers import (
    DeepseekV2ForCausalLM,
    DeepseekV3ForCausalLM,
    GptOssForCausalLM,
    GraniteMoeForCausalLM,
    MixtralForCausalLM,
    OlmoeForCausalLM,
    PhimoeForCausalLM,
    Qwen2MoeForCausalLM,
    Qwen3MoeForCausalLM,
)
from transformers.modeling_outputs import MoeCausalLMOutputWithPast

from .configuration_diep import (
    DiepCheckpointError,
    DiepDeepseekV2Config,
    DiepDeepseekV3Config,
    DiepGptOssConfig,
    DiepGraniteMoeConfig,
    DiepMixtralConfig,
    DiepOlmoeConfig,
    DiepPhimoeConfig,
    DiepQwen2MoeConfig,
    DiepQwen3MoeConfig,
)
from .loading_diep import MAX_LISTED, loading_problems, per_expert_problems, safetensors_names
from .skipping_diep import DiepExpertSkipping

# transformers lets a model switch experts backend (eager / batched_mm / grouped_mm) only when the model's
# module source contains the text "@use_experts_implementation" (it greps for it). Our experts are the
# family's own classes, which carry that decorator, so the fast backends are correct here.


def per_layer_load_balancing_loss(router_logits, attention_mask=None, top_k: int = 2) -> torch.Tensor:
    """Switch-Transformer balancing loss computed per MoE layer, then averaged over layers.

    Each layer uses its own expert count (the width of its router logits) and top-k = min(top_k, width). With a
    single MoE layer this equals transformers' ``load_balancing_loss_func``.
    """
    losses = []
    for logits in router_logits:
        probs = torch.softmax(logits.float(), dim=-1)
        num_experts = probs.shape[-1]
        _, chosen = torch.topk(probs, min(top_k, num_experts), dim=-1)
        assigned = torch.nn.functional.one_hot(chosen, num_experts).sum(dim=1).float()
        if attention_mask is not None and attention_mask.numel() == probs.shape[0]:
            weight = attention_mask.reshape(-1, 1).to(probs.device, torch.float32)
            fraction_routed = (assigned * weight).sum(0) / weight.sum()
            mean_prob = (probs * weight).sum(0) / weight.sum()
        else:
            fraction_routed = assigned.mean(0)
            mean_prob = probs.mean(0)
        losses.append(num_experts * torch.sum(fraction_routed * mean_prob))
    return torch.stack(losses).mean()


@functools.cache
def cache_argument(model_class) -> str:
    """The name under which ``model_class.forward`` takes the KV cache: ``cache`` from transformers 5.24 (where
    ``past_key_values`` is deprecated with a FutureWarning), ``past_key_values`` before. This file travels with
    checkpoints loaded by any transformers the package supports, so it asks the installed one."""
    return "cache" if "cache" in inspect.signature(model_class.forward).parameters else "past_key_values"


# The output's field for the cache: ``cache`` from transformers 5.24 (``past_key_values`` is renamed with a warning).
OUTPUT_CACHE_FIELD = next(
    (f.name for f in dataclasses.fields(MoeCausalLMOutputWithPast) if f.name in ("cache", "past_key_values")),
    "past_key_values",
)


class DiepForCausalLMMixin:
    """Rebuilds every MoE block with its layer's expert count before weights are initialised or loaded."""

    _diep_block_attr = "mlp"
    _diep_logits_scaling = False
    # the error raised for an incomplete or corrupt checkpoint (diep_hub swaps in a subclass that is a DiEPError)
    _diep_error = DiepCheckpointError

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """transformers' loader, refusing a checkpoint whose tensors do not match the config.

        The detailed check runs in ``_finalize_model_loading`` (before transformers reinitialises anything); this
        re-reads the final loading report, so a missing or unexpected tensor is still refused if a later
        transformers stops calling that hook. ``ignore_mismatched_sizes=True`` keeps transformers' meaning
        (mis-shaped tensors are reinitialised); everything else that does not match is an error.
        """
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(
            pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
        )
        ignore = bool(kwargs.get("ignore_mismatched_sizes", False))
        problems = loading_problems(info, ignore_mismatched_sizes=ignore)
        if problems:
            cls._diep_raise(pretrained_model_name_or_path, problems)
        return (model, info) if want_info else model

    @classmethod
    def _load_pretrained_model(cls, model, state_dict, checkpoint_files, load_config, *args, **kwargs):
        result = super()._load_pretrained_model(model, state_dict, checkpoint_files, load_config, *args, **kwargs)
        # Per-expert tensors are named as stored on disk (transformers only sees the fused tensor they build);
        # the list rides on the loading report to _finalize_model_loading. Adapters (expected_keys) are skipped.
        counts = getattr(model.config, "num_experts_per_layer", None)
        if checkpoint_files and counts is not None and kwargs.get("expected_keys") is None:
            names = safetensors_names(checkpoint_files)
            if names is not None:
                result[0].diep_disk_problems = per_expert_problems(names, counts)
        return result

    @classmethod
    def _finalize_model_loading(cls, model, load_config, loading_info):
        """Refuse mis-shaped, unconvertible, missing or unexpected tensors, naming each one.

        Shape and conversion problems are raised before transformers' own finalisation (which would raise a bare
        RuntimeError pointing at a logged table); missing and unexpected keys are checked after it, once it has
        discounted tied weights and the keys the family declares ignorable.
        """
        source = load_config.pretrained_model_name_or_path
        ignore = bool(load_config.ignore_mismatched_sizes)
        problems = list(getattr(loading_info, "diep_disk_problems", ()))
        problems += loading_problems(loading_info, ignore_mismatched_sizes=ignore, include_missing=False)
        if problems:
            cls._diep_raise(source, problems)
        loading_info = super()._finalize_model_loading(model, load_config, loading_info)
        problems = loading_problems(loading_info, ignore_mismatched_sizes=ignore)
        if problems:
            cls._diep_raise(source, problems)
        return loading_info

    @classmethod
    def _diep_raise(cls, source, problems):
        listed = "; ".join(problems[:MAX_LISTED])
        more = f"; and {len(problems) - MAX_LISTED} more" if len(problems) > MAX_LISTED else ""
        raise cls._diep_error(
            f"checkpoint {source} is incomplete or corrupt: its tensors do not match its config.json "
            f"({len(problems)} problem(s): {listed}{more}). Loading it anyway would leave these weights randomly "
            "initialised; save the model again (diep_hub.save_pruned) or download the checkpoint again"
        )

    def post_init(self):
        # The family __init__ ends with post_init(): rebuild here so weight init and loading see the real shapes.
        self._diep_rebuild_moe_blocks()
        super().post_init()
        self.diep_configure_skipping()

    def _diep_experts_modules(self):
        for layer_idx, layer in enumerate(self.model.layers):
            block = getattr(layer, self._diep_block_attr, None)
            if block is not None and hasattr(block, "experts"):
                yield layer_idx, block.experts

    def diep_configure_skipping(self):
        """(Re)install adaptive expert skipping from ``config.diep_skipping``, or remove it when disabled."""
        config = self.config
        settings = getattr(config, "diep_skipping", None)
        override = config.__dict__.pop("diep_skipping_enabled", None)
        if override is not None and settings:
            settings = {**settings, "enabled": bool(override)}
            config.diep_skipping = settings
        for _, experts in self._diep_experts_modules():
            for handle in experts.__dict__.pop("_diep_skip_handles", ()):
                handle.remove()
            experts.__dict__.pop("diep_skipping", None)
        if not settings or not settings.get("enabled"):
            return
        layers = {int(key): value for key, value in settings.get("layers", {}).items()}
        for layer_idx, experts in self._diep_experts_modules():
            entry = layers.get(layer_idx)
            if entry is None:
                continue
            size = len(entry["cka_ratio"])
            if size != experts.num_experts:
                raise ValueError(
                    f"diep_skipping layer {layer_idx} has a {size} x {size} table but the layer has "
                    f"{experts.num_experts} experts; recalibrate skipping after pruning"
                )
            skipper = DiepExpertSkipping(layer_idx, entry["gamma1"], entry["cka_ratio"])
            experts.diep_skipping = skipper
            experts._diep_skip_handles = (
                experts.register_forward_pre_hook(skipper.before),
                experts.register_forward_hook(skipper.after),
            )

    def _diep_rebuild_moe_blocks(self):
        config = self.config
        if getattr(config, "num_experts_per_layer", None) is None:
            return
        for layer_idx, layer in enumerate(self.model.layers):
            block = getattr(layer, self._diep_block_attr, None)
            if block is None or not hasattr(block, "experts"):
                continue
            count = config.num_experts_per_layer[layer_idx]
            if count is None:
                raise self._diep_error(
                    f"config num_experts_per_layer[{layer_idx}] is null but layer {layer_idx} is a MoE layer; it must "
                    "hold the number of experts the layer keeps"
                )
            layer_config = copy.copy(config)
            setattr(layer_config, config.diep_num_experts_field, count)
            layer_config.num_experts_per_tok = config.layer_top_k(layer_idx)
            for field in ("n_group", "topk_group"):
                per_layer = getattr(config, f"{field}_per_layer", None)
                if per_layer is not None and per_layer[layer_idx] is not None:
                    setattr(layer_config, field, per_layer[layer_idx])
            new_block = type(block)(layer_config)
            # Per-layer copies would go stale: experts read config._experts_implementation on every call.
            for module in new_block.modules():
                if getattr(module, "config", None) is layer_config:
                    module.config = config
            setattr(layer, self._diep_block_attr, new_block)

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        position_ids=None,
        cache=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_router_logits=None,
        logits_to_keep=0,
        **kwargs,
    ):
        """The family's causal-LM forward with a per-layer auxiliary loss.

        The KV cache is taken as ``cache`` (transformers >= 5.24, and its ``generate``) or ``past_key_values``
        (earlier releases and older callers) and handed to the decoder under the one name it accepts, so neither a
        deprecation warning nor "both are set" is raised on any supported transformers.
        """
        past_key_values = kwargs.pop("past_key_values", None)
        if cache is not None and past_key_values is not None and cache is not past_key_values:
            raise ValueError("pass the KV cache once, as `cache` (transformers >= 5.24) or `past_key_values`")
        cache = cache if cache is not None else past_key_values
        cache_name = cache_argument(type(self.model))
        cache_kwarg = {cache_name: cache} if cache is not None else {}
        if output_router_logits is None:
            output_router_logits = getattr(self.config, "output_router_logits", False)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
            **cache_kwarg,
            **kwargs,
        )
        hidden_states = outputs.last_hidden_state
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.lm_head(hidden_states[:, keep, :])
        if self._diep_logits_scaling:
            logits = logits / self.config.logits_scaling

        loss = None
        if labels is not None:
            loss = self.loss_function(logits, labels, self.vocab_size, **kwargs)
        aux_loss = None
        if output_router_logits and outputs.router_logits:
            aux_loss = per_layer_load_balancing_loss(
                outputs.router_logits, attention_mask, top_k=self.config.num_experts_per_tok
            )
            coef = getattr(self.config, "router_aux_loss_coef", None)
            if loss is not None and coef:
                loss = loss + coef * aux_loss.to(loss.device)
        return MoeCausalLMOutputWithPast(
            loss=loss,
            aux_loss=aux_loss,
            logits=logits,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
            **{OUTPUT_CACHE_FIELD: getattr(outputs, OUTPUT_CACHE_FIELD, None)},
        )


class DiepMixtralForCausalLM(DiepForCausalLMMixin, MixtralForCausalLM):
    config_class = DiepMixtralConfig


class DiepQwen2MoeForCausalLM(DiepForCausalLMMixin, Qwen2MoeForCausalLM):
    config_class = DiepQwen2MoeConfig


class DiepQwen3MoeForCausalLM(DiepForCausalLMMixin, Qwen3MoeForCausalLM):
    config_class = DiepQwen3MoeConfig


class DiepOlmoeForCausalLM(DiepForCausalLMMixin, OlmoeForCausalLM):
    config_class = DiepOlmoeConfig


class DiepDeepseekV2ForCausalLM(DiepForCausalLMMixin, DeepseekV2ForCausalLM):
    config_class = DiepDeepseekV2Config


class DiepDeepseekV3ForCausalLM(DiepForCausalLMMixin, DeepseekV3ForCausalLM):
    config_class = DiepDeepseekV3Config


class DiepGptOssForCausalLM(DiepForCausalLMMixin, GptOssForCausalLM):
    config_class = DiepGptOssConfig


class DiepPhimoeForCausalLM(DiepForCausalLMMixin, PhimoeForCausalLM):
    config_class = DiepPhimoeConfig


class DiepGraniteMoeForCausalLM(DiepForCausalLMMixin, GraniteMoeForCausalLM):
    config_class = DiepGraniteMoeConfig
    _diep_block_attr = "block_sparse_moe"
    _diep_logits_scaling = True


DIEP_MODEL_CLASSES = {
    cls.config_class.model_type: cls
    for cls in (
        DiepMixtralForCausalLM,
        DiepQwen2MoeForCausalLM,
        DiepQwen3MoeForCausalLM,
        DiepOlmoeForCausalLM,
        DiepDeepseekV2ForCausalLM,
        DiepDeepseekV3ForCausalLM,
        DiepGptOssForCausalLM,
        DiepPhimoeForCausalLM,
        DiepGraniteMoeForCausalLM,
    )
}


def _register_checkpoint_conversions():
    """Let per-expert checkpoints (``experts.3.w1.weight``) load into fused experts for diep_* model types.

    transformers applies its conversion rules by model_type; a custom type gets none unless registered, and
    unmatched keys would be randomly initialised with only a warning.
    """
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    for diep_type in DIEP_MODEL_CLASSES:
        mapping = get_checkpoint_conversion_mapping(diep_type[len("diep_") :])
        if mapping is not None:
            register_checkpoint_conversion_mapping(diep_type, mapping, overwrite=True)


_register_checkpoint_conversions()
for _model_class in DIEP_MODEL_CLASSES.values():
    _model_class.register_for_auto_class("AutoModelForCausalLM")
