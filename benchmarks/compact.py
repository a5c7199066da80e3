"""R@1 against bytes per descriptor: full float32, PCA-whitening 512/256/128, float16, int8 and binary codes.

    python benchmarks/compact.py [--model effnet-lite0-gem]

Held-out places, as the earlier tables: Gardens Point night_right vs day_right frames 70-99 (+-2) and Nordland winter
vs summer 2000-2499 (+-1, near-black frames dropped). PCA-whitening is learned on each database (the flat index's
own training), float16/int8 are FAISS scalar quantisers, binary the sign bits searched by Hamming distance; every
variant's FAISS index is made by the place index's own constructor (`_make_faiss`), as `index build --dim/--storage/
--kind binary` makes it. With 30
Gardens Point places R@1 moves in steps of 0.033; the 500 Nordland places are the comparison to trust.
Writes benchmarks/results/compact.{json,md}.
"""

from __future__ import annotations

import argparse

import numpy as np
from heldout import ROOT, data_root

from edgevpr.data.datasets import open_dataset
from edgevpr.deploy import index as idx
from edgevpr.deploy.index.backends import faiss_kinds as fk
from edgevpr.eval.extract import extract
from edgevpr.eval.recall import first_hit_rank
from edgevpr.models.model import load_model
from edgevpr.utils import default_cache_dir, write_json, write_text

VARIANTS = {"float32": ("flat", {}), "PCA 512": ("flat", {"pca_dim": 512}), "PCA 256": ("flat", {"pca_dim": 256}),
            "PCA 128": ("flat", {"pca_dim": 128}), "float16": ("flat", {"storage": "float16"}),
            "int8": ("flat", {"storage": "int8"}), "PCA 256 + int8": ("flat", {"pca_dim": 256, "storage": "int8"}),
            "binary": ("binary", {})}


def r_at_1(db: np.ndarray, q: np.ndarray, positives: list[np.ndarray], kind: str, params: dict) -> tuple[float, int]:
    """R@1 of queries q against database db through a FAISS index built as edgevpr builds it; bytes/vector."""
    index, used = fk._make_faiss(kind, db.shape[1], len(db), params)
    codes_db = idx.pack_bits(db) if kind == "binary" else db
    if not index.is_trained:
        index.train(fk.training_sample(codes_db))
    index.add(codes_db)
    ids = index.search(idx.pack_bits(q) if kind == "binary" else q, 1)[1]
    bpv = db.shape[1] // 8 if kind == "binary" else used.get("bytes_per_vector", 4 * db.shape[1])
    return float(np.mean(first_hit_rank(ids, positives) == 0)), bpv


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="effnet-lite0-gem", help="model (default effnet-lite0-gem)")
    args = ap.parse_args()
    model = load_model(args.model)
    data = data_root()
    gp, nl = data / "gardens_point", data / "nordland_64x32"
    sets = {"Gardens Point night 70-99": open_dataset(gp / "day_right", gp / "night_right", aligned_tolerance=2,
                                                      frames=(70, 100)),
            "Nordland 2000-2499": open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1, frames=(2000, 2500),
                                               drop_dark=10)}
    rows = []
    for name, ds in sets.items():
        db = extract(model, ds.db_paths, cache_dir=default_cache_dir(), desc=f"{name} db").descriptors
        q = extract(model, ds.q_paths, cache_dir=default_cache_dir(), desc=f"{name} queries").descriptors
        for variant, (kind, params) in VARIANTS.items():
            if params.get("pca_dim", 0) >= min(len(db), db.shape[1]):
                continue
            r1, bpv = r_at_1(db, q, ds.positives, kind, params)
            rows.append({"set": name, "variant": variant, "bytes": bpv, "R@1": r1, "db": len(db), "queries": len(q)})
            print(rows[-1], flush=True)
    write_json(ROOT / "benchmarks" / "results" / "compact.json", {"model": args.model, "rows": rows})
    lines = [f"# R@1 vs bytes per descriptor ({args.model}, held-out places)", "",
             "| set | variant | bytes / descriptor | R@1 |", "|---|---|---:|---:|"]
    lines += [f"| {r['set']} ({r['queries']} q / {r['db']} db) | {r['variant']} | {r['bytes']} | {r['R@1']:.3f} |"
              for r in rows]
    write_text(ROOT / "benchmarks" / "results" / "compact.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
