# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Loading checks of a DiEP-pruned checkpoint (travels with it as remote code, beside modeling_diep.py).

A pruned checkpoint must hold exactly the tensors its config describes; these helpers list what does not match.
"""

import json
import re

# ---------------------------------------------------------------------------------------------- loading checks
# A pruned checkpoint must hold exactly the tensors its config describes. transformers only logs a report for a
# missing or unexpected tensor and initialises the missing one at random (a missing router weight would route
# tokens at random with no error); the mixin below turns every such problem into a DiepCheckpointError.

_PER_EXPERT_KEY = re.compile(
    r"^(?P<prefix>(?:.*\.)?layers\.(?P<layer>\d+)\.(?:[^.]+\.)*experts)\.(?P<idx>\d+)\.(?P<leaf>.+)$"
)
MAX_LISTED = 8


def safetensors_names(files):
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


def per_expert_problems(names, counts) -> list:
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


def loading_problems(info, *, ignore_mismatched_sizes: bool, include_missing: bool = True) -> list:
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
