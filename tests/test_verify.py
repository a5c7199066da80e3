"""Geometric verification re-ranking (deploy/verify.py) on real frames."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from edgevpr.cli import main
from edgevpr.data.images import load_image
from edgevpr.deploy import index as idx
from edgevpr.deploy.inputs import Frame
from edgevpr.deploy.localize import Localizer
from edgevpr.deploy.verify import Verifier, inliers, local_features
from tests.conftest import shared_data


@pytest.fixture(scope="module")
def gp_index(tmp_path_factory):
    from edgevpr.models.model import load_model

    data = shared_data()
    root = tmp_path_factory.mktemp("verify") / "index"
    idx.build(load_model("effnet-lite0-gem"), data / "gardens_point" / "day_right", root, spec="effnet-lite0-gem",
              progress=False)
    return root, data / "gardens_point"


def test_inliers_tell_the_same_place_from_another():
    gp = shared_data() / "gardens_point"
    img = load_image(gp / "day_right" / "Image050.jpg")
    moved = img.crop((40, 20, img.width - 10, img.height - 30)).resize(img.size, Image.BICUBIC)
    same = inliers(local_features(img), local_features(moved))
    other = inliers(local_features(img), local_features(load_image(gp / "day_right" / "Image000.jpg")))
    assert same >= 100 and other <= 30, (same, other)


def test_mutual_matches_are_opencvs_brute_force_matches():
    """The numpy matcher (one matrix product) gives exactly the pairs of OpenCV's brute-force L2 matcher (knnMatch
    both ways, Lowe's ratio) on real pairs: SIFT with ratio 0.8 on Gardens Point night/day_left vs day_right, and
    unit-length feature-map cells with the mutual check alone."""
    import cv2

    from edgevpr.deploy.verify import RATIO, mutual_matches

    def brute_force(a, b, ratio):
        bf = cv2.BFMatcher(cv2.NORM_L2)
        back = {m[0].queryIdx: m[0].trainIdx for m in bf.knnMatch(b, a, k=1) if m}
        return [(m[0].queryIdx, m[0].trainIdx) for m in bf.knnMatch(a, b, k=2)
                if m[0].distance < ratio * m[1].distance and back.get(m[0].trainIdx) == m[0].queryIdx]

    gp = shared_data() / "gardens_point"
    sift = {p: local_features(load_image(gp / p)).desc for p in
            ("night_right/Image010.jpg", "day_left/Image050.jpg", "day_right/Image010.jpg", "day_right/Image051.jpg",
             "day_right/Image090.jpg")}
    rng = np.random.default_rng(0)
    cells = [c / np.linalg.norm(c, axis=1, keepdims=True) for c in rng.normal(size=(4, 196, 112)).astype(np.float32)]
    pairs = [(sift[q], sift[d], RATIO) for q in list(sift)[:2] for d in list(sift)[2:]] + \
        [(cells[0], cells[k], 1.0) for k in (1, 2, 3)] + [(cells[0], cells[0] + 0.3 * cells[1], 1.0)]
    n = 0
    for a, b, ratio in pairs:
        i, j = mutual_matches(a, b / np.linalg.norm(b, axis=1, keepdims=True), ratio)
        want = brute_force(a, b / np.linalg.norm(b, axis=1, keepdims=True), ratio)
        assert list(zip(i.tolist(), j.tolist(), strict=True)) == want
        n += len(want)
    assert n > 300  # real matches were compared, not empty lists


def test_verification_moves_a_correct_match_to_rank_1_on_gardens_point(gp_index, capsys):
    """Night query 68: the descriptor's top-1 is place 71 (wrong: +-2 frames); SIFT verification of the top 10 (the
    torch-free runtime's features) puts place 68 first (18 inliers against 10) and records what it did."""
    root, gp = gp_index
    photo = gp / "night_right" / "Image068.jpg"
    plain = Localizer(root).localize([load_image(photo)], 3)[0]
    assert plain[0].path.endswith("Image071.jpg")
    loc = Localizer(root, verify=10, verify_with="sift")
    a = loc.answer(loc.embed([load_image(photo)]), 3, None, [load_image(photo)])[0]
    assert abs(int(a.matches[0].path[-7:-4]) - 68) <= 2
    check = a.decision["verification"]
    assert check["verified"] and check["moved"] and check["candidates"] == 10 and check["features"] == "sift"
    assert check["inliers"][0] == max(check["inliers"])
    assert main(["localize", "--index", str(root), "--verify", "10", "--verify-with", "sift", str(photo), "--json",
                 "-k", "1"]) == 0
    out = json.loads(capsys.readouterr().out)["results"][0]
    assert abs(int(out["matches"][0]["path"][-7:-4]) - 68) <= 2 and out["decision"]["verification"]["moved"]
    # each verified match carries its inliers, and the table for people shows them and what verification did
    assert [m.inliers for m in a.matches] == check["inliers"][:3]
    assert out["matches"][0]["inliers"] == out["decision"]["verification"]["inliers"][0] == check["inliers"][0]
    assert main(["localize", "--index", str(root), "--verify", "10", "--verify-with", "sift", str(photo), "-k",
                 "3"]) == 0
    text = capsys.readouterr().out
    assert "  rank   score  inliers " in text and "verified on sift over 10 candidates: top-1 moved" in text
    assert f"  {check['inliers'][0]:>7}  " in text.splitlines()[2], text


