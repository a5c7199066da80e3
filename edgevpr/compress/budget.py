"""``edgevpr compress``: from a trusted model to one that fits a latency budget on this device, without labels.

Stages (each resumable: its outputs are written atomically into ``OUT`` and reused when the command runs again):

1. **split**: the map's images (a folder or CSV). Accuracy is measured on held-out queries: the user's ``--queries``
   (photos of the same places from another visit) when given, else every ``holdout``-th map image, searched among
   the other map images with its ``exclude`` neighbours in map order left out (a map image's neighbours are near
   copies of it: finding them says nothing about recognising a place).
2. **teacher**: its descriptors of database and queries (fp32, PyTorch), its top-1 per query (the reference), its
   own latency as an onnxruntime fp32 export, and its R@1 when ground truth is given.
3. **candidates**: the teacher's architecture at input sizes ``sizes`` (fractions of its own, rounded to its patch
   or stride multiple), exported to ONNX in fp32 and int8 (CNNs: static int8 calibrated on map images; ViTs: dynamic
   int8), each timed on this CPU at batch 1 with the thread policy the user will run (``--threads``), and each
   searched at the descriptor sizes ``dims`` (PCA-whitening fitted on the map's own descriptors, exactly as
   ``index build --dim`` does it). Accuracy: the share of held-out queries whose top-1 equals the teacher's
   (agreement), or R@1 with ground truth (``--aligned`` / ``--radius``).
   An unreachable budget stops here, in one line naming the fastest candidate.
4. **distil**: for the ``distil_sizes`` largest smaller input sizes whose plain candidate meets the budget (the
   larger the input, the more accurate; each student costs the same training time), a student with the teacher's
   architecture and weights is trained at that size, label-free, on the map's images (never on the held-out queries)
   to reproduce the teacher's full-size descriptor (``distil_config``: ``edgevpr train`` runs it, so it checkpoints
   every quarter and a killed run resumes bit-exactly); it is then exported, timed and scored like the others
   (fp32 and int8, every dim). Its time is its plain twin's (the same graph with other weights): timed twice,
   this shared machine's +-30% noise would decide which of two identical computations fits the budget; its own
   measurement is kept as ``ms_measured``. Why this student: at a quarter of the teacher's time the input size is
   the lever that buys the speed (benchmarks/results/compress.md), and what a small input loses is what the
   teacher still sees at its own size; training on the map's own images is what the issue asks (a student tuned
   on another map does not carry over). ``teacher_cos`` (every candidate): the mean cosine between its and the
   teacher's descriptors of the queries, a label-free measure of how far it moved towards the teacher.
5. **choose**: the most accurate candidate within ``budget_ms`` (ties: the faster); ``OUT/model.onnx`` is it, and
   ``OUT/report.{json,md}`` + ``OUT/frontier.png`` the accuracy / latency frontier beside the teacher. With ground
   truth, ``choose_by="agreement"`` keeps the choice label-free (agreement, ties: ``teacher_cos``, then the faster)
   while R@1 is still reported: the way to measure what label-free compression would have picked, and a choice
   less fitted to the few queries that R@1 is reported on (picking the best of many candidates by R@1 on the same
   queries inflates the winner's R@1).

A teacher with a WeiToP token-pruning scorer is also tried at lower keep ratios (``keep_ratios``, baked into each
export), and its students train at keep ratios drawn per step; a ViT teacher with a SALAD/WeiAD head but no scorer
first gets one trained by WeiToP's self-distillation (``scorer_start``, ``scorer_config``: only the scorer trains;
at keep 1 the scored model is the teacher, so it stands in for it). Students of another architecture
(``smaller_start``: the teacher's first half of blocks, or a CNN without its last stages; ``ternary_start``,
opt-in: TAT-VPR stage 1, ternary linears)
are distilled with token distillation too. What did not apply is listed in the report (``not_tried``).
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import math
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..utils import atomic_write, write_json, write_text

#: default input sizes (fractions of the teacher's), descriptor sizes (0: the model's own) of the candidates
SIZES = (1.0, 0.75, 0.5)
DIMS = (0, 512, 256, 128)
#: keep ratios tried on a model with a WeiToP token-pruning scorer (1.0 always)
KEEPS = (0.75, 0.5)
#: distilled candidates: training steps each (0: none), map images a step, learning rate, how many input sizes
DISTIL_STEPS, DISTIL_BATCH, DISTIL_LR, DISTIL_SIZES = 300, 16, 1e-4, 2
#: the smaller ViT student's share of the teacher's transformer blocks (``smaller_start``)
DEPTH_FRACTION = 0.5
#: batch-1 timing: warm-up runs, then the median of this many
WARMUP, REPEATS = 3, 15


def accuracy(top1: np.ndarray, teacher_top1: np.ndarray, positives: list[np.ndarray] | None = None) -> float:
    """Top-1 ids [Q] -> agreement with the teacher's top-1 [Q], or R@1 when ``positives`` (per query, the database
    ids that count as the same place) are given. With the teacher's own top-1 as the ground truth they are equal."""
    if positives is None:
        return float(np.mean(top1 == teacher_top1))
    return float(np.mean([t in set(np.asarray(p).tolist()) for t, p in zip(top1, positives, strict=True)]))


