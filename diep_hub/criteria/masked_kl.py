"""Masked KL: how far a keep map, applied by masking the router, moves the next-token distribution away from the
unpruned model's, on a fixed set of sequences.

The pruned model is the unpruned one with every removed expert's router logit at ``MIN_LOG_GATE``
(``router_bias``): what surgery does to routing. Judging and refining keep maps (``choice``) measure many keep maps
on the same sequences, and two things do not change between those measurements; :class:`MaskedKL` keeps them,
within a memory budget, instead of computing them again:

- the unpruned model's log-probabilities of each batch (one full forward a measurement otherwise);
- the decoder layers' outputs under a *base* keep map (:meth:`MaskedKL.set_base`). A keep map that first differs
  from the base at the MoE layer of decoder layer ``d`` routes every decoder layer before ``d`` as the base does,
  so its forward takes the base's output of layer ``d - 1`` and computes only layers ``d`` onwards (the earlier
  layers hand the cached output on without computing). A refinement's probes change one or two layers, so they
  run on average about half of the model.

Both reuse exactly what a full forward computes, so every KL is the same number, bit for bit, with or without the
caches (tests/test_masked_kl.py checks it on every family).

``objective="nll"`` measures the pruned model's own next-token negative log-likelihood of the sequences instead
(how well it models the text, not how close it stays to the unpruned model; no unpruned forward is needed), with the
same caches and the same interface: ``validated_choice``'s ``refine_objective`` (benchmarks/NLL_REFINEMENT.md).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from huggingface_hub.utils import tqdm  # honours HF_HUB_DISABLE_PROGRESS_BARS
from torch import nn

from ..families import MoELayer
from .capture import eval_mode, input_device
from .router_bias import removal_bias, router_logit_bias

logger = logging.getLogger(__name__)

KeepMap = dict[int, list[int]]

#: what :class:`MaskedKL` measures: the KL from the unpruned model, or the pruned model's own next-token NLL
OBJECTIVES = ("kl", "nll")


def log_probabilities(logits: torch.Tensor) -> torch.Tensor:
    """Log-softmax in at least float32 (a bf16 model's logits are widened; a float64 model's stay float64)."""
    return torch.log_softmax(logits.to(torch.promote_types(logits.dtype, torch.float32)), dim=-1)


def decoder_positions(model: nn.Module, layers: list[MoELayer]) -> tuple[nn.ModuleList | None, list[int]]:
    """(the model's list of decoder layers, the position in it of each MoE layer's block), or (None, []) when no
    single ``nn.ModuleList`` holds every block, one block an element at most (then nothing is resumed)."""
    blocks = [layer.block for layer in layers]
    for module in model.modules():
        if not isinstance(module, nn.ModuleList):
            continue
        positions = []
        for block in blocks:
            found = [d for d, element in enumerate(module) if any(m is block for m in element.modules())]
            if len(found) != 1:
                break
            positions.append(found[0])
        if len(positions) == len(blocks) and len(set(positions)) == len(positions):
            return module, positions
    return None, []


@contextmanager
def _resumed_at(decoder_layers: nn.ModuleList, start: int, output) -> Iterator[None]:
    """Within the block, decoder layers ``0 .. start - 1`` return ``output`` (layer ``start - 1``'s output under
    the base keep map) without computing, so a forward computes layers ``start`` onwards only. An instance-level
    ``forward`` already there (accelerate's device hooks put one) is put back afterwards."""
    saved = [layer.__dict__.get("forward") for layer in decoder_layers[:start]]
    for layer in decoder_layers[:start]:
        layer.forward = lambda *args, **kwargs: output
    try:
        yield
    finally:
        for layer, forward in zip(decoder_layers[:start], saved):
            del layer.forward
            if forward is not None:
                layer.forward = forward


@contextmanager
def _capturing(decoder_layers: nn.ModuleList, positions: list[int], into: dict[int, object]) -> Iterator[None]:
    """Within the block, the output of each decoder layer in ``positions`` is stored in ``into[position]``."""
    def hook_for(position: int):
        def hook(_module, _args, output):
            into[position] = output
        return hook

    handles = [decoder_layers[p].register_forward_hook(hook_for(p)) for p in positions]
    try:
        yield
    finally:
        for handle in handles:
            handle.remove()


class MaskedKL:
    """Mean per-token KL(unpruned || pruned) of keep maps on fixed ``sequences``, reusing the unpruned
    log-probabilities and a base keep map's decoder-layer outputs while they fit in ``cache_bytes``.

    ``objective="nll"``: the pruned model's mean next-token NLL instead (each sequence's ``L - 1`` predictions),
    where "KL" below reads "NLL"; the unpruned model is then never run.

    The unpruned log-probabilities of a batch are kept when all batches' fit in the budget; the base's outputs are
    kept at as many evenly spaced decoder layers as the rest of the budget holds (all of them on small models;
    a keep map resumes from the nearest kept layer below its first change). ``cache_bytes=0`` recomputes
    everything, as a plain loop over batches would.
    """

    def __init__(self, model: nn.Module, layers: list[MoELayer], sequences: torch.Tensor, batch_size: int,
                 cache_bytes: int = 0, desc: str = "masked KL", objective: str = "kl"):
        if objective not in OBJECTIVES:
            raise ValueError(f"objective={objective!r}; allowed: {list(OBJECTIVES)}")
        if objective == "nll" and sequences.shape[1] < 2:
            raise ValueError(f"objective='nll' needs sequences of at least 2 tokens, got {tuple(sequences.shape)}")
        self.model, self.layers, self.sequences, self.desc = model, layers, sequences, desc
        self.objective = objective
        self.batches = list(torch.split(sequences, batch_size))
        self.cache_bytes = int(cache_bytes)
        self.num_sequences = int(sequences.shape[0])
        self._references: list[torch.Tensor] | None = [] if self.cache_bytes > 0 else None
        self._reference_bytes = 0
        self._decoder_layers, self._moe_positions = decoder_positions(model, layers)
        if self._decoder_layers is None and self.cache_bytes > 0:
            logger.debug("%s: no list of decoder layers holds every MoE block; every masked forward runs in full", desc)
        self._base: KeepMap | None = None
        self._base_outputs: list[dict[int, object]] = []  # per batch: decoder position -> its output under base
        # keep maps measured with offer_as_base: (keep map, resume point, outputs per batch, result)
        self._offers: list[tuple[KeepMap, int, list[dict[int, object]], tuple[float, torch.Tensor]]] = []
        self.forwards = 0.0  # passes of the whole model over all the sequences (a resumed forward counts the share
        # of decoder layers it ran)

    # -- the unpruned reference -------------------------------------------------------------------------------
    def _reference(self, index: int, ids: torch.Tensor) -> torch.Tensor:
        if self._references is not None and index < len(self._references):
            return self._references[index]
        reference = log_probabilities(self.model(input_ids=ids, use_cache=False).logits)
        self.forwards += ids.shape[0] / self.num_sequences
        if self._references is not None:
            size = reference.numel() * reference.element_size()
            if self._reference_bytes + size * (len(self.batches) - index) <= self.cache_bytes:
                self._references.append(reference)  # every batch's fits: keep them (in order)
                self._reference_bytes += size
            else:
                self._references = None  # not all fit: recompute each time, as without a cache
        return reference

    # -- resuming from the base keep map ------------------------------------------------------------------------
    def _first_change(self, keep: KeepMap) -> int | None:
        """The decoder position of the first MoE layer whose kept experts differ from the base's (None: none do)."""
        changed = [position for layer, position in zip(self.layers, self._moe_positions)
                   if sorted(keep[layer.index]) != sorted(self._base[layer.index])]
        return min(changed) if changed else None

    def _resume_point(self, keep: KeepMap) -> int:
        """The decoder layer a forward under ``keep`` starts at (0: from the embeddings, a full forward)."""
        if self._base is None or not self._base_outputs:
            return 0
        first = self._first_change(keep)
        if first is None:
            first = len(self._decoder_layers)  # the base itself: only the head runs after the last layer
        cached = [p for p in self._base_outputs[0] if p < first]
        return max(cached) + 1 if cached else 0

    def nominal_shares(self, keep_maps: list[KeepMap]) -> list[float]:
        """Each keep map's cost against the base, in passes of the whole model over the sequences, as a forward that
        resumes at its first change computes it: the share of decoder layers from that change on (1 without a list of
        decoder layers). It leaves out what the cache budget adds (the unpruned reference, resuming from an earlier
        layer), so a refinement bounded in these units takes the same moves with any ``cache_bytes``."""
        if self._base is None or self._decoder_layers is None:
            return [1.0] * len(keep_maps)
        shares = []
        for keep in keep_maps:
            first = self._first_change(keep)
            shares.append(0.0 if first is None else 1 - first / len(self._decoder_layers))
        return shares

    def _pruned_logits(self, index: int, ids: torch.Tensor, bias: list[torch.Tensor], start: int):
        with router_logit_bias(self.layers, lambda p: bias[p]):
            share = ids.shape[0] / self.num_sequences
            if start == 0:
                self.forwards += share
                return self.model(input_ids=ids, use_cache=False).logits
            self.forwards += share * (1 - start / len(self._decoder_layers))
            with _resumed_at(self._decoder_layers, start, self._base_outputs[index][start - 1]):
                return self.model(input_ids=ids, use_cache=False).logits

    def set_base(self, keep: KeepMap) -> tuple[float, torch.Tensor]:
        """Make ``keep`` the base keep map, whose decoder-layer outputs later measurements resume from; returns its
        :meth:`per_sequence` value. The forward that measures it stores its outputs; a keep map just measured
        with ``offer_as_base`` needs no forward at all."""
        normalized = {index: sorted(ids) for index, ids in keep.items()}
        offers, self._offers = self._offers, []
        if self._decoder_layers is None or self.cache_bytes <= 0:
            self._base = normalized
            return self.per_sequence([keep])[0]
        offered = [offer for offer in offers if offer[0] == normalized]
        if offered:
            _, start, new_outputs, result = offered[0]
        else:
            start = self._resume_point(keep)
            for outputs in self._base_outputs:  # only the layers before the change stay valid (and resumed from)
                for position in [p for p in outputs if p >= start]:
                    del outputs[position]
            positions = self._cached_positions()
            results, captured = self._measure([keep], [start], positions=positions)
            result, new_outputs = results[0], captured[0] if positions else []
        for old, new in zip(self._base_outputs, new_outputs):  # carry the unchanged layers' outputs over
            new.update({p: output for p, output in old.items() if p < start})
        self._base, self._base_outputs = normalized, new_outputs
        return result

    def _cached_positions(self, copies: int = 1) -> list[int]:
        """Decoder positions whose outputs the base keeps: evenly spaced over 0 .. D-2 (the last layer's output is
        never resumed from), as many as the budget left by the reference holds ``copies`` times."""
        count = len(self._decoder_layers) - 1
        if count <= 0:
            return []
        first = self.batches[0]
        hidden_size = self.model.config.get_text_config().hidden_size
        dtype = next(self.model.parameters()).dtype
        per_layer = self.num_sequences * first.shape[1] * hidden_size * torch.empty((), dtype=dtype).element_size()
        room = self.cache_bytes - self._reference_bytes
        if self.objective == "kl" and self._references is not None and not self._references:  # reserve its room
            vocab = self.model.config.get_text_config().vocab_size
            room -= self.num_sequences * first.shape[1] * vocab * 4
        affordable = max(0, room) // max(1, per_layer * copies)
        if affordable <= 0:
            return []
        if affordable >= count:
            return list(range(count))
        step = count / affordable
        return sorted({min(count - 1, int(math.floor((i + 1) * step)) - 1) for i in range(int(affordable))})

    # -- measuring ----------------------------------------------------------------------------------------------
    def per_sequence(self, keep_maps: list[KeepMap], progress: bool = False,
                     offer_as_base: bool = False) -> list[tuple[float, torch.Tensor]]:
        """(mean per-token KL, each sequence's mean per-token KL [num_sequences] float64) per keep map.

        ``offer_as_base``: keep each map's decoder-layer outputs too, so that :meth:`set_base` of one of them costs
        no forward (a refinement makes the best of the moves it measured its next base); only when the budget
        holds them all at every position the base keeps, else :meth:`set_base` measures as usual."""
        starts = [self._resume_point(keep) for keep in keep_maps]
        positions = None
        if offer_as_base and self._decoder_layers is not None and self.cache_bytes > 0:
            full = self._cached_positions()
            if full and self._cached_positions(copies=len(keep_maps) + 1) == full:
                positions = full
        results, captured = self._measure(keep_maps, starts, progress=progress, positions=positions)
        self._offers = [({index: sorted(ids) for index, ids in keep.items()}, start, outputs, result)
                        for keep, start, outputs, result in zip(keep_maps, starts, captured, results)
                        if positions]
        return results

    def means(self, keep_maps: list[KeepMap], progress: bool = False, offer_as_base: bool = False) -> list[float]:
        """The mean per-token KL per keep map (:meth:`per_sequence`'s means)."""
        return [mean for mean, _ in self.per_sequence(keep_maps, progress, offer_as_base)]

    def _measure(self, keep_maps: list[KeepMap], starts: list[int], progress: bool = False,
                 positions: list[int] | None = None):
        """(per_sequence's results, per keep map the outputs per batch of the decoder ``positions`` at or after its
        start: empty lists without ``positions``)."""
        device = input_device(self.model)
        biases = [removal_bias(self.layers, keep) for keep in keep_maps]
        totals = [0.0] * len(keep_maps)
        per_sequence = [[] for _ in keep_maps]
        captured: list[list[dict[int, object]]] = [[] for _ in keep_maps]
        tokens = 0
        with torch.no_grad(), eval_mode(self.model):
            for index, batch in enumerate(tqdm(self.batches, desc=self.desc, disable=not progress)):
                ids = batch.to(device)
                reference = self._reference(index, ids) if self.objective == "kl" else None
                tokens += ids.shape[0] * (ids.shape[1] - (self.objective == "nll"))
                for number, (bias, start) in enumerate(zip(biases, starts)):
                    if positions:
                        stored: dict[int, object] = {}
                        with _capturing(self._decoder_layers, [p for p in positions if p >= start], stored):
                            logits = self._pruned_logits(index, ids, bias, start)
                        captured[number].append(stored)
                    else:
                        logits = self._pruned_logits(index, ids, bias, start)
                    terms = self._terms(reference, logits, ids)
                    totals[number] += float(terms.sum())
                    per_position = terms.sum(dim=-1) if self.objective == "kl" else terms
                    per_sequence[number].append(per_position.mean(dim=-1).to(torch.float64).cpu())
        results = [(total / tokens, torch.cat(sequences)) for total, sequences in zip(totals, per_sequence)]
        return results, captured

    def _terms(self, reference: torch.Tensor | None, logits: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """What the objective sums: KL(unpruned || pruned)'s summands [batch, positions, vocab], or the NLL of the
        next token at every position but the last [batch, positions - 1]."""
        if self.objective == "kl":
            return reference.exp() * (reference - log_probabilities(logits))
        return -log_probabilities(logits[:, :-1]).gather(-1, ids[:, 1:, None]).squeeze(-1)
