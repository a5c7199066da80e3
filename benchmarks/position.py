"""How far the decision's position is from the truth, against the top-1's own coordinates and the score-weighted mean
of the matches in the top-1's neighbourhood (the position before this round).

    python benchmarks/position.py [--model effnet-lite0-gem] [--spacing 3]

Map: Gardens Point day_right 0-99 with made-up coordinates along a straight walk, ``--spacing`` metres apart (the
issue measured 3 m); queries: night_right and day_left 0-99, whose true position is their own frame's coordinates.
Every answer counts (the position of a rejected answer is withheld at run time; here all are measured so that the
three estimates are compared on the same answers). The decision's position is computed by ``decision.position``,
as ``Localizer`` does. No video + GPX map is measured here. Writes benchmarks/results/position.{json,md}.
"""

from __future__ import annotations

import argparse

import numpy as np
from heldout import ROOT, data_root

from edgevpr.deploy.decision import DECISION_DEPTH, Coordinates, Neighbourhood, position
from edgevpr.eval.extract import extract
from edgevpr.models.model import load_model
from edgevpr.utils import default_cache_dir, write_json, write_text


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="effnet-lite0-gem", help="model (default effnet-lite0-gem)")
    ap.add_argument("--spacing", type=float, default=3.0, help="metres between map frames (default 3)")
    args = ap.parse_args()
    gp = data_root() / "gardens_point"
    model = load_model(args.model).eval()

    def desc(folder):
        paths = sorted((gp / folder).glob("*.jpg"))
        return extract(model, paths, 32, default_cache_dir(), False, 0, "cpu", None, progress=False).descriptors

    db = desc("day_right")
    n = len(db)
    east = np.arange(n) * args.spacing
    coords = Coordinates(np.full(n, np.nan), np.full(n, np.nan), east, np.zeros(n))
    hood = Neighbourhood(radius_m=25.0)
    res: dict = {"model": model.name, "spacing_m": args.spacing, "sets": {}}
    for folder in ("night_right", "day_left"):
        q = desc(folder)
        sim = q @ db.T
        err = {"decision": [], "top-1": [], "weighted mean (before)": []}
        for i in range(len(q)):
            ids = np.argsort(-sim[i])[:DECISION_DEPTH]
            sc = sim[i, ids]
            pos = position(sc, ids, coords, hood, DECISION_DEPTH)
            near = hood.near(coords, int(ids[0]), ids)
            w = np.clip(sc[near], 0, None) + 1e-9
            err["decision"].append(abs(pos["east"] - east[i]))
            err["top-1"].append(abs(east[ids[0]] - east[i]))
            err["weighted mean (before)"].append(abs(float(np.average(east[ids[near]], weights=w)) - east[i]))
        res["sets"][folder] = {k: {"median_m": float(np.median(v)), "p90_m": float(np.percentile(v, 90)),
                                   "answers": len(v)} for k, v in err.items()}
    out = ROOT / "benchmarks" / "results"
    write_json(out / "position.json", res)
    lines = [f"# Position error (`python benchmarks/position.py`, {res['model']}, map frames {args.spacing:g} m apart)",
             "", "| queries | estimate | median error (m) | 90th percentile (m) | answers |",
             "|---|---|---:|---:|---:|"]
    lines += [f"| {s} | {k} | {v['median_m']:.1f} | {v['p90_m']:.1f} | {v['answers']} |"
              for s, r in res["sets"].items() for k, v in r.items()]
    write_text(out / "position.md", "\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
