# Copyright 2026 the diep_hub authors. Apache-2.0.
"""Make the vLLM tests' fixtures with diep_hub (run by the MAIN environment's python, not the vLLM one).

    python integrations/vllm/tests/make_checkpoints.py OUT_DIR

Writes, for every family the plugin serves, a tiny non-uniformly pruned checkpoint (4 layers, 8 experts, top-2,
layers keeping 5/3/8/1 experts or similar, so one layer routes top-1; DeepSeek with valid routing groups, and
DeepSeek-V3 with regrouped layers) with calibrated expert skipping, saved by ``diep_hub.save_pruned`` (per-expert
keys; Mixtral also with fused keys), a uniform stock-format export, checkpoints of families the plugin refuses, and
what ``diep-hub inspect`` says of each. Then, in a fresh process that does not import diep_hub (as a user's
transformers would, through the checkpoint's remote code), the reference: greedy tokens with each step's top-2
logit gap, and per-position log-probabilities, with skipping off and on. ``OUT_DIR/manifest.json`` lists it all.
The ``mixtral`` checkpoint also gets a word-level tokenizer and ``OUT_DIR/lm_eval/`` a small local multiple-choice
task with lm-eval's ``hf`` backend results on it (per-choice log-likelihoods), for the ``vllm`` backend to match.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

HIDDEN, HEADS, HEAD_DIM, VOCAB, LAYERS = 64, 2, 32, 64, 4  # vLLM's CPU attention needs head_dim >= 32
SPECIAL = ["<pad>", "<s>", "</s>", "<unk>"]  # ids 0-3, as the configs' pad/bos/eos ids say
WORDS = [f"w{i}" for i in range(4, VOCAB)]  # word wI has id I
LM_EVAL_TASK, LM_EVAL_CHECKPOINT, LM_EVAL_DOCS = "diep_tiny_choice", "mixtral", 24
NEW_TOKENS = 12
DEEPSEEK = {"first_k_dense_replace": 1, "n_shared_experts": 1, "n_group": 2, "topk_group": 1, "kv_lora_rank": 512,
            "qk_rope_head_dim": 64}
PROMPTS = [[5, 17, 33, 8, 41], [12, 3, 9, 60, 22, 14, 7, 30], [44, 44, 2, 19], [6, 50, 27, 11, 38, 13, 4, 58, 21, 9]]

# name -> (family, keep map {layer: current ids kept}, extra config, save options)
DIEP = {
    "mixtral": ("mixtral", {0: [0, 2, 3, 5, 7], 1: [1, 4, 6], 3: [2]}, {}, {}),
    "mixtral_fused": ("mixtral", {0: [1, 2, 6], 1: [0, 1, 2, 3, 4, 5], 2: [7]}, {}, {"fused_weights": True}),
    "qwen2_moe": ("qwen2_moe", {0: [0, 1, 2, 3, 4, 5], 2: [3, 6], 3: [5]},
                  {"shared_expert_intermediate_size": 48, "mlp_only_layers": [1]}, {}),
    "qwen3_moe": ("qwen3_moe", {0: [7, 1, 4], 1: [0, 1, 2, 3, 4, 5, 6], 3: [6]}, {"norm_topk_prob": True}, {}),
    "olmoe": ("olmoe", {0: [0, 3], 1: [1, 2, 4, 6, 7], 2: [5]}, {}, {"fused_weights": True}),
    # DeepSeek: a dense first layer, a shared expert, 2 routing groups of 4 with 1 picked a token; groups kept valid
    # (the same count from every group) or regrouped (n_group = topk_group = 1). vLLM's CPU latent attention only
    # has kernels for kv_lora_rank + qk_rope_head_dim = 512 + 64.
    # routed_scaling_factor 16 as DeepSeek-V2's own config: at 1.5 the routed experts are too small a part of the
    # residual stream for skipping to move transformers' logprobs by the 1e-2 test_equality.py requires
    "deepseek_v2": ("deepseek_v2", {1: [0, 1, 2, 4, 5, 6], 2: [1, 3, 5, 7]},
                    {"topk_method": "group_limited_greedy", "routed_scaling_factor": 16.0, **DEEPSEEK}, {}),
    "deepseek_v3": ("deepseek_v3", {1: [0, 1, 4, 5], 2: [1, 2, 3, 5, 6, 7]}, {"head_dim": 64, **DEEPSEEK}, {}),
    "deepseek_v3_regrouped": ("deepseek_v3", {1: [0, 1, 2, 5, 6], 2: [3, 7]}, {"head_dim": 64, **DEEPSEEK}, {}),
}
PRUNE = {"deepseek_v3_regrouped": {"regroup": [1, 2]}}  # prune_experts options beyond allow_below_top_k
REFUSED = {
    "phimoe": ("phimoe", {0: [0, 1, 2, 3, 4], 1: [1, 2, 3]}, {}, {}),
}


def bad_groups(config: dict) -> None:
    """Edit a deepseek_v3 config.json so that layer 2 (6 experts kept) claims 4 routing groups: not servable."""
    config["n_group_per_layer"][2] = 4
    config.pop("diep_skipping", None)


def _config(family: str, extra: dict):
    from diep_hub.zoo.configs import expert_ffn_field, family_kwargs
    from transformers import AutoConfig

    ffn = 32 if expert_ffn_field(family) != "intermediate_size" else None
    kwargs = family_kwargs(family, experts=8, top_k=2, expert_ffn=ffn, attention=(HEADS, HEAD_DIM), **extra)
    common = dict(
        vocab_size=VOCAB, hidden_size=HIDDEN, intermediate_size=64, num_hidden_layers=LAYERS, num_attention_heads=HEADS,
        num_key_value_heads=1, head_dim=HEAD_DIM, max_position_embeddings=256, tie_word_embeddings=False,
        bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )
    return AutoConfig.for_model(family, **{**common, **kwargs})


def _model(family: str, extra: dict, seed: int):
    """A random model whose routers and logits have real preferences (larger than the init), in float32."""
    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(family, extra)).eval()
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("gate.weight") and param.dim() == 2 and param.shape[0] > 1:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
            elif name == "lm_head.weight":
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
        for name, buffer in model.named_buffers():  # DeepSeek-V3's selection-only bias: make it matter
            if name.endswith("e_score_correction_bias"):
                buffer.copy_(torch.randn(buffer.shape, generator=generator) * 0.1)
    return model


def tokenizer():
    """A whitespace word-level tokenizer over the tiny vocabulary (lm-eval needs one; no Hub access)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(vocab={t: i for i, t in enumerate(SPECIAL + WORDS)}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>")


def write_lm_eval_task(folder: Path) -> Path:
    """The local multiple-choice task (documents and yaml) in ``folder``; returns it (lm-eval's include_path).

    Both backends read the same files; the yaml names the documents by absolute path, so it is written where used.
    """
    import random

    folder.mkdir(parents=True, exist_ok=True)
    data = folder / "docs.jsonl"
    if not data.is_file():
        rng = random.Random(7)
        docs = [{"question": " ".join(rng.choices(WORDS, k=6)),
                 "choices": [" ".join(rng.choices(WORDS, k=2)) for _ in range(4)], "answer": rng.randrange(4)}
                for _ in range(LM_EVAL_DOCS)]
        data.write_text("".join(json.dumps(d) + "\n" for d in docs))
    (folder / f"{LM_EVAL_TASK}.yaml").write_text(
        f"task: {LM_EVAL_TASK}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data.resolve()}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: question\ndoc_to_choice: choices\n"
        "doc_to_target: answer\ntarget_delimiter: \" \"\n"
        "metric_list:\n  - metric: acc\n"
    )
    return folder


def lm_eval_results(backend: str, checkpoint: Path, task_dir: Path, **model_args) -> dict:
    """lm-eval ``simple_evaluate`` of the local task: accuracy and each document's per-choice log-likelihoods."""
    import lm_eval
    from lm_eval.tasks import TaskManager

    results = lm_eval.simple_evaluate(
        model=backend, model_args={"pretrained": str(checkpoint), "trust_remote_code": True, "dtype": "float32",
                                   **model_args},
        tasks=[LM_EVAL_TASK], task_manager=TaskManager(include_path=str(task_dir)), log_samples=True,
        batch_size=4, random_seed=0, numpy_random_seed=0, torch_random_seed=0,
    )
    samples = sorted(results["samples"][LM_EVAL_TASK], key=lambda s: s["doc_id"])
    return {"acc": results["results"][LM_EVAL_TASK]["acc,none"],
            "loglikelihoods": [[float(r[0][0]) for r in s["resps"]] for s in samples]}


def make(out: Path) -> dict:
    import diep_hub
    import torch
    from diep_hub.checkpoint.inspect import serving_support
    from diep_hub.skipping import calibrate_skipping, enable_skipping

    manifest = {"prompts": PROMPTS, "new_tokens": NEW_TOKENS, "checkpoints": {}}
    for seed, (name, (family, keep, extra, save)) in enumerate({**DIEP, **REFUSED}.items()):
        model = _model(family, extra, seed)
        model = diep_hub.prune_experts(model, keep, allow_below_top_k=True, **PRUNE.get(name, {}))
        entry = {"family": family, "kind": "diep" if name in DIEP else "refused",
                 "experts_per_layer": list(model.config.num_experts_per_layer)}
        if name in DIEP:
            calibration_ids = torch.randint(3, VOCAB, (8, 32), generator=torch.Generator().manual_seed(seed))
            enable_skipping(model, calibrate_skipping(model, calibration_ids), enabled=True)
            entry["skipping_layers"] = sorted(int(k) for k in model.config.diep_skipping["layers"])
        if name == LM_EVAL_CHECKPOINT:
            save = {**save, "tokenizer": tokenizer()}
        diep_hub.save_pruned(model, out / name, **save)
        config = json.loads((out / name / "config.json").read_text())
        entry["inspect_serving"] = serving_support(config)  # what `diep-hub inspect` tells users
        manifest["checkpoints"][name] = entry
    config = json.loads((out / "deepseek_v3" / "config.json").read_text())
    bad_groups(config)
    manifest["inspect_bad_groups"] = serving_support(config)
    # uniform pruning, exported in the stock format: plain vLLM serves it without the plugin
    model = diep_hub.prune_experts(_model("mixtral", {}, 99), {i: [0, 2, 4, 6, 7] for i in range(LAYERS)})
    diep_hub.save_pruned(model, out / "mixtral_stock", stock_format=True)
    manifest["checkpoints"]["mixtral_stock"] = {"family": "mixtral", "kind": "stock", "experts_per_layer": [5] * 4}
    return manifest


def reference(folder: Path, skipping: bool | None) -> dict:
    """transformers' greedy tokens (each step's top-2 logit gap beside them) and per-position log-probs.

    Greedy decoding is written out (argmax of the last position, no logits processors), since ``generate`` would
    apply the checkpoint's generation settings (EOS handling) that the vLLM side does not (``ignore_eos``).
    """
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {} if skipping is None else {"diep_skipping_enabled": skipping}
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True, dtype=torch.float32, **kwargs).eval()
    assert "diep_hub" not in sys.modules, "the reference must run the checkpoint's remote code"
    results = []
    with torch.no_grad():
        for prompt in PROMPTS:
            sequence = torch.tensor([prompt])
            gaps = []
            for _ in range(NEW_TOKENS):
                logits = model(sequence).logits[0, -1].float()
                top2 = torch.topk(logits, 2)
                gaps.append(float(top2.values[0] - top2.values[1]))
                sequence = torch.cat([sequence, top2.indices[:1][None]], dim=1)
            logprobs = torch.log_softmax(model(sequence).logits[0].float(), dim=-1)
            tokens = sequence[0].tolist()
            # log-prob of token t+1 given tokens <= t, as vLLM's prompt_logprobs reports it for position t+1
            token_logprobs = logprobs[:-1].gather(-1, sequence[0, 1:, None])[:, 0].tolist()
            results.append({"tokens": tokens[len(prompt):], "gaps": gaps, "sequence": tokens,
                            "token_logprobs": token_logprobs})
    return {"skipping": skipping, "results": results}


