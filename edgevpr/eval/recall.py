"""Retrieval metrics: FAISS search, Recall@N, precision-recall curve and its AUC."""

from __future__ import annotations

import numpy as np


def search(db: np.ndarray, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Exact inner-product search on L2-normalised descriptors -> (scores [Q, k], indices [Q, k])."""
    import faiss

    index = faiss.IndexFlatIP(db.shape[1])
    index.add(np.ascontiguousarray(db, dtype=np.float32))
    return index.search(np.ascontiguousarray(queries, dtype=np.float32), min(k, len(db)))


def first_hit_rank(indices: np.ndarray, positives: list[np.ndarray]) -> np.ndarray:
    """Rank (0-based) of the first correct match in each query's list, or -1 if none within k."""
    ranks = np.full(len(indices), -1, dtype=np.int64)
    for q, (row, pos) in enumerate(zip(indices, positives, strict=True)):
        hits = np.nonzero(np.isin(row, pos))[0]
        if hits.size:
            ranks[q] = hits[0]
    return ranks


def recall_at_n(ranks: np.ndarray, has_positive: np.ndarray, ns=(1, 5, 10, 20)) -> dict[str, float]:
    """Fraction of queries (that have a positive) whose first hit is within the top N."""
    r = ranks[has_positive]
    if r.size == 0:
        raise ValueError("no query has a ground-truth positive in the database")
    return {f"R@{n}": float(np.mean((r >= 0) & (r < n))) for n in ns}


def pr_curve(top1_scores: np.ndarray, top1_correct: np.ndarray, has_positive: np.ndarray) -> dict:
    """Precision-recall over a threshold on the top-1 score (accept a match if score >= t).

    precision = correct accepted / accepted; recall = correct accepted / queries with a positive.
    Returns precision, recall arrays (by decreasing threshold), AUC (trapezoid, starting at recall 0
    with the first precision) and the recall at 100% precision.
    """
    order = np.argsort(-top1_scores, kind="stable")
    correct = top1_correct[order].astype(np.float64)
    tp = np.cumsum(correct)
    accepted = np.arange(1, len(correct) + 1)
    precision = tp / accepted
    recall = tp / max(1, int(has_positive.sum()))
    r = np.concatenate([[0.0], recall])
    p = np.concatenate([[precision[0] if len(precision) else 1.0], precision])
    auc = float(np.sum((r[1:] - r[:-1]) * (p[1:] + p[:-1]) / 2))
    perfect = recall[precision >= 1.0 - 1e-12]
    return {"precision": precision, "recall": recall, "auc": auc,
            "recall_at_100p": float(perfect.max()) if perfect.size else 0.0}
