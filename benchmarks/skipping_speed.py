"""Tokens/s of adaptive expert skipping, with and without pruning, measured side by side in one run.

Six variants of one model: full, full + skipping, 25% and 50% of routed experts pruned, each with and without
skipping. Timings are interleaved (every repeat runs every variant once, in a rotating order) so that load on a
shared machine hits all variants alike; medians over repeats are reported, with ratios to the full model taken
from the same run. Prefill forward passes (no KV cache), one torch thread by default: the process CPU time of a
single-threaded pass is what the pass costs, and it is much less disturbed by other jobs than wall time on a
shared machine (both are reported).

Two model sources:
- ``--model wide`` (default): a random-weight Mixtral-type MoE whose expert compute dominates (hidden 256,
  expert intermediate 2048, 8 experts top-2, 4 layers), router rows scaled so routing weights spread out like a
  trained model's. Quality here is only agreement with the full model's next-token argmax (random weights).
- ``--model zoo:<name>`` (e.g. ``zoo:mixtral-8e``): a trained model of :mod:`diep_hub.zoo` (built and cached on
  first use), which also gives accuracy (zoo multiple-choice, exact match, loss). Small experts: on CPU the
  attention and embedding cost dilute the speed-up.

Pruning: ``--criterion frequency`` (default) keeps each layer's most frequently routed experts on the
calibration tokens (uniform per layer); ``--criterion diep`` (zoo models) runs ``DiEPPruner`` (DiEP search,
global non-uniform selection). Skipping is calibrated after pruning, on the pruned model, as in the pipeline.

Run: ``python benchmarks/skipping_speed.py`` (about a minute on 2 CPU cores); ``--help`` for options.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, MixtralConfig

import diep_hub
from diep_hub.criteria.capture import input_device
from diep_hub.families import get_family
from diep_hub.skipping import calibrate_skipping, enable_skipping, reset_skip_counters, skip_rates

logger = logging.getLogger("skipping_speed")


def wide_model(args) -> torch.nn.Module:
    config = MixtralConfig(
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_hidden_layers=args.layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=args.experts,
        num_experts_per_tok=args.top_k,
        max_position_embeddings=max(512, args.seq_len),
        tie_word_embeddings=False,
    )
    torch.manual_seed(args.seed)
    model = AutoModelForCausalLM.from_config(config).eval()
    generator = torch.Generator().manual_seed(args.seed + 1)
    with torch.no_grad():
        for layer in get_family(model).moe_layers(model):
            # RMS-normed inputs have unit-scale coordinates: logits then have std ~ router_scale * sqrt(hidden)
            weight = torch.randn(layer.router.weight.shape, generator=generator)
            layer.router.weight.copy_(weight * args.router_scale / args.hidden**0.5)
    return model


def most_used_experts(model, ids: torch.Tensor, keep: int) -> dict[int, list[int]]:
    """Per layer, the ``keep`` experts chosen most often on ``ids`` (kept in their original order)."""
    counts, handles = {}, []
    for layer in get_family(model).moe_layers(model):
        counts[layer.index] = torch.zeros(layer.num_experts)

        def hook(module, args, index=layer.index):
            counts[index] += torch.bincount(args[1].flatten().cpu(), minlength=counts[index].numel()).float()

        handles.append(layer.experts.register_forward_pre_hook(hook))
    with torch.no_grad():
        model(ids.to(input_device(model)))
    for handle in handles:
        handle.remove()
    return {i: sorted(c.topk(keep).indices.tolist()) for i, c in counts.items()}


def build_variants(base, calib_ids, sparsities, args, tokenizer=None, texts=None) -> dict[str, torch.nn.Module]:
    variants = {}
    num_experts = get_family(base).moe_layers(base)[0].num_experts
    for sparsity in sparsities:
        model = copy.deepcopy(base)
        label = "full" if sparsity == 0 else f"{round(sparsity * 100)}% pruned"
        if sparsity and args.criterion == "frequency":
            keep = max(args.top_k, round(num_experts * (1 - sparsity)))
            diep_hub.prune_experts(model, most_used_experts(model, calib_ids, keep))
        elif sparsity:
            from diep_hub.pruner import DiEPPruner

            pruner = DiEPPruner(
                sparsity=sparsity,
                method=args.criterion,
                dataset=texts,
                num_samples=len(texts),
                seq_len=calib_ids.shape[1],
                batch_size=8,
                seed=args.seed,
                progress=False,
            )
            pruner.prune_model(model, tokenizer)
        variants[label] = model
        skipped = copy.deepcopy(model)
        calibration = calibrate_skipping(skipped, calib_ids, max_tokens_for_cka=args.cka_tokens)
        enable_skipping(skipped, calibration)
        variants[f"{label} + skipping"] = skipped
    return variants


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_variants(variants, ids, repeats: int, warmup: int) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Wall-clock and process CPU seconds per forward pass, per variant (wall is the figure on a GPU)."""
    times = {name: [] for name in variants}
    cpu_times = {name: [] for name in variants}
    names = list(variants)
    with torch.no_grad():
        for _ in range(warmup):
            for model in variants.values():
                model(ids, use_cache=False)
        for model in variants.values():
            reset_skip_counters(model) if diep_hub.is_pruned(model) else None
        for r in range(repeats):
            order = names[r % len(names) :] + names[: r % len(names)]
            for name in order:
                _sync(ids.device)
                start, cpu_start = time.perf_counter(), time.process_time()
                variants[name](ids, use_cache=False)
                _sync(ids.device)
                times[name].append(time.perf_counter() - start)
                cpu_times[name].append(time.process_time() - cpu_start)
    return times, cpu_times