def test_a_cnn_verifies_a_nordland_thumbnail_on_its_own_feature_map(tmp_path):
    """A 64x32 Nordland frame has too few SIFT points to verify; the default CNN's own stride-16 feature map (a
    14x14 grid at 224 px, ``verify_with="auto"``) does: winter 1829 against summer 1800-1899, whose descriptor
    top-1 is summer 1862, comes out right (66 inliers against at most 40 for the other nine candidates)."""
    from edgevpr.models.model import load_model

    nl = shared_data() / "nordland_64x32"
    db = tmp_path / "summer"
    db.mkdir()
    for p in sorted((nl / "summer").glob("*.png"))[1800:1900]:
        (db / p.name).symlink_to(p)
    model = load_model("effnet-lite0-gem").eval()
    idx.build(model, db, tmp_path / "index", progress=False)
    photo = load_image(nl / "winter" / "images-18290.png")
    plain = Localizer(tmp_path / "index", model).localize([photo], 3)[0]
    assert plain[0].path.endswith("images-18620.png")
    loc = Localizer(tmp_path / "index", model, verify=10)
    assert loc.verifier.kind == "feature map"
    a = loc.answer(loc.embed([photo]), 3, None, [photo])[0]
    check = a.decision["verification"]
    assert a.matches[0].path.endswith("images-18290.png"), (a.matches[0].path, check)
    assert check["verified"] and check["moved"] and check["features"] == "feature map"
    assert check["inliers"][0] >= 60 and max(check["inliers"][1:]) <= 45, check["inliers"]
    sift = Localizer(tmp_path / "index", model, verify=10, verify_with="sift")
    assert not sift.answer(sift.embed([photo]), 3, None, [photo])[0].decision["verification"]["verified"]
    # the query's map comes from its descriptor's forward (``embed_local``): no second pass, the same answer
    own, passes = loc.verifier.local, []
    loc.verifier.local = lambda img: passes.append(img) or own(img)
    one = loc.stream([Frame("winter 1829", photo, "w")], 3)
    b = next(iter(one))
    assert passes == [] and b.decision["verification"] == check and b.matches == a.matches


def test_frames_too_small_for_local_features_fall_back_cleanly():
    frame = load_image(sorted((shared_data() / "nordland_64x32" / "winter").glob("*.png"))[1000])
    order, info = Verifier().rerank(frame, np.array([0.9, 0.8, 0.7]), ["a.png", "b.png", "c.png"])
    assert order.tolist() == [0, 1, 2] and info["verified"] is False and "local features" in info["reason"]


def test_the_database_feature_cache_is_bounded_in_bytes_and_keeps_the_recently_used():
    """Database features are kept for later queries within ``cache_mb`` (a CNN map's size here: room for five),
    least recently used dropped first; a dropped image is computed again when it comes back."""
    from edgevpr.deploy.verify import patch_features

    paths = [str(p) for p in sorted((shared_data() / "gardens_point" / "day_right").glob("*.jpg"))[:6]]
    computed = []

    def cells(img):
        computed.append(img.size)
        return patch_features(np.ones((196, 112), np.float32), (14, 14))

    v = Verifier.with_tokens(cells, k=5)
    one = patch_features(np.ones((196, 112), np.float32), (14, 14)).nbytes
    v.cache_mb = 5 * one / 2**20
    for p in paths[:5] + paths[:1] + paths[5:]:  # the first image used again before the sixth arrives
        v.db_features(p)
    assert list(v._cache) == paths[2:5] + paths[:1] + paths[5:] and v._cached_bytes == 5 * one
    assert len(computed) == 6
    v.db_features(paths[1])  # dropped: computed again
    assert len(computed) == 7 and paths[1] in v._cache and paths[2] not in v._cache


