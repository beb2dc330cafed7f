"""Quality benchmark report: merge the JSON results of ``quality.py`` runs and render RESULTS.md / HELDOUT.md and
their plots from them.

Kept apart from the runs (``quality.py``) so the report can be regenerated, or changed, without the models: it needs
only the JSON under ``benchmarks/results`` (``python benchmarks/quality.py --report-only``).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from diep_hub.zoo import domains
from diep_hub.zoo.train import EXTRA, HELDOUT, ZOO

HERE = Path(__file__).resolve().parent

# ---------------------------------------------------------------------------------------------------------------
# Results JSON: merge the rows just run into those of earlier runs.


def _merge_block(old: dict, new: dict, rows_key: str, label_key: str) -> dict:
    """``new`` with the rows of ``old`` whose method (or variant) was not run again, so that one method can be
    re-run (``--methods diep``) without re-running the others."""
    rerun = {row[label_key] for row in new[rows_key]}
    kept = [row for row in old.get(rows_key, []) if row.get(label_key) not in rerun]
    merged = {**old, **new, rows_key: kept + new[rows_key]}
    if "layer_counts" in old:
        merged["layer_counts"] = {**old["layer_counts"], **new.get("layer_counts", {})}
    return merged


def merge_write(path: Path, meta: dict, blocks: list[dict]) -> None:
    """Write results, merging the rows just run into those of earlier runs (per model and method)."""
    old = json.loads(path.read_text()) if path.is_file() else {"meta": {}, "blocks": []}
    by_model = {b["model"]: b for b in old["blocks"]}
    for block in blocks:
        rows_key, label_key = ("runs", "method") if "runs" in block else ("rows", "variant")
        previous = by_model.get(block["model"])
        by_model[block["model"]] = _merge_block(previous, block, rows_key, label_key) if previous else block
    ordered = [by_model[name] for name in [*ZOO, *EXTRA, *HELDOUT] if name in by_model]
    meta = {**meta, "commands": list(dict.fromkeys([*old["meta"].get("commands", []), meta["command"]]))}
    path.write_text(json.dumps({"meta": meta, "blocks": ordered}, indent=1), encoding="utf-8")


# ---------------------------------------------------------------------------------------------------------------
# Report: RESULTS.md tables and plots from the JSON written above.

FINDINGS_MARKER = "<!-- findings: hand-written below this line, kept when the tables are regenerated -->"


def _fmt(x: float | None) -> str:
    return "—" if x is None else f"{x:.3f}"


def _run(block: dict, method: str, selection: str, sparsity: float) -> dict | None:
    for row in block["runs"]:
        if (row.get("method"), row.get("selection"), row.get("sparsity")) == (
            method,
            selection,
            sparsity,
        ) and "macro" in row:
            return row
    return None


def main_tables(data: dict, method_order: Sequence[str], selections: Sequence[str]) -> list[str]:
    """The main table and the per-model tables; methods in ``method_order`` (others last), rows per selection."""
    meta = data["meta"]
    blocks = data["blocks"]
    order = list(method_order)
    methods = sorted(
        dict.fromkeys(r["method"] for b in blocks for r in b["runs"]),
        key=lambda m: order.index(m) if m in order else len(order),
    )
    sparsities = sorted({r["sparsity"] for b in blocks for r in b["runs"] if "sparsity" in r})
    lines = [
        "## Main table",
        "",
        "Commands (a method's rows come from the last command that ran it on that model): "
        + ", ".join(f"`{c}`" for c in meta.get("commands", [meta["command"]]))
        + "  ",
        f"Machine: {meta['machine']}.  ",
        f"Calibration: {meta['num_samples']} zoo documents (calibration split) x {meta['seq_len']} tokens, batch "
        f"{meta['batch_size']}. Evaluation: held-out items of every domain; MC = 4-way multiple choice by "
        "log-likelihood (chance 0.25), EM = greedy exact match; macro = mean over the 7 domains.",
        "",
        "### Mean retention over the zoo models (macro MC accuracy pruned / unpruned; EM in brackets)",
        "",
        "| method | selection | " + " | ".join(f"{int(s * 100)}%" for s in sparsities) + " |",
        "|---|---|" + "---|" * len(sparsities),
    ]
    for method in methods:
        for selection in selections:
            cells = []
            for s in sparsities:
                rows = [_run(b, method, selection, s) for b in blocks]
                rows = [r for r in rows if r is not None]
                if not rows:
                    cells.append("—")
                    continue
                mc = sum(r["retention"]["mc_acc"] for r in rows) / len(rows)
                em = sum(r["retention"]["em_acc"] for r in rows) / len(rows)
                cells.append(f"{mc:.3f} ({em:.3f})" + ("" if len(rows) == len(blocks) else f" [{len(rows)} models]"))
            if any(c != "—" for c in cells):
                lines.append(f"| {method} | {selection} | " + " | ".join(cells) + " |")
    for block in blocks:
        base = block["base"]["macro"]
        lines += [
            "",
            f"### {block['model']}",
            "",
            f"Unpruned: MC {base['mc_acc']:.3f}, EM {base['em_acc']:.3f}, loss {base['loss']:.3f}."
            + (
                f" DiEPPruner end-to-end keep map equals the staged one: {block['pruner_agrees']}."
                if "pruner_agrees" in block
                else ""
            ),
            "",
            "| method | selection | "
            + " | ".join(f"MC {int(s * 100)}% | EM {int(s * 100)}% | loss {int(s * 100)}%" for s in sparsities)
            + " |",
            "|---|---|" + "---|---|---|" * len(sparsities),
        ]
        for method in methods:
            for selection in selections:
                rows = [_run(block, method, selection, s) for s in sparsities]
                if all(r is None for r in rows):
                    continue
                cells = []
                for r in rows:
                    cells += [
                        _fmt(r and r["macro"]["mc_acc"]),
                        _fmt(r and r["macro"]["em_acc"]),
                        _fmt(r and r["macro"]["loss"]),
                    ]
                lines.append(f"| {method} | {selection} | " + " | ".join(cells) + " |")
        s = max(sparsities)
        doms = list(block["base"]["domains"])
        lines += [
            "",
            f"Per-domain MC accuracy at {int(s * 100)}%, global selection (domain weight in brackets):",
            "",
            "| method | " + " | ".join(f"{d} ({domains.DOMAINS[d].weight:.2f})" for d in doms) + " |",
            "|---|" + "---|" * len(doms),
            "| unpruned | " + " | ".join(f"{block['base']['domains'][d]['mc_acc']:.2f}" for d in doms) + " |",
        ]
        for method in methods:
            r = _run(block, method, "global", s) or _run(block, method, "uniform", s)
            if r is not None:
                tag = "" if r["selection"] == "global" else " (uniform)"
                lines.append(f"| {method}{tag} | " + " | ".join(f"{r['domains'][d]:.2f}" for d in doms) + " |")
        skipped = {r["method"]: r["skipped"] for r in block["runs"] if "skipped" in r}
        for method, why in skipped.items():
            lines.append(f"\n{method} not run on {block['model']}: {why}")
    return lines


def ablation_tables(data: dict) -> list[str]:
    lines = [
        "",
        "## DiEP ablation",
        "",
        "Commands: "
        + ", ".join(f"`{c}`" for c in data["meta"].get("commands", [data["meta"]["command"]]))
        + ". Cells: retention of macro MC accuracy (EM in brackets); "
        "kept = experts kept per layer under global selection.",
        "",
    ]
    for block in data["blocks"]:
        keys = sorted({(r["sparsity"], r.get("selection", "global")) for r in block["rows"]})
        lines += [
            f"### {block['model']}",
            "",
            "| variant | " + " | ".join(f"{int(s * 100)}% {m}" for s, m in keys) + " | kept (global) | search s |",
            "|---|" + "---|" * len(keys) + "---|---|",
        ]
        for variant in dict.fromkeys(r["variant"] for r in block["rows"]):
            rows = {(r["sparsity"], r.get("selection", "global")): r for r in block["rows"] if r["variant"] == variant}
            cells = [
                f"{rows[k]['retention']['mc_acc']:.3f} ({rows[k]['retention']['em_acc']:.3f})" if k in rows else "—"
                for k in keys
            ]
            kept = "; ".join(
                "/".join(str(v) for v in rows[k]["kept"].values()) for k in keys if k in rows and k[1] == "global"
            )
            first = next(iter(rows.values()))
            lines.append(f"| {variant} | " + " | ".join(cells) + f" | {kept} | {first['score_seconds']} |")
        lines.append("")
    return lines


def plots(data: dict, folder: Path, prefix: str = "") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = data["blocks"]
    methods = list(dict.fromkeys(r["method"] for b in blocks for r in b["runs"] if "macro" in r))
    fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 4), squeeze=False)
    for ax, block in zip(axes[0], blocks, strict=True):
        for k, method in enumerate(methods):
            color = plt.get_cmap("tab10")(k % 10)
            for selection, style in (("global", "-"), ("uniform", ":")):
                pts = [(0.0, 1.0)] + [
                    (r["sparsity"], r["retention"]["mc_acc"])
                    for r in block["runs"]
                    if r.get("method") == method and r.get("selection") == selection and "macro" in r
                ]
                if len(pts) > 1:
                    xs, ys = zip(*sorted(pts), strict=True)
                    ax.plot(xs, ys, style, marker="o", color=color, label=f"{method} ({selection})")
        ax.set_title(block["model"])
        ax.set_xlabel("sparsity (fraction of routed experts removed)")
        ax.set_ylabel("retention (macro MC accuracy)")
        ax.axhline(0.25 / block["base"]["macro"]["mc_acc"], color="grey", lw=0.8, ls="--")
        ax.grid(alpha=0.3)
    axes[0][-1].legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(folder / f"{prefix}retention.png", dpi=110)
    plt.close(fig)

    fig, axes = plt.subplots(1, len(blocks), figsize=(5 * len(blocks), 3.5), squeeze=False)
    for ax, block in zip(axes[0], blocks, strict=True):
        counts = block["layer_counts"]
        width = 0.8 / max(1, len(counts))
        for j, (label, kept) in enumerate(counts.items()):
            layers = [int(k) for k in kept]
            ax.bar([x + j * width for x in layers], list(kept.values()), width=width, label=label)
        if counts:
            layers = [int(k) for k in next(iter(counts.values()))]
            ax.set_xticks([x + 0.4 - width / 2 for x in layers], [str(x) for x in layers])
        ax.set_title(f"{block['model']}: DiEP kept experts per layer")
        ax.set_xlabel("decoder layer")
        ax.set_ylabel("experts kept")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(folder / f"{prefix}diep_layer_counts.png", dpi=110)
    plt.close(fig)


def write_report(
    results_dir: Path = HERE / "results",
    target: Path = HERE / "RESULTS.md",
    *,
    method_order: Sequence[str],
    selections: Sequence[str],
) -> None:
    """Regenerate RESULTS.md (tables) and the plots; keep the hand-written findings below the marker.

    ``method_order`` and ``selections`` come from ``quality.py`` (its METHODS and SELECTIONS), passed in rather
    than imported because ``quality.py`` runs as ``__main__`` and importing it here would load it twice."""
    main_report = target.name == "RESULTS.md"
    titles = {"RESULTS": "which pruning criterion keeps the most of a trained MoE",
              "HELDOUT": "a held-out model, to check the defaults chosen in RESULTS.md"}
    title = titles.get(target.stem, f"{target.stem} models")
    lines = [f"# Quality benchmark: {title}", ""]
    prefix = "" if main_report else f"{target.stem.lower()}_"
    if (results_dir / "quality.json").is_file():
        data = json.loads((results_dir / "quality.json").read_text())
        lines += main_tables(data, method_order, selections)
        plots(data, target.parent, prefix)
        lines += [
            "",
            f"Plots: `benchmarks/{prefix}retention.png` (retention vs sparsity per method; dashed grey = chance), "
            f"`benchmarks/{prefix}diep_layer_counts.png` (DiEP's kept experts per layer, global selection).",
        ]
    if (results_dir / "ablation.json").is_file():
        lines += ablation_tables(json.loads((results_dir / "ablation.json").read_text()))
    findings = ""
    if target.is_file() and FINDINGS_MARKER in target.read_text():
        findings = target.read_text().split(FINDINGS_MARKER, 1)[1]
    target.write_text("\n".join(lines) + "\n\n" + FINDINGS_MARKER + findings, encoding="utf-8")
