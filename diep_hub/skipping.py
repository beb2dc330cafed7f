"""Adaptive expert skipping (DiEP section 3.3): calibrate the thresholds, ship them in the config, count skips.

Rule (arXiv 2509.16105): for a token routed to experts e0, e1 with weights w_e1 <= w_e0, skip e1 when
``w_e1 < gamma * w_e0`` with ``gamma = gamma1 * gamma2(e0, e1)``:

- ``gamma1`` (per layer): the median over calibration tokens of ``w_e1 / w_e0``, the top-k weights SORTED in
  descending order first (DeepSeek routers return them unsorted);
- ``gamma2(e0, e1) = CKA(y_e0, y_e1) / mean pairwise CKA`` of the layer, where y_e is expert e's output on a
  shared sample of calibration tokens (every expert is run on the same tokens), CKA linear by default or RBF
  (Kornblith et al. 2019, see ``diep_hub.cka``). The N x N ratio table is precomputed, so inference is a lookup.

Top-k > 2 (the paper only treats top-2): every non-primary expert e_j is tested against the primary,
``w_ej < gamma1 * gamma2(e0, e_j) * w_e0``, and ``gamma1`` is the median of ``w_ej / w_e0`` over all calibration
(token, non-primary slot) pairs, which is the paper's statistic when k = 2. Skipped weights become 0 and the kept
weights are rescaled to keep their original sum (top-2: the primary's weight becomes w_e0 + w_e1).

The thresholds live in ``config.diep_skipping`` and the rule runs in the checkpoint's remote code
(``skipping_diep.DiepExpertSkipping``, shipped beside modeling_diep.py), so a published checkpoint skips the same
tokens without diep_hub.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS
from torch import nn

from .checkpoint.format import is_pruned
from .cka import CKA_KERNELS, centered_gram_vector, cka_matrix, mean_off_diagonal
from .criteria.capture import input_device
from .errors import ConfigError
from .families import MoELayer, get_family

logger = logging.getLogger(__name__)

#: Beyond this many experts in a layer the N x N tables make config.json large (64 experts: ~4k floats a layer).
LARGE_TABLE_EXPERTS = 64


@dataclass
class LayerSkipping:
    """Calibrated skipping of one MoE layer.

    Attributes:
        gamma1: median of w_ej / w_e0 over calibration (token, non-primary slot) pairs.
        cka: N x N CKA between expert outputs on the shared token sample.
        cka_ratio: ``cka / mean off-diagonal cka`` (gamma2), the table the remote code looks up.
        num_slots: non-primary routing slots seen during calibration.
        calibration_skip_rate: fraction of those slots the rule skips (what to expect on similar text).
    """

    gamma1: float
    cka: torch.Tensor
    cka_ratio: torch.Tensor
    num_slots: int
    calibration_skip_rate: float

    @property
    def num_experts(self) -> int:
        return int(self.cka_ratio.shape[0])


@dataclass
class SkippingCalibration:
    """Per-layer thresholds and CKA tables, plus how they were measured."""

    kernel: str
    layers: dict[int, LayerSkipping]
    num_tokens: int
    cka_tokens: int
    details: dict = field(default_factory=dict)

    def to_config(self, enabled: bool = True) -> dict:
        """The JSON-able ``config.diep_skipping`` entry (layer keys as strings, as JSON requires)."""
        return {
            "enabled": bool(enabled),
            "kernel": self.kernel,
            "layers": {
                str(index): {
                    "gamma1": float(layer.gamma1),
                    "cka_ratio": [[float(v) for v in row] for row in layer.cka_ratio.tolist()],
                }
                for index, layer in sorted(self.layers.items())
            },
        }

    def summary(self) -> dict:
        """Per-layer figures for the pruning report and the model card."""
        return {
            "kernel": self.kernel,
            "calibration_tokens": self.num_tokens,
            "cka_tokens": self.cka_tokens,
            "layers": {
                index: {
                    "gamma1": layer.gamma1,
                    "mean_pairwise_cka": mean_off_diagonal(layer.cka),
                    "calibration_skip_rate": layer.calibration_skip_rate,
                }
                for index, layer in sorted(self.layers.items())
            },
        }


def _sorted_routing(top_k_index: torch.Tensor, top_k_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weights sorted descending with their expert ids; a stable sort keeps the first slot of a tie as primary."""
    weights, order = top_k_weights.detach().float().sort(dim=-1, descending=True, stable=True)
    return top_k_index.gather(-1, order), weights


