"""Adaptive expert skipping, its statistics: CKA (linear and RBF) against the formulas, and the calibration's
per-layer statistics against an independent computation, over every family in tests/helpers/tiny_models.FAMILIES.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

import diep_hub
from diep_hub.cka import centered_gram_vector, cka, cka_matrix, mean_off_diagonal
from diep_hub.errors import ConfigError
from diep_hub.families import get_family
from diep_hub.skipping import (
    calibrate_skipping,
    enable_skipping,
)
from tests.helpers.skipping_models import IDS, keep_map, pruned, routing_recorder
from tests.helpers.tiny_models import FAMILIES, tiny_model

# ---------------------------------------------------------------------------------------------------------------
# CKA


def test_linear_cka_equals_feature_space_formula_and_invariances():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(40, 6, generator=g, dtype=torch.float64)
    y = x @ torch.randn(6, 5, generator=g, dtype=torch.float64) + 0.3 * torch.randn(
        40, 5, generator=g, dtype=torch.float64
    )
    xc, yc = x - x.mean(0), y - y.mean(0)
    expected = float((yc.T @ xc).norm() ** 2 / ((xc.T @ xc).norm() * (yc.T @ yc).norm()))
    assert cka(x, y) == pytest.approx(expected, rel=1e-10)
    q, _ = torch.linalg.qr(torch.randn(6, 6, generator=g, dtype=torch.float64))
    assert cka(x, 3.5 * x @ q + 2.0) == pytest.approx(1.0, abs=1e-10)  # orthogonal, scale and shift invariant
    assert 0.0 < cka(x, y) < 1.0


def test_rbf_cka_is_symmetric_bounded_and_one_on_itself():
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(30, 4, generator=g), torch.randn(30, 7, generator=g)
    assert cka(x, x, kernel="rbf") == pytest.approx(1.0, abs=1e-9)
    assert cka(x, y, kernel="rbf") == pytest.approx(cka(y, x, kernel="rbf"), abs=1e-12)
    assert 0.0 <= cka(x, y, kernel="rbf") < 1.0
    # RBF with the median heuristic is invariant to isotropic scaling
    assert cka(x, 10 * x, kernel="rbf") == pytest.approx(1.0, abs=1e-9)


def test_cka_matrix_handles_a_constant_representation():
    g = torch.Generator().manual_seed(2)
    reps = [torch.randn(20, 3, generator=g), torch.zeros(20, 3), torch.randn(20, 3, generator=g)]
    matrix = cka_matrix(torch.stack([centered_gram_vector(r) for r in reps]))
    assert torch.equal(matrix.diagonal(), torch.ones(3, dtype=matrix.dtype))
    assert matrix[1, 0] == 0 and matrix[0, 1] == 0 and matrix[1, 2] == 0
    assert matrix[0, 2] == pytest.approx(cka(reps[0], reps[2]), abs=1e-9)
    assert mean_off_diagonal(matrix) == pytest.approx(2 * float(matrix[0, 2]) / 6, abs=1e-12)


def test_cka_rejects_unknown_kernel():
    with pytest.raises(ConfigError, match="cosine"):
        cka(torch.randn(4, 2), torch.randn(4, 2), kernel="cosine")


# ---------------------------------------------------------------------------------------------------------------
# Calibration


@pytest.mark.parametrize("family", FAMILIES)
def test_calibration_statistics_match_an_independent_computation(family):
    model = pruned(family)
    seen, handles = routing_recorder(model, after_skipping=False)
    with torch.no_grad():
        model(IDS)
    for handle in handles:
        handle.remove()
    calibration = calibrate_skipping(model, IDS, batch_size=2, max_tokens_for_cka=24)
    for layer in get_family(model).moe_layers(model):
        index, weights = seen[layer.index][0]
        ordered = np.sort(weights.float().numpy(), axis=-1)[:, ::-1]  # descending, whatever the router returned
        expected_gamma1 = float(np.median(ordered[:, 1:] / ordered[:, :1]))
        got = calibration.layers[layer.index]
        assert got.gamma1 == pytest.approx(expected_gamma1, rel=1e-6)
        assert got.cka.shape == (layer.num_experts, layer.num_experts)
        assert torch.allclose(got.cka, got.cka.T) and torch.equal(got.cka.diagonal(), torch.ones(layer.num_experts))
        assert mean_off_diagonal(got.cka_ratio) == pytest.approx(1.0, rel=1e-5)
        assert got.num_slots == IDS.numel() * (layer.top_k - 1)
        assert 0.0 < got.calibration_skip_rate < 1.0
    config = calibration.to_config()
    assert json.loads(json.dumps(config)) == config
    assert set(config["layers"]) == {str(layer.index) for layer in get_family(model).moe_layers(model)}


def test_cka_table_uses_every_expert_on_the_same_tokens():
    """Two identical experts have CKA 1 with each other; the table is the CKA of their outputs."""
    model = tiny_model("mixtral")
    layer = get_family(model).moe_layers(model)[0]
    with torch.no_grad():
        for name in ("gate_up_proj", "down_proj"):
            getattr(layer.experts, name)[5].copy_(getattr(layer.experts, name)[2])
    calibration = calibrate_skipping(model, IDS, max_tokens_for_cka=30)
    table = calibration.layers[layer.index].cka
    assert table[2, 5] == pytest.approx(1.0, abs=1e-5)
    assert table[2, 3] < 0.999
    rbf = calibrate_skipping(model, IDS, kernel="rbf", max_tokens_for_cka=30)
    assert rbf.kernel == "rbf" and rbf.layers[layer.index].cka[2, 5] == pytest.approx(1.0, abs=1e-5)
    assert not torch.allclose(rbf.layers[layer.index].cka, table)


def test_bad_inputs_raise_before_any_work():
    model = tiny_model("mixtral")
    with pytest.raises(ConfigError, match="kernel='cosine'"):
        calibrate_skipping(model, IDS, kernel="cosine")
    with pytest.raises(ConfigError, match="input_ids"):
        calibrate_skipping(model, IDS[0])
    with pytest.raises(ConfigError, match="batch_size"):
        calibrate_skipping(model, IDS, batch_size=0)
    with pytest.raises(ConfigError, match="max_tokens_for_cka"):
        calibrate_skipping(model, IDS, max_tokens_for_cka=1)
    with pytest.raises(ConfigError, match="SkippingCalibration"):
        enable_skipping(model, {"layers": {}})


def test_calibration_before_pruning_is_refused_on_the_pruned_model():
    model = tiny_model("mixtral")
    calibration = calibrate_skipping(model, IDS, max_tokens_for_cka=16)
    diep_hub.prune_experts(model, keep_map(model))
    with pytest.raises(ConfigError, match="calibrate skipping after pruning"):
        enable_skipping(model, calibration)
    assert getattr(model.config, "diep_skipping", None) is None

