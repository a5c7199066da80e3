"""Loss terms. The VPR metric loss is Multi-Similarity with the MS miner (pytorch-metric-learning) at the
VPR settings used by GSV-Cities, MixVPR, SALAD, BoQ and EfficientVPR: alpha=1, beta=50, base=0,
miner epsilon=0.1 (the library defaults alpha=2, base=0.5 differ).

Extra terms (distillation, alignment, self-distillation) are ``LossTerm`` modules registered in
``LOSS_TERMS`` and named in a training config (``loss.terms: [{name, weight, ...}]``). Each sees a
``StepContext`` (student descriptors and tokens, the frozen teacher's, labels, step) and returns a scalar;
the loop adds ``weight * term`` to the loss and logs every term apart. A term's own parameters (projectors,
alignment modules) train with the model and are checkpointed, but never exported with it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import nn

from ..registry import Registry
from ..tokens import Tokens


class MultiSimilarity(nn.Module):
    """descriptors [B, D] (L2-normalised), labels [B] -> (loss, batch accuracy).

    Batch accuracy (as logged by GSV-Cities/MixVPR/SALAD): 1 - unique mined anchors / batch size, i.e.
    the fraction of images whose positives already beat every negative by the miner's margin.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 50.0, base: float = 0.0, epsilon: float = 0.1,
                 mine: bool = True) -> None:
        super().__init__()
        from pytorch_metric_learning import losses, miners

        self.loss = losses.MultiSimilarityLoss(alpha=alpha, beta=beta, base=base)
        self.miner = miners.MultiSimilarityMiner(epsilon=epsilon) if mine else None

    def forward(self, desc: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, float]:
        if self.miner is None:
            return self.loss(desc, labels), float("nan")
        pairs = self.miner(desc, labels)
        anchors = torch.unique(torch.cat([pairs[0], pairs[2]]))
        return self.loss(desc, labels, pairs), 1.0 - anchors.numel() / desc.shape[0]


@dataclass
class StepContext:
    """One training step as the loss terms see it.

    desc/labels/teacher_desc cover the global batch (gathered across DDP ranks, so batch-level terms equal
    the single-process ones); tokens/teacher_tokens cover this rank's images only.
    """

    step: int
    total_steps: int
    labels: torch.Tensor  # [B]
    desc: torch.Tensor  # [B, D] student descriptors, L2-normalised
    tokens: Tokens  # student tokens before aggregation, [b, N, C]
    teacher_desc: torch.Tensor | None = None  # [B, Dt]
    teacher_tokens: Tokens | None = None  # [b, Nt, Ct]
    images: torch.Tensor | None = None  # this rank's student inputs [b, 3, H, W]

    def float(self) -> StepContext:
        """Every tensor in float32 (the losses run in fp32 under mixed precision)."""
        def f(t):
            return None if t is None else t.float()

        return replace(self, desc=self.desc.float(), tokens=self.tokens.float(), teacher_desc=f(self.teacher_desc),
                       teacher_tokens=f(self.teacher_tokens), images=f(self.images))


class LossTerm(nn.Module):
    """An extra objective: ``forward(ctx) -> scalar``. ``needs_teacher``: the config must name a teacher."""

    needs_teacher: bool = False

    def forward(self, ctx: StepContext) -> torch.Tensor:
        raise NotImplementedError


@dataclass(frozen=True)
class TermContext:
    """What a term may need to know when it is built: the student's and the teacher's token widths and
    descriptor dims (teacher fields None without a teacher)."""

    student_width: int
    student_dim: int
    teacher_width: int | None
    teacher_dim: int | None
    student: nn.Module | None = None  # the VPRModel being trained (terms that read its internals)


LOSS_TERMS: Registry[LossTerm] = Registry("loss term")


def _needs(ctx: TermContext, name: str) -> tuple[int, int]:
    if ctx.teacher_width is None or ctx.teacher_dim is None:
        raise ValueError(f"loss term '{name}' needs a teacher: add 'teacher: {{model: ...}}' to the config")
    return ctx.teacher_width, ctx.teacher_dim


