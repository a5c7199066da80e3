import math

import numpy as np
import pytest
import torch

from edgevpr.models.aggregators import AGGREGATORS, HeadContext
from edgevpr.models.aggregators.netvlad import NetVLAD
from edgevpr.models.aggregators.salad import SALAD, dustbin_marginals
from edgevpr.models.model import build_model
from edgevpr.tokens import PrunedTokensError, Tokens

CTX = HeadContext(in_dim=32, has_cls=True, grid=(6, 8))


def _tokens(b=3, grid=(6, 8), c=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    patches = torch.randn(b, grid[0] * grid[1], c, generator=g)
    return Tokens(patches=patches, cls=torch.randn(b, c, generator=g), grid=grid)


SMALL = {"gem": {}, "cls": {}, "netvlad": {"num_clusters": 8}, "mixvpr": {"out_channels": 16, "mix_depth": 2},
         "salad": {"num_clusters": 8, "cluster_dim": 16, "token_dim": 32, "hidden": 64},
         "boq": {"proj_dim": 64, "num_queries": 4, "num_layers": 2, "row_dim": 4}}


@pytest.mark.parametrize("name", sorted(SMALL))
def test_heads_declare_dim_and_normalise(name):
    torch.manual_seed(0)
    head = AGGREGATORS.get(name)(CTX, **SMALL[name]).eval()
    d = head(_tokens())
    assert d.shape == (3, head.out_dim)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(3))
    assert torch.isfinite(d).all()


@pytest.mark.parametrize("name", sorted(SMALL))
def test_grid_heads_refuse_pruned_tokens_others_accept(name):
    head = AGGREGATORS.get(name)(CTX, **SMALL[name]).eval()
    tok = _tokens()
    pruned = tok.select(torch.arange(16).flip(0).expand(3, -1))
    assert pruned.index[0, 0] == 15 and not pruned.is_full_grid
    if head.needs_grid:
        with pytest.raises(PrunedTokensError, match="needs the full 6x8 patch grid but got 16 pruned tokens"):
            head(pruned)
    else:
        assert torch.isfinite(head(pruned)).all()


def test_cls_head_refuses_cnn():
    with pytest.raises(ValueError, match="CLS token"):
        AGGREGATORS.get("cls")(HeadContext(32, False, (4, 4)))


def test_gem_matches_formula():
    head = AGGREGATORS.get("gem")(CTX)
    tok = _tokens()
    x = tok.patches.clamp(min=1e-6)
    want = torch.nn.functional.normalize((x ** 3).mean(1) ** (1 / 3), dim=-1)
    torch.testing.assert_close(head(tok), want)


def test_salad_marginals_equal_reference_and_stay_valid():
    m = 64
    for n in (65, 100, 529):  # the reference SALAD formula where it is defined
        log_a, log_b = dustbin_marginals(m, n, 1, torch.device("cpu"), torch.float64)
        ref_a = torch.tensor([-math.log(n + m)] * m + [-math.log(n + m) + math.log(n - m)], dtype=torch.float64)
        torch.testing.assert_close(log_a[0], ref_a)
        torch.testing.assert_close(log_b[0], torch.full((n,), -math.log(n + m), dtype=torch.float64))
    for n in (1, 16, 64, 65):
        log_a, log_b = dustbin_marginals(m, n, 1, torch.device("cpu"), torch.float64)
        assert torch.isfinite(log_a).all()
        torch.testing.assert_close(log_a.exp().sum(), log_b.exp().sum())  # balanced transport


def test_salad_finite_with_16_tokens_and_output_shape():
    torch.manual_seed(0)
    head = SALAD(32).eval()
    tok = _tokens(grid=(4, 4))
    d = head(tok)
    assert d.shape == (3, 64 * 128 + 256) and torch.isfinite(d).all()
    p = head.assignment(tok)
    assert p.shape == (3, 64, 16) and (p.sum(1) <= 1 + 1e-4).all()


def test_netvlad_kmeans_init():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(8, 32)).astype(np.float32) * 5
    feats = np.concatenate([c + rng.normal(size=(60, 32)).astype(np.float32) * 0.1 for c in centres])
    original = feats.copy()
    head = NetVLAD(32, num_clusters=8)
    head.init_from_features(feats)
    assert np.array_equal(feats, original)  # the caller's array is not modified
    x = feats / np.linalg.norm(feats, axis=1, keepdims=True)
    c = head.centroids.detach().numpy()
    nearest = ((x[:, None] - c[None]) ** 2).sum(-1).argmin(1)
    for k in np.unique(nearest):  # k-means fixed point: each centroid is the mean of its members
        np.testing.assert_allclose(c[k], x[nearest == k].mean(0), atol=1e-4)
    soft = head.assign(torch.from_numpy(x)).softmax(-1).detach().numpy()
    assert (soft.argmax(1) == nearest).mean() > 0.99  # alpha-scaled weights assign like the centroids


@pytest.mark.parametrize("cfg,dim", [
    ({"backbone": {"name": "dinov2_vitb14"}, "aggregator": {"name": "salad"}, "image_size": [224, 224]}, 8448),
    ({"backbone": {"name": "dinov2_vitb14", "final_norm": False}, "aggregator": {"name": "boq"},
      "image_size": [322, 322]}, 12288),
    ({"backbone": {"name": "resnet50"}, "aggregator": {"name": "mixvpr", "out_channels": 1024},
      "image_size": [320, 320]}, 4096),
])
def test_published_shapes(cfg, dim):
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with torch.no_grad():
        d = model(torch.randn(1, 3, *cfg["image_size"]))
    assert model.out_dim == dim and d.shape == (1, dim)
    torch.testing.assert_close(d.norm(dim=-1), torch.ones(1))


def test_mixvpr_wrong_size_is_clear():
    head = AGGREGATORS.get("mixvpr")(CTX, **SMALL["mixvpr"])
    with pytest.raises(ValueError, match="built for a 6x8 grid but got 4x4"):
        head(_tokens(grid=(4, 4)))
