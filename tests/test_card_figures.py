"""The card's figures: drawn at twice the old resolution, a legend outside the axes, floor layers that stand out,
heatmap outlines that do not merge, and the layer table's yes/no cells."""

from __future__ import annotations

import pytest

import diep_hub
from diep_hub.card import build_model_card
from tests.helpers.card_inputs import (
    KEEP,
    PNG,
    REPORT,
    table,
)
from tests.helpers.tiny_models import tiny_model


# ------------------------------------------------------------------------------ issue 14: figures people can read
def _png_size_and_dpi(png: bytes) -> tuple[int, int, float]:
    import struct

    assert png.startswith(PNG)
    width, height = struct.unpack(">II", png[16:24])
    at = png.index(b"pHYs")
    per_metre_x, _, unit = struct.unpack(">IIB", png[at + 4:at + 13])
    assert unit == 1  # metres
    return width, height, per_metre_x * 0.0254


def test_figures_render_at_twice_the_old_resolution():
    from diep_hub.card.figures import DPI, experts_per_layer_figure, png_bytes

    rows = [{"layer": i, "kept": len(v), "original": 8} for i, v in KEEP.items()]
    png = png_bytes(experts_per_layer_figure(rows, top_k=2))
    width, height, dpi = _png_size_and_dpi(png)
    assert DPI == 220 and round(dpi) == 220
    figure = experts_per_layer_figure(rows, top_k=2)
    import io

    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110, bbox_inches="tight", metadata={"Software": None})
    old_width, old_height, _ = _png_size_and_dpi(buffer.getvalue())
    assert width == pytest.approx(2 * old_width, rel=0.01) and height == pytest.approx(2 * old_height, rel=0.01)
    assert width >= 860  # 430 px wide before


def test_experts_legend_sits_outside_the_axes_and_floor_layers_stand_out():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.colors import to_hex

    from diep_hub.card.figures import FLOOR_COLOR, KEPT_COLOR, experts_per_layer_figure

    rows = [{"layer": 0, "kept": 4, "original": 8}, {"layer": 1, "kept": 2, "original": 8},
            {"layer": 2, "kept": 8, "original": 8}, {"layer": 3, "kept": 2, "original": 8}]
    figure = experts_per_layer_figure(rows, top_k=2)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    [ax] = figure.axes
    legend, box = ax.get_legend().get_window_extent(renderer), ax.get_window_extent(renderer)
    assert legend.x0 >= box.x1, (legend, box)  # entirely to the right of the plotting area: hides no bar
    assert [t.get_text() for t in ax.get_legend().get_texts()] == [
        "original", "kept", "kept, at floor (= top-k)", "top-k = 2"]
    kept_bars = ax.patches[len(rows):2 * len(rows)]
    assert [to_hex(p.get_facecolor()) for p in kept_bars] == [KEPT_COLOR, FLOOR_COLOR, KEPT_COLOR, FLOOR_COLOR]
    assert [p.get_height() for p in kept_bars] == [4, 2, 8, 2]


def test_heatmap_outlines_of_neighbouring_kept_experts_do_not_merge():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.patches import Rectangle

    from diep_hub.card.figures import DPI, scores_heatmap_figure

    scores = {str(i): [float(e) for e in range(8)] for i in range(3)}
    kept = {"0": [0, 1, 2], "1": [4, 5], "2": [7]}
    figure = scores_heatmap_figure(scores, kept)
    figure.set_dpi(DPI)
    renderer = FigureCanvasAgg(figure).get_renderer()
    figure.draw(renderer)
    ax = figure.axes[0]
    outlines = [p for p in ax.patches if isinstance(p, Rectangle)]
    assert len(outlines) == 6
    by_cell = {}
    for patch in outlines:
        col, row = round(patch.get_x() + patch.get_width() / 2), round(patch.get_y() + patch.get_height() / 2)
        assert col - 0.5 < patch.get_x() and patch.get_x() + patch.get_width() < col + 0.5  # inside its cell
        by_cell[(row, col)] = patch
    assert set(by_cell) == {(0, 0), (0, 1), (0, 2), (1, 4), (1, 5), (2, 7)}
    for left, right in [((0, 0), (0, 1)), ((0, 1), (0, 2)), ((1, 4), (1, 5))]:
        a, b = by_cell[left], by_cell[right]
        stroke = a.get_linewidth() * DPI / 72  # points -> pixels
        gap = b.get_window_extent(renderer).x0 - a.get_window_extent(renderer).x1
        assert gap > stroke, (left, right, gap, stroke)  # half a stroke each side still leaves a gap


def test_booleans_read_yes_or_no_and_floor_layers_are_pointed_out():
    import re

    model = diep_hub.prune_experts(tiny_model("mixtral"), {0: [0, 1, 2, 5], 1: [3, 6], 2: [0, 2, 3], 3: [1, 4]})
    model.config.diep_skipping = {"enabled": True, "kernel": "linear", "layers": {"0": {"gamma1": 0.5}}}
    report = {**REPORT, "skipping": {**REPORT["skipping"], "renormalize": False}}
    card = build_model_card(model, report=report, license="mit")
    text = str(card)
    assert "- enabled at load: yes" in text and "- renormalize: no" in text
    # code (fenced and inline) rightly says trust_remote_code=True / diep_skipping_enabled=False
    prose = re.sub(r"`[^`]*`", "", re.sub(r"```.*?```", "", text, flags=re.S))
    assert "True" not in prose and "False" not in prose
    assert card.inputs.top_k == 2 and card.inputs.floor_layers == [1, 3]
    rows = table(text, "| Layer | Kept | Original |")
    assert [(r[0], r[1], r[4]) for r in rows[:4]] == [("0", "4", "no"), ("1", "2", "yes"), ("2", "3", "no"),
                                                      ("3", "2", "yes")]
    assert "Layers at the floor (1, 3) keep only top-k = 2 experts" in text


# ------------------------------------------------------------------------------ issue 14: the card's own figures
def test_card_figures_are_2x_and_mark_the_floor_layers():
    from diep_hub.card.figures import DPI, experts_per_layer_png

    model = diep_hub.prune_experts(tiny_model("mixtral"), {0: [0, 1, 2, 5], 1: [3, 6], 2: [0, 2, 3], 3: [1, 4]})
    card = build_model_card(model, report=REPORT, license="mit")
    assert card.inputs.top_k == 2 and card.inputs.floor_layers == [1, 3]
    for path, png in card.figures.items():
        width, _, dpi = _png_size_and_dpi(png)
        assert round(dpi) == DPI and width >= 800, (path, width)  # sharp at ~400 CSS px; 110 dpi gave 430 px
    rows = [{"layer": r.layer, "kept": r.kept, "original": r.original} for r in card.inputs.layers]
    # the card's bar chart is the one drawn with top-k (floor colour, dashed top-k line), not the plain one
    assert card.figures["assets/experts_per_layer.png"] == experts_per_layer_png(rows, top_k=2)
    assert card.figures["assets/experts_per_layer.png"] != experts_per_layer_png(rows, top_k=None)