class TokenDistill(LossTerm):
    """Token-level distillation (TAT-VPR stage 1): the student's patch-token map, bilinearly resized to the
    teacher's grid and linearly projected to the teacher's width (when widths differ), regresses the
    frozen teacher's patch-token map with MSE.

    student tokens [B, Hs*Ws, Cs] -> map [B, Cs, Hs, Ws] -> [B, Cs, Ht, Wt] -> [B, Ht*Wt, Ct] vs teacher [B, Ht*Wt, Ct].
    ``normalize``: L2-normalise both per token first (scale-free; off by default as in TAT-VPR).
    """

    needs_teacher = True

    def __init__(self, student_width: int, teacher_width: int, normalize: bool = False) -> None:
        super().__init__()
        self.proj = nn.Linear(student_width, teacher_width) if student_width != teacher_width else nn.Identity()
        self.normalize = normalize

    def forward(self, ctx: StepContext) -> torch.Tensor:
        s, t = ctx.tokens, ctx.teacher_tokens
        assert t is not None
        smap = s.as_map("token distillation")
        if s.grid != t.grid:
            smap = F.interpolate(smap, size=t.grid, mode="bilinear", align_corners=False)
        sp = self.proj(smap.flatten(2).transpose(1, 2))
        tp = t.patches
        if self.normalize:
            sp, tp = F.normalize(sp, dim=-1), F.normalize(tp, dim=-1)
        return F.mse_loss(sp, tp)


