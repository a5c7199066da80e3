"""Human-readable results: markdown tables, recall and PR plots, failure grids."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from ..data.images import load_image


def results_table(results: dict) -> str:
    """Markdown table of recall metrics (one row per dataset) and one of efficiency."""
    ds = results["datasets"]
    ns = [k for k in next(iter(ds.values()))["recall"]] if ds else []
    lines = [f"Model: `{results['model']['name']}` (fingerprint {results['model']['fingerprint']}, "
             f"{results['model']['descriptor_dim']}-D, {results['model']['image_size'][0]}x"
             f"{results['model']['image_size'][1]} px)", "",
             "| dataset | db | queries | " + " | ".join(ns) + " | PR-AUC | R@100%P |",
             "|---|---:|---:|" + "---:|" * (len(ns) + 2)]
    for name, r in ds.items():
        vals = " | ".join(f"{r['recall'][n]:.3f}" for n in ns)
        lines.append(f"| {name} | {r['num_db']} | {r['num_queries']} | {vals} | {r['pr_auc']:.3f} | "
                     f"{r['recall_at_100p']:.3f} |")
    seq = {name: r["sequence"] for name, r in ds.items() if r.get("sequence")}
    if seq:
        lines += ["", "| dataset | sequence R@1 | single-frame R@1 | frames | method |", "|---|---:|---:|---:|---|"]
        for name, q in seq.items():
            lines.append(f"| {name} | {q['recall']['R@1']:.3f} | {ds[name]['recall'][ns[0]]:.3f} | {q['length']} | "
                         f"{q['method']} |")
    ver = {name: r["verification"] for name, r in ds.items() if r.get("verification")}
    if ver:
        lines += ["", "| dataset | verified R@1 | R@1 without | K | ms/query | top-1 moved | not verifiable |",
                  "|---|---:|---:|---:|---:|---:|---:|"]
        for name, v in ver.items():
            lines.append(f"| {name} | {ds[name]['recall'][ns[0]]:.3f} | {v['recall_unverified'][ns[0]]:.3f} | "
                         f"{v['k']} | {v['ms_per_query']:.0f} | {v['top1_moved']} | {v['not_verified']} |")
    eff = results.get("efficiency")
    if eff:
        lines += ["", "| params (M) | GFLOPs | ms/img b1 | ms/img batched | peak RSS MB (b1) | inference MB (b1) "
                  "| model MB | desc bytes fp32 |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        batched = next(k for k in eff if k.startswith("ms_per_img_b") and k != "ms_per_img_b1")

        def cell(key: str, fmt: str = ".1f", scale: float = 1.0) -> str:  # "-" where a runtime cannot tell
            v = eff.get(key)
            return "-" if v is None else f"{v / scale:{fmt}}"

        mem = "peak_rss_mb_b1" if "peak_rss_mb_b1" in eff else "peak_mem_mb_b1"
        lines.append(f"| {cell('params', '.2f', 1e6)} | {cell('gflops', '.2f')} | {cell('ms_per_img_b1')} | "
                     f"{eff[batched]:.1f} ({batched.split('_b')[-1]}) | {cell(mem, '.0f')} | "
                     f"{cell('inference_mem_mb_b1', '.0f')} | {cell('model_bytes', '.1f', 2**20)} | "
                     f"{eff['descriptor_bytes_fp32']} |")
    return "\n".join(lines) + "\n"


def line_plot(path: Path, series: list[tuple[np.ndarray, np.ndarray, str]], integer_x: bool = False,
              **axes) -> Path:
    """One PNG with a line per (x, y, label) series; ``axes`` go to ``Axes.set``; ``integer_x``: integer ticks."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(5, 4))
    for x, y, label in series:
        ax.plot(x, y, marker="." if len(x) < 50 else None, label=label)
    ax.set(**axes)
    if integer_x:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_curves(results: dict, curves: dict[str, dict], out: Path) -> list[Path]:
    """recall@N (N = 1..max) and precision-recall curves per dataset as PNG files."""
    recall = [(np.arange(1, len(c["recall_at"]) + 1), np.asarray(c["recall_at"]), name) for name, c in curves.items()]
    pr = [(c["pr"]["recall"], c["pr"]["precision"], f"{name} (AUC {c['pr']['auc']:.3f})") for name, c in curves.items()]
    return [
        line_plot(out / "recall_at_n.png", recall, integer_x=True, xlabel="N", ylabel="Recall@N",
                  title=results["model"]["name"], ylim=y_range([y for _, y, _ in recall])),
        line_plot(out / "pr_curve.png", pr, xlabel="recall", ylabel="precision",
                   title="precision-recall (top-1 score threshold)", xlim=(0, 1), ylim=(0, 1.02)),
    ]


def y_range(ys: list[np.ndarray]) -> tuple[float, float]:
    """A y-range in [0, 1] that spans the curves with a little room, so that their differences show."""
    lo, hi = min(float(np.min(y)) for y in ys), max(float(np.max(y)) for y in ys)
    pad = max(0.02, 0.08 * (hi - lo))
    return max(0.0, lo - pad), min(1.0, hi + pad) + 0.005


def clearest_failures(sim: np.ndarray, positives: list[np.ndarray], n: int) -> list[dict]:
    """Similarities [Q, N] and each query's right database ids -> up to ``n`` queries with a wrong top-1 whose
    correct match is furthest behind (largest score gap), each {query, wrong, wrong_score, right, right_rank,
    right_score, gap} (ranks from 1; right is None when the query has no right image)."""
    rows = []
    for q, pos in enumerate(positives):
        top = int(np.argmax(sim[q]))
        if len(pos) == 0 or top in set(pos.tolist()):
            continue
        right = int(pos[np.argmax(sim[q, pos])])
        rows.append({"query": q, "wrong": top, "wrong_score": float(sim[q, top]), "right": right,
                     "right_rank": int((sim[q] > sim[q, right]).sum()) + 1, "right_score": float(sim[q, right]),
                     "gap": float(sim[q, top] - sim[q, right])})
    return sorted(rows, key=lambda r: -r["gap"])[:n]


def failure_grid(rows: list[tuple[str, tuple[str, str], tuple[str, str]]], out: Path, title: str) -> Path:
    """PNG grid, one row per failed query: query | wrong top-1 | the best-ranked correct match; ``rows`` hold
    (query path, (wrong path, label), (right path, label)) with the labels under each picture."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 2.2 * len(rows)), squeeze=False)
    for r, (q, wrong, right) in enumerate(rows):
        for c, (path, label) in enumerate(((q, "query"), wrong, right)):
            ax = axes[r, c]
            ax.axis("off")
            if path:
                img = load_image(path)
                img.thumbnail((320, 320))
                ax.imshow(img)
                ax.set_title(f"{label}\n{Path(path).name}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
