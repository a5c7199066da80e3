"""Place-index kinds side by side: flat (exact), IVF-PQ and HNSW on real descriptors and at scale.

Descriptors: the default model (EfficientNet-lite0 + GeM, 1280-D) on Nordland 64x32 summer (2500) + Gardens
Point day_right (100) as the database, Nordland winter + Gardens Point night_right (2600) as queries. For scale
the database is tiled with noisy copies (x + sigma * n, re-normalised; sigma such that a copy keeps cosine
``--copy-cos`` to its source) to 100k and 1M vectors. Reported per kind and size: recall@1 against flat
(approximate top-1 == exact top-1), ms/query (batch of all queries, this CPU's threads), bytes/vector (the
written index file / N), build time (train + add). The real-size rows also give R@1 against ground truth.

    python benchmarks/index.py                       # real, 100k, 1M  (about 25 minutes here)
    python benchmarks/index.py --sizes 0 100000      # 0 = the real database alone
    python benchmarks/index.py --integrity 1000000   # cost of the integrity check at open (index_integrity.md)

``--integrity N`` writes a complete index folder (SQLite with N descriptor rows + a flat FAISS file + manifest,
through edgevpr's own writer) of the tiled database and times what opening it costs: the first open after the
files changed (full sha256 of both), later opens (stat stamps only), and ``index info --verify``.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import ROOT, data_root  # noqa: E402

from edgevpr.data.datasets import open_dataset  # noqa: E402
from edgevpr.deploy.index import _configure, _make_faiss, training_sample  # noqa: E402
from edgevpr.eval.extract import default_cache_dir, extract  # noqa: E402
from edgevpr.eval.recall import first_hit_rank  # noqa: E402
from edgevpr.models.model import load_model  # noqa: E402
from edgevpr.utils import write_json, write_text  # noqa: E402

KINDS = ("flat", "ivfpq", "hnsw")


def real_descriptors(model_name: str) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(db [N, D], queries [Q, D], positives per query as db indices)."""
    data = data_root()
    model = load_model(model_name)
    gp, nl = data / "gardens_point", data / "nordland_64x32"
    sets = [open_dataset(nl / "summer", nl / "winter", aligned_tolerance=1),
            open_dataset(gp / "day_right", gp / "night_right", aligned_tolerance=2)]
    dbs, qs, pos, offset = [], [], [], 0
    for ds in sets:
        db = extract(model, ds.db_paths, cache_dir=default_cache_dir(), desc=f"{ds.name} db").descriptors
        q = extract(model, ds.q_paths, cache_dir=default_cache_dir(), desc=f"{ds.name} queries").descriptors
        dbs.append(db)
        qs.append(q)
        pos += [p + offset for p in ds.positives]
        offset += len(db)
    return np.concatenate(dbs), np.concatenate(qs), pos


def tiled(db: np.ndarray, n: int, copy_cos: float, seed: int = 0) -> np.ndarray:
    """``db`` followed by noisy, re-normalised copies up to ``n`` rows [n, D] float32."""
    if n <= len(db):
        return db
    d = db.shape[1]
    sigma = np.sqrt((1 / copy_cos**2 - 1) / d)
    rng = np.random.default_rng(seed)
    out = np.empty((n, d), np.float32)
    out[: len(db)] = db
    for start in range(len(db), n, 65536):
        stop = min(n, start + 65536)
        src = db[rng.integers(0, len(db), stop - start)]
        x = src + sigma * rng.standard_normal(src.shape, dtype=np.float32)
        out[start:stop] = x / np.linalg.norm(x, axis=1, keepdims=True)
    return out


def bench_kind(kind: str, db: np.ndarray, q: np.ndarray, exact: np.ndarray | None) -> tuple[dict, np.ndarray]:
    import faiss

    index, params = _make_faiss(kind, db.shape[1], len(db), {})
    t0 = time.perf_counter()
    if not index.is_trained:
        index.train(training_sample(db))
    index.add(db)
    build_s = time.perf_counter() - t0
    _configure(index, kind, params)
    index.search(q[:8], 1)  # warm-up
    t0 = time.perf_counter()
    _, ids = index.search(q, 10)
    ms = (time.perf_counter() - t0) * 1000 / len(q)
    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        faiss.write_index(index, f"{d}/i.faiss")
        nbytes = os.path.getsize(f"{d}/i.faiss")
    del index
    agree = 1.0 if exact is None else float(np.mean(ids[:, 0] == exact))
    in10 = 1.0 if exact is None else float(np.mean((ids == exact[:, None]).any(1)))
    return {"kind": kind, "params": params, "n": len(db), "recall1_vs_flat": agree, "recall1at10_vs_flat": in10,
            "ms_per_query": ms,
            "bytes_per_vector": nbytes / len(db), "build_s": build_s}, ids


