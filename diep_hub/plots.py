"""Figures for the model card: experts kept per layer (bars) and expert scores per layer (heatmap), as PNG bytes.

Built on matplotlib's object API with the Agg canvas, so no global backend is switched and no display is needed
(CI, servers). Figures are deterministic for the same data and matplotlib version (no timestamps in metadata).
"""

from __future__ import annotations

import io
from collections.abc import Mapping, Sequence

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

EXPERTS_FIGURE = "assets/experts_per_layer.png"
SCORES_FIGURE = "assets/expert_scores.png"


def _png(figure: Figure) -> bytes:
    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    return buffer.getvalue()


def experts_per_layer_png(layers: Sequence[Mapping]) -> bytes:
    """Bar chart of kept vs original routed experts for each MoE layer (rows with ``layer``, ``kept``, ``original``)."""
    if not layers:
        raise ValueError("no MoE layers to plot")
    index = [int(r["layer"]) for r in layers]
    kept = [int(r["kept"]) for r in layers]
    original = [int(r.get("original") or r["kept"]) for r in layers]
    figure = Figure(figsize=(max(4.0, 0.28 * len(index) + 2), 2.8))
    ax = figure.add_subplot()
    ax.bar(index, original, color="#d9d9d9", label="original", width=0.8)
    ax.bar(index, kept, color="#3b75af", label="kept", width=0.8)
    ax.set_xlabel("decoder layer")
    ax.set_ylabel("routed experts")
    ax.set_ylim(0, max(original) * 1.15)
    ax.set_title("Experts kept per layer")
    ax.legend(loc="lower right", fontsize="small")
    return _png(figure)


def scores_heatmap_png(
    scores: Mapping[int | str, Sequence[float]], kept: Mapping[int | str, Sequence[int]] | None = None
) -> bytes:
    """Heatmap of expert scores (layers x experts, original numbering); kept experts are outlined when given."""
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
    if kept:
        for row, key in enumerate(layers):
            for expert in kept.get(key, kept.get(str(key), [])) or []:
                ax.add_patch(_outline(int(expert), row))
    return _png(figure)


def _outline(col: int, row: int):
    from matplotlib.patches import Rectangle

    return Rectangle((col - 0.5, row - 0.5), 1, 1, fill=False, edgecolor="white", linewidth=1.2)