def main() -> None:
    if sys.argv[1] == "--lm-eval":  # a fresh process: lm-eval's hf backend through the checkpoint's remote code
        out, checkpoint, task_dir = Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])
        result = lm_eval_results("hf", checkpoint, write_lm_eval_task(task_dir), device="cpu")
        assert "diep_hub" not in sys.modules, "the reference must run the checkpoint's remote code"
        out.write_text(json.dumps(result))
        return
    if sys.argv[1] == "--reference":  # one fresh process for all references (one transformers import)
        out = Path(sys.argv[2])
        for folder in map(Path, sys.argv[3:]):
            modes = (("off", False), ("on", True)) if folder.name != "mixtral_stock" else (("stock", None),)
            runs = {mode: reference(folder, value) for mode, value in modes}
            (out / f"{folder.name}.json").write_text(json.dumps(runs))
        return
    out = Path(sys.argv[1])
    out.mkdir(parents=True, exist_ok=True)
    manifest = make(out)
    (out / "references").mkdir(exist_ok=True)
    names = [name for name, entry in manifest["checkpoints"].items() if entry["kind"] != "refused"]
    subprocess.run([sys.executable, __file__, "--reference", str(out / "references"), *(str(out / n) for n in names)],
                   check=True)
    subprocess.run([sys.executable, __file__, "--lm-eval", str(out / "references" / "lm_eval_hf.json"),
                    str(out / LM_EVAL_CHECKPOINT), str(out / "lm_eval")], check=True)
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))


if __name__ == "__main__":
    main()
