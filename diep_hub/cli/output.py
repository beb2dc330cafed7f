"""What ``diep-hub`` prints: exit codes, JSON or text on stdout, and the text forms of each command's result."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

EXIT_OK, EXIT_MISMATCH, EXIT_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130


def emit(data: Any, as_json: bool, text: Callable[[Any], str] | None = None) -> None:
    if as_json or text is None:
        sys.stdout.write(json.dumps(data, indent=2, default=str) + "\n")
    else:
        sys.stdout.write(text(data) + "\n")


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    return f"{seconds / 60:.1f} min" if seconds < 7200 else f"{seconds / 3600:.1f} h"


def run_text(summary: dict) -> str:
    if summary.get("dry_run"):
        e = summary["estimate"]
        lines = [
            f"dry run: {e['model']} ({e['family']}, {e['dtype']})",
            f"  MoE layers {e['num_moe_layers']}, experts per layer {e['experts_per_layer']}, top-k {e['top_k']}",
            f"  parameters {e['params_total']:,} (experts {e['params_experts']:,}), "
            f"after pruning ~{e['params_after_pruning']:,}",
            f"  experts removed {e['experts_removed']} of {e['experts_total']}",
            f"  weights {_size(e['weight_bytes'])} -> ~{_size(e['weight_bytes_after_pruning'])}",
            f"  run ~{_duration(e['run_seconds_estimate'])} on {e['device']} "
            f"(search ~{_duration(e['search_seconds_estimate'])}"
            + (f", merging and recalibration ~{_duration(e['edit_seconds_estimate'])}"
               if e.get("edit_seconds_estimate") else "")
            + f"), peak ~{_size(e['peak_bytes_estimate'])}",
            f"  cost model: {e['assumptions']}",
            *([f"  config: {e['config_source']}"] if e.get("config_source") else []),
            *(f"  note: {note}" for note in e.get("notes", [])),
            f"  output would go to {summary['output_dir']}; push: {summary['push']}",
        ]
        return "\n".join(lines)
    experts = summary["experts"]
    kept = " ".join(str(r["kept"]) for r in experts)
    total = sum(r["original"] or 0 for r in experts)
    lines = [f"saved {summary['output_dir']} ({summary['method']}, sparsity {summary['sparsity']}) in "
             f"{_duration(summary['wall_seconds'])}",
             f"experts kept per layer: {kept} ({sum(r['kept'] for r in experts)} of {total})"]
    retention = summary.get("retention")
    if retention:
        error = "" if retention["stderr"] is None else f" ± {100 * retention['stderr']:.2f}%"
        lines.append(f"retention: {100 * retention['average']:.2f}%{error} (standard error; "
                     f"{retention['tasks']} task(s), {retention['items']} items)")
    else:
        lines.append("retention: not measured (evaluation.tasks and evaluation.base give it)")
    ppl = summary.get("perplexity")
    if ppl and ppl.get("ratio") is not None:
        lines.append(f"perplexity: {ppl['base']:.4g} -> {ppl['pruned']:.4g} (ratio {ppl['ratio']:.3f})")
    size = summary.get("weight_bytes")
    if size:
        change = f" ({100 * (size['after'] / size['before'] - 1):+.1f}%)" if size["before"] else ""
        lines.append(f"weights: {size['before']:,} -> {size['after']:,} bytes{change}")
    if summary.get("pushed"):
        lines.append(f"pushed: {summary['pushed']['pr_url'] or summary['pushed']['commit_url']}")
    if summary.get("next_commands"):
        lines += ["next:", *(f"  {command}" for command in summary["next_commands"])]
    return "\n".join(lines)


def reproduce_text(result: dict) -> str:
    lines = [f"reproduce {result['source']}: {'MATCH' if result['match'] else 'MISMATCH'}"]
    for name, check in result["checks"].items():
        lines.append(f"  {name}: {'ok' if check['match'] else 'differs'}")
        for d in check.get("differences", [])[:5]:
            lines.append(f"    {d}")
    return "\n".join(lines)


def env_text(report: dict) -> str:
    lines = [f"platform:  {report['platform']}", f"machine:   {report['machine']}", "packages:"]
    lines += [f"  {name}: {found or 'not installed'}" for name, found in report["packages"].items()]
    hub = report["hub"]
    lines += ["hub:", f"  endpoint: {hub['endpoint']}", f"  offline: {'yes' if hub['offline'] else 'no'}",
              f"  cache: {hub['cache']}", f"  token configured: {'yes' if hub['token_configured'] else 'no'}"]
    return "\n".join(lines)
