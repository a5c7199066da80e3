"""WeiToP vs general-vision pruning on one trained model: held-out R@1 at each keep ratio.

    python benchmarks/weitop.py runs/weitop/cpu-weiad [--which best] [--size H W] [--name weitop]

The run's model (trained with the WeiToP scorer after block 3) is evaluated on the held-out places of
benchmarks/heldout.py at keep ratios 1.0, 0.75, 0.5, 0.3 with each pruning method at the same block: its learned
scorer (weitop), random, EViT (CLS attention) and ToMe (merging); keep ratio 1.0 is the unpruned model. A
diagnostic row ranks by the scorer's target itself (oracle_ranking).
It also reports whether the scorer has something to rank, on the held-out Gardens Point query photos: the spread
of the self-distillation target (aggregation-induced importance at keep ratio 1: max/min over tokens, entropy over
log N, the range of the learned cluster weights) and the overlap of the scorer's top-k with the target's top-k at
each keep ratio beside chance (k/N). Writes benchmarks/results/NAME.{json,md}.
"""

from __future__ import annotations

import argparse
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
from heldout import ROOT, data_root, held_out_sets, recall1

from edgevpr.data.images import load_image
from edgevpr.models.model import VPRModel, load_model
from edgevpr.models.pruning import keep_count
from edgevpr.utils import write_json, write_text

OUT = ROOT / "benchmarks" / "results"
RATIOS = (1.0, 0.75, 0.5, 0.3)
METHODS = ("weitop", "random", "evit", "tome")


def target_agreement(model: VPRModel, paths: list[Path], size: tuple[int, int]) -> dict:
    """Spread of WeiToP's target and top-k overlap of the scorer with it on ``paths`` (one batch)."""
    tf = model.transform(size)
    x = torch.stack([tf(load_image(p)) for p in paths])
    pruner = model.backbone.pruner
    with torch.no_grad():
        tokens = model.forward_tokens(x)  # keep ratio 1: every token, the target's input
        a = model.aggregator.importance(tokens)  # [B, N]
        w = model.aggregator.cluster_weights(tokens)
        with model.using(keep_ratio=0.5):  # an active pruner records the scorer's logits on every token
            model.forward_tokens(x)
        s = pruner.last_logits  # [B, N]
    n = a.shape[1]
    res = {"images": len(paths), "tokens": n,
           "cluster_weight_min": w.min().item(), "cluster_weight_max": w.max().item(),
           "target_max_over_min": (a.max(-1).values / a.min(-1).values).mean().item(),
           "target_entropy_over_logN": (-(a * a.log()).sum(-1) / math.log(n)).mean().item()}
    for rho in RATIOS[1:]:
        k = keep_count(n, rho)
        hit = torch.zeros_like(a).scatter_(1, a.topk(k, -1).indices, 1).gather(1, s.topk(k, -1).indices)
        res[f"topk_overlap_{rho}"] = hit.mean().item()
    return res


@contextmanager
def oracle_ranking(model: VPRModel) -> Iterator[None]:
    """Diagnostic, not a method: the pruner ranks tokens by WeiToP's target itself (the head's importance on an
    unpruned forward of the same batch) instead of the scorer's prediction of it; two forwards per batch. Tells
    a scorer that misses its target from a target that is a poor pruning criterion."""
    pruner, forward, method = model.backbone.pruner, model.forward, model.backbone.pruner.method

    def oracle_forward(x: torch.Tensor, **knobs) -> torch.Tensor:
        with torch.no_grad(), model.using(keep_ratio=1.0):
            target = model.aggregator.importance(model.forward_tokens(x))  # [B, N]
        pruner.scores = lambda *_: target
        return forward(x, **knobs)

    pruner.method, model.forward = "weitop", oracle_forward
    try:
        yield
    finally:
        del model.forward, pruner.scores
        pruner.method = method


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("--which", default="best", choices=["best", "final"])
    ap.add_argument("--size", type=int, nargs=2, default=None, metavar=("H", "W"),
                    help="default: the model's image size")
    ap.add_argument("--name", default="weitop", help="results file name (benchmarks/results/NAME.md)")
    args = ap.parse_args()
    sets = held_out_sets(data_root(), day_left=False)
    model = load_model(args.run / args.which)
    if getattr(model.backbone, "pruner", None) is None:
        raise SystemExit(f"{args.run / args.which}: the model has no token pruner (backbone.pruning)")
    size = tuple(args.size) if args.size else model.image_size
    agree = target_agreement(model.eval(), sets[0].q_paths, size)
    rows: dict = {"unpruned": recall1(model, sets, size, keep_ratio=1.0)}
    for method in METHODS:
        model.backbone.pruner.method = method  # same block, same trained weights; only the selection differs
        for rho in RATIOS[1:]:
            rows[f"{method} {rho}"] = recall1(model, sets, size, keep_ratio=rho)
            print(method, rho, rows[f"{method} {rho}"])
    with oracle_ranking(model):
        for rho in RATIOS[1:]:
            rows[f"target itself (oracle) {rho}"] = recall1(model, sets, size, keep_ratio=rho)
    write_json(OUT / f"{args.name}.json", {"run": str(args.run), "model": args.which, "image_size": list(size),
                                           "rows": rows, "target_agreement": agree})
    names = [ds.name for ds in sets]
    md = [f"# Pruning methods on one trained model ({args.run}/{args.which}, {size[0]} px; "
          f"`python benchmarks/weitop.py {args.run}`)", "", "| method, keep ratio | " + " | ".join(names) + " |",
          "|---|" + "---:|" * len(names)]
    md += [f"| {k} | " + " | ".join(f"{v[n]:.3f}" for n in names) + " |" for k, v in rows.items()]
    md += ["", f"WeiToP's target and scorer on the {agree['images']} held-out Gardens Point query photos "
           f"({agree['tokens']} tokens): cluster weights "
           f"{agree['cluster_weight_min']:.3f}-{agree['cluster_weight_max']:.3f}, "
           f"target max/min over tokens {agree['target_max_over_min']:.3f}, entropy / log N "
           f"{agree['target_entropy_over_logN']:.5f}; scorer top-k overlap with the target's top-k "
           + ", ".join(f"{agree[f'topk_overlap_{r}']:.3f} at {r} (chance {r})" for r in RATIOS[1:]) + "."]
    write_text(OUT / f"{args.name}.md", "\n".join(md) + "\n")
    print("\n".join(md))


if __name__ == "__main__":
    main()
