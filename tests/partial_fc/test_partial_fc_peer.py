"""Peer check: pytorch-metric-learning's ArcFace, CosFace and SubCenterArcFace
losses give the same loss as the head on the same weights (one rank).

Conventions bridged here: PML takes margins in degrees (ArcFace) and stores
``W`` as ``(D, C)`` (sub-centres: ``(D, C*K)`` with column ``c*K + k``); the
head stores ``(C*K, D)`` with row ``c*K + k``.
"""

from __future__ import annotations

import math

import pytest
import torch

from partial_fc import ArcFace, CosFace, PartialFC

losses = pytest.importorskip("pytorch_metric_learning.losses")

NUM_CLASSES, DIM, BATCH = 23, 12, 40


def _data(k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(11 + k)
    weight = torch.randn(NUM_CLASSES * k, DIM, generator=g, dtype=torch.float64)
    labels = torch.randint(0, NUM_CLASSES, (BATCH,), generator=g)
    # Mix of near, unrelated and opposite embeddings: exercises the arc fallback too.
    pull = torch.tensor([1.0, 0.0, -1.0, 0.5])[torch.arange(BATCH) % 4].double()
    centre = torch.nn.functional.normalize(weight[labels * k], dim=1)
    embeddings = pull[:, None] * centre + 0.3 * torch.randn(BATCH, DIM, generator=g).double()
    return embeddings, labels, weight


def _head_loss(margin, k: int, embeddings, labels, weight) -> torch.Tensor:
    head = PartialFC(NUM_CLASSES, DIM, margin, num_subcenters=k, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
    return head(embeddings, labels).detach()


def _peer_loss(peer, embeddings, labels, weight) -> torch.Tensor:
    peer = peer.double()
    with torch.no_grad():
        peer.W.copy_(weight.t())
    return peer(embeddings, labels).detach()


def test_arcface_matches_pytorch_metric_learning() -> None:
    embeddings, labels, weight = _data(1)
    ours = _head_loss(ArcFace(64.0, 0.5), 1, embeddings, labels, weight)
    peer = losses.ArcFaceLoss(NUM_CLASSES, DIM, margin=math.degrees(0.5), scale=64)
    torch.testing.assert_close(ours, _peer_loss(peer, embeddings, labels, weight))


def test_cosface_matches_pytorch_metric_learning() -> None:
    embeddings, labels, weight = _data(1)
    ours = _head_loss(CosFace(64.0, 0.35), 1, embeddings, labels, weight)
    peer = losses.CosFaceLoss(NUM_CLASSES, DIM, margin=0.35, scale=64)
    torch.testing.assert_close(ours, _peer_loss(peer, embeddings, labels, weight))


def test_subcenter_arcface_matches_pytorch_metric_learning() -> None:
    embeddings, labels, weight = _data(3)
    ours = _head_loss(ArcFace(64.0, 0.5), 3, embeddings, labels, weight)
    peer = losses.SubCenterArcFaceLoss(
        num_classes=NUM_CLASSES, embedding_size=DIM, margin=math.degrees(0.5), scale=64,
        sub_centers=3,
    )  # fmt: skip
    torch.testing.assert_close(ours, _peer_loss(peer, embeddings, labels, weight))
