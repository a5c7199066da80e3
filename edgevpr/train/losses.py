"""Loss terms. The VPR metric loss is Multi-Similarity with the MS miner (pytorch-metric-learning) at the
VPR settings used by GSV-Cities, MixVPR, SALAD, BoQ and EfficientVPR: alpha=1, beta=50, base=0,
miner epsilon=0.1 (the library defaults alpha=2, base=0.5 differ). Extra terms (distillation,
alignment, self-distillation) are not wired into the loop yet.
"""

from __future__ import annotations

import torch
from torch import nn


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