def argmax_agreement(model, reference, ids) -> float:
    with torch.no_grad():
        return float((model(ids).logits.argmax(-1) == reference(ids).logits.argmax(-1)).float().mean())


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="wide", help="'wide' (random, expert-heavy) or 'zoo:<name>'")
    parser.add_argument("--hidden", type=int, default=256)
    parser.add_argument("--intermediate", type=int, default=2048)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--top-k", type=int, default=2)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--vocab", type=int, default=512)
    parser.add_argument("--router-scale", type=float, default=1.5)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--cka-tokens", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads (1: steadier on a shared CPU)")
    parser.add_argument("--backend", default="grouped_mm", help="experts backend: grouped_mm (default), eager...")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--device", default="cpu", help="cpu, or cuda for the wide model (wall time is then the figure)"
    )
    parser.add_argument(
        "--criterion",
        default="frequency",
        help="'frequency' (most-routed experts, uniform per layer; any model) or a registered criterion run "
        "through DiEPPruner, e.g. 'diep' (zoo models: needs the tokenizer)",
    )
    parser.add_argument("--zoo-eval", type=int, default=60, help="zoo items per domain and metric (zoo models)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr)
    if args.threads:
        torch.set_num_threads(args.threads)

    tokenizer = None
    if args.model == "wide":
        base = wide_model(args)
        vocab = args.vocab
    elif args.model.startswith("zoo:"):
        from diep_hub.zoo.train import build_zoo_model

        base, tokenizer = build_zoo_model(args.model[4:])
        vocab = base.config.vocab_size
        args.top_k = base.config.num_experts_per_tok
    else:
        parser.error(f"--model {args.model!r}: use 'wide' or 'zoo:<name>'")
    device = torch.device(args.device)
    if device.type != "cpu" and tokenizer is not None:
        parser.error("zoo models are evaluated on CPU (the zoo scorer builds CPU tensors); use --device cpu")
    base.to(device)
    base.config._experts_implementation = args.backend
    generator = torch.Generator().manual_seed(args.seed + 2)
    if tokenizer is not None:
        from diep_hub.zoo.domains import corpus_texts

        texts = corpus_texts(args.calib_samples + args.batch, seed=args.seed)
        calib_texts = texts[: args.calib_samples]
        encoded = [tokenizer(t, add_special_tokens=False)["input_ids"] for t in texts]
        length = min(args.seq_len, min(len(e) for e in encoded))
        rows = torch.tensor([e[:length] for e in encoded])
        calib_ids, ids = rows[: args.calib_samples], rows[args.calib_samples :]
    else:
        if args.criterion != "frequency":
            parser.error("--criterion other than 'frequency' needs a zoo model (a tokenizer for calibration text)")
        calib_texts = None
        calib_ids = torch.randint(3, vocab, (args.calib_samples, args.seq_len), generator=generator)
        ids = torch.randint(3, vocab, (args.batch, args.seq_len), generator=generator)

    ids = ids.to(device)
    variants = build_variants(base, calib_ids, [0.0, 0.25, 0.5], args, tokenizer, calib_texts)
    times, cpu_times = time_variants(variants, ids, args.repeats, args.warmup)
    tokens = ids.numel()
    full = statistics.median(times["full"])
    full_cpu = statistics.median(cpu_times["full"])
    rows = []
    for name, model in variants.items():
        median = statistics.median(times[name])
        rates = skip_rates(model) if diep_hub.is_pruned(model) else {}
        row = {
            "variant": name,
            "tokens_per_s": tokens / median,
            "speedup_vs_full": full / median,
            "median_s": median,
            "min_s": min(times[name]),
            "speedup_vs_full_min": min(times["full"]) / min(times[name]),
            "tokens_per_cpu_s": tokens / statistics.median(cpu_times[name]),
            "speedup_vs_full_cpu": full_cpu / statistics.median(cpu_times[name]),
            "skip_rate": statistics.mean(rates.values()) if rates else 0.0,
            "argmax_agreement_with_full": argmax_agreement(model, variants["full"], ids),
        }
        if tokenizer is not None:
            from diep_hub.zoo.tasks import evaluate_zoo

            n = args.zoo_eval
            row["zoo"] = evaluate_zoo(model, tokenizer, num_mc=n, num_em=n // 2, num_loss=n)["macro"]
        rows.append(row)

    machine = {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
    }
    result = {
        "command": " ".join(["python", "benchmarks/skipping_speed.py", *(argv or sys.argv[1:])]),
        "args": vars(args) | {"out": str(args.out) if args.out else None},
        "machine": machine,
        "tokens_per_forward": tokens,
        "rows": rows,
    }
    print(
        "| variant | tokens/CPU-s | speed-up (CPU time) | tokens/s wall | speed-up (wall, median) | "
        "speed-up (wall, best) | skip rate | argmax = full |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for row in rows:
        print(
            f"| {row['variant']} | {row['tokens_per_cpu_s']:.0f} | {row['speedup_vs_full_cpu']:.3f}x | "
            f"{row['tokens_per_s']:.0f} | {row['speedup_vs_full']:.3f}x | {row['speedup_vs_full_min']:.3f}x | "
            f"{row['skip_rate']:.3f} | {row['argmax_agreement_with_full']:.3f} |"
        )
    if tokenizer is not None:
        print("\n| variant | " + " | ".join(rows[0]["zoo"]) + " |")
        print("|---|" + "---|" * len(rows[0]["zoo"]))
        for row in rows:
            print(f"| {row['variant']} | " + " | ".join(f"{v:.3f}" for v in row["zoo"].values()) + " |")
    if args.out:
        args.out.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
