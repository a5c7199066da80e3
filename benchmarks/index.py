"""The place index at scale, with distractors that are not copies: what a user with a city-sized map would see.

    python benchmarks/index.py --on-disk 0                    # real, 100k, 1M in memory (~35 min here)
    python benchmarks/index.py --sizes --append               # + 10M on disk in its own process (own peak RSS)
    python benchmarks/index.py --sizes 1000000 --kinds ivfpq/4096 --on-disk 0 --append   # more lists at 1M
    python benchmarks/index.py --sizes 100000 --components 1 --on-disk 0 --qdrant-max 0 --append  # single Gaussian
    python benchmarks/index.py --integrity 1000000            # cost of the integrity check at open

Database: the real descriptors (default model, 1280-D) of Nordland summer (2500) + Gardens Point day_right (100),
plus distractors up to each size. Queries: real ones (Nordland winter + Gardens Point night_right): 500 for the
tables and 200 other ones (disjoint) for tuning, whose ground truth lies among the real images only (+-1 / +-2).

Distractors (``--components``, default 64): samples of a Gaussian mixture fitted to the real database descriptors:
spherical k-means gives the component means and weights, and one covariance shared by all components is fitted
to the residuals from the means (its top 256 principal directions, the rest spread isotropically); each sample is
L2-normalised. Why: there are no other real images here to embed, and the earlier tiling (noisy copies of the
2600 real descriptors) put ~385 near-identical copies around every real image, which made "same top-1 as flat"
arbitrary. A map's descriptors are clustered (runs of overlapping frames, similar streets): the mixture keeps the
real descriptors' cluster structure and spread without duplicating any of them. ``--components 1`` is a single
Gaussian: no cluster structure at all, the worst case for IVF's cells (both are reported where run). What neither
models: near-duplicate places a real city has (the same facade twice), so real maps can be harder.

Per size and kind: R@1 of the real queries (ground truth), top-1 agreement with exact search (flat), ms/query
(batch of all queries, this CPU's threads), bytes/vector (index file, plus the float16 re-ranking copy where used),
build time, and the process's peak RSS so far. Kinds: flat; IVF-PQ as built (nprobe 16, no re-ranking); IVF-PQ +
exact re-ranking and HNSW with settings chosen by edgevpr's own tuner (``index.search_settings``, target 0.95
agreement, on the 200 tuning queries, never the table's); IVF-PQ with 4-bit fast-scan codes (``--kinds ivfpq4``);
Qdrant Edge up to --qdrant-max (``bench_edge``: the shard as edgevpr makes it, HNSW + int8 with re-scoring, as built
and with the smallest hnsw_ef reaching 0.95 on the tuning queries). ``--on-disk N``: an IVF-PQ index of N
vectors whose inverted lists live in a file (FAISS OnDiskInvertedLists, memory-mapped), built in chunks so that
the vectors are never all in memory; exact search for agreement is streamed over the same chunks.
Writes benchmarks/results/index.{json,md}.
"""

from __future__ import annotations

import argparse
import itertools
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from heldout import ROOT, data_root  # noqa: E402

from edgevpr.data.datasets import open_dataset  # noqa: E402
from edgevpr.deploy.index import search_settings  # noqa: E402
from edgevpr.deploy.index.backends.faiss_kinds import (  # noqa: E402
    _configure,
    _make_faiss,
    faiss_search,
    training_sample,
)
from edgevpr.eval.extract import default_cache_dir, extract  # noqa: E402
from edgevpr.models.model import load_model  # noqa: E402
from edgevpr.utils import write_json, write_text  # noqa: E402

RANK = 256
CHUNK = 65536
OUT = ROOT / "benchmarks" / "results"


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


