# Copyright 2026 the diep_hub authors. Apache-2.0.
"""vLLM serves diep checkpoints made by diep_hub exactly as transformers runs them (through the remote code).

For every supported family (a non-uniformly pruned tiny checkpoint, one layer left with a single expert, skipping
calibrated; DeepSeek-V2 and -V3 with routing groups kept valid, and DeepSeek-V3 with two layers regrouped), with
skipping off and on:
- greedy tokens equal transformers' greedy tokens at every step whose reference top-2 logit gap exceeds MARGIN;
  a step at or below MARGIN (a near-tie that float rounding may flip) ends the comparison of that sequence, and
  at least MIN_DECIDED of all steps must be decided;
- the log-prob of every token of the reference sequence (prompt + greedy continuation, as vLLM prompt_logprobs)
  is within LOGPROB_TOL of transformers' (float32 on both sides; the differences seen are ~2e-6);
- DeepSeek: every MoE layer routes with the groups, scoring and selection bias of the remote code (vLLM's grouped
  top-k without skipping, the plugin's router in the layers with skipping tables when skipping is on).
"""

from __future__ import annotations

import json

import pytest
from conftest import engine, reference

MARGIN = 1e-3  # logits: float32 rounding between the two engines is ~1e-6, so a gap above this decides the token
MIN_DECIDED = 0.9
LOGPROB_TOL = 1e-4
DIEP = ["mixtral", "mixtral_fused", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v2", "deepseek_v3",
        "deepseek_v3_regrouped"]


def _greedy(llm, prompts, new_tokens):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
    return [list(o.outputs[0].token_ids) for o in outputs]


def _prompt_logprobs(llm, sequences):
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    params = SamplingParams(max_tokens=1, prompt_logprobs=0, detokenize=False)
    outputs = llm.generate([TokensPrompt(prompt_token_ids=s) for s in sequences], params, use_tqdm=False)
    return [[step[token].logprob for step, token in zip(o.prompt_logprobs[1:], s[1:])]
            for o, s in zip(outputs, sequences)]


def assert_same_greedy(got: list[list[int]], results: list[dict]) -> None:
    decided = total = 0
    for index, (tokens, ref) in enumerate(zip(got, results)):
        total += len(ref["tokens"])
        for step, (token, expected, gap) in enumerate(zip(tokens, ref["tokens"], ref["gaps"])):
            if gap <= MARGIN:
                break  # near-tie: this and the following steps are not decided
            assert token == expected, (
                f"prompt {index} step {step}: vLLM chose {token}, transformers {expected} (top-2 gap {gap:.4g}); "
                f"vLLM {tokens} vs transformers {ref['tokens']}"
            )
            decided += 1
    assert decided >= MIN_DECIDED * total, f"only {decided} of {total} steps decided (top-2 gap > {MARGIN})"


def assert_close_logprobs(got: list[list[float]], results: list[dict]) -> None:
    for index, (values, ref) in enumerate(zip(got, results)):
        assert len(values) == len(ref["token_logprobs"])
        worst = max(abs(a - b) for a, b in zip(values, ref["token_logprobs"]))
        assert worst <= LOGPROB_TOL, f"prompt {index}: prompt logprobs differ by {worst:.3g} > {LOGPROB_TOL}"


def _record_plugin_log(monkeypatch) -> list[str]:
    """The plugin's INFO lines (vLLM's log handler writes to a stream pytest cannot re-capture per test)."""
    import diep_hub_vllm.models as models

    lines: list[str] = []
    original = models.logger.info

    def info(message, *args, **kwargs):
        lines.append(message % args)
        original(message, *args, **kwargs)

    monkeypatch.setattr(models.logger, "info", info)
    return lines


def _layer_widths(llm) -> list:
    """(experts, top-k) of every decoder layer's routed experts as vLLM built them (None for a dense layer)."""

    def widths(model):
        out = []
        for layer in model.model.layers:
            block = getattr(layer, "block_sparse_moe", None) or getattr(layer, "mlp", None)
            experts = getattr(block, "experts", None)
            if experts is None:
                out.append(None)
            else:
                weight = experts.routed_experts.w13_weight
                out.append((int(weight.shape[0]), int(experts.router.top_k)))
        return out

    return llm.apply_model(widths)[0]


def _deepseek_routing(llm) -> list:
    """Per decoder layer, how vLLM routes it: ("grouped", n_group, topk_group, scoring, has bias) with vLLM's own
    grouped top-k, ("skipping", n_group, topk_group, scoring, has bias) with the plugin's router, None if dense."""

    def routing(model):
        out = []
        for layer in model.model.layers:
            experts = getattr(layer.mlp, "experts", None)
            if experts is None:
                out.append(None)
                continue
            router = experts.router
            custom = router.custom_routing_function
            if custom is None:
                out.append(("grouped", router.num_expert_group, router.topk_group, router.scoring_func,
                            router.e_score_correction_bias is not None))
            else:
                out.append(("skipping", custom.n_group, custom.topk_group, custom.scoring_func,
                            getattr(custom.gate, "e_score_correction_bias", None) is not None))
        return out

    return llm.apply_model(routing)[0]