def bench_integrity(db: np.ndarray, folder: Path) -> dict:
    """Write an index folder of ``db`` [N, D] with edgevpr's writer, then time PlaceIndex.open three ways."""
    import faiss

    from edgevpr.deploy import index as idx
    from edgevpr.integrity import StampCache

    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    con = idx._connect(folder / idx.DB_FILE)
    with con:
        for start in range(0, len(db), 10_000):
            part = db[start:start + 10_000]
            con.executemany("INSERT INTO images (id, path, descriptor) VALUES (?, ?, ?)",
                            ((start + i, f"img{start + i:08d}.jpg", v.tobytes()) for i, v in enumerate(part)))
    index = faiss.IndexFlatIP(db.shape[1])
    index.add(db)
    record = {"name": "bench", "fingerprint": "0" * 16, "spec": None, "knobs": {}, "image_size": [224, 224],
              "dim": int(db.shape[1]), "runtime": "torch"}
    idx._write(folder, con, index, "flat", {}, record, None)
    con.close()
    del index
    write_s = time.perf_counter() - t0
    files = {name: (folder / name).stat().st_size for name in (idx.FAISS_FILE, idx.DB_FILE)}

    def timed_open(verify: bool = False) -> float:
        t = time.perf_counter()
        idx.PlaceIndex.open(folder, verify=verify).close()
        return time.perf_counter() - t

    (folder / StampCache.NAME).unlink()  # as after a copy to another machine: no stamps yet
    first = timed_open()
    stamped = sorted(timed_open() for _ in range(5))[2]
    full = timed_open(verify=True)
    return {"n": len(db), "dim": int(db.shape[1]), "bytes": files, "write_s": write_s, "first_open_s": first,
            "stamped_open_s": stamped, "verify_open_s": full}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="effnet-lite0-gem")
    ap.add_argument("--sizes", type=int, nargs="+", default=[0, 100_000, 1_000_000], help="0 = real database")
    ap.add_argument("--copy-cos", type=float, default=0.9, help="cosine of a tiled copy to its source")
    ap.add_argument("--queries", type=int, default=1000, help="queries timed per size (all for the real size)")
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "index"))
    ap.add_argument("--integrity", type=int, metavar="N",
                    help="instead: time the integrity check at open on an index folder of N vectors (default off)")
    args = ap.parse_args()

    import faiss

    db0, q_all, positives = real_descriptors(args.model)
    if args.integrity:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
            r = bench_integrity(tiled(db0, args.integrity, args.copy_cos), Path(d) / "index")
        out = Path(args.out + "_integrity")
        write_json(out.with_suffix(".json"), r)
        gb = {k: v / 1e9 for k, v in r["bytes"].items()}
        text = (f"# Index integrity check at open ({r['n']:,} x {r['dim']}-D, flat, {args.model} descriptors tiled)\n\n"
                f"Files: index.faiss {gb['index.faiss']:.2f} GB, places.sqlite {gb['places.sqlite']:.2f} GB "
                f"(written in {r['write_s']:.0f} s).\n\n"
                "| open | what is checked | seconds |\n|---|---|---:|\n"
                f"| first open after the files changed (or were copied) | sizes + full sha256 of both files | "
                f"{r['first_open_s']:.2f} |\n"
                f"| later opens (median of 5) | sizes + stat stamps (device, inode, size, mtime, ctime) | "
                f"{r['stamped_open_s']:.3f} |\n"
                f"| `index info --verify` | full sha256 of both files, always | {r['verify_open_s']:.2f} |\n")
        write_text(out.with_suffix(".md"), text)
        print(text)
        return
    rows = []
    for size in args.sizes:
        db = tiled(db0, size, args.copy_cos) if size else db0
        rng = np.random.default_rng(1)
        pick = np.arange(len(q_all)) if not size else np.sort(rng.choice(len(q_all), args.queries, replace=False))
        q = q_all[pick]
        exact = None
        for kind in KINDS:
            r, ids = bench_kind(kind, db, q, exact)
            if kind == "flat":
                exact = ids[:, 0]
            if not size:
                ranks = first_hit_rank(ids, [positives[i] for i in pick])
                r["gt_recall1"] = float(np.mean(ranks == 0))
            r["size"] = "real" if not size else f"{size:,}"
            rows.append(r)
            print(f"{r['size']:>10} {kind:>6}: recall@1 vs flat {r['recall1_vs_flat']:.3f} "
                  f"(1@10 {r['recall1at10_vs_flat']:.3f}), "
                  f"{r['ms_per_query']:.3f} ms/query, {r['bytes_per_vector']:.0f} B/vector, build {r['build_s']:.1f} s",
                  flush=True)
        del db
    meta = {"model": args.model, "dim": int(db0.shape[1]), "db_real": len(db0), "queries_real": len(q_all),
            "copy_cos": args.copy_cos, "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads()}
    write_json(Path(args.out + ".json"), {"meta": meta, "rows": rows})
    lines = [f"# Place index kinds ({args.model}, {meta['dim']}-D, FAISS {meta['faiss']}, {meta['threads']} threads)",
             "", "Real: Nordland 64x32 summer + Gardens Point day_right as database "
             f"({meta['db_real']}), winter + night_right as queries ({meta['queries_real']}). Larger sizes tile the "
             f"database with noisy copies (cosine {args.copy_cos} to their source); {args.queries} queries.", "",
             "recall@1 vs flat: the approximate top-1 is the exact top-1; 1@10: the exact top-1 is in the approximate "
             "top-10. R@1 (ground truth): the real place found, +-1 Nordland frame / +-2 Gardens Point frames.", "",
             "| size | kind | settings | recall@1 vs flat | 1@10 vs flat | R@1 (ground truth) | ms/query "
             "| bytes/vector | build s |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        settings = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        gt = f"{r['gt_recall1']:.3f}" if "gt_recall1" in r else "-"
        lines.append(f"| {r['size']} | {r['kind']} | {settings} | {r['recall1_vs_flat']:.3f} | "
                     f"{r['recall1at10_vs_flat']:.3f} | {gt} | "
                     f"{r['ms_per_query']:.3f} | {r['bytes_per_vector']:.0f} | {r['build_s']:.1f} |")
    write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