class Distractors:
    """A Gaussian mixture (``components`` means, one shared covariance) fitted to ``real`` [N, D]; ``chunks(n)``
    yields ``n`` L2-normalised samples in [<=CHUNK, D] float32 pieces, the same ones for the same seed."""

    def __init__(self, real: np.ndarray, components: int = 64, seed: int = 0) -> None:
        import faiss

        d = real.shape[1]
        if components > 1:
            km = faiss.Kmeans(d, components, niter=25, seed=seed, spherical=True, verbose=False)
            km.train(real)
            _, assign = km.index.search(real, 1)
            assign = assign[:, 0]
            counts = np.bincount(assign, minlength=components)
            means = np.stack([real[assign == c].mean(0) if counts[c] else km.centroids[c]
                              for c in range(components)])
        else:
            assign, counts, means = np.zeros(len(real), int), np.array([len(real)]), real.mean(0, keepdims=True)
        x = real - means[assign]
        _, s, vt = np.linalg.svd(x, full_matrices=False)
        var = s**2 / max(len(real) - components, 1)
        r = min(RANK, len(var))
        self.resid = float(var[r:].sum() / max(d - r, 1))
        self.basis, self.scale = vt[:r].astype(np.float32), np.sqrt(var[:r]).astype(np.float32)
        self.means, self.weights = means.astype(np.float32), counts / counts.sum()
        self.components, self.seed = components, seed
        self.within = float(var.sum() / ((real - real.mean(0)) ** 2).sum(1).mean() * (len(real) - components)
                            / len(real))  # share of the variance left inside the components

    def chunks(self, n: int):
        rng = np.random.default_rng(self.seed)
        d = self.basis.shape[1]
        for start in range(0, n, CHUNK):
            m = min(CHUNK, n - start)
            z = (rng.standard_normal((m, len(self.scale)), dtype=np.float32) * self.scale) @ self.basis
            z += np.sqrt(self.resid) * rng.standard_normal((m, d), dtype=np.float32)
            z += self.means[rng.choice(len(self.means), m, p=self.weights)]
            yield z / np.linalg.norm(z, axis=1, keepdims=True)


def database(real: np.ndarray, dist: Distractors, n: int) -> np.ndarray:
    """The real descriptors followed by distractors up to ``n`` rows: [n, D] float32."""
    db = np.empty((n, real.shape[1]), np.float32)
    db[:len(real)] = real
    row = len(real)
    for part in dist.chunks(n - len(real)):
        db[row:row + len(part)] = part
        row += len(part)
    return db


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


def r_at_1(top: np.ndarray, positives: list[np.ndarray]) -> float:
    return float(np.mean([t in set(p.tolist()) for t, p in zip(top, positives, strict=True) if len(p)]))


def exact_top1(q: np.ndarray, parts) -> np.ndarray:
    """Exact top-1 ids [Q] of queries [Q, D] over a database given as consecutive [M, D] parts."""
    best, arg, offset = np.full(len(q), -np.inf, np.float32), np.zeros(len(q), np.int64), 0
    for part in parts:
        s = q @ part.T
        a = s.argmax(1)
        v = s[np.arange(len(q)), a]
        better = v > best
        best[better], arg[better] = v[better], a[better] + offset
        offset += len(part)
    return arg


def timed_search(index, kind: str, params: dict, vectors, q: np.ndarray) -> tuple[np.ndarray, float]:
    """(top-1 ids [Q], ms/query) with ``params`` set (after an 8-query warm-up)."""
    _configure(index, kind, params)
    depth = int(params.get("rerank", 0))
    faiss_search(index, vectors, depth, q[:8], 1)
    t0 = time.perf_counter()
    _, ids = faiss_search(index, vectors, depth, q, 1)
    return ids[:, 0], (time.perf_counter() - t0) * 1000 / len(q)


def file_bytes(index) -> int:
    import faiss

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        faiss.write_index(index, f"{d}/i.faiss")
        return Path(f"{d}/i.faiss").stat().st_size


