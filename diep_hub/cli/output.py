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
            f"  search ~{_duration(e['search_seconds_estimate'])}, peak ~{_size(e['search_peak_bytes_estimate'])}",
            f"  ({e['assumptions']})",
            f"  output would go to {summary['output_dir']}; push: {summary['push']}",
        ]
        return "\n".join(lines)
    kept = " ".join(str(r["kept"]) for r in summary["experts"])
    lines = [f"saved {summary['output_dir']} ({summary['method']}, sparsity {summary['sparsity']})",
             f"experts kept per layer: {kept}", f"wall time {summary['wall_seconds']} s"]
    if summary.get("pushed"):
        lines.append(f"pushed: {summary['pushed']['commit_url']}")
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
