# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Models of DiEP-pruned MoE checkpoints (travels with every pruned checkpoint as remote code).

Each ``DiepXForCausalLM`` is the family's own causal LM whose MoE blocks are rebuilt, layer by layer, with
that layer's expert count, so layers may keep different numbers of experts. The blocks, routers and fused
experts are the family's own transformers classes (decorated with ``@use_experts_implementation``), so the
fast experts backends (grouped_mm by default) serve them. Imports only torch and transformers.

Why the causal-LM forward is redefined here: the stock heads compute the router auxiliary loss with one
global expert count, which fails when layers differ; ``per_layer_load_balancing_loss`` computes it per layer.

Adaptive expert skipping (DiEP section 3.3), applied when ``config.diep_skipping["enabled"]`` is true: a forward
pre-hook on each MoE layer's experts (``DiepExpertSkipping``) sees the routing (indices, weights) the family
computed, takes the highest-weight expert e0 as primary, and skips every other selected expert e with
``w_e < gamma1 * cka_ratio[e0][e] * w_e0``; skipped weights become 0 and the kept weights are rescaled to keep
their original sum (top-2: the primary gets w_e0 + w_e1). For top-k > 2 each non-primary expert is tested
against the primary. Turn it off at load time with ``from_pretrained(..., diep_skipping_enabled=False)`` or on a
live model with ``model.config.diep_skipping["enabled"] = False; model.diep_configure_skipping()``.

How a skipped expert saves compute, on every family and every experts backend (grouped_mm, eager, batched_mm,
GPT-OSS included, so no family falls back to zero weights): the pre-hook hands the experts only the routing slots
that remain, as a top-1 call over [kept slots, H]; a forward hook puts the rows back in [T, k] and sums over k.
We tried the sentinel route first (index ``num_experts`` with ``experts._is_expert_parallel = True`` in
grouped_mm): it is correct, but grouped_mm's expert-parallel masking copies the [slots, 2 x intermediate]
activations, which on CPU cost more than the skipped GEMMs saved; and GPT-OSS's eager loop has no sentinel class.
Cost of the compaction: one host sync per MoE layer (to size the kept rows), as the eager backend already has.
"""

import copy
import json
import re

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


class DiepExpertSkipping:
    """The skip rule of one MoE layer, run by two hooks on that layer's experts module.

    ``before`` (forward pre-hook) decides which routing slots to skip and hands the experts only the slots that
    remain, one per row (top-1 calls on [kept slots, H]), so skipped experts cost nothing on any backend;
    ``after`` (forward hook) scatters the rows back to [T, k] and sums over k as the backends do. A batch with
    nothing skipped passes through untouched (bit-identical to no skipping).

    ``gamma[e0][e] = gamma1 * cka_ratio[e0][e]`` is built once per device from the config's lists (so a live model
    and one reloaded from disk use the very same float32 values). Counters: ``skipped`` non-primary routing slots
    out of ``slots`` seen since ``reset()``. Setting ``record`` to a list appends each call's skip mask [T, k].
    """

    def __init__(self, layer_idx: int, gamma1: float, cka_ratio):
        self.layer_idx = layer_idx
        self.gamma1 = float(gamma1)
        self.cka_ratio = [[float(v) for v in row] for row in cka_ratio]
        self.active = True
        self.record = None
        self._gamma = {}
        self._pending = None
        self.reset()

    def reset(self):
        self.skipped = 0
        self.slots = 0

    def gamma(self, device) -> torch.Tensor:
        if device not in self._gamma:
            table = torch.tensor(self.cka_ratio, dtype=torch.float32) * self.gamma1
            self._gamma[device] = table.to(device)
        return self._gamma[device]

    def decide(self, top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> torch.Tensor:
        """Boolean [T, k]: True where a non-primary slot is skipped. Ties: the first slot of the max is primary."""
        weights = top_k_weights.detach().float()
        primary = weights.argmax(dim=-1, keepdim=True)
        w0 = weights.gather(-1, primary)
        e0 = top_k_index.gather(-1, primary)
        skip = weights < self.gamma(top_k_index.device)[e0, top_k_index] * w0
        return skip.scatter(-1, primary, False)

    def reweight(self, top_k_weights: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        """Zero the skipped weights and rescale the kept ones to the original sum (top-2: primary = w0 + w1)."""
        kept = top_k_weights.masked_fill(skip, 0)
        total = top_k_weights.sum(dim=-1, keepdim=True)
        rescaled = kept * (total / kept.sum(dim=-1, keepdim=True))
        # a row left with its primary only (always, for top-2) gives the primary the original sum exactly
        alone = (skip.sum(dim=-1, keepdim=True) == skip.shape[-1] - 1) & ~skip
        rescaled = torch.where(alone, total.expand_as(kept), rescaled)
        return torch.where(skip.any(dim=-1, keepdim=True), rescaled, top_k_weights)

    def before(self, experts, args):
        self._pending = None
        if not self.active or len(args) != 3 or args[1].dim() != 2 or args[1].shape[-1] < 2:
            return None
        if len(self.cka_ratio) != experts.num_experts:
            raise ValueError(
                f"layer {self.layer_idx}: the skipping table covers {len(self.cka_ratio)} experts but the layer has "
                f"{experts.num_experts}; recalibrate skipping after pruning"
            )
        hidden_states, top_k_index, top_k_weights = args
        with torch.no_grad():
            skip = self.decide(top_k_index, top_k_weights)
        num_tokens, k = skip.shape
        self.skipped = self.skipped + skip.sum()
        self.slots += num_tokens * (k - 1)
        if self.record is not None:
            self.record.append(skip.cpu())
        if not bool(skip.any()):
            return None
        rows = (~skip).reshape(-1).nonzero().squeeze(-1)  # kept slots, token-major
        weights = self.reweight(top_k_weights, skip).reshape(-1)[rows]
        self._pending = (rows, num_tokens, k)
        return hidden_states[rows // k], top_k_index.reshape(-1)[rows].unsqueeze(-1), weights.unsqueeze(-1)

    def after(self, experts, args, output):
        if self._pending is None:
            return None
        rows, num_tokens, k = self._pending
        self._pending = None
        slots = output.new_zeros(num_tokens * k, output.shape[-1]).index_copy_(0, rows, output)
        return slots.view(num_tokens, k, -1).sum(dim=1)


# ---------------------------------------------------------------------------------------------- loading checks
# A pruned checkpoint must hold exactly the tensors its config describes. transformers only logs a report for a
# missing or unexpected tensor and initialises the missing one at random (a missing router weight would route
# tokens at random with no error); the mixin below turns every such problem into a DiepCheckpointError.

_PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:[^.]+\.)*experts)\.(?P<idx>\d+)\.(?P<leaf>.+)$"
)
_MAX_LISTED = 8


def _safetensors_names(files):
    """Tensor names in the checkpoint's safetensors files (read from their headers), or None if unreadable."""
    names = set()
    for path in files:
        if not str(path).endswith(".safetensors"):
            return None
        try:
            with open(path, "rb") as handle:
                size = int.from_bytes(handle.read(8), "little")
                header = json.loads(handle.read(size))
        except (OSError, ValueError):
            return None
        names.update(name for name in header if name != "__metadata__")
    return names