def bench_faiss(kind: str, db: np.ndarray, test, tune) -> list[dict]:
    """Rows for one FAISS kind: as built and, for IVF-PQ (+ re-ranking) and HNSW, tuned. ``test`` / ``tune`` are
    (queries [Q, D], positives, exact top-1 [Q])."""
    kind, _, nlist = kind.partition("/")  # "ivfpq/4096": IVF-PQ with 4096 lists; "ivfpq4": 4-bit fast-scan codes
    nbits = 4 if kind == "ivfpq4" else 8
    kind = "ivfpq" if kind == "ivfpq4" else kind
    t0 = time.perf_counter()
    given = {"rerank": 0, "nbits": nbits, **({"nlist": int(nlist)} if nlist else {})} if kind == "ivfpq" else {}
    index, params = _make_faiss(kind, db.shape[1], len(db), given)
    if not index.is_trained:
        index.train(training_sample(db))
    index.add(db)
    vectors = db.astype(np.float16) if kind == "ivfpq" else None
    build_s = time.perf_counter() - t0
    nbytes = file_bytes(index)

    def row(label: str, p: dict, tuned: dict | None = None) -> dict:
        top, ms = timed_search(index, kind, p, vectors, test[0])
        extra = vectors.nbytes if p.get("rerank") else 0
        return {"kind": label, "params": dict(p), "r_at_1": r_at_1(top, test[1]),
                "agreement": float(np.mean(top == test[2])), "ms_per_query": ms,
                "bytes_per_vector": (nbytes + extra) / len(db), "build_s": build_s, "peak_rss_gb": peak_rss_gb(),
                **({"tuned_on": tuned} if tuned else {})}

    rows = [row(kind + (" fast-scan" if nbits == 4 else ""), params)]
    if kind in ("ivfpq", "hnsw"):
        def measure(setting: dict) -> tuple[float, float]:
            top, ms = timed_search(index, kind, {**params, **setting}, vectors, tune[0])
            return float(np.mean(top == tune[2])), ms

        best, trials = search_settings(kind, params.get("nlist", 0), kind == "ivfpq", measure, 0.95, False)
        setting = {k: best[k] for k in trials[0] if k not in ("agreement", "ms_per_query")}
        label = f"{rows[0]['kind']} tuned" + (" (+ re-rank)" if setting.get("rerank") else "")
        rows.append(row(label, {**params, **setting}, {"agreement": best["agreement"], "trials": len(trials)}))
    return rows


def bench_edge(db: np.ndarray, test, tune) -> list[dict]:
    """Rows for a Qdrant Edge shard made as edgevpr makes one (``qdrant_store.edge_config``: HNSW, int8 scalar
    quantization, no WAL), filled in batches and optimised (HNSW built), searched in batches with ``query_batch``:
    as built (edgevpr's defaults) and with the smallest ``hnsw_ef`` of EF_GRID reaching 0.95 agreement on ``tune``."""
    import qdrant_edge as qe

    from edgevpr.deploy.index.backends.qdrant_edge import EDGE_DEFAULTS, edge_config, search_params

    with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
        t0 = time.perf_counter()
        shard = qe.EdgeShard.create(f"{d}/shard", edge_config(qe, db.shape[1], {}))
        for start in range(0, len(db), 2048):
            shard.update(qe.UpdateOperation.upsert_points(
                [qe.Point(id=start + i, vector=v.tolist()) for i, v in enumerate(db[start:start + 2048])]))
            if start // 2048 % 50 == 0:
                print(f"  edge upload {start:,}/{len(db):,} ({time.perf_counter() - t0:.0f} s)", flush=True)
        shard.flush()
        shard.optimize()
        build_s = time.perf_counter() - t0
        print(f"  edge built in {build_s:.0f} s: {shard.info()}", flush=True)
        nbytes = sum(f.stat().st_size for f in Path(d).rglob("*") if f.is_file())

        def run(q: np.ndarray, ef: int) -> tuple[np.ndarray, float]:
            reqs = [qe.QueryRequest(limit=1, query=qe.Query.Nearest(v.tolist()), with_payload=False,
                                    params=search_params(qe, {"hnsw_ef": ef})) for v in q]
            shard.query_batch(qe.QueryBatchRequest(reqs[:8]))
            t = time.perf_counter()
            res = shard.query_batch(qe.QueryBatchRequest(reqs))
            ms = (time.perf_counter() - t) * 1000 / len(q)
            return np.array([r[0].id if r else -1 for r in res]), ms

        def row(label: str, ef: int, tuned: dict | None = None) -> dict:
            top, ms = run(test[0], ef)
            params = {**{k: EDGE_DEFAULTS[k] for k in ("hnsw_m", "ef_construct", "quantization", "oversampling")},
                      "hnsw_ef": ef}
            return {"kind": label, "params": params, "r_at_1": r_at_1(top, test[1]),
                    "agreement": float(np.mean(top == test[2])), "ms_per_query": ms,
                    "bytes_per_vector": nbytes / len(db), "build_s": build_s, "peak_rss_gb": peak_rss_gb(),
                    **({"tuned_on": tuned} if tuned else {})}

        rows = [row("qdrant edge", EDGE_DEFAULTS["hnsw_ef"])]
        trials = []
        for ef in EF_GRID:
            top, ms = run(tune[0], ef)
            trials.append({"hnsw_ef": ef, "agreement": float(np.mean(top == tune[2])), "ms_per_query": ms})
            if trials[-1]["agreement"] >= 0.95:
                break
        best = trials[-1]
        rows.append(row("qdrant edge tuned", best["hnsw_ef"], {"agreement": best["agreement"],
                                                              "trials": len(trials)}))
        shard.close()
    return rows