def split(n: int, holdout: int, exclude: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Map of ``n`` images -> (database ids [N-Q], held-out query ids [Q], mask [Q, N-Q]: True where a database
    image is within ``exclude`` positions of the query in map order, i.e. left out of its search)."""
    q = np.arange(holdout // 2, n, holdout)
    db = np.setdiff1d(np.arange(n), q)
    return db, q, np.abs(q[:, None] - db[None, :]) <= exclude


def top1(db: np.ndarray, q: np.ndarray, mask: np.ndarray | None, dim: int = 0) -> np.ndarray:
    """Database [N, D], queries [Q, D] -> top-1 database positions [Q] by inner product, after PCA-whitening to
    ``dim`` fitted on ``db`` (then L2-normalised: what ``index build --dim`` does) when ``dim`` > 0; ``mask`` [Q, N]
    True leaves a database image out of that query's search."""
    from ..deploy.index import pca_whitening

    if dim:
        fit = pca_whitening(db, dim)
        db, q = fit(db), fit(q)
    s = q @ db.T
    if mask is not None:
        s = np.where(mask, -np.inf, s)
    return s.argmax(1)


def time_onnx(path: Path, size: tuple[int, int], threads: int | None) -> float:
    """Median ms of one image at batch 1 through onnxruntime (after WARMUP runs), at ``threads``."""
    from ..deploy.onnx_model import OnnxModel

    m = OnnxModel(path, threads=threads)
    x = np.random.default_rng(0).standard_normal((1, 3, *size)).astype(np.float32)
    for _ in range(WARMUP):
        m.session.run(["descriptors"], {"images": x})
    times = []
    for _ in range(REPEATS):
        t = time.perf_counter()
        m.session.run(["descriptors"], {"images": x})
        times.append((time.perf_counter() - t) * 1000)
    return float(np.median(times))


def teacher_cosine(student: np.ndarray, teacher: np.ndarray) -> float | None:
    """Mean cosine [Q, D] x [Q, D] -> float between a candidate's and the teacher's descriptors of the same images
    (None when the sizes differ): how close the candidate stays to the teacher's descriptor space, label-free."""
    if student.shape != teacher.shape:
        return None
    a = student / np.maximum(np.linalg.norm(student, axis=1, keepdims=True), 1e-12)
    b = teacher / np.maximum(np.linalg.norm(teacher, axis=1, keepdims=True), 1e-12)
    return float(np.mean(np.sum(a * b, axis=1)))


def _map_data(manifest: Path, size: tuple[int, int]) -> dict:
    """The training data of every label-free stage: the map's images (``manifest``), one per draw, ``DISTIL_BATCH``
    a batch, RandAugmented, at input ``size``."""
    return {"places": [{"manifest": str(manifest)}], "sampler": "images", "images_per_place": 1, "min_images": 1,
            "places_per_batch": DISTIL_BATCH, "image_size": list(size), "augment": "rand-m9-n2"}


def _schedule(steps: int) -> dict:
    return {"schedule": {"name": "cosine", "warmup_steps": min(20, steps // 10)}, "steps": steps,
            "checkpoint_every": max(1, min(50, steps // 4))}


def distil_config(teacher: str, manifest: Path, teacher_size: tuple[int, int], size: tuple[int, int], steps: int,
                  min_keep: float | None, device: str, seed: int, start: str | None = None) -> dict:
    """The training config of a distilled candidate (``edgevpr train`` runs it, so it checkpoints and resumes):
    the teacher's own weights as the start, every layer trained at input ``size`` (normalisation statistics frozen,
    so training computes exactly what is deployed) on RandAugmented map images (``_map_data``) to reproduce the
    frozen teacher's descriptor of the clean image at its own size (``descriptor_distill``) and its in-batch
    similarities (``similarity_distill``). No label is used (Multi-Similarity weight 0): the teacher is the target,
    as in TAT-VPR's stage 1, whose student also sees RandAugmented images and the teacher clean ones.

    ``start``: another architecture's start (``ternary_start``, ``smaller_start``) instead of the teacher; its
    patch-token map then also regresses the teacher's (``token_distill``: what TAT-VPR's stage 1 trains on); the
    descriptor terms stay, as the candidate keeps the teacher's head and must give its descriptor."""
    terms = [{"name": "descriptor_distill"}, {"name": "similarity_distill"}]
    return {"seed": seed, "model": start or teacher, "device": device,
            "teacher": {"model": teacher, "image_size": list(teacher_size)}, "data": _map_data(manifest, size),
            "trainable": {"mode": "all", "norm_stats": "frozen"},
            "loss": {"ms": {"weight": 0.0}, "terms": terms + ([{"name": "token_distill"}] if start else [])},
            "optimizer": {"name": "adamw", "lr": DISTIL_LR, "weight_decay": 1e-4}, **_schedule(steps),
            # a WeiToP model: a keep ratio drawn per step, as its own recipe trains, so the student learns to give
            # the teacher's unpruned full-size descriptor from the tokens it keeps (WeiToP's self-distillation, with
            # the teacher as the unpruned target)
            "knobs": {} if min_keep is None else {"keep_ratio": {"uniform": [min_keep, 1.0]}}}


def scorer_config(start: str, manifest: Path, size: tuple[int, int], steps: int, min_keep: float, device: str,
                  seed: int) -> dict:
    """The training config of a WeiToP scorer for a teacher that has none (``scorer_start``): only the scorer
    trains (every other weight stays the teacher's), by WeiToP's self-distillation (``weitop_distill``: its token
    scores learn the aggregator's own token importance on the unpruned tokens), at keep ratios drawn from
    [``min_keep``, 1] per step on the map's images, with the recipe's weight and learning rate
    (configs/weitop/cpu-weiad.yaml). Label-free by construction."""
    return {"seed": seed, "model": start, "device": device, "data": _map_data(manifest, size),
            "trainable": {"mode": "match", "patterns": [r"^backbone\.pruner\."], "norm_stats": "frozen"},
            "loss": {"ms": {"weight": 0.0}, "terms": [{"name": "weitop_distill", "weight": 100.0}]},
            "optimizer": {"name": "adamw", "lr": 2e-4, "weight_decay": 1e-4}, **_schedule(steps),
            "knobs": {"keep_ratio": {"uniform": [min_keep, 1.0]}}}


def _start(tm, folder: Path, name: str, change: Callable[[dict], None], dropped: str = "") -> str:
    """``tm`` rebuilt from its config as edited by ``change`` and given its weights (new parameters keep their
    initialisation; ``dropped``: a regular expression of the weights the edit removes), saved in ``folder`` once
    -> the folder."""
    import copy

    from ..models.model import build_model, save_model

    if not (folder / "config.json").is_file():
        cfg = copy.deepcopy(tm.config)
        for key in ("fingerprint", "format_version", "packed"):
            cfg.pop(key, None)
        cfg["name"] = f"{tm.name}-{name}"
        cfg["backbone"]["weights"] = None  # the weights come from tm
        if cfg["backbone"].get("stem"):
            cfg["backbone"]["stem"]["weights"] = None
        change(cfg)
        model = build_model(cfg)
        missing, unexpected = model.load_state_dict(tm.state_dict(), strict=False)
        unexpected = [k for k in unexpected if not (dropped and re.match(dropped, k))]
        if unexpected or any(not k.startswith("backbone.pruner.") for k in missing):
            raise ValueError(f"{folder}: {tm.name}'s weights do not fit its {name} twin ({missing[:3]}, "
                             f"{unexpected[:3]})")
        save_model(model, folder)
    return str(folder)


def ternary_start(tm, folder: Path) -> str | None:
    """The teacher with TAT-VPR ternary linears (``ternary: {}``: attention and FFN linears of every block, the last
    FFN full precision), its latent weights the teacher's (TernaryLinear keeps nn.Linear's keys), saved in
    ``folder`` once -> the folder; None when the teacher has no such linear (a CNN) or is ternary already."""
    from ..models.ternary import target_layers

    if tm.config.get("ternary") is not None or not target_layers(tm.backbone):
        return None
    return _start(tm, folder, "ternary", lambda cfg: cfg.update(ternary={}))


def scorer_start(tm, folder: Path) -> str | None:
    """The teacher with an untrained WeiToP scorer after block round(depth / 4) (the recipe's 3 of 12), saved in
    ``folder`` once -> the folder; None when it does not apply: not a ViT, a head without token importance (WeiToP's
    target needs SALAD's or WeiAD's), prompts, or a pruner already."""
    vit = getattr(tm.backbone, "vit", None)
    if (vit is None or not hasattr(tm.aggregator, "importance") or getattr(tm.backbone, "pruner", None) is not None
            or tm.config["backbone"].get("prompts")):
        return None
    block = max(1, round(len(vit.blocks) / 4))
    return _start(tm, folder, "weitop", lambda cfg: cfg["backbone"].update(pruning={"block": block,
                                                                                     "method": "weitop"}))


def smaller_start(tm, folder: Path) -> tuple[str, str] | None:
    """A smaller model of the teacher's family with the teacher's weights, saved in ``folder`` once -> (the folder,
    its kind); None when none applies.

    * ViT: its first ``round(depth * DEPTH_FRACTION)`` blocks, the teacher's final norm and head on top (kind
      ``depthN``); not with prompts or a pruner at or after the cut.
    * CNN of the EfficientNet / MobileNet family (timm's ``blocks`` stages): its last two stages and its 1x1 head
      convolution cut (kind ``blocksN``, N stages kept; EfficientNet-lite0: the zoo's small student, 112 channels at
      stride 16); the head (GeM) pools the earlier map.
    """
    vit, net = getattr(tm.backbone, "vit", None), getattr(tm.backbone, "net", None)
    if vit is not None:
        depth = max(1, round(len(vit.blocks) * DEPTH_FRACTION))
        pruner = getattr(tm.backbone, "pruner", None)
        if tm.config["backbone"].get("prompts") or depth >= len(vit.blocks) or (pruner is not None and
                                                                                 pruner.block >= depth):
            return None
        cut = "|".join(map(str, range(depth, len(vit.blocks))))
        return _start(tm, folder, f"depth{depth}", lambda cfg: cfg["backbone"].update(depth=depth),
                      dropped=rf"backbone\.vit\.blocks\.({cut})\."), f"depth{depth}"
    blocks = getattr(net, "blocks", None)
    if blocks is None or len(blocks) < 4 or tm.config["backbone"].get("crop"):
        return None
    keep = len(blocks) - 2
    crop = [f"blocks.{i}" for i in range(keep, len(blocks))] + [m for m in ("conv_head", "bn2") if hasattr(net, m)]
    names = "|".join(re.escape(c) for c in crop)
    return _start(tm, folder, f"blocks{keep}", lambda cfg: cfg["backbone"].update(crop=crop),
                  dropped=rf"backbone\.net\.({names})\."), f"blocks{keep}"


def _train(rows: list, run: Path, config: Callable[[Path], dict], progress: bool,
           on_step: Callable[[int, dict], None] | None):
    """Train (or resume, or reuse) ``config(manifest)`` on the map ``rows`` in ``run`` -> the model in eval mode."""
    from ..models.model import load_model
    from ..train.loop import train

    run.mkdir(parents=True, exist_ok=True)
    manifest = run / "images.csv"
    if not manifest.is_file():  # place_id: every image its own place (labels are not used); no coordinates needed
        buf = io.StringIO()
        w = csv.writer(buf)
        w.writerow(["path", "utm_east", "utm_north", "place_id"])
        w.writerows([str(Path(r.path).resolve()), "nan", "nan", f"{i:09d}"] for i, r in enumerate(rows))
        write_text(manifest, buf.getvalue())
    if not (run / "final" / "model.safetensors").is_file():
        train(config(manifest), run, resume=(run / "checkpoints" / "latest.json").is_file(), progress=progress,
              on_step=on_step)
    return load_model(str(run / "final")).eval()


def distil(teacher: str, tm, rows: list, size: tuple[int, int], steps: int, min_keep: float | None, run: Path,
           device: str, seed: int, progress: bool, on_step: Callable[[int, dict], None] | None = None,
           start: str | None = None):
    """Train (or resume, or reuse) the distilled student of ``teacher`` at ``size`` on the map ``rows`` in ``run``
    (``start``: another architecture's start, ``distil_config``) -> (the student in eval mode, its training
    record: steps, the batch's mean cosine to the teacher at the first and the last step)."""
    student = _train(rows, run, lambda m: distil_config(teacher, m, tuple(tm.image_size), size, steps, min_keep,
                                                        device, seed, start), progress, on_step)
    with open(run / "metrics.csv", newline="") as f:
        cos = [1 - float(r["loss/descriptor_distill"]) for r in csv.DictReader(f)]
    return student, {"steps": steps, "train_cos_first": cos[0], "train_cos_last": cos[-1]}


def choice_key(choose_by: str) -> Callable[[dict], tuple]:
    """The ranking of candidate records that ``compress`` chooses by: ``accuracy`` (ties: the faster) or
    ``agreement`` (ties: ``teacher_cos``, then the faster)."""
    if choose_by == "accuracy":
        return lambda r: (r["accuracy"], -r["ms"])
    return lambda r: (r["agreement"], r.get("teacher_cos") or 0.0, -r["ms"])


def candidate_name(size: tuple[int, int], keep: float | None, int8: bool, kind: str = "") -> str:
    """E.g. ``96x96-distilled-keep0.5-int8`` (kind: "" plain, "distilled", "ternary", or the smaller student's
    ``depthN`` / ``blocksN``)."""
    return (f"{size[0]}x{size[1]}" + (f"-{kind}" if kind else "") + ("" if keep is None else f"-keep{keep:g}")
            + ("-int8" if int8 else "-fp32"))


def _size(model, frac: float) -> tuple[int, int]:
    """The model's input size scaled by ``frac``, rounded to a multiple of its stride (a ViT's patch)."""
    step = int(getattr(model.backbone, "stride", 16))
    return tuple(max(step, int(round(s * frac / step)) * step) for s in model.image_size)


#: in a compress OUT: what the run is of (teacher fingerprint, image lists, settings); every cached step belongs to it
RUN_FILE = "run.json"


def _listing(rows: list) -> str:
    """sha256 of an image list with each file's size and mtime: another folder, or a changed image, differs."""
    h = hashlib.sha256()
    for r in rows:
        try:
            st = os.stat(r.path)
            h.update(f"{r.path}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{r.path}\0missing\n".encode())
    return h.hexdigest()


def _claim(out: Path, run: dict) -> None:
    """Make ``out`` this run's folder, or resume it when it holds the same run (same teacher fingerprint, images,
    queries and settings); anything else in it is refused in one line naming what differs: a cached teacher,
    student or candidate of another run is never returned as this one's."""
    f = out / RUN_FILE
    if f.is_file():
        try:
            had = json.loads(f.read_text())
        except (ValueError, RecursionError):
            had = None
        if not isinstance(had, dict):
            raise ValueError(f"{f}: not a compress run record; choose another --out")
        differ = [k for k in run if had.get(k) != run[k]]
        if differ:
            raise ValueError(f"{out}: holds a compress run of another {', '.join(differ)} (nothing is resumed from "
                             "it): choose another --out, or delete that folder")
        return
    if out.is_dir() and any(out.iterdir()):
        raise ValueError(f"{out}: not empty and not a compress run (no {RUN_FILE}): choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    write_json(f, run)


def _cached(path: Path, make: Callable[[], dict]) -> dict:
    """The JSON at ``path`` when a previous run finished it, else ``make()`` written there atomically."""
    if path.is_file():
        return json.loads(path.read_text())
    out = make()
    write_json(path, out)
    return out


def _descriptors(model, paths: list[Path], out: Path, name: str, progress: bool) -> np.ndarray:
    """Descriptors [N, D] of ``paths`` by ``model``, kept in ``out/<name>.npy`` (atomic) for a resumed run."""
    f = out / f"{name}.npy"
    if f.is_file():
        return np.load(f, allow_pickle=False)
    from ..eval.extract import extract

    d = extract(model, paths, desc=name, progress=progress).descriptors
    atomic_write(f, lambda tmp: np.save(open(tmp, "wb"), d))
    return d


def compress(teacher: str, images: str | os.PathLike, budget_ms: float, out: str | os.PathLike,
             queries: str | os.PathLike | None = None, aligned: int | None = None, radius: float | None = None,
             sizes: tuple[float, ...] = SIZES, dims: tuple[int, ...] = DIMS, threads: int | None = None,
             holdout: int = 10, exclude: int = 2, keep_ratios: tuple[float, ...] = KEEPS,
             distil_steps: int = DISTIL_STEPS, distil_sizes: int = DISTIL_SIZES, device: str = "auto",
             choose_by: str = "accuracy", ternary: bool = False,
             seed: int = 0, progress: bool = True, on_candidate: Callable[[str], None] | None = None,
             on_step: Callable[[int, dict], None] | None = None) -> dict:
    """Run the stages (module docstring) -> the report (also in ``out/report.json``)."""
    from ..deploy.export import export_onnx
    from ..deploy.index import read_rows
    from ..deploy.onnx_model import OnnxModel
    from ..models.model import load_model

    if not (isinstance(budget_ms, (int, float)) and math.isfinite(budget_ms) and budget_ms > 0):
        raise ValueError(f"--budget-ms {budget_ms}: must be a positive number of milliseconds")
    if choose_by not in ("accuracy", "agreement"):
        raise ValueError(f"--choose-by {choose_by}: must be accuracy or agreement")
    if any(not (isinstance(k, (int, float)) and 0 < k <= 1) for k in keep_ratios):
        raise ValueError(f"--keep-ratios {' '.join(map(str, keep_ratios))}: each must be in (0, 1]")
    out = Path(out)
    stages: dict[str, float] = {}
    t0 = time.perf_counter()
    rows = read_rows(images)
    map_paths = [Path(r.path) for r in rows]
    if queries is not None:
        q_rows = read_rows(queries)
        q_paths, db_ids, mask = [Path(r.path) for r in q_rows], np.arange(len(rows)), None
        q_ids = None
    else:
        if len(rows) < 2 * holdout:
            raise ValueError(f"{images}: {len(rows)} images; held-out queries need at least {2 * holdout} (or give "
                             "--queries)")
        db_ids, q_ids, mask = split(len(rows), holdout, exclude)
        q_rows, q_paths = [rows[i] for i in q_ids], [map_paths[i] for i in q_ids]
    db_paths = [map_paths[i] for i in db_ids]
    positives = None
    if aligned is not None:
        if queries is None or len(q_rows) != len(rows):
            raise ValueError("--aligned: give --queries with as many photos as the map, query i at map image i")
        positives = [np.flatnonzero(np.abs(db_ids - i) <= aligned) for i in range(len(q_rows))]
    elif radius is not None:
        def xy(rs):
            a = np.array([[r.east, r.north] for r in rs], dtype=float)
            if np.isnan(a).any():
                raise ValueError("--radius: every map image and query needs coordinates (utm or lat/lon)")
            return a

        dist = np.linalg.norm(xy(q_rows)[:, None] - xy([rows[i] for i in db_ids])[None], axis=2)
        if mask is not None:
            dist = np.where(mask, np.inf, dist)
        positives = [np.flatnonzero(d <= radius) for d in dist]
    metric = "R@1" if positives is not None else "top-1 agreement with the teacher"
    stages["split_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    tm = load_model(teacher).eval()
    settings = {"sizes": list(sizes), "dims": list(dims), "holdout": holdout, "exclude": exclude,
                "keep_ratios": list(keep_ratios), "distil_steps": distil_steps, "distil_sizes": distil_sizes,
                "ternary": ternary, "seed": seed, "aligned": aligned, "radius": radius}  # not the budget, the choice
    _claim(out, {"teacher": tm.fingerprint(), "images": _listing(rows),
                 "queries": _listing(q_rows) if queries is not None else None, "settings": settings})
    cache = out / "cache"
    t_db = _descriptors(tm, db_paths, cache, "teacher-db", progress)
    t_q = _descriptors(tm, q_paths, cache, "teacher-queries", progress)
    ref = top1(t_db, t_q, mask)
    teacher_onnx = out / "candidates" / "teacher-fp32.onnx"
    if not teacher_onnx.is_file():
        export_onnx(tm, teacher_onnx)
    t_rec = _cached(out / "candidates" / "teacher.json", lambda: {
        "name": "teacher", "image_size": list(tm.image_size), "int8": False, "dim": int(tm.out_dim),
        "ms": time_onnx(teacher_onnx, tuple(tm.image_size), threads), "mb": teacher_onnx.stat().st_size / 1e6,
        "accuracy": accuracy(ref, ref, positives), "agreement": 1.0})
    stages["teacher_s"] = time.perf_counter() - t0
    spec, scorer = teacher, "the teacher's own" if "keep_ratio" in tm.knob_names() else None

    train_rows = rows if queries is not None else [rows[i] for i in db_ids]  # held-out queries are never trained on
    # a ViT teacher with a SALAD/WeiAD head but no token pruning: a WeiToP scorer trained for it first; the scored
    # model computes exactly the teacher at keep ratio 1, so it stands in for the teacher from here on
    start = scorer_start(tm, out / "train" / "scorer-start") if keep_ratios and distil_steps else None
    if start is not None:
        t0 = time.perf_counter()
        tm = _train(train_rows, out / "train" / "scorer", lambda m: scorer_config(
            start, m, tuple(tm.image_size), distil_steps, min(keep_ratios), device, seed), progress, on_step)
        teacher = scorer = str(out / "train" / "scorer" / "final")
        stages["scorer_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    results: list[dict] = []
    timed: dict[str, float] = {}

    def evaluate(model, size: tuple[int, int], keep: float | None, int8: bool, distilled: dict | None = None,
                 kind: str = "distilled") -> None:
        """Export ``model`` at ``size`` (keep ratio ``keep`` baked in, int8 or fp32), time it, score it at every dim;
        cached in candidates/. ``distilled``: a trained candidate's record (``kind``: distilled, ternary or depthN);
        a distilled or ternary one takes its plain twin's time (the same graph)."""
        kind = kind if distilled is not None else ""
        name = candidate_name(size, keep, int8, kind)
        twin = candidate_name(size, keep, int8) if kind in ("distilled", "ternary") else None
        onnx = out / "candidates" / f"{name}.onnx"

        def make() -> dict:
            if not onnx.is_file():
                export_onnx(model, onnx, knobs=None if keep is None else {"keep_ratio": keep}, image_size=size,
                            int8=int8, calibration=str(images) if int8 else None)
            m = OnnxModel(onnx, threads=threads)
            c_db = _descriptors(m, db_paths, cache, f"{name}-db", progress)
            c_q = _descriptors(m, q_paths, cache, f"{name}-queries", progress)
            by_dim = []
            for dim in dims:
                if dim and (dim >= c_db.shape[1] or dim >= len(c_db)):
                    continue
                got = top1(c_db, c_q, mask, dim)
                by_dim.append({"dim": int(dim or c_db.shape[1]), "accuracy": accuracy(got, ref, positives),
                               "agreement": accuracy(got, ref)})
            return {"name": name, "image_size": list(size), "keep_ratio": keep, "int8": int8,
                    "ms": time_onnx(onnx, size, threads), "mb": onnx.stat().st_size / 1e6,
                    "teacher_cos": teacher_cosine(c_q, t_q), "distilled": distilled, "kind": kind or "plain",
                    "by_dim": by_dim}

        rec = _cached(out / "candidates" / f"{name}.json", make)
        if twin is not None:  # the same graph as a plain candidate: one time per graph, so that timing noise cannot
            rec = {**rec, "ms_measured": rec["ms"], "ms": timed[twin]}  # rank two identical computations apart
        timed[name] = rec["ms"]
        results.extend({**{k: v for k, v in rec.items() if k != "by_dim"}, **d, "name": f"{name}-{d['dim']}d"}
                       for d in rec["by_dim"])
        if on_candidate is not None:
            on_candidate(name)

    cand_sizes = list(dict.fromkeys(_size(tm, f) for f in sizes))  # fractions that round to one size: tried once
    # a model with a token-pruning scorer (WeiToP) is also tried at lower keep ratios, the knob baked into its export
    keeps = sorted(set(keep_ratios) | {1.0}, reverse=True) if "keep_ratio" in tm.knob_names() else [None]
    for size in cand_sizes:
        for keep in keeps:
            for int8 in (False, True):
                evaluate(tm, size, keep, int8)
    stages["candidates_s"] = time.perf_counter() - t0

    within = [r for r in results if r["ms"] <= budget_ms]
    if not within:  # a distilled candidate has the architecture and input size of a plain one: no faster
        fastest = min(results, key=lambda r: r["ms"])
        raise ValueError(f"no candidate meets --budget-ms {budget_ms:g}: the fastest, {fastest['name']}, takes "
                         f"{fastest['ms']:.1f} ms on this CPU ({metric} {fastest['accuracy']:.3f})")

    t0 = time.perf_counter()
    # only sizes whose plain candidate meets the budget are worth training, the largest first: accuracy grows with
    # the input size and each student costs the same training time
    fits = sorted({tuple(r["image_size"]) for r in within if tuple(r["image_size"]) != tuple(tm.image_size)},
                  key=lambda hw: -hw[0] * hw[1])[:distil_sizes]
    for size in fits if distil_steps else []:
        student, log = distil(teacher, tm, train_rows, size, distil_steps, None if keeps == [None] else min(keeps),
                              out / "train" / f"{size[0]}x{size[1]}-distilled", device, seed, progress, on_step)
        for keep in keeps:
            for int8 in (False, True):
                evaluate(student, size, keep, int8, log)
    stages["distil_s"] = time.perf_counter() - t0

    # students of another architecture, trained unpruned (token distillation needs the whole patch grid) towards
    # the teacher's tokens and descriptor, exported at every keep ratio. TAT-VPR stage 1 (opt-in): ternary linears
    # from the teacher's weights at the largest input size whose int8 candidate meets the budget (the teacher's own
    # included), int8 only (the int8 export of a ternary matrix is exact; its fp32 one is as slow as the teacher's
    # fp32 graph), timed as that twin. A smaller model of the teacher's family (``smaller_start``): at the largest input
    # size at which its untrained start's int8 export meets the budget, fp32 and int8, timed on their own.
    def area(hw: tuple[int, int]) -> int:
        return hw[0] * hw[1]

    others = []
    tern = ternary_start(tm, out / "train" / "ternary-start") if ternary and distil_steps else None
    int8_fits = [tuple(r["image_size"]) for r in within if r["int8"]]
    if tern is not None and int8_fits:
        others.append(("ternary", tern, max(int8_fits, key=area), (True,)))
    cut = smaller_start(tm, out / "train" / "smaller-start") if distil_steps else None
    if cut is not None:
        t0 = time.perf_counter()
        kind, small = cut[1], load_model(cut[0]).eval()
        for size in sorted(cand_sizes, key=area, reverse=True):
            name = candidate_name(size, None if keeps == [None] else 1.0, True, f"{kind}-start")
            onnx = out / "candidates" / f"{name}.onnx"

            def timed_start(onnx: Path = onnx, size: tuple[int, int] = size) -> dict:
                if not onnx.is_file():
                    export_onnx(small, onnx, image_size=size, int8=True, calibration=str(images))
                return {"ms": time_onnx(onnx, size, threads)}

            if _cached(out / "candidates" / f"{name}.json", timed_start)["ms"] <= budget_ms:
                others.append((kind, cut[0], size, (False, True)))
                break
        stages[f"{kind}_s"] = time.perf_counter() - t0
    for kind, init, size, int8s in others:
        t0 = time.perf_counter()
        student, log = distil(teacher, tm, train_rows, size, distil_steps, None,
                              out / "train" / f"{size[0]}x{size[1]}-{kind}", device, seed, progress, on_step, init)
        for keep in keeps:
            for int8 in int8s:
                evaluate(student, size, keep, int8, log, kind)
        stages[f"{kind}_s"] = stages.get(f"{kind}_s", 0.0) + time.perf_counter() - t0

    within = [r for r in results if r["ms"] <= budget_ms]
    best = max(within, key=choice_key(choose_by))
    shutil.copyfile(out / "candidates" / f"{best['name'].rsplit('-', 1)[0]}.onnx", out / ".model.onnx.tmp")
    os.replace(out / ".model.onnx.tmp", out / "model.onnx")
    report = {"teacher": {**t_rec, "spec": spec}, "chosen": best, "budget_ms": budget_ms, "metric": metric,
              "chosen_by": metric if choose_by == "accuracy" else "top-1 agreement with the teacher",
              "queries": "given" if queries is not None else f"every {holdout}th map image, +-{exclude} neighbours "
                                                             "left out of its search",
              "n_queries": len(q_paths), "n_database": len(db_paths), "threads": threads, "candidates": results,
              "stages_s": stages, "weitop_scorer": scorer,
              "not_tried": not_tried(tm, ternary, tern is not None, any(k != "ternary" for k, *_ in others)),
              "deploy": f"edgevpr index build --model {out / 'model.onnx'} --images MAP"
                        + (f" --dim {best['dim']}" if best["dim"] < results[0]["dim"] else "") + " --out MAP.index"}
    write_json(out / "report.json", report)
    write_text(out / "report.md", report_table(report))
    frontier_plot(report, out / "frontier.png")
    return report


def not_tried(tm, asked: bool, ternary: bool, smaller: bool) -> list[str]:
    """What the report lists as not tried for ``tm`` (``asked``: --ternary given; ``ternary`` / ``smaller``: such a
    student was trained)."""
    vit = getattr(tm.backbone, "vit", None) is not None
    out = []
    if not ternary:
        out.append("ternary linears distilled from the teacher's tokens (TAT-VPR stage 1): " +
                   ("give --ternary" if vit and not asked else "the teacher has no transformer linears to make "
                                                               "ternary, or is ternary already"))
    if not smaller:
        out.append("a smaller student of the teacher's family: none applies (a ViT with prompts or a pruner at or "
                   "after the cut; a CNN without EfficientNet/MobileNet stages) or none meets the budget at any size")
    if "keep_ratio" not in tm.knob_names():
        out.append("token pruning (WeiToP): needs a ViT with a SALAD or WeiAD head")
    return out


def report_table(r: dict) -> str:
    """The report card as markdown: teacher and every candidate, the chosen one marked."""
    t = r["teacher"]
    lines = [f"# Compression of {t['spec']} to {r['budget_ms']:g} ms", "",
             f"Accuracy: {r['metric']} on {r['n_queries']} held-out queries ({r['queries']}) against "
             f"{r['n_database']} map images; chosen by {r['chosen_by']}. ms: onnxruntime, batch 1, median of "
             f"{REPEATS}, threads "
             f"{r['threads'] or 'default'}. Stages: " + ", ".join(f"{k[:-2]} {v:.0f} s" for k, v in
                                                                   r["stages_s"].items()) + ".", "",
             "| model | input | int8 | dim | accuracy | agreement | cos to teacher | ms | MB | within budget |",
             "|---|---|---|---:|---:|---:|---:|---:|---:|---|",
             f"| teacher (fp32 ONNX) | {t['image_size'][0]}x{t['image_size'][1]} | no | {t['dim']} | "
             f"{t['accuracy']:.3f} | 1.000 | 1.000 | {t['ms']:.2f} | {t['mb']:.1f} | "
             f"{'yes' if t['ms'] <= r['budget_ms'] else 'no'} |"]
    for c in sorted(r["candidates"], key=lambda c: c["ms"]):
        mark = " **(chosen)**" if c["name"] == r["chosen"]["name"] else ""
        lines.append(f"| {c['name']}{mark} | {c['image_size'][0]}x{c['image_size'][1]} | "
                     f"{'yes' if c['int8'] else 'no'} | {c['dim']} | {c['accuracy']:.3f} | {c['agreement']:.3f} | "
                     f"{'' if c.get('teacher_cos') is None else format(c['teacher_cos'], '.3f')} | "
                     f"{c['ms']:.2f} | "
                     f"{c['mb']:.1f} | {'yes' if c['ms'] <= r['budget_ms'] else 'no'} |")
    lines += ["", "Not tried: " + ("; ".join(r["not_tried"]) or "nothing") + ".", "", f"Deploy: `{r['deploy']}`"]
    return "\n".join(lines) + "\n"


def frontier_plot(r: dict, path: Path) -> None:
    """Accuracy against ms of every candidate and the teacher, the budget as a line, the chosen one circled."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    cs = r["candidates"]
    markers = {"plain": "o", "distilled": "^", "ternary": "s"}

    def kind_of(c: dict) -> str:  # reports written before candidates had a kind: distilled or plain
        return c.get("kind", "distilled" if c.get("distilled") else "plain")

    for int8, colour in ((False, "tab:blue"), (True, "tab:orange")):
        for kind in sorted({kind_of(c) for c in cs}, key=lambda k: list(markers).index(k) if k in markers else 9):
            marker = markers.get(kind, "D")  # D: the smaller student (depthN, blocksN)
            pts = [c for c in cs if c["int8"] == int8 and kind_of(c) == kind]
            if pts:
                ax.scatter([c["ms"] for c in pts], [c["accuracy"] for c in pts], c=colour, s=22, marker=marker,
                           label=("int8" if int8 else "fp32") + ("" if kind == "plain" else f", {kind}"))
    t, best = r["teacher"], r["chosen"]
    ax.scatter([t["ms"]], [t["accuracy"]], marker="*", s=120, c="k", label="teacher")
    ax.scatter([best["ms"]], [best["accuracy"]], s=160, facecolors="none", edgecolors="tab:green", linewidths=2,
               label=f"chosen: {best['name']}")
    ax.axvline(r["budget_ms"], ls="--", c="tab:red", label=f"budget {r['budget_ms']:.3g} ms")
    ax.set_xlabel("ms per image (batch 1, this CPU)")
    ax.set_ylabel(r["metric"])
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png"))
    plt.close(fig)
