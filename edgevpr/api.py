"""The stages of edgevpr as plain functions; the CLI is a thin layer over them."""

from __future__ import annotations

import csv
import os
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .data.datasets import VPRDataset
from .data.images import list_images, load_image
from .eval import efficiency, report
from .eval.extract import Extraction, default_cache_dir, extract
from .eval.recall import first_hit_rank, pr_curve, recall_at_n, search
from .models.aggregators.netvlad import NetVLAD
from .models.model import VPRModel
from .utils import atomic_write, write_json, write_text

DEFAULT_NS = (1, 5, 10, 20)


@dataclass
class EvalConf:
    """Options of ``evaluate``; every field is also a CLI flag."""

    batch_size: int = 32
    num_workers: int = 0
    cache_dir: str | None = str(default_cache_dir())
    skip_bad: bool = False
    ns: tuple[int, ...] = DEFAULT_NS
    top_k: int = 20
    plot: bool = False
    show_failures: int = 0
    efficiency: bool = True
    image_size: tuple[int, int] | None = None
    progress: bool = True
    knobs: dict | None = None  # runtime knobs, e.g. {"sparsity": 0.4}
    sequence: int = 0  # > 0: also sequence matching (SeqSLAM-style, offline) over this many query frames
    verify: int = 0  # > 0: geometric verification re-ranks each query's top ``verify`` candidates
    verify_with: str = "auto"  # its local features: auto (the torch model's own, else SIFT), sift or tokens


def _extract(model: VPRModel, paths: list[Path], conf: EvalConf, desc: str, device) -> Extraction:
    return extract(model, paths, conf.batch_size, conf.cache_dir, conf.skip_bad, conf.num_workers, device,
                   conf.image_size, knobs=conf.knobs, desc=desc, progress=conf.progress)


def evaluate_dataset(model: VPRModel, ds: VPRDataset, conf: EvalConf, device="cpu",
                     out_dir: Path | None = None) -> tuple[dict, dict]:
    """Recall@N, PR curve and per-query matches of ``model`` on one dataset -> (metrics, curves); curves holds the
    recall@N and PR curves and ``top1_correct`` [Q with a positive] bool, for paired comparisons of two models."""
    t0 = time.perf_counter()
    db = _extract(model, ds.db_paths, conf, f"{ds.name} db", device)
    q = _extract(model, ds.q_paths, conf, f"{ds.name} queries", device)
    failed = db.failed + q.failed
    if failed:
        ds = ds.subset(db.ok, q.ok)
    db_desc, q_desc = db.descriptors[db.ok], q.descriptors[q.ok]
    k = max(max(conf.ns), conf.top_k, conf.verify)
    scores, idx = search(db_desc, q_desc, k)
    has_pos = np.array([len(p) > 0 for p in ds.positives])
    verification = None
    if conf.verify:
        unverified = recall_at_n(first_hit_rank(idx, ds.positives), has_pos, conf.ns)
        scores, idx, verification = _verify(ds, scores, idx, conf, model)
        verification["recall_unverified"] = unverified
    ranks = first_hit_rank(idx, ds.positives)
    recall = recall_at_n(ranks, has_pos, conf.ns)
    pr = pr_curve(scores[:, 0], ranks == 0, has_pos)
    metrics = {
        "num_db": ds.num_db, "num_queries": ds.num_queries, "queries_with_positive": int(has_pos.sum()),
        "recall": recall, "pr_auc": pr["auc"], "recall_at_100p": pr["recall_at_100p"],
        "failed_images": [{"path": p, "reason": r} for p, r in failed], "ground_truth": ds.info,
        "seconds": time.perf_counter() - t0,
        **({"verification": verification} if verification else {}),
    }
    if conf.sequence:
        from .deploy.sequence import seqslam

        best, _ = seqslam(q_desc @ db_desc.T, length=conf.sequence)
        hit = np.array([b in set(p.tolist()) for b, p in zip(best, ds.positives, strict=True)])
        metrics["sequence"] = {"length": conf.sequence, "method": "seqslam (offline; similarity rows z-scored, "
                               "velocities 0.8-1.25 database frames per query frame)",
                               "tolerance": {k: v for k, v in ds.info.items() if k in ("tolerance_frames", "radius_m")}
                               or "as the single-frame ground truth",
                               "recall": {"R@1": float(np.mean(hit[has_pos]))}}
    r_at = [float(np.mean((ranks[has_pos] >= 0) & (ranks[has_pos] < n))) for n in range(1, k + 1)]
    curves = {"recall_at": r_at, "pr": pr, "top1_correct": ranks[has_pos] == 0}
    if out_dir is not None:
        _write_matches(out_dir / f"{ds.name}_matches.csv", ds, scores, idx, ranks, conf.top_k)
        if conf.show_failures:
            worst = report.clearest_failures(q_desc @ db_desc.T, ds.positives, conf.show_failures)
            if worst:
                rows = [(str(ds.q_paths[f["query"]]),
                         (str(ds.db_paths[f["wrong"]]), f"wrong top-1, score {f['wrong_score']:.3f}"),
                         (str(ds.db_paths[f["right"]]), f"best correct: rank {f['right_rank']}, score "
                                                        f"{f['right_score']:.3f}")) for f in worst]
                report.failure_grid(rows, out_dir / f"{ds.name}_failures.png",
                                    f"{ds.name}: {int((has_pos & (ranks != 0)).sum())} wrong top-1; the {len(rows)} "
                                    "with the largest score gap to their best correct match")
    return metrics, curves