EF_GRID = (32, 64, 128, 256, 512, 1024)


def bench_on_disk(real: np.ndarray, dist: Distractors, n: int, test, folder: Path, nlist: int,
                  nprobes: tuple[int, ...]) -> list[dict]:
    """IVF-PQ of ``n`` vectors with on-disk inverted lists (never all vectors in memory), at each nprobe."""
    import faiss

    q, pos, _ = test
    d = real.shape[1]
    t0 = time.perf_counter()
    trainer, params = _make_faiss("ivfpq", d, n, {"nlist": nlist, "rerank": 0})
    sample = np.concatenate([real, next(dist.chunks(CHUNK))])
    trainer.train(sample)
    invlists = faiss.OnDiskInvertedLists(nlist, trainer.code_size, str(folder / "lists.ivfdata"))
    trainer.replace_invlists(invlists, True)
    invlists.this.disown()  # the index owns the lists now

    def added(index):
        """The database parts in order, each added to the index before exact search sees it."""
        offset, start = 0, time.perf_counter()
        for part in itertools.chain([real], dist.chunks(n - len(real))):
            index.add(part)
            offset += len(part)
            if offset // CHUNK % 16 == 0:
                rate = offset / (time.perf_counter() - start)
                print(f"  on-disk build {offset:,}/{n:,} ({rate:,.0f} vectors/s, ETA {(n - offset) / rate / 60:.0f} "
                      "min)", flush=True)
            yield part

    arg = exact_top1(q, added(trainer))  # build time here includes drawing the samples and this streamed exact search
    build_s = time.perf_counter() - t0
    faiss.write_index(trainer, str(folder / "index.faiss"))
    del trainer
    index = faiss.read_index(str(folder / "index.faiss"))  # the lists stay in lists.ivfdata, memory-mapped
    nbytes = sum(f.stat().st_size for f in folder.iterdir())
    rows = []
    for p in nprobes:
        top, ms = timed_search(index, "ivfpq", {**params, "nprobe": p, "rerank": 0}, None, q)
        rows.append({"kind": "ivfpq on disk", "params": {**params, "nprobe": p, "rerank": 0},
                     "r_at_1": r_at_1(top, pos), "agreement": float(np.mean(top == arg)), "ms_per_query": ms,
                     "bytes_per_vector": nbytes / n, "build_s": build_s, "peak_rss_gb": peak_rss_gb()})
        print(n, rows[-1], flush=True)
    return rows


def bench_integrity(db: np.ndarray, folder: Path) -> dict:
    """Write an index folder of ``db`` [N, D] with edgevpr's writer, then time PlaceIndex.open three ways."""
    from edgevpr.deploy import index as idx
    from edgevpr.deploy.index import ops
    from edgevpr.deploy.index.backends import faiss_kinds
    from edgevpr.integrity import StampCache

    folder.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    con = idx._connect(folder / idx.DB_FILE)
    with con:
        for start in range(0, len(db), 10_000):
            part = db[start:start + 10_000]
            con.executemany("INSERT INTO images (id, path, descriptor) VALUES (?, ?, ?)",
                            ((start + i, f"img{start + i:08d}.jpg", v.tobytes()) for i, v in enumerate(part)))
    backend, used = faiss_kinds.create(folder, "flat", db.shape[1], db, {}, con)
    record = {"name": "bench", "fingerprint": "0" * 16, "spec": None, "knobs": {}, "image_size": [224, 224],
              "dim": int(db.shape[1]), "runtime": "torch"}
    ops._write(folder, con, backend, "flat", used, record, None)
    con.close()
    del backend
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


