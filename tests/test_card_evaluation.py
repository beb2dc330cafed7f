"""What the card says was measured: retention with its standard error and item count beside perplexity, memory the
model itself needs, and how vLLM serves the checkpoint."""

from __future__ import annotations

import pytest

import diep_hub
from diep_hub.card import build_model_card
from tests.helpers.card_inputs import (
    FORWARD_METHOD,
    evaluation_section,
    pruned_with_keep,
    results,
    table,
)
from tests.helpers.tiny_models import tiny_model


# -------------------------------------------------------------------- issue 14: what was measured, with its error
def test_retention_is_shown_with_its_error_and_items_beside_perplexity():
    import math
    import re

    evaluation = results(0.40, 0.38, 0.80)
    card = build_model_card(tiny_model("mixtral"), eval_results=evaluation, license="mit")
    section = evaluation_section(str(card))
    assert "**" not in section  # no bold single-number headline
    rows = {r[0]: r for r in table(section, "| Task | Dataset (config, split) | Metric | Base | Pruned |")}
    expected = {"openbookqa": (0.40, 0.38, 0.02, 0.02, 500), "boolq": (0.85, 0.80, 0.01, 0.01, 3270)}
    errors = []
    for task, (base, pruned, se_b, se_p, items) in expected.items():
        _, _, metric, b, p, se, retention, n = rows[task]
        r = pruned / base
        r_se = r * math.sqrt((se_p / pruned) ** 2 + (se_b / base) ** 2)
        errors.append(r_se)
        assert (metric, float(b), float(p), int(n)) == ("acc (0-shot)", base, pruned, items)
        assert se == f"{se_b:.4f} / {se_p:.4f}"
        assert retention == f"{100 * r:.2f}% ± {100 * r_se:.2f}%"
    mean = evaluation["comparison"]["average_retention"]
    mean_se = math.sqrt(sum(e * e for e in errors)) / 2
    summary = re.search(r"Mean retention over (\d+) tasks \((\d+) items\): ([\d.]+)% ± ([\d.]+)% \(one standard "
                        r"error\); perplexity ([\d.]+) \(base\) -> ([\d.]+) \(pruned\), ([\d.]+)x\.", section)
    assert summary is not None, section
    assert summary.groups() == ("2", "3770", f"{100 * mean:.2f}", f"{100 * mean_se:.2f}", "8.000", "10.000", "1.25")
    assert card.inputs.retention.stderr == pytest.approx(mean_se)
    assert table(section, "| Perplexity |")[0] == ["wikitext", "8.000", "10.000", "1.250", "8192"]


def test_missing_standard_errors_are_stated_not_invented():
    evaluation = results(0.40, 0.38, 0.80)
    evaluation["base"]["lm_eval"]["tasks"]["boolq"]["metrics"]["acc_stderr"] = "N/A"  # what lm-eval writes
    card = build_model_card(tiny_model("mixtral"), eval_results=evaluation, license="mit")
    section = evaluation_section(str(card))
    boolq = {r[0]: r for r in table(section, "| Task | Dataset (config, split) |")}["boolq"]
    assert boolq[5:7] == ["n/a / 0.0100", f"{100 * 0.80 / 0.85:.2f}%"]
    assert "(standard error not recorded)" in section
    assert card.inputs.retention.stderr is None and card.inputs.results[1].retention_stderr is None


# ------------------------------------------------------------------------- issue 14: memory the model itself needs
def test_memory_rows_are_weights_and_the_isolated_forward_peak():
    evaluation = results(0.40, 0.38, 0.80)
    section = evaluation_section(str(build_model_card(tiny_model("mixtral"), eval_results=evaluation, license="mit")))
    ratio = f"{49 / 93:.3f}"  # every row scales with the parameters in this fixture
    assert table(section, "| Memory |") == [
        ["Weights (all parameters)", "86.6 GiB", "45.6 GiB", ratio],
        ["Routed-expert weights", "43.3 GiB", "22.8 GiB", ratio],
        ["One forward: peak above the weights", "1.7 GiB", "934.6 MiB", ratio],
    ]
    assert f"from the rest of the process: {FORWARD_METHOD}; one forward over 1 x 128 tokens on cpu." in section
    assert "(RSS) is not reported" in section
    # results written before: peak_bytes was the process RSS; only the weights are shown from them
    for side in ("base", "pruned"):
        memory = evaluation[side]["memory"]
        for key in ("forward_peak_bytes", "peak_method", "batch_size", "seq_len", "device"):
            memory.pop(key)
        memory["peak_bytes"], memory["peak_method"] = 10**9, "process RSS, sampled"
    old = evaluation_section(str(build_model_card(tiny_model("mixtral"), eval_results=evaluation, license="mit")))
    assert [r[0] for r in table(old, "| Memory |")] == ["Weights (all parameters)", "Routed-expert weights"]
    assert "RSS, sampled" not in old and "isolates the model" not in old


def _serving_section(text: str) -> str:
    assert "## Serving with vLLM" in text
    return text.split("## Serving with vLLM", 1)[1].split("\n## ", 1)[0]


def test_card_says_how_vllm_serves_the_checkpoint(tmp_path):
    """A diep_<family> the plugin serves: its two commands; a family it refuses: the reason; a stock export: plain
    `vllm serve` (issue 13, point 6). The wording comes from the same table `diep-hub inspect` reports."""
    from diep_hub.checkpoint.inspect import serving_support

    mixtral, _ = pruned_with_keep("mixtral")
    section = _serving_section(str(build_model_card(mixtral, repo_id="tester/mixtral-x")))
    assert 'pip install "./integrations/vllm[cuda]"' in section
    assert "vllm serve tester/mixtral-x --trust-remote-code" in section

    deepseek, _ = pruned_with_keep("deepseek_v3")  # its groups stay valid: served by the plugin
    section = _serving_section(str(build_model_card(deepseek, repo_id="tester/deepseek-x")))
    assert "vllm serve tester/deepseek-x --trust-remote-code" in section

    gpt_oss, _ = pruned_with_keep("gpt_oss")
    section = _serving_section(str(build_model_card(gpt_oss, repo_id="tester/gpt-oss-x")))
    assert "Not servable by vLLM yet" in section and "vllm serve" not in section
    assert serving_support({"model_type": "diep_gpt_oss"})["reason"] in section

    model = tiny_model("mixtral")
    layers = model.config.num_hidden_layers
    uniform = diep_hub.prune_experts(model, keep={layer: [0, 2, 3] for layer in range(layers)})
    folder = tmp_path / "stock"
    diep_hub.save_pruned(uniform, folder, stock_format=True)
    section = _serving_section(str(build_model_card(folder, repo_id="tester/stock-x")))
    assert "vllm serve tester/stock-x\n" in section and "trust-remote-code" not in section
