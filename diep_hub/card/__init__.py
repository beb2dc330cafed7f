"""Model cards for pruned checkpoints: typed card data, rendered from ``templates/modelcard.md.j2``.

Data and rendering are separate, as in huggingface_hub: ``inputs`` gathers everything the card states (from a live
model or a checkpoint folder, the pruning report, evaluation results and the recipe) into a :class:`CardInputs`;
``tables`` turns evaluation results into the card's tables and the Hub's result formats; ``modelcard`` fills the
template into a :class:`DiepModelCard` (a ``huggingface_hub.ModelCard``) and writes it; ``figures`` draws the PNGs
(matplotlib is imported only there, when a figure is drawn).
"""

from .gather import card_inputs
from .inputs import CardInputs, LayerRow, card_inputs_from_report
from .modelcard import DiepModelCard, build_model_card, card_files, load_template, render_card, write_card
from .tables import HUB_BENCHMARKS, ResultRow, RetentionSummary, eval_result_entries, model_index_results

__all__ = [
    "HUB_BENCHMARKS",
    "CardInputs",
    "DiepModelCard",
    "LayerRow",
    "ResultRow",
    "RetentionSummary",
    "build_model_card",
    "card_files",
    "card_inputs",
    "card_inputs_from_report",
    "eval_result_entries",
    "load_template",
    "model_index_results",
    "render_card",
    "write_card",
]