def _median(values: torch.Tensor) -> float:
    """The median (mean of the two middle values for an even count): torch.median would return the lower one."""
    ordered = values.flatten().sort().values
    n = ordered.numel()
    if n % 2:
        return float(ordered[n // 2])
    return float((ordered[n // 2 - 1].double() + ordered[n // 2].double()) / 2)


def _check_inputs(model: nn.Module, input_ids, kernel: str, batch_size: int, max_tokens_for_cka: int) -> None:
    if kernel not in CKA_KERNELS:
        raise ConfigError(f"kernel={kernel!r} is not supported; choose one of {list(CKA_KERNELS)}")
    if (
        not isinstance(input_ids, torch.Tensor)
        or input_ids.dim() != 2
        or input_ids.dtype not in (torch.long, torch.int)
    ):
        shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else type(input_ids).__name__
        raise ConfigError(f"input_ids must be an integer tensor [num_samples, seq_len], got {shape}")
    if input_ids.numel() == 0:
        raise ConfigError("input_ids is empty; calibration needs at least one token")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ConfigError(f"batch_size must be a positive integer, got {batch_size!r}")
    if isinstance(max_tokens_for_cka, bool) or not isinstance(max_tokens_for_cka, int) or max_tokens_for_cka < 2:
        raise ConfigError(f"max_tokens_for_cka must be an integer >= 2, got {max_tokens_for_cka!r}")
    if input_ids.numel() < 2:
        raise ConfigError("CKA needs at least 2 calibration tokens; got 1")
    get_family(model)  # raises UnsupportedModelError for dense or unknown models


class _RoutingRecorder:
    """Pre-hook on one layer's experts: keeps sorted routing of every token and the CKA sample's hidden states."""

    def __init__(self, sample_positions: torch.Tensor):
        self.sample_positions = sample_positions  # sorted flat token positions over the whole calibration set
        self.offset = 0
        self.index: list[torch.Tensor] = []
        self.weights: list[torch.Tensor] = []
        self.sample: list[torch.Tensor] = []

    def __call__(self, experts, args):
        hidden_states, top_k_index, top_k_weights = args
        index, weights = _sorted_routing(top_k_index, top_k_weights)
        self.index.append(index.cpu())
        self.weights.append(weights.cpu())
        count = hidden_states.shape[0]
        lo = torch.searchsorted(self.sample_positions, self.offset)
        hi = torch.searchsorted(self.sample_positions, self.offset + count)
        if hi > lo:
            rows = (self.sample_positions[lo:hi] - self.offset).to(hidden_states.device)
            self.sample.append(hidden_states.detach()[rows])
        self.offset += count
        return None


def _expert_outputs_gram_vectors(layer: MoELayer, sample: torch.Tensor, kernel: str) -> torch.Tensor:
    """Run every expert of the layer on the shared sample (through the model's own experts backend)."""
    experts = layer.experts
    n = sample.shape[0]
    vectors = []
    ones = torch.ones(n, 1, dtype=sample.dtype, device=sample.device)
    for expert in range(layer.num_experts):
        index = torch.full((n, 1), expert, dtype=torch.long, device=sample.device)
        output = experts(sample, index, ones)
        vectors.append(centered_gram_vector(output, kernel))
    return torch.stack(vectors)


def _disabled_skipping(model: nn.Module) -> list:
    """Pause any installed skipping so calibration sees the router's own choices."""
    paused = []
    for module in model.modules():
        skipper = module.__dict__.get("diep_skipping")
        if skipper is not None and skipper.active:
            skipper.active = False
            paused.append(skipper)
    return paused


@torch.no_grad()
def calibrate_skipping(
    model: nn.Module,
    input_ids: torch.Tensor,
    *,
    kernel: str = "linear",
    batch_size: int = 8,
    max_tokens_for_cka: int = 512,
    seed: int = 0,
) -> SkippingCalibration:
    """Measure gamma1 and the CKA ratio table of every MoE layer with top-k >= 2 on calibration text.

    Args:
        model: a supported MoE causal LM, stock or pruned (calibrate AFTER pruning: tables are per kept expert).
        input_ids: calibration token ids [num_samples, seq_len] (e.g. ``load_calibration_data``).
        kernel: "linear" (default, cheap) or "rbf" CKA.
        batch_size: sequences per forward pass.
        max_tokens_for_cka: size of the shared token sample on which every expert is run (memory ~ n^2 per expert).
        seed: picks the token sample.

    Returns:
        SkippingCalibration; pass it to ``enable_skipping``.
    """
    _check_inputs(model, input_ids, kernel, batch_size, max_tokens_for_cka)
    family = get_family(model)
    layers = [layer for layer in family.moe_layers(model) if layer.top_k >= 2 and layer.num_experts >= 2]
    if not layers:
        raise ConfigError("no MoE layer routes to 2 or more experts: there is nothing to skip")
    total_tokens = input_ids.numel()
    n_sample = min(max_tokens_for_cka, total_tokens)
    generator = torch.Generator().manual_seed(seed)
    positions = torch.randperm(total_tokens, generator=generator)[:n_sample].sort().values
    recorders = {layer.index: _RoutingRecorder(positions) for layer in layers}
    handles = [layer.experts.register_forward_pre_hook(recorders[layer.index]) for layer in layers]
    paused = _disabled_skipping(model)
    device = input_device(model)
    was_training = model.training
    model.eval()
    try:
        for start in tqdm(range(0, input_ids.shape[0], batch_size), desc="skipping calibration", leave=False):
            model(input_ids=input_ids[start : start + batch_size].to(device), use_cache=False)
        calibrated = {}
        for layer in tqdm(layers, desc="expert CKA", leave=False):
            recorder = recorders[layer.index]
            index = torch.cat(recorder.index)
            weights = torch.cat(recorder.weights)
            ratios = weights[:, 1:] / weights[:, :1].clamp_min(torch.finfo(torch.float32).tiny)
            gamma1 = _median(ratios)
            sample = torch.cat(recorder.sample)
            cka = cka_matrix(_expert_outputs_gram_vectors(layer, sample, kernel)).float().cpu()
            mean = mean_off_diagonal(cka)
            # all pairs orthogonal (mean 0) means all pairs are equally (dis)similar: gamma2 = 1
            cka_ratio = cka / mean if mean > 0 else torch.ones_like(cka)
            gamma = gamma1 * cka_ratio[index[:, :1], index[:, 1:]]
            skip_rate = float((weights[:, 1:] < gamma * weights[:, :1]).float().mean())
            calibrated[layer.index] = LayerSkipping(gamma1, cka, cka_ratio, ratios.numel(), skip_rate)
            logger.info(
                "layer %d: gamma1 %.4f, mean CKA %.4f, calibration skip rate %.3f", layer.index, gamma1, mean, skip_rate
            )
    finally:
        for handle in handles:
            handle.remove()
        for skipper in paused:
            skipper.active = True
        model.train(was_training)
    return SkippingCalibration(kernel=kernel, layers=calibrated, num_tokens=total_tokens, cka_tokens=n_sample)


def enable_skipping(model: nn.Module, calibration: SkippingCalibration, *, enabled: bool = True) -> nn.Module:
    """Store the calibration in ``model.config.diep_skipping`` and activate it on the live model.

    A stock model is first turned into a ``diep_<family>`` model (``prune_experts(model, {})``: same weights, same
    logits), because skipping ships as the checkpoint's remote code. Returns the same model object.

    Raises:
        ConfigError: the calibration names a layer that is not a MoE layer, or its table does not match the
            layer's expert count (calibrated before pruning): recalibrate on the model as it is now.
    """
    if not isinstance(calibration, SkippingCalibration):
        raise ConfigError(f"calibration must be a SkippingCalibration, got {type(calibration).__name__}")
    family = get_family(model)
    counts = {layer.index: layer.num_experts for layer in family.moe_layers(model)}
    for index, layer in calibration.layers.items():
        if index not in counts:
            raise ConfigError(f"calibration has layer {index}, which is not a MoE layer; MoE layers: {sorted(counts)}")
        if layer.num_experts != counts[index]:
            raise ConfigError(
                f"layer {index}: calibration has {layer.num_experts} experts but the model has {counts[index]}; "
                "calibrate skipping after pruning, on the model you enable it on"
            )
    if max(counts.values()) > LARGE_TABLE_EXPERTS:
        logger.warning(
            "layers of up to %d experts make config.json carry N x N skipping tables per layer (large)",
            max(counts.values()),
        )
    if not is_pruned(model):
        from .surgery import prune_experts

        logger.info("converting the %s model to the diep format so that skipping ships with it", family.model_type)
        prune_experts(model, {})
    model.config.diep_skipping = calibration.to_config(enabled=enabled)
    model.diep_configure_skipping()
    return model


def disable_skipping(model: nn.Module) -> nn.Module:
    """Turn skipping off on a live model (kept in the config as ``enabled: false``)."""
    settings = getattr(model.config, "diep_skipping", None)
    if settings:
        model.config.diep_skipping = {**settings, "enabled": False}
        model.diep_configure_skipping()
    return model


def _skippers(model: nn.Module) -> dict[int, object]:
    found = {}
    for layer in get_family(model).moe_layers(model):
        skipper = layer.experts.__dict__.get("diep_skipping")
        if skipper is not None:
            found[layer.index] = skipper
    return found


def skip_counts(model: nn.Module) -> dict[int, tuple[int, int]]:
    """(skipped, seen) non-primary routing slots per layer since the last reset (layers with skipping on)."""
    return {index: (int(skipper.skipped), int(skipper.slots)) for index, skipper in _skippers(model).items()}


def skip_rates(model: nn.Module) -> dict[int, float]:
    """Fraction of non-primary routing slots skipped per layer since the last reset (0.0 where none were seen;
    :func:`skip_counts` tells the two apart)."""
    return {index: skipped / seen if seen else 0.0 for index, (skipped, seen) in skip_counts(model).items()}


def reset_skip_counters(model: nn.Module) -> None:
    """Zero the skip counters of every layer."""
    for skipper in _skippers(model).values():
        skipper.reset()


def skipping_enabled(model: nn.Module) -> bool:
    """Whether adaptive expert skipping is on in ``model`` (``config.diep_skipping["enabled"]``)."""
    settings = getattr(model.config, "diep_skipping", None)
    return bool(isinstance(settings, Mapping) and settings.get("enabled"))
