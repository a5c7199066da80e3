"""WeiAD and WeiToP: weighted clusters, token pruning at any keep ratio, baselines, self-distillation."""

import math

import pytest
import torch

from edgevpr.models.aggregators.salad import SALAD
from edgevpr.models.aggregators.weiad import WeiAD
from edgevpr.models.model import load_model
from edgevpr.models.pruning import keep_count, tome_merge
from edgevpr.tokens import PrunedTokensError, Tokens
from edgevpr.train.losses import StepContext, TermContext, WeiToPDistill

VIT = {"name": "dinov2_vits14", "weights": None, "depth": 4, "init_values": 1.0}


def _model(method="weitop", head="weiad", **head_cfg):
    torch.manual_seed(0)
    return load_model({"backbone": {**VIT, "pruning": {"block": 2, "method": method}},
                       "aggregator": {"name": head, **head_cfg}, "image_size": [84, 84]})


def test_keep_ratio_one_is_exactly_the_unpruned_model():
    pruned = _model()
    plain = load_model({"backbone": VIT, "aggregator": {"name": "weiad"}, "image_size": [84, 84]})
    plain.load_state_dict({k: v for k, v in pruned.state_dict().items() if "pruner" not in k})
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad():
        assert torch.equal(pruned(x), plain(x)) and torch.equal(pruned(x, keep_ratio=1.0), plain(x))
        assert not torch.allclose(pruned(x, keep_ratio=0.5), plain(x), atol=1e-4)


@pytest.mark.parametrize("method", ["weitop", "random", "evit", "tome"])
def test_every_method_keeps_ceil_rho_n_tokens(method):
    m = _model(method)
    with torch.no_grad(), m.using(keep_ratio=0.3):
        tok = m.forward_tokens(torch.randn(2, 3, 84, 84))
    assert tok.patches.shape == (2, math.ceil(0.3 * 36), 384) and tok.index.shape == (2, 11)
    assert tok.grid == (6, 6) and (tok.index < 36).all() and tok.cls is not None
    assert all(len(set(row.tolist())) == 11 for row in tok.index)  # distinct grid positions


def test_weitop_keeps_the_highest_scored_tokens():
    m = _model()
    x = torch.randn(2, 3, 84, 84)
    with torch.no_grad(), m.using(keep_ratio=0.25):
        tok = m.forward_tokens(x)
    logits = m.backbone.pruner.last_logits
    want = logits.topk(keep_count(36, 0.25), dim=-1).indices.sort(-1).values
    assert torch.equal(tok.index, want)


def test_tome_merges_similar_tokens_with_size_weights():
    x = torch.tensor([[[1.0, 0], [1, 0.01], [0, 1], [0.01, 1]]])
    merged, pos = tome_merge(x, 2)
    assert merged.shape == (1, 2, 2) and sorted(pos[0].tolist()) == [1, 3]
    torch.testing.assert_close(merged.sum(1), x.sum(1) / 2)  # each kept token = mean of a merged pair


def test_weiad_starts_as_salad_and_weights_clusters():
    torch.manual_seed(0)
    t = Tokens(torch.randn(2, 30, 16), torch.randn(2, 16), (5, 6))
    w = load_model({"backbone": VIT, "aggregator": {"name": "weiad", "weighting": "global"}}).aggregator
    assert torch.equal(w.cluster_weights(t), torch.ones(2, 64))
    for weighting in ("global", "predicted"):
        torch.manual_seed(1)
        a = WeiAD(16, weighting=weighting, dropout=0.0).eval()
        torch.manual_seed(1)
        s = SALAD(16, dropout=0.0).eval()
        s.load_state_dict({k: v for k, v in a.state_dict().items() if k in s.state_dict()})
        torch.testing.assert_close(a(t), s(t))  # w = 1 at the start: exactly SALAD
        imp = a.importance(t)
        assert imp.shape == (2, 30) and torch.allclose(imp.sum(-1), torch.ones(2))


@pytest.mark.parametrize("head", ["salad", "weiad"])
def test_ot_heads_stay_finite_with_16_tokens(head):
    m = _model(head=head)
    with torch.no_grad():
        d = m(torch.randn(2, 3, 84, 84), keep_ratio=16 / 36)
    assert d.shape[0] == 2 and torch.isfinite(d).all()


def test_grid_heads_refuse_pruned_tokens():
    m = load_model({"backbone": {**VIT, "pruning": {"block": 2, "method": "random"}},
                    "aggregator": {"name": "boq", "proj_dim": 64, "num_queries": 4, "num_layers": 1, "row_dim": 4},
                    "image_size": [84, 84]})
    with pytest.raises(PrunedTokensError, match="full 6x6 patch grid"):
        m(torch.randn(1, 3, 84, 84), keep_ratio=0.5)


def test_weitop_kl_is_zero_when_the_pruner_matches_the_target():
    m = _model()
    term = WeiToPDistill(m, temperature=2.0)
    target = torch.softmax(torch.randn(3, 36), -1)
    assert float(term.kl(target.log(), target)) == pytest.approx(0.0, abs=1e-6)
    assert float(term.kl(torch.zeros(3, 36), target)) > 0
    # inside a training step: the target comes from the unpruned tokens even when the step ran pruned
    x = torch.randn(2, 3, 84, 84)
    m.train()
    with m.using(keep_ratio=0.5):
        tok = m.forward_tokens(x)
    ctx = StepContext(0, 1, torch.tensor([0, 1]), m.aggregator(tok), tok, images=x)
    loss = term(ctx)
    loss.backward()
    assert loss > 0 and m.backbone.pruner.scorer[-1].weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="needs backbone.pruning"):
        WeiToPDistill(load_model({"backbone": VIT, "aggregator": {"name": "weiad"}}))
    assert TermContext(1, 1, None, None, m).student is m