class SimilarityDistill(LossTerm):
    """Relational distillation: MSE between the student's and the teacher's in-batch cosine similarity
    matrices (off-diagonal). desc [B, D], teacher desc [B, Dt] -> scalar; widths need not match."""

    needs_teacher = True

    def forward(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.teacher_desc is not None
        s = ctx.desc @ ctx.desc.T
        t = ctx.teacher_desc @ ctx.teacher_desc.T
        off = ~torch.eye(s.shape[0], dtype=torch.bool, device=s.device)
        return F.mse_loss(s[off], t[off])


class DescriptorDistill(LossTerm):
    """Descriptor distillation: 1 - cosine between the student's descriptor (linearly projected to the teacher's
    dims when they differ) and the frozen teacher's, averaged over the batch. desc [B, D], teacher [B, Dt] ->
    scalar. It places the student in the teacher's descriptor space (what ``edgevpr compress`` trains a student at
    a smaller input size with, beside ``similarity_distill``, which keeps the in-batch neighbourhoods)."""

    needs_teacher = True

    def __init__(self, student_dim: int, teacher_dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_dim, teacher_dim) if student_dim != teacher_dim else nn.Identity()

    def forward(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.teacher_desc is not None
        s = F.normalize(self.proj(ctx.desc), dim=-1)
        return (1 - (s * F.normalize(ctx.teacher_desc, dim=-1)).sum(-1)).mean()


class WeiToPDistill(LossTerm):
    """WeiToP self-distillation: the pruning head's token scores learn the aggregator's token importance.

    target a [B, N] = the head's importance of each patch token (``importance``: cluster weight x transport
    mass, normalised; the head in eval mode, without dropout) on the *unpruned* final tokens, detached;
    when the step ran pruned (keep_ratio < 1), an extra no-grad forward at keep_ratio 1 provides it.
    loss = T^2 * 1/N0 * sum_i p_t,i log(p_t,i / p_s,i), with p_t = softmax(log a / T), p_s = softmax(s / T), s the
    head's logits [B, N] and N0 = N the number of patch tokens scored (the seed's 1/N0), averaged over images.
    Zero when s = log a.
    """

    def __init__(self, student: nn.Module, temperature: float = 1.0) -> None:
        super().__init__()
        self.student = [student]  # a reference, not a submodule: the model trains and saves on its own
        self.t = temperature
        pruner = getattr(student.backbone, "pruner", None)
        if pruner is None or pruner.method != "weitop" or not hasattr(student.aggregator, "importance"):
            raise ValueError("loss term 'weitop_distill' needs backbone.pruning {method: weitop} "
                             "and a salad or weiad head")

    def forward(self, ctx: StepContext) -> torch.Tensor:
        model = self.student[0]
        logits = model.backbone.pruner.last_logits
        tokens = ctx.tokens
        if tokens.index is not None:  # pruned step: the target needs every token
            assert ctx.images is not None
            with torch.no_grad(), model.using(keep_ratio=1.0):
                tokens = model.forward_tokens(ctx.images)
            model.backbone.pruner.last_logits = logits
        head = model.aggregator
        was_training = head.training
        with torch.no_grad():
            target = head.eval().importance(tokens)  # without dropout: a clean target
        head.train(was_training)
        return self.kl(logits, target)

    def kl(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        """logits [B, N], target importance [B, N] (sums to 1) -> T^2 / N * mean_b KL(p_t || p_s)."""
        log_pt = F.log_softmax(target.clamp_min(1e-12).log() / self.t, -1)
        log_ps = F.log_softmax(logits / self.t, -1)
        return self.t**2 * (log_pt.exp() * (log_pt - log_ps)).sum(-1).mean() / logits.shape[-1]


def hard_negatives(sim: torch.Tensor, labels: torch.Tensor, k: int) -> torch.Tensor:
    """[B, B] similarities, labels [B] -> [B, k] indices of each anchor's k most similar other-place images
    (fewer real ones when a batch has fewer negatives: the mask of ``negative_mask`` tells)."""
    neg = labels[:, None] != labels[None, :]
    return sim.masked_fill(~neg, float("-inf")).topk(min(k, sim.shape[1]), dim=-1).indices


class PosNegDistill(LossTerm):
    """TinyVPR's online positive-negative contrastive distillation (only the abstract is public).

    In every P x K batch the frozen teacher's cosine similarities S_t and the student's S_s are compared on
    two pair sets: the positives (same place, i != j; "correct knowledge") and, per anchor, the ``hard_k``
    other-place images the teacher finds most similar (mined online; "confusing knowledge"):
        L = w_pos * mean_P (S_s - S_t)^2 + w_neg * mean_N (S_s - S_t)^2.
    Similarity matrices make student and teacher widths irrelevant; zero when the student reproduces the
    teacher's similarities.
    """

    needs_teacher = True

    def __init__(self, hard_k: int = 5, w_pos: float = 1.0, w_neg: float = 1.0) -> None:
        super().__init__()
        self.hard_k, self.w_pos, self.w_neg = hard_k, w_pos, w_neg

    def forward(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.teacher_desc is not None
        return self.loss(ctx.desc, ctx.teacher_desc, ctx.labels)

    def loss(self, desc: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        s, t = desc @ desc.T, teacher @ teacher.T
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos = (labels[:, None] == labels[None, :]) & ~eye
        hard = torch.zeros_like(pos).scatter_(1, hard_negatives(t.detach(), labels, self.hard_k), True)
        hard &= labels[:, None] != labels[None, :]
        d2 = (s - t) ** 2
        zero = desc.sum() * 0
        lp = d2[pos].mean() if pos.any() else zero
        ln = d2[hard].mean() if hard.any() else zero
        return self.w_pos * lp + self.w_neg * ln


class CrossAttentionAlign(LossTerm):
    """TinyVPR's cross-attention feature alignment (training only; not part of the exported student).

    Each frozen teacher token asks the student for its content: student tokens [B, Ns, Cs] are projected to the
    teacher's width (v = W s + b), teacher tokens [B, Nt, Ct] query them (single-head scaled dot product between
    LayerNorm'd teacher tokens and LayerNorm'd projected student tokens), and the attended student content must
    reconstruct the teacher token:
        L = mean_j (1 - cos(t_j, sum_i softmax_i(LN(t_j) . LN(v_i) / sqrt(Ct)) v_i)).
    Grids and token counts may differ (the attention finds the corresponding student tokens). The direction
    matters: an earlier form, in which projected student tokens attended over the teacher and were pulled towards
    the teacher mixture they picked, could be satisfied by the projector's bias alone (a constant query picks a
    constant mixture); here a projector that ignores the student returns one vector for every teacher token and
    cannot follow their variation (tests/test_tinyvpr.py: the bias-only control).
    """

    needs_teacher = True

    def __init__(self, student_width: int, teacher_width: int) -> None:
        super().__init__()
        self.proj = nn.Linear(student_width, teacher_width)
        self.key_norm = nn.LayerNorm(teacher_width)
        self.query_norm = nn.LayerNorm(teacher_width)

    def forward(self, ctx: StepContext) -> torch.Tensor:
        assert ctx.teacher_tokens is not None
        return self.loss(ctx.tokens.patches, ctx.teacher_tokens.patches)

    def loss(self, student: torch.Tensor, teacher: torch.Tensor) -> torch.Tensor:
        """student [B, Ns, Cs], teacher [B, Nt, Ct] -> scalar."""
        v = self.proj(student)  # [B, Ns, Ct]
        attn = torch.softmax(self.query_norm(teacher) @ self.key_norm(v).transpose(1, 2) / teacher.shape[-1] ** 0.5,
                             -1)  # [B, Nt, Ns]
        return (1 - F.cosine_similarity(attn @ v, teacher, dim=-1)).mean()


class ConfusionAwareMS(LossTerm):
    """TinyVPR's confusion-aware Multi-Similarity loss, with the MS miner's online hard-pair mining.

    Pairs are mined as the MS miner does (positive (i,p) kept if S_ip - eps < max_n S_in; negative (i,n) kept if
    S_in + eps > min_p S_ip), then per anchor
        L_i = 1/alpha log(1 + sum_p exp(-alpha (S_ip - base))) + 1/beta log(1 + sum_n c_in exp(beta (S_in - base)))
    with confusion weights c_in = 1 + gamma * max(0, T_in) on the negatives, T the teacher's cosine similarity
    (the student's own, detached, without a teacher): negatives the teacher also finds alike push harder.
    gamma = 0 is exactly Multi-Similarity (tested against pytorch-metric-learning); the mean runs over all
    anchors, those without mined pairs counting 0, as pytorch-metric-learning's MeanReducer does.
    """

    def __init__(self, alpha: float = 1.0, beta: float = 50.0, base: float = 0.0, epsilon: float = 0.1,
                 gamma: float = 1.0) -> None:
        super().__init__()
        self.alpha, self.beta, self.base, self.eps, self.gamma = alpha, beta, base, epsilon, gamma

    def forward(self, ctx: StepContext) -> torch.Tensor:
        return self.loss(ctx.desc, ctx.labels, ctx.teacher_desc)

    def loss(self, desc: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None = None) -> torch.Tensor:
        s = desc @ desc.T
        ref = (teacher @ teacher.T if teacher is not None else s).detach()
        eye = torch.eye(len(labels), dtype=torch.bool, device=labels.device)
        pos = (labels[:, None] == labels[None, :]) & ~eye
        neg = labels[:, None] != labels[None, :]
        sd = s.detach()
        max_neg = sd.masked_fill(~neg, float("-inf")).amax(1, keepdim=True)
        min_pos = sd.masked_fill(~pos, float("inf")).amin(1, keepdim=True)
        pos_m = pos & (sd - self.eps < max_neg)
        neg_m = neg & (sd + self.eps > min_pos)
        c = 1 + self.gamma * ref.clamp(min=0)
        pos_term = torch.log1p((torch.exp(-self.alpha * (s - self.base)) * pos_m).sum(1)) / self.alpha
        neg_term = torch.log1p((c * torch.exp(self.beta * (s - self.base)) * neg_m).sum(1)) / self.beta
        return (pos_term + neg_term).mean()


@LOSS_TERMS.register("posneg_distill")
def _posneg(ctx: TermContext, hard_k: int = 5, w_pos: float = 1.0, w_neg: float = 1.0) -> PosNegDistill:
    _needs(ctx, "posneg_distill")
    return PosNegDistill(hard_k, w_pos, w_neg)


@LOSS_TERMS.register("xattn_align")
def _xattn(ctx: TermContext) -> CrossAttentionAlign:
    return CrossAttentionAlign(ctx.student_width, _needs(ctx, "xattn_align")[0])


@LOSS_TERMS.register("confusion_ms")
def _confusion_ms(ctx: TermContext, **cfg) -> ConfusionAwareMS:
    return ConfusionAwareMS(**cfg)


@LOSS_TERMS.register("weitop_distill")
def _weitop(ctx: TermContext, temperature: float = 1.0) -> WeiToPDistill:
    if ctx.student is None:
        raise ValueError("loss term 'weitop_distill' is built with the student model")
    return WeiToPDistill(ctx.student, temperature)


@LOSS_TERMS.register("token_distill")
def _token_distill(ctx: TermContext, normalize: bool = False) -> TokenDistill:
    return TokenDistill(ctx.student_width, _needs(ctx, "token_distill")[0], normalize)


@LOSS_TERMS.register("descriptor_distill")
def _descriptor_distill(ctx: TermContext) -> DescriptorDistill:
    return DescriptorDistill(ctx.student_dim, _needs(ctx, "descriptor_distill")[1])


@LOSS_TERMS.register("similarity_distill")
def _similarity_distill(ctx: TermContext) -> SimilarityDistill:
    _needs(ctx, "similarity_distill")
    return SimilarityDistill()


def build_terms(specs: list[dict], ctx: TermContext) -> tuple[nn.ModuleDict, dict[str, float]]:
    """Config entries {name, weight=1, as=name, ...options} -> (terms by log name, weights by log name)."""
    terms, weights = nn.ModuleDict(), {}
    for spec in specs:
        spec = dict(spec)
        name = spec.pop("name")
        key = spec.pop("as", name)
        if key in terms:
            raise ValueError(f"loss term '{key}' is configured twice; give one an 'as: other_name'")
        weights[key] = float(spec.pop("weight", 1.0))
        builder: Callable[..., LossTerm] = LOSS_TERMS.get(name)
        terms[key] = builder(ctx, **spec)
    return terms, weights