def _verify(ds: VPRDataset, scores: np.ndarray, idx: np.ndarray, conf: EvalConf,
            model) -> tuple[np.ndarray, np.ndarray, dict]:
    """Ranked scores and ids [Q, k] -> the same with each query's top ``conf.verify`` re-ranked by geometric
    verification (``deploy.verify``, as ``localize --verify`` does), and a record: K, ms per query, queries whose
    top-1 moved, queries too plain to verify."""
    from tqdm.auto import tqdm

    from .data.images import load_image
    from .deploy.verify import verifier_for

    verifier = verifier_for(model, model.transform(conf.image_size), conf.verify, conf.verify_with, conf.knobs)
    scores, idx = scores.copy(), idx.copy()
    n = min(conf.verify, idx.shape[1])
    moved = plain = 0
    t0 = time.perf_counter()
    for q in tqdm(range(len(idx)), desc=f"{ds.name} verify top-{n}", unit="query", disable=not conf.progress,
                  dynamic_ncols=True):
        paths = [str(ds.db_paths[j]) for j in idx[q, :n]]
        order, rec = verifier.rerank(load_image(ds.q_paths[q]), scores[q, :n], paths)
        scores[q, :n], idx[q, :n] = scores[q, :n][order], idx[q, :n][order]
        moved += bool(rec.get("moved"))
        plain += not rec["verified"]
    return scores, idx, {"k": n, "ms_per_query": (time.perf_counter() - t0) * 1000 / max(len(idx), 1),
                         "top1_moved": moved, "not_verified": plain,
                         "features": verifier.kind, "method": verifier.method}


def _write_matches(path: Path, ds: VPRDataset, scores, idx, ranks, top_k: int) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            cols = [c for r in range(1, top_k + 1) for c in (f"match{r}", f"score{r}", f"correct{r}")]
            w.writerow(["query", "first_correct_rank", *cols])
            for qi in range(len(idx)):
                pos = set(ds.positives[qi].tolist())
                row = [str(ds.q_paths[qi]), int(ranks[qi]) + 1 if ranks[qi] >= 0 else ""]
                for r in range(min(top_k, idx.shape[1])):
                    row += [str(ds.db_paths[idx[qi, r]]), f"{scores[qi, r]:.5f}", int(idx[qi, r] in pos)]
                w.writerow(row)

    atomic_write(path, write)


def evaluate(model: VPRModel, datasets: list[VPRDataset], conf: EvalConf | None = None,
             out_dir: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> dict:
    """Evaluate on every dataset; write results.json, results.md (and plots) to ``out_dir``."""
    conf = conf or EvalConf()
    out = Path(out_dir) if out_dir else None
    if out:
        out.mkdir(parents=True, exist_ok=True)
    model = model.to(device).eval()
    size = conf.image_size or model.image_size
    results = {"model": {"name": model.name, "fingerprint": model.fingerprint(), "descriptor_dim": model.out_dim,
                         "image_size": list(size), "config": model.config, "knobs": conf.knobs or {}},
               "datasets": {}}
    curves = {}
    for ds in datasets:
        results["datasets"][ds.name], curves[ds.name] = evaluate_dataset(model, ds, conf, device, out)
    if conf.efficiency:
        results["efficiency"] = (efficiency.profile(model, size, model.out_dim, **(conf.knobs or {}))
                                 if isinstance(model, torch.nn.Module) else efficiency.onnx_profile(model, size,
                                                                                                    model.out_dim))
    if out:
        write_json(out / "results.json", results)
        write_text(out / "results.md", report.results_table(results))
        if conf.plot:
            report.plot_curves(results, curves, out)
    return results


@torch.inference_mode()
def init_netvlad(model: VPRModel, images: list[Path], max_images: int = 500, per_image: int = 100,
                 seed: int = 0) -> None:
    """k-means initialisation of a NetVLAD head from local features of (up to) ``max_images`` images."""
    head = model.aggregator
    if not isinstance(head, NetVLAD):
        raise TypeError(f"init_netvlad needs a NetVLAD head, the model has {type(head).__name__}")
    rng = np.random.default_rng(seed)
    chosen = [images[i] for i in sorted(rng.choice(len(images), min(max_images, len(images)), replace=False))]
    tf = model.transform()
    feats = []
    model.eval()
    for p in chosen:
        tok = model.forward_tokens(tf(load_image(p)).unsqueeze(0))
        x = tok.patches[0].float().numpy()
        feats.append(x[rng.choice(len(x), min(per_image, len(x)), replace=False)])
    head.init_from_features(np.concatenate(feats), seed=seed)


def images_of(source: str | os.PathLike) -> list[Path]:
    """Images of a folder or of a CSV manifest."""
    from .data.datasets import read_manifest

    p = Path(source)
    return read_manifest(p)[0] if p.suffix.lower() == ".csv" else list_images(p)