def _expected_deepseek_routing(fixtures_dir, entry, mode) -> list:
    """What the checkpoint's remote code routes with, read from config.json: each layer's groups (V2 groups only
    with topk_method group_limited_greedy), softmax without bias (V2) or sigmoid with a selection bias (V3)."""
    config = json.loads((fixtures_dir / entry["name"] / "config.json").read_text())
    v3 = config["model_type"] == "diep_deepseek_v3"
    grouped = v3 or config.get("topk_method") == "group_limited_greedy"
    out = []
    for index, count in enumerate(config["num_experts_per_layer"]):
        if count is None:
            out.append(None)
            continue
        groups = (config["n_group_per_layer"][index], config["topk_group_per_layer"][index]) if grouped else (1, 1)
        kind = "skipping" if mode == "on" and index in entry["skipping_layers"] else "grouped"
        out.append((kind, *groups, "sigmoid" if v3 else "softmax", v3))
    return out


@pytest.mark.parametrize("mode", ["off", "on"])
@pytest.mark.parametrize("name", DIEP)
def test_diep_checkpoint_matches_transformers(fixtures_dir, manifest, name, mode, monkeypatch):
    entry = manifest["checkpoints"][name]
    refs = reference(fixtures_dir, name)
    results = refs[mode]["results"]
    if mode == "on":
        # the fixture must make skipping matter, or "on" would test nothing beyond "off"
        shift = max(abs(a - b) for on, off in zip(refs["on"]["results"], refs["off"]["results"])
                    for a, b in zip(on["token_logprobs"], off["token_logprobs"]))
        assert shift > 100 * LOGPROB_TOL, f"skipping changes transformers' logprobs by only {shift:.3g}"
    overrides = {"diep_skipping_enabled": mode == "on"}
    log = _record_plugin_log(monkeypatch)
    with engine(fixtures_dir / name, hf_overrides=overrides) as llm:
        widths = _layer_widths(llm)
        routing = _deepseek_routing(llm) if name.startswith("deepseek") else None
        got_tokens = _greedy(llm, manifest["prompts"], manifest["new_tokens"])
        got_logprobs = _prompt_logprobs(llm, [r["sequence"] for r in results])
    expected_widths = [None if n is None else (n, min(2, n)) for n in entry["experts_per_layer"]]
    assert widths == expected_widths
    if routing is not None:
        assert routing == _expected_deepseek_routing(fixtures_dir, {**entry, "name": name}, mode)
    if mode == "on":
        line = f"expert skipping APPLIED in layers {entry['skipping_layers']} (diep_skipping_enabled=True override)"
    else:
        line = "expert skipping NOT applied (diep_skipping_enabled=False override)"
    assert any(line in entry for entry in log), f"the engine did not log whether skipping is applied: {log}"
    assert_same_greedy(got_tokens, results)
    assert_close_logprobs(got_logprobs, results)


def test_skipping_follows_config_by_default(fixtures_dir, manifest, monkeypatch):
    """Without an override, config.json's diep_skipping.enabled (true in the fixtures) decides, as in transformers."""
    results = reference(fixtures_dir, "olmoe")["on"]["results"]
    log = _record_plugin_log(monkeypatch)
    with engine(fixtures_dir / "olmoe") as llm:
        got_logprobs = _prompt_logprobs(llm, [r["sequence"] for r in results])
    line = "expert skipping APPLIED in layers [0, 1, 3] (config.json diep_skipping.enabled=True)"
    assert any(line in entry for entry in log), f"the engine did not log whether skipping is applied: {log}"
    assert_close_logprobs(got_logprobs, results)


def test_stock_export_serves_without_the_plugin(fixtures_dir, manifest):
    """The uniform stock-format export is vLLM's own Mixtral: the plugin's classes are not involved."""
    results = reference(fixtures_dir, "mixtral_stock")["stock"]["results"]
    with engine(fixtures_dir / "mixtral_stock") as llm:
        model_class = llm.apply_model(lambda model: f"{type(model).__module__}.{type(model).__name__}")[0]
        widths = _layer_widths(llm)
        got_tokens = _greedy(llm, manifest["prompts"], manifest["new_tokens"])
        got_logprobs = _prompt_logprobs(llm, [r["sequence"] for r in results])
    assert model_class == "vllm.model_executor.models.mixtral.MixtralForCausalLM"
    assert widths == [(5, 2)] * 4
    assert_same_greedy(got_tokens, results)
    assert_close_logprobs(got_logprobs, results)