def table(res: dict) -> str:
    lines = ["# The place index at scale (`python benchmarks/index.py`)", "",
             f"{res['real_images']} real database images (Nordland summer + Gardens Point day_right, "
             f"{res['model']}, {res['dim']}-D) + distractors: samples of a Gaussian mixture fitted to them "
             "(components below; 1 = a single Gaussian, no cluster structure). "
             f"{res['queries']} real queries (Nordland winter + Gardens Point night); tuned rows chose their "
             f"settings on {res['tuning_queries']} other real queries (target 0.95 agreement). FAISS "
             f"{res['faiss']}, {res['threads']} threads. R@1: ground truth; agreement: same top-1 as exact search. "
             "Peak RSS: of the process so far (each command of the docstring is its own process). On-disk rows: "
             "FAISS's OnDiskInvertedLists grows its file by doubling, so their bytes/vector include that slack "
             "(codes + ids are 136 B), and their build time includes drawing the samples and the streamed exact search "
             "for agreement; they have no re-ranking (the float16 copy of 10M x 1280-D would be 25.6 GB "
             "beside the 4.3 GB lists, on a disk with 33 GB free). Rows measured in different runs: "
             "the fast-scan and Qdrant Edge rows (and the flat rows beside them) came from a later run during which "
             "other jobs shared the CPU (flat: 2.1 ms at 100k and 53 ms at 1M there), and the 1M Qdrant Edge row "
             "was built and searched pinned to one core for most of its run: compare within a run, not across. "
             "Qdrant Edge's peak RSS counts its memory-mapped files' resident pages; its bytes/vector include the "
             "float32 vectors, int8 codes, HNSW graph, payloads and its storage's preallocation.",
             "", "| size | distractors | kind | settings | R@1 | agreement | ms/query | bytes/vector | build s "
             "| peak RSS GB |", "|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in res["rows"]:
        settings = ", ".join(f"{k}={v}" for k, v in r["params"].items()) or "-"
        lines.append(f"| {r['size']:,} | {r['components']} comp. | {r['kind']} | {settings} | {r['r_at_1']:.3f} | "
                     f"{r['agreement']:.3f} | {r['ms_per_query']:.2f} | {r['bytes_per_vector']:.0f} | "
                     f"{r['build_s']:.1f} | {r['peak_rss_gb']:.1f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="effnet-lite0-gem", help="model of the real descriptors (default "
                                                                "effnet-lite0-gem)")
    ap.add_argument("--sizes", type=int, nargs="*", default=[0, 100_000, 1_000_000],
                    help="in-memory database sizes, 0 = the real database alone (default 0 100000 1000000)")
    ap.add_argument("--components", type=int, nargs="+", default=[64],
                    help="mixture components of the distractors, each run in turn; 1 = a single Gaussian "
                         "(default 64)")
    ap.add_argument("--on-disk", type=int, default=10_000_000,
                    help="size of the on-disk IVF-PQ run, 0 = none (default 10000000)")
    ap.add_argument("--on-disk-nlist", type=int, default=1024,
                    help="its inverted lists (default 1024, edgevpr's largest: the coarse assignment dominates "
                         "the build on 2 cores)")
    ap.add_argument("--append", action="store_true",
                    help="keep the rows of index.json that this run does not measure again (default: start "
                         "afresh)")
    ap.add_argument("--queries", type=int, default=500, help="real queries in the tables (default 500)")
    ap.add_argument("--tuning-queries", type=int, default=200, help="other real queries for tuning (default 200)")
    ap.add_argument("--qdrant-max", type=int, default=1_000_000,
                    help="largest size run in Qdrant Edge (default 1000000)")
    ap.add_argument("--kinds", nargs="+", default=["flat", "ivfpq", "hnsw"],
                    help="FAISS kinds; ivfpq/N: IVF-PQ with N lists (default flat ivfpq hnsw)")
    ap.add_argument("--integrity", type=int, metavar="N",
                    help="instead: time the integrity check at open on an index folder of N vectors (default off)")
    args = ap.parse_args()

    import faiss

    real, queries, positives = real_descriptors(args.model)
    if args.integrity:
        with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
            r = bench_integrity(database(real, Distractors(real), args.integrity), Path(d) / "index")
        write_json(OUT / "index_integrity.json", r)
        gb = {k: v / 1e9 for k, v in r["bytes"].items()}
        text = (f"# Index integrity check at open ({r['n']:,} x {r['dim']}-D, flat, {args.model} descriptors + "
                "fitted distractors)\n\n"
                f"Files: index.faiss {gb['index.faiss']:.2f} GB, places.sqlite {gb['places.sqlite']:.2f} GB "
                f"(written in {r['write_s']:.0f} s).\n\n"
                "| open | what is checked | seconds |\n|---|---|---:|\n"
                f"| first open after the files changed (or were copied) | sizes + full sha256 of both files | "
                f"{r['first_open_s']:.2f} |\n"
                f"| later opens (median of 5) | sizes + stat stamps (device, inode, size, mtime, ctime) | "
                f"{r['stamped_open_s']:.3f} |\n"
                f"| `index info --verify` | full sha256 of both files, always | {r['verify_open_s']:.2f} |\n")
        write_text(OUT / "index_integrity.md", text)
        print(text)
        return
    pick = np.random.default_rng(0).permutation(len(queries))
    test_ids, tune_ids = np.sort(pick[:args.queries]), np.sort(pick[args.queries:args.queries + args.tuning_queries])
    res = {"model": args.model, "dim": int(real.shape[1]), "real_images": len(real), "queries": len(test_ids),
           "tuning_queries": len(tune_ids), "faiss": faiss.__version__, "threads": faiss.omp_get_max_threads(),
           "rows": []}
    if args.append and (OUT / "index.json").is_file():
        import json

        res["rows"] = [r for r in json.loads((OUT / "index.json").read_text())["rows"]
                       if r["kind"] != "qdrant (local mode)"]  # the engine edgevpr no longer uses

    def key(r: dict) -> tuple:
        return r["size"], r["components"], r["kind"], r["params"].get("nlist"), r["params"].get("nprobe")

    def emit(rows: list[dict], size: int, comp: int) -> None:
        for r in rows:
            r.update(size=size or len(real), components=comp)
            print(r, flush=True)
        new = {key(r) for r in rows}  # a re-measured row replaces its earlier self
        res["rows"] = [r for r in res["rows"] if key(r) not in new] + rows
        write_json(OUT / "index.json", res)  # after every size: a long run keeps what it measured
        write_text(OUT / "index.md", table(res))

    for comp in args.components:
        dist = Distractors(real, comp)
        print(f"{comp} components: share of variance inside them {dist.within:.2f}", flush=True)
        res.setdefault("within_share", {})[str(comp)] = dist.within
        for n in args.sizes:
            if not n and comp != args.components[0]:
                continue  # the real database alone has no distractors
            db = database(real, dist, max(n, len(real)))
            sets = []
            for ids in (test_ids, tune_ids):
                q = queries[ids]
                sets.append((q, [positives[i] for i in ids], exact_top1(q, [db[i:i + CHUNK]
                                                                        for i in range(0, len(db), CHUNK)])))
            for kind in args.kinds:
                emit(bench_faiss(kind, db, sets[0], sets[1]), n, comp)
            if n <= args.qdrant_max:
                emit(bench_edge(db, sets[0], sets[1]), n, comp)
            del db
        if args.on_disk:
            q = queries[test_ids]
            with tempfile.TemporaryDirectory(dir=os.environ.get("TMPDIR")) as d:
                emit(bench_on_disk(real, dist, args.on_disk, (q, [positives[i] for i in test_ids], None), Path(d),
                                   args.on_disk_nlist, (16, 64, 256)), args.on_disk, comp)
    print(table(res))


if __name__ == "__main__":
    main()
