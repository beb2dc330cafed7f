"""Figures for the model card: experts kept per layer (bars) and expert scores per layer (heatmap), as PNG bytes.

Built on matplotlib's object API with the Agg canvas, so no global backend is switched and no display is needed
(CI, servers); matplotlib is imported only when a figure is drawn, so importing the card costs nothing. Figures are
deterministic for the same data and matplotlib version (no timestamps in metadata), rendered at 2x (``DPI``) for
high-density screens, with legends outside the plotting area so that no bar is hidden.
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING

from ..checkpoint.layout import EXPERTS_FIGURE, SCORES_FIGURE

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from .inputs import CardInputs

DPI = 220  # 2x matplotlib's 110 used before: the Hub shows images at their CSS width, sharp on 2x screens
OUTLINE_INSET = 0.12  # kept-expert outlines are drawn this far inside their cell, so neighbours never touch
KEPT_COLOR, FLOOR_COLOR, ORIGINAL_COLOR = "#3b75af", "#d9822b", "#d9d9d9"


def png_bytes(figure: Figure) -> bytes:
    """The figure as PNG at ``DPI``, cropped to its content (legends outside the axes included)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def experts_per_layer_figure(layers: Sequence[Mapping], top_k: int | None = None) -> Figure:
    """Bars of kept vs original routed experts per MoE layer (rows with ``layer``, ``kept``, ``original``).

    Layers left at the floor (kept <= ``top_k``: every token uses every kept expert, the router has no choice left)
    get their own colour, and a dashed line marks top-k. The legend sits to the right of the axes."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    if not layers:
        raise ValueError("no MoE layers to plot")
    index = [int(r["layer"]) for r in layers]
    kept = [int(r["kept"]) for r in layers]
    original = [int(r.get("original") or r["kept"]) for r in layers]
    at_floor = [top_k is not None and k <= top_k for k in kept]
    figure = Figure(figsize=(max(4.0, 0.28 * len(index) + 2), 2.8))
    ax = figure.add_subplot()
    ax.bar(index, original, color=ORIGINAL_COLOR, width=0.8)
    ax.bar(index, kept, color=[FLOOR_COLOR if f else KEPT_COLOR for f in at_floor], width=0.8)
    handles = [Patch(color=ORIGINAL_COLOR, label="original"), Patch(color=KEPT_COLOR, label="kept")]
    if any(at_floor):
        handles.append(Patch(color=FLOOR_COLOR, label="kept, at floor (= top-k)"))
    if top_k is not None:
        handles.append(ax.axhline(top_k, color="#555555", linestyle="--", linewidth=0.9, label=f"top-k = {top_k}"))
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("routed experts")
    ax.set_ylim(0, max(original) * 1.15)
    ax.set_title("Experts kept per layer")
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0, fontsize="small",
              frameon=False)
    return figure


def experts_per_layer_png(layers: Sequence[Mapping], top_k: int | None = None) -> bytes:
    return png_bytes(experts_per_layer_figure(layers, top_k))


def scores_heatmap_figure(
    scores: Mapping[int | str, Sequence[float]], kept: Mapping[int | str, Sequence[int]] | None = None
) -> Figure:
    """Heatmap of expert scores (layers x experts, original numbering); kept experts are outlined when given, each
    outline inset in its own cell so that two kept neighbours show as two boxes, not one."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    if not scores:
        raise ValueError("no expert scores to plot")
    layers = sorted(scores, key=lambda k: int(k))
    width = max(len(scores[k]) for k in layers)
    grid = [[float("nan")] * width for _ in layers]
    for row, key in enumerate(layers):
        for col, value in enumerate(scores[key]):
            grid[row][col] = float(value)
    figure = Figure(figsize=(max(4.0, 0.22 * width + 2), max(2.2, 0.25 * len(layers) + 1.2)))
    ax = figure.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", interpolation="nearest")
    figure.colorbar(image, ax=ax, label="score")
    ax.set_yticks(range(len(layers)), [str(k) for k in layers])
    ax.set_xlabel("expert (original id)")
    ax.set_ylabel("decoder layer")
    ax.set_title("Expert scores (outlined: kept)")
    side = 1 - 2 * OUTLINE_INSET
    for row, key in enumerate(layers):
        for expert in (kept or {}).get(key, (kept or {}).get(str(key), [])) or []:
            corner = (int(expert) - 0.5 + OUTLINE_INSET, row - 0.5 + OUTLINE_INSET)
            ax.add_patch(Rectangle(corner, side, side, fill=False, edgecolor="white", linewidth=1.2))
    return figure


def scores_heatmap_png(
    scores: Mapping[int | str, Sequence[float]], kept: Mapping[int | str, Sequence[int]] | None = None
) -> bytes:
    return png_bytes(scores_heatmap_figure(scores, kept))


def card_figures(inputs: CardInputs) -> dict[str, bytes]:
    """The card's figures, ``{path in the repo: PNG bytes}``, for what ``inputs.figures`` names."""
    figures: dict[str, bytes] = {}
    if "experts" in inputs.figures and inputs.layers:
        rows = [{"layer": r.layer, "kept": r.kept, "original": r.original} for r in inputs.layers]
        figures[EXPERTS_FIGURE] = experts_per_layer_png(rows, inputs.top_k)
    if "scores" in inputs.figures and inputs.scores:
        figures[SCORES_FIGURE] = scores_heatmap_png(inputs.scores, {str(r.layer): r.kept_ids for r in inputs.layers})
    return figures