def test_eval_verify_reports_the_verified_recall_beside_the_unverified(tmp_path, capsys):
    """`eval --verify 10` on Gardens Point night 60-79 (20 queries; night 68 is the known rescue above): the
    recall is the verified one, the unverified one stands beside it, and the table says so."""
    gp = shared_data() / "gardens_point"
    assert main(["eval", "--model", "effnet-lite0-gem", "--db", str(gp / "day_right"), "--queries",
                 str(gp / "night_right"), "--aligned", "2", "--frames", "60:80", "--verify", "10",
                 "--no-efficiency", "--no-cache", "--quiet", "--out", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    res = json.loads((tmp_path / "results.json").read_text())
    r = next(iter(res["datasets"].values()))
    v = r["verification"]
    assert v["k"] == 10 and v["top1_moved"] >= 1 and v["not_verified"] == 0 and v["ms_per_query"] > 0
    assert r["recall"]["R@1"] > v["recall_unverified"]["R@1"], (r["recall"], v)
    assert "| verified R@1 | R@1 without |" in out and "| verified R@1 |" in (tmp_path / "results.md").read_text()


def test_patch_tokens_are_local_features_on_their_grid():
    """A ViT's patch tokens as local features (``patch_features``): a view shifted by two patches (an 8x12 grid,
    tokens carried along with a little noise) is explained by a fundamental matrix over most patches, an unrelated
    view is not, and a pruned token set is refused. Break: the grid read column-major -> the shift is scrambled."""
    from edgevpr.deploy.verify import patch_features

    rng = np.random.default_rng(0)
    h, w, c = 8, 12, 64
    scene = rng.normal(size=(h, w + 2, c))
    a = scene[:, :w].reshape(-1, c)
    b = (scene[:, 2:] + 0.1 * rng.normal(size=(h, w, c))).reshape(-1, c)
    other = rng.normal(size=(h * w, c))
    fa, fb, fo = (patch_features(t, (h, w)) for t in (a, b, other))
    assert fa.xy[w + 1].tolist() == [1.5, 1.5] and fa.xy[w].tolist() == [0.5, 1.5]  # row-major patch centres
    shifted = inliers(fa, fb, threshold_px=0.5, ratio=1.0)
    assert shifted >= 0.8 * h * (w - 2), shifted
    assert inliers(fa, fo, threshold_px=0.5, ratio=1.0) < shifted / 3  # chance agreement of a fundamental matrix
    with pytest.raises(ValueError, match="95 patch tokens for a 8x12 grid"):
        patch_features(a[:-1], (h, w))


def test_a_vit_verifies_with_its_own_patch_tokens(gp_index, tmp_path):
    """``verify_with="auto"`` takes a torch ViT's own patch tokens (a CNN's feature map: the index above), the
    answer says which features it verified with, "sift" forces SIFT, and tokens are refused in one line for a model
    without features of its own (SeqSLAM's pixels). What tokens are worth is measured with a trained ViT (not in
    CI): benchmarks/results/verification_tokens.md."""
    from edgevpr.models.model import load_model

    gp = shared_data() / "gardens_point"
    vit = load_model({"backbone": {"name": "vit", "timm_name": "vit_tiny_patch16_224"}, "aggregator": {"name": "gem"},
                      "image_size": [64, 64], "name": "tiny-vit"}).eval()
    root = tmp_path / "vit-index"
    idx.build(vit, gp / "day_right", root, progress=False)
    loc = Localizer(root, vit, verify=5)
    assert loc.verifier.kind == "patch tokens" and loc.verifier.k == 5
    photo = load_image(gp / "night_right" / "Image068.jpg")
    check = loc.answer(loc.embed([photo]), 3, None, [photo])[0].decision["verification"]
    assert check["verified"] and check["features"] == "patch tokens" and len(check["inliers"]) == 5
    assert Localizer(root, vit, verify=5, verify_with="sift").verifier.kind == "sift"
    assert Localizer(gp_index[0], verify=5).verifier.kind == "feature map"  # a CNN
    pixels = tmp_path / "pixels-index"
    idx.build(load_model("pixels-patchnorm"), gp / "day_right", pixels, spec="pixels-patchnorm", progress=False)
    with pytest.raises(ValueError, match="--verify-with tokens: model pixels-patchnorm has no local features of its"):
        Localizer(pixels, verify=5, verify_with="tokens")
    assert Localizer(pixels, verify=5).verifier.kind == "sift"
    from edgevpr.cli import build_parser

    for argv in (["localize", "--index", "i", "a.jpg"], ["calibrate", "--index", "i"], ["serve", "--index", "i"],
                 ["eval", "--model", "m", "--db", "d", "--queries", "q"]):
        assert build_parser().parse_args(argv).verify_with == "auto"
        assert build_parser().parse_args([*argv, "--verify-with", "sift"]).verify_with == "sift"


def test_the_inlier_margin_marks_a_look_alike_with_many_inliers():
    """``verified_evidence``: the top-1's log inliers minus the best candidate's outside its neighbourhood. The
    measured near miss (Gardens Point day_left 37: top-1 33 with 72 inliers, the true place 37 with 75) gets a
    negative margin for all its inliers; a top-1 whose rivals lie in its own neighbourhood is measured against the
    best one outside; unverified answers have no geometric evidence (0, 0). Break: neighbours not excluded, or the
    top-1's own count as the rival -> red."""
    from edgevpr.deploy.decision import Coordinates, Neighbourhood, verified_evidence

    nan = np.full(100, np.nan)
    coords, hood = Coordinates(nan, nan, nan, nan), Neighbourhood(radius_m=None, frames=2)
    near_miss = verified_evidence({"verified": True, "inliers": [72, 75, 65]}, np.array([33, 37, 34]), coords, hood)
    assert near_miss["log_inliers"] == pytest.approx(np.log(73))
    assert near_miss["inlier_margin"] == pytest.approx(np.log(73) - np.log(76))
    right = verified_evidence({"verified": True, "inliers": [72, 70, 10, 12]}, np.array([33, 34, 80, 5]), coords,
                              hood)
    assert right["inlier_margin"] == pytest.approx(np.log(73) - np.log(13))  # 34 is a neighbour, not a rival
    alone = verified_evidence({"verified": True, "inliers": [40, 30]}, np.array([10, 11]), coords, hood)
    assert alone["inlier_margin"] == pytest.approx(np.log(41))
    assert verified_evidence({"verified": False, "reason": "small"}, np.array([1, 2]), coords, hood) == \
        {"log_inliers": 0.0, "inlier_margin": 0.0}


def test_a_calibration_fitted_on_verified_answers_uses_their_inliers_and_needs_them(gp_index, tmp_path, capsys):
    """``calibrate`` with verification on (the default CNN's feature map, K = 10) fits the confidence on the
    inliers too (``log_inliers`` and ``inlier_margin``: right answers have more than any look-alike elsewhere, so
    the margin's weight is positive, and on these answers inliers alone tell right from wrong), records how it
    verified (the sequence calibration too: its ``agree`` read the
    verified frame answers), and gives held-out verified answers a probability; a localizer that does not verify
    the same way gets no confidence from either, with one warning."""
    import shutil

    from sklearn.metrics import roc_auc_score

    from edgevpr.deploy.decision import Neighbourhood
    from edgevpr.deploy.inputs import Frame

    root, gp = gp_index
    index = tmp_path / "index"
    shutil.copytree(root, index)
    nl = sorted((shared_data() / "nordland_64x32" / "summer").glob("*.png"))

    def frames(paths):
        return [Frame(str(p), load_image(p)) for p in paths]

    def positives(i):
        return {str(gp / "day_right" / f"Image{j:03d}.jpg") for j in range(max(0, i - 2), min(100, i + 3))}

    loc = Localizer(index, verify=10)
    cal, seq = loc.calibrate(frames([gp / "night_right" / f"Image{i:03d}.jpg" for i in range(50)]),
                             [positives(i) for i in range(50)], 0.9, Neighbourhood(radius_m=None, frames=2),
                             unknown_frames=frames(nl[:50]), sequence=5)
    assert cal.features[-2:] == ["log_inliers", "inlier_margin"] and (cal.verify, cal.verify_features) == (10,
                                                                                                  "feature map")
    assert (seq.verify, seq.verify_features) == (10, "feature map")  # its ``agree`` read verified frame answers
    assert cal.coef[-1] > 0
    loc = Localizer(index, verify=10)
    rows = []
    for f, good in zip(frames([gp / "night_right" / f"Image{i:03d}.jpg" for i in range(50, 100)] + nl[100:150]),
                       [positives(i) for i in range(50, 100)] + [set()] * 50, strict=True):
        a = loc.answer(loc.embed([f.image]), 3, None, [f.image])[0]
        rows.append((a.matches[0].path in good, a.decision["evidence"]["log_inliers"], a.decision["confidence"]))
    right, inl, prob = (np.array(c) for c in zip(*rows, strict=True))
    assert roc_auc_score(right, inl) > 0.9, roc_auc_score(right, inl)
    assert prob[right].mean() > 0.7 > 0.2 > prob[~right].mean()
    plain = Localizer(index)
    capsys.readouterr()
    photo = load_image(gp / "night_right" / "Image060.jpg")
    assert all(plain.answer(plain.embed([photo]), 3)[0].decision["confidence"] is None for _ in range(2))
    assert plain.tracker(5).calibration is None and loc.tracker(5).calibration is not None
    err = capsys.readouterr().err
    assert err.count("fitted on answers verified with --verify 10 on feature map, not no --verify") == 1, err