def _per_expert_problems(names, counts) -> list:
    """Per-expert tensors (``...experts.<i>.<leaf>``) missing or beyond each layer's kept count, as named on disk.

    transformers stacks these into fused tensors, so a missing one only shows up as a shape mismatch or a failed
    conversion of the fused tensor; naming the file's own key tells the user which expert is absent.
    """
    groups = {}
    for name in names:
        match = _PER_EXPERT_KEY.match(name)
        if match is None:
            continue
        layer = int(match["layer"])
        if layer >= len(counts) or counts[layer] is None:
            continue
        leaves = groups.setdefault((match["prefix"], layer), {})
        leaves.setdefault(match["leaf"], set()).add(int(match["idx"]))
    problems = []
    for (prefix, layer), leaves in sorted(groups.items()):
        count = counts[layer]
        for leaf, present in sorted(leaves.items()):
            for idx in sorted(set(range(count)) - present):
                problems.append(f"{prefix}.{idx}.{leaf} is missing (layer {layer} keeps {count} experts)")
            for idx in sorted(i for i in present if i >= count):
                problems.append(f"{prefix}.{idx}.{leaf} is unexpected (layer {layer} keeps {count} experts)")
    return problems


def _conversion_summary(message) -> str:
    lines = [line.strip() for line in str(message).splitlines() if line.strip()]
    chosen = next((line for line in reversed(lines) if line.startswith("Error")), lines[-1] if lines else "")
    return chosen[:200]


def _loading_problems(info, *, ignore_mismatched_sizes: bool, include_missing: bool = True) -> list:
    """One line per missing, unexpected, mis-shaped or unconvertible tensor in a transformers loading report."""
    get = info.get if isinstance(info, dict) else lambda key, default=None: getattr(info, key, default)
    problems = []
    if include_missing:
        problems += [f"{key} is missing" for key in sorted(get("missing_keys") or ())]
        problems += [f"{key} is unexpected" for key in sorted(get("unexpected_keys") or ())]
    if not ignore_mismatched_sizes:
        for key, on_disk, expected in sorted(get("mismatched_keys") or (), key=lambda item: item[0]):
            problems.append(
                f"{key} has shape {list(on_disk)} in the checkpoint but the config gives {list(expected)}"
            )
    for key, message in sorted((get("conversion_errors") or {}).items()):
        problems.append(f"{key} could not be assembled from the checkpoint ({_conversion_summary(message)})")
    return problems


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
        problems = _loading_problems(info, ignore_mismatched_sizes=ignore)
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
            names = _safetensors_names(checkpoint_files)
            if names is not None:
                result[0].diep_disk_problems = _per_expert_problems(names, counts)
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
        problems += _loading_problems(loading_info, ignore_mismatched_sizes=ignore, include_missing=False)
        if problems:
            cls._diep_raise(source, problems)
        loading_info = super()._finalize_model_loading(model, load_config, loading_info)
        problems = _loading_problems(loading_info, ignore_mismatched_sizes=ignore)
        if problems:
            cls._diep_raise(source, problems)
        return loading_info

    @classmethod
    def _diep_raise(cls, source, problems):
        listed = "; ".join(problems[:_MAX_LISTED])
        more = f"; and {len(problems) - _MAX_LISTED} more" if len(problems) > _MAX_LISTED else ""
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
        past_key_values=None,
        inputs_embeds=None,
        labels=None,
        use_cache=None,
        output_router_logits=None,
        logits_to_keep=0,
        **kwargs,
    ):
        if output_router_logits is None:
            output_router_logits = getattr(self.config, "output_router_logits", False)
        outputs = self.model(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            use_cache=use_cache,
            output_router_logits=output_router_logits,
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
            past_key_values=outputs.past_key_values,
            hidden_states=outputs.hidden_states,
            attentions=outputs.attentions,
            router_logits=outputs.router_logits,
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
