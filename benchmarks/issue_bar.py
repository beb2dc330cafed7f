"""Issue 12's bar, read off the fresh-item comparisons: is the default ahead of every baseline, and where it is
not, could any pruning be shown ahead?

A cell's rows are fresh_items.py's ``compare`` results (the default against one baseline and selection each).
"""

from __future__ import annotations

#: the sparsities issue 12's bar is set at (others are reported only)
BAR_SPARSITIES = (0.25, 0.5)


def bar(group: list[dict]) -> str:
    """Whether one cell's rows (the default against each baseline) meet the issue's bar against the baselines it
    names (other settings of validated_choice, compared on some pages, are not among them): "met", "out of reach"
    (every baseline not beaten is one no faithful pruning beats either) or "missed: <the beatable ones>"."""
    baselines = [r for r in group if not r["method"].startswith("validated-choice")]
    if not baselines:  # only other settings of the default were compared: the bar has nothing to be met against
        return "-"
    missed = [f"{r['method']} ({r['selection']})" for r in baselines
              if r["verdict"] != "ahead" and r["faithful_low"] > 0]
    if not missed:
        status = "met" if all(r["verdict"] == "ahead" for r in baselines) else "out of reach"
    else:
        status = "missed: " + ", ".join(missed)
    return status if group[0]["sparsity"] in BAR_SPARSITIES else f"not asked ({status})"


def bar_baselines(rows: list[dict]) -> str:
    """The baselines the rows compare the default with, each with the selections it ran with."""
    selections: dict[str, list[str]] = {}
    for r in rows:
        if not r["method"].startswith("validated-choice"):
            selections.setdefault(r["method"], [])
            if r["selection"] not in selections[r["method"]]:
                selections[r["method"]].append(r["selection"])
    return ", ".join(f"{m} ({' and '.join(s)})" for m, s in selections.items()) or "none"
