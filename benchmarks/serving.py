"""Serving speed and memory of DiEP-pruned checkpoints in vLLM: base, 25% pruned, 50% pruned, 50% + skipping.

One run builds the checkpoints of a Mixtral-shaped model with random weights whose routed experts hold most of
the bytes (diep_hub, in the main environment), then measures each in vLLM (the vLLM environment with the
diep-hub-vllm plugin, one fresh process per checkpoint) at several batch sizes, and prints one table with the
ratios to base. The pruned checkpoints keep a different number of experts in each layer (as DiEP's global
selection does), so they are served by the plugin; the base is a stock Mixtral served by vLLM's own model.

    python benchmarks/serving.py --out /tmp/serving_bench --vllm-python /work/vllm-venv/bin/python
    python benchmarks/serving.py --device cuda --layers 32 --hidden 1024 --expert-ffn 3584 ...   # on a GPU
    python benchmarks/serving.py --kernel --vllm-python /work/vllm-venv/bin/python    # the CPU MoE kernel alone

Measured per batch size B (prompts of --prompt-len random token ids, prefix caching off, --repeats pairs of timings,
t1 and tN taken back to back):
- prefill tokens/s = B * prompt_len / t1, t1 the best time of generate(max_tokens=1);
- decode tokens/s = B * (N - 1) / (tN - t1), tN the time of generate(max_tokens=N, ignore_eos) on the same shape,
  the median over the pairs (a best-of t1 and tN taken apart turned one slow t1 into a decode rate 3x too high on a
  shared machine).
Memory: the model's parameter bytes as vLLM holds them (all, and routed experts alone), and the process peak: on
CPU the peak resident set (ru_maxrss) of the measuring process, which holds the in-process engine, the weights, the
touched part of the KV cache (VLLM_CPU_KVCACHE_SPACE GiB) and the Python/vLLM runtime, shown whole and above the
resident set once vLLM is imported ("peak - import"); on CUDA torch.cuda.max_memory_allocated (weights, activations
and the KV cache vLLM pre-allocates, a fixed share of the GPU: compare the weight bytes there).

Skipping: the plugin hands vLLM's fused MoE kernel each skipped slot as the token's primary expert with weight 0, so
an expert reached only through skipped slots gets no rows and is neither read nor computed (routing.py). On CPU the
pruned-50+skip engine also times, alternately in the same engine, the form the plugin used before (skipped expert ids
kept at weight 0, so the kernel computes them): the "skip A/B" table, what not computing them saves, with the
machine's load shared by both forms. The share of skipped routing slots is counted (``skipped``).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import random
import subprocess
import sys
import time
from pathlib import Path

logger = logging.getLogger("benchmarks.serving")

VARIANTS = {  # name -> (sparsity, skipping, checkpoint folder, skipped slots as the plugin emits them)
    "base": (0.0, False, "base", None),
    "pruned-25": (0.25, False, "pruned-25", None),
    "pruned-50": (0.5, False, "pruned-50", None),
    "pruned-50+skip": (0.5, True, "pruned-50+skip", "redirect"),
}


def layer_counts(experts: int, layers: int, sparsity: float) -> list[int]:
    """Non-uniform kept counts with the total of a uniform ``sparsity``: +1/-1 alternately around the mean."""
    mean = round(experts * (1 - sparsity))
    if mean == experts:
        return [experts] * layers
    return [mean + (0 if i == layers - 1 and layers % 2 else (1 if i % 2 == 0 else -1)) for i in range(layers)]


# ----------------------------------------------------------------------------------------------------- prepare


def prepare(args: argparse.Namespace, out: Path) -> dict[str, dict]:
    """Build the checkpoints with diep_hub (main environment); returns name -> description."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    import diep_hub
    from diep_hub.skipping import calibrate_skipping, enable_skipping

    heads = args.hidden // 64
    config = AutoConfig.for_model(
        "mixtral", vocab_size=args.vocab, hidden_size=args.hidden, intermediate_size=args.expert_ffn,
        num_hidden_layers=args.layers, num_attention_heads=heads, num_key_value_heads=max(1, heads // 4),
        head_dim=64, num_local_experts=args.experts, num_experts_per_tok=args.top_k, max_position_embeddings=4096,
        tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=0,
    )

    def fresh():
        torch.manual_seed(args.seed)
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
        generator = torch.Generator().manual_seed(args.seed + 1)
        with torch.no_grad():  # routers with real preferences, so that skipping calibrates to something
            for name, param in model.named_parameters():
                if name.endswith("gate.weight") and param.shape[0] == args.experts:
                    param.copy_(torch.randn(param.shape, generator=generator) * 0.5)
        return model

    described = {}
    for name, (sparsity, skipping, folder_name, skip_form) in VARIANTS.items():
        folder = out / folder_name
        counts = layer_counts(args.experts, args.layers, sparsity)
        described[name] = {"sparsity": sparsity, "skipping": skipping, "experts_per_layer": counts,
                           "path": str(folder), "skip_form": skip_form}
        if (folder / "config.json").is_file():
            logger.info("reusing %s", folder)
            continue
        started = time.perf_counter()
        model = fresh()
        if sparsity == 0:
            model.save_pretrained(folder)  # the stock checkpoint: vLLM's own Mixtral
        else:
            rng = random.Random(args.seed)
            keep = {i: sorted(rng.sample(range(args.experts), n)) for i, n in enumerate(counts)}
            model = diep_hub.prune_experts(model, keep)
            if skipping:
                ids = torch.randint(3, args.vocab, (8, 64), generator=torch.Generator().manual_seed(args.seed))
                enable_skipping(model, calibrate_skipping(model, ids), enabled=True)
            diep_hub.save_pruned(model, folder)
        logger.info("built %s (%s experts per layer) in %.0fs", name, counts, time.perf_counter() - started)
        del model
    return described


# ----------------------------------------------------------------------------------------------------- measure


def _peak_rss_bytes() -> int:
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB


def _patch_skipping(skip_form: str | None, count: bool):
    """Count the skipped routing slots (with ``count``: CPU, eager, so the Python counter runs on every call) and
    return a switch between the plugin's form of the skipped slots ("redirect") and the form it used before
    ("computed": expert ids kept at weight 0). Patches this process's plugin (in-process engine); the routers look
    both functions up at each call."""
    counts = {"skipped": 0, "slots": 0}
    if skip_form is None:
        return counts, None
    from diep_hub_vllm import routing

    redirect = routing.redirect_skipped

    def use(form: str) -> None:
        routing.redirect_skipped = redirect if form == "redirect" else (lambda ids, weights, skip: ids)

    use(skip_form)
    if not count:
        return counts, use

    decide = routing.skip_mask

    def counting_skip_mask(ids, weights, gamma):
        skip = decide(ids, weights, gamma)
        counts["skipped"] += int(skip.sum())
        counts["slots"] += skip.shape[0] * (skip.shape[1] - 1)
        return skip

    routing.skip_mask = counting_skip_mask
    return counts, use


def measure(args: argparse.Namespace) -> dict:
    """Measure one checkpoint (vLLM environment, in-process engine); returns the figures as a dict."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # _patch_skipping patches this process's routers
    skips, use_form = _patch_skipping(args.skip_form, count=args.device == "cpu")
    forms = ["redirect", "computed"] if use_form is not None and args.device == "cpu" else [None]
    if args.device == "cpu":
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(args.kv_cache_gib))
        os.environ["VLLM_CPU_OMP_THREADS_BIND"] = args.cpu_bind
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    rss_after_import = _peak_rss_bytes()
    kwargs = dict(
        model=args.measure, trust_remote_code=True, dtype="float32" if args.device == "cpu" else "bfloat16",
        max_model_len=args.prompt_len + args.decode_tokens + 8, distributed_executor_backend="uni",
        skip_tokenizer_init=True, seed=0, enable_prefix_caching=False, max_num_seqs=max(args.batch_sizes),
        max_num_batched_tokens=max(args.batch_sizes) * (args.prompt_len + args.decode_tokens + 8),
    )
    if args.device == "cpu":
        kwargs["enforce_eager"] = True
    else:
        kwargs["gpu_memory_utilization"] = args.gpu_memory_utilization
    started = time.perf_counter()
    llm = LLM(**kwargs)
    load_seconds = time.perf_counter() - started

    def weights(model):
        total = experts = 0
        for name, param in model.named_parameters():
            size = param.numel() * param.element_size()
            total += size
            experts += size if ".experts." in name else 0
        return {"class": type(model).__name__, "weight_bytes": total, "expert_bytes": experts}

    held = llm.apply_model(weights)[0]
    rng = random.Random(args.seed)

    def prompts(batch):
        return [TokensPrompt(prompt_token_ids=[rng.randrange(3, args.vocab) for _ in range(args.prompt_len)])
                for _ in range(batch)]

    def timed(batch, new_tokens):
        params = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True, detokenize=False)
        batch_prompts = prompts(batch)
        begun = time.perf_counter()
        outputs = llm.generate(batch_prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - begun
        assert all(len(o.outputs[0].token_ids) == new_tokens for o in outputs)
        return elapsed

    timed(max(args.batch_sizes), 2)  # warm-up: first-call allocations and kernel set-up
    rows = []
    for batch in args.batch_sizes:
        # t1 and tN back to back, so that a pair shares the machine's load; the median pair resists a slow moment.
        # With two skip forms, their pairs alternate in this one engine.
        pairs = {form: [] for form in forms}
        for _ in range(args.repeats):
            for form in forms:
                if form is not None:
                    use_form(form)
                pairs[form].append((timed(batch, 1), timed(batch, args.decode_tokens)))
        if len(forms) > 1:
            use_form(args.skip_form)
        by_form = {}
        for form, form_pairs in pairs.items():
            decode = sorted(batch * (args.decode_tokens - 1) / max(tn - t1, 1e-9) for t1, tn in form_pairs)
            by_form[form] = {"prefill_tps": batch * args.prompt_len / min(t1 for t1, _ in form_pairs),
                             "decode_tps": decode[len(decode) // 2], "decode_tps_all": decode, "pairs": form_pairs}
        rows.append({"batch": batch, **by_form[forms[0]]})
        if len(forms) > 1:
            rows[-1]["skip_ab"] = by_form
        logger.info("batch %d: prefill %.0f tok/s, decode %.1f tok/s%s", batch, rows[-1]["prefill_tps"],
                    rows[-1]["decode_tps"], "" if len(forms) == 1 else
                    f" (skipped slots computed: prefill {by_form['computed']['prefill_tps']:.0f}, decode "
                    f"{by_form['computed']['decode_tps']:.1f})")
    if args.device == "cuda":
        import torch

        peak, peak_what = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        baseline = 0  # nothing on the GPU before the engine
    else:
        peak, peak_what = _peak_rss_bytes(), "peak RSS of the measuring process (ru_maxrss)"
        baseline = rss_after_import
    import vllm

    return {**held, "rows": rows, "skips": skips, "peak_bytes": peak, "peak_what": peak_what,
            "baseline_bytes": baseline, "load_seconds": load_seconds, "vllm": vllm.__version__}


def kernel(args: argparse.Namespace) -> list[dict]:
    """The CPU MoE kernel alone (vLLM environment): one layer of each pruned-50 width, random weights, top-k routing
    of random logits with the second slot skipped for ceil(--kernel-skip-rate x tokens) tokens; the skipped slots
    handed to ``cpu_fused_moe`` as the plugin does (redirected to the primary) and as it did before (expert id kept,
    computed), timed alternately in one process (best of --repeats), so machine noise hits both alike."""
    import torch
    from diep_hub_vllm.routing import redirect_skipped
    from vllm import _custom_ops as ops

    isa = "vec"  # what vLLM's CPU experts use for float32 (its "amx" experts take bfloat16 only)
    generator = torch.Generator().manual_seed(args.seed)
    rows = []
    for experts in sorted(set(layer_counts(args.experts, args.layers, 0.5)), reverse=True):
        w13 = torch.randn(experts, 2 * args.expert_ffn, args.hidden, generator=generator) * 0.02
        w2 = torch.randn(experts, args.hidden, args.expert_ffn, generator=generator) * 0.02
        w13, w2 = ops.cpu_prepack_moe_weight(w13, isa), ops.cpu_prepack_moe_weight(w2, isa)
        for tokens in args.batch_sizes:
            x = torch.randn(tokens, args.hidden, generator=generator)
            weights, ids = torch.randn(tokens, experts, generator=generator).softmax(-1).topk(args.top_k, dim=-1)
            skip = torch.zeros_like(ids, dtype=torch.bool)  # ceil(rate * tokens) tokens skip their second slot
            skipping = torch.randperm(tokens, generator=generator)[:math.ceil(args.kernel_skip_rate * tokens)]
            skip[skipping, 1] = True
            kept = weights.masked_fill(skip, 0)
            kept = (kept / kept.sum(-1, keepdim=True)).contiguous()
            forms = {"redirect": redirect_skipped(ids, weights, skip).int().contiguous(),
                     "computed": ids.int().contiguous()}
            out = torch.empty_like(x)
            calls = max(2, 64 // tokens)
            best = {form: float("inf") for form in forms}
            for _ in range(args.repeats):
                for form, form_ids in forms.items():
                    begun = time.perf_counter()
                    for _ in range(calls):
                        ops.cpu_fused_moe(out, x, w13, w2, None, None, kept, form_ids, "silu", isa, False)
                    best[form] = min(best[form], (time.perf_counter() - begun) / calls)
            rows.append({"experts": experts, "tokens": tokens, "skipped_tokens": int(skip.any(-1).sum()),
                         "experts_used": {form: len(set(ids.flatten().tolist())) for form, ids in forms.items()},
                         "ms": {form: 1e3 * best[form] for form in forms}})
            logger.info("kernel %s", rows[-1])
    return rows


def kernel_table(rows: list[dict]) -> str:
    lines = ["| experts in layer | tokens | tokens with a skipped slot | experts used (computed -> redirect) "
             "| computed ms | redirect ms | speed-up |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        used, ms = row["experts_used"], row["ms"]
        lines.append(f"| {row['experts']} | {row['tokens']} | {row['skipped_tokens']} | {used['computed']} -> "
                     f"{used['redirect']} | {ms['computed']:.3f} | {ms['redirect']:.3f} | "
                     f"{ms['computed'] / ms['redirect']:.2f}x |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------- report


def table(described: dict, measured: dict, batch_sizes: list[int]) -> str:
    base = measured["base"]
    gib = 2**30
    lines = [
        "| checkpoint | experts kept | weights GiB (experts) | x base | peak GiB | x base | peak - import GiB "
        "| x base | skipped | "
        + " | ".join(f"prefill B={b} tok/s (x) | decode B={b} tok/s (x)" for b in batch_sizes) + " |",
        "|" + "---|" * (9 + 2 * len(batch_sizes)),
    ]
    def engine_bytes(figures):  # CPU: the peak above what the process held once vLLM was imported
        return figures["peak_bytes"] - figures["baseline_bytes"]

    for name, figures in measured.items():
        skips = figures.get("skips") or {}
        skipped = f"{skips['skipped'] / skips['slots']:.0%}" if skips.get("slots") else "-"
        kept = sum(described[name]["experts_per_layer"])
        cells = [
            name, f"{kept}", f"{figures['weight_bytes'] / gib:.3f} ({figures['expert_bytes'] / gib:.3f})",
            f"{figures['weight_bytes'] / base['weight_bytes']:.2f}", f"{figures['peak_bytes'] / gib:.2f}",
            f"{figures['peak_bytes'] / base['peak_bytes']:.2f}",
            f"{engine_bytes(figures) / gib:.2f}", f"{engine_bytes(figures) / engine_bytes(base):.2f}",
            skipped,
        ]
        for row, base_row in zip(figures["rows"], base["rows"]):
            cells.append(f"{row['prefill_tps']:.0f} ({row['prefill_tps'] / base_row['prefill_tps']:.2f})")
            cells.append(f"{row['decode_tps']:.1f} ({row['decode_tps'] / base_row['decode_tps']:.2f})")
        lines.append("| " + " | ".join(cells) + " |")
    for name, figures in measured.items():
        if figures["rows"] and "skip_ab" in figures["rows"][0]:
            lines += ["", f"Skip A/B in one {name} engine (pairs alternating): skipped slots redirected to the "
                      "primary (the plugin) vs their expert ids kept at weight 0 (computed, as before)", "",
                      "| batch | prefill redirect / computed tok/s (x) | decode redirect / computed tok/s (x) |",
                      "|---|---|---|"]
            for row in figures["rows"]:
                new, old = row["skip_ab"]["redirect"], row["skip_ab"]["computed"]
                lines.append(f"| {row['batch']} | {new['prefill_tps']:.0f} / {old['prefill_tps']:.0f} "
                             f"({new['prefill_tps'] / old['prefill_tps']:.2f}) | {new['decode_tps']:.1f} / "
                             f"{old['decode_tps']:.1f} ({new['decode_tps'] / old['decode_tps']:.2f}) |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=Path("/tmp/diep_serving_bench"),
                        help="folder for the checkpoints (reused when present) and results.json")
    parser.add_argument("--vllm-python", default=os.environ.get("DIEP_VLLM_PYTHON", sys.executable),
                        help="python of the vLLM environment (with diep-hub-vllm installed)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--layers", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--expert-ffn", type=int, default=1536)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--vocab", type=int, default=4096)
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--decode-tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2, help="best of this many timings per figure")
    parser.add_argument("--kv-cache-gib", type=int, default=1, help="VLLM_CPU_KVCACHE_SPACE on CPU")
    parser.add_argument("--cpu-bind", default=os.environ.get("VLLM_CPU_OMP_THREADS_BIND", "auto"),
                        help="VLLM_CPU_OMP_THREADS_BIND on CPU: core ids for vLLM's threads, e.g. 0 (one core), 0-1")
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS))
    parser.add_argument("--measure", help=argparse.SUPPRESS)  # internal: measure this checkpoint (vLLM env)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--skip-form", choices=["redirect", "computed"], help=argparse.SUPPRESS)  # internal
    parser.add_argument("--kernel", action="store_true",
                        help="CPU: time the MoE kernel alone, skipped slots redirected vs computed (no checkpoints)")
    parser.add_argument("--kernel-skip-rate", type=float, default=0.5,
                        help="with --kernel: share of tokens whose second slot is skipped (rounded up)")
    parser.add_argument("--kernel-result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    if args.measure:
        args.result.write_text(json.dumps(measure(args)))
        return 0
    if args.kernel_result:  # internal: in the vLLM environment
        args.kernel_result.write_text(json.dumps(kernel(args)))
        return 0
    if args.kernel:
        args.out.mkdir(parents=True, exist_ok=True)
        result = args.out / "kernel.result.json"
        passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                       ("layers", "hidden", "expert_ffn", "experts", "top_k", "repeats", "seed", "kernel_skip_rate")]
        subprocess.run([args.vllm_python, __file__, "--kernel-result", str(result), *passthrough, "--batch-sizes",
                        *map(str, args.batch_sizes)], check=True)
        print(kernel_table(json.loads(result.read_text())))
        return 0
    if "base" not in args.variants:
        parser.error("--variants must include base (the ratios are to base)")
    args.out.mkdir(parents=True, exist_ok=True)
    described = {k: v for k, v in prepare(args, args.out).items() if k in args.variants}
    measured = {}
    passthrough = [f"--{k.replace('_', '-')}={getattr(args, k)}" for k in
                   ("device", "vocab", "prompt_len", "decode_tokens", "repeats", "kv_cache_gib",
                    "cpu_bind", "gpu_memory_utilization", "seed")]
    for name, info in described.items():
        result = args.out / f"{name}.result.json"
        command = [args.vllm_python, __file__, "--measure", info["path"], "--result", str(result), *passthrough,
                   "--batch-sizes", *map(str, args.batch_sizes)]
        if info["skip_form"]:
            command += ["--skip-form", info["skip_form"]]
        started = time.perf_counter()
        subprocess.run(command, check=True)
        measured[name] = json.loads(result.read_text())
        logger.info("measured %s in %.0fs", name, time.perf_counter() - started)
    report = {"settings": {k: str(v) for k, v in vars(args).items() if k not in ("measure", "result")},
              "checkpoints": described, "measured": measured}
    (args.out / "results.json").write_text(json.dumps(report, indent=1))
    print(table(described, measured, args.batch_sizes))
    return 0


if __name__ == "__main__":
    sys.exit(main())
