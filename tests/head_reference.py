"""A plain single-process dense margin-softmax, written independently of
``partial_fc``: full logits, per-sample Python control flow for the margin
branches, ``F.cross_entropy`` and autograd. Tests compare the sharded head with it."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass
class MarginSpec:
    """Margin parameters of the reference: scalars or per-class lists."""

    scale: float = 64.0
    m1: float | list[float] = 1.0
    m2: float | list[float] = 0.5
    m3: float | list[float] = 0.0
    easy_margin: bool = False
    straight_through: bool = False
    sphere_lambda: float = 0.0  # A-Softmax: (lam * cos + psi) / (1 + lam)

    def value(self, name: str, cls: int) -> float:
        v = getattr(self, name)
        return float(v[cls]) if isinstance(v, list) else float(v)


def target_phi(c: torch.Tensor, cls: int, spec: MarginSpec) -> torch.Tensor:
    """cos(m1*theta + m2) with the fallbacks, for one 0-dim cosine ``c``."""
    m1, m2 = spec.value("m1", cls), spec.value("m2", cls)
    theta = torch.acos(c)
    u = m1 * theta + m2
    if spec.easy_margin and c.item() <= 0:
        phi = c
    elif m1 == 1.0:
        if m2 > 0 and c.item() <= math.cos(math.pi - m2):
            phi = c - m2 * math.sin(m2)
        else:
            phi = torch.cos(u)
    else:
        k = max(0, math.floor(u.item() / math.pi))
        phi = (-1) ** k * torch.cos(u) - 2 * k
    if spec.sphere_lambda:
        lam = spec.sphere_lambda
        phi = (lam * c + phi) / (1 + lam)
    return phi


def dense_loss(
    embeddings: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    spec: MarginSpec,
    num_subcenters: int = 1,
    ignore_index: int | None = None,
    classes: torch.Tensor | None = None,
    filter_threshold: float | None = None,
    filter_mode: str = "remove",
) -> tuple[torch.Tensor, torch.Tensor]:
    """Loss and per-sample top-1 correctness over ``classes`` (default: all).

    ``weight`` is ``(C*K, D)`` in the head's layout (row c*K + k); ``labels`` hold
    global class ids. With ``classes`` given, only those classes form the softmax
    (the Partial-FC subset), and labels must all be among them. With
    ``filter_threshold``, negatives whose cosine exceeds it become a constant
    logit: -inf ("remove") or 0 ("zero").
    """
    k = num_subcenters
    num_classes = weight.shape[0] // k
    cos = F.normalize(embeddings, dim=1) @ F.normalize(weight, dim=1).t()
    cos = cos.view(embeddings.shape[0], num_classes, k).max(dim=2).values
    keep = torch.ones(labels.shape[0], dtype=torch.bool)
    if ignore_index is not None:
        keep = labels != ignore_index
    rows = []
    for i in range(labels.shape[0]):
        row = spec.scale * cos[i]
        if filter_threshold is not None:
            conflict = [
                j != int(labels[i]) and cos[i, j].item() > filter_threshold
                for j in range(num_classes)
            ]
            constant = torch.tensor(float("-inf") if filter_mode == "remove" else 0.0)
            row = torch.stack([constant if conflict[j] else row[j] for j in range(num_classes)])
        if keep[i]:
            y = int(labels[i])
            exact = spec.scale * (target_phi(cos[i, y], y, spec) - spec.value("m3", y))
            if spec.straight_through:
                exact = row[y] + (exact - row[y]).detach()
            row = torch.cat([row[:y], exact.view(1), row[y + 1 :]])
        rows.append(row)
    logits = torch.stack(rows)
    targets = labels.clone()
    if classes is not None:
        logits, cos = logits[:, classes], cos[:, classes]
        position = {int(c): j for j, c in enumerate(classes)}
        targets = torch.tensor([position.get(int(y), -100) for y in labels])
    targets = torch.where(keep, targets, torch.full_like(targets, -100))
    loss = F.cross_entropy(logits, targets, ignore_index=-100)
    correct = torch.zeros_like(keep)
    for i in range(labels.shape[0]):
        if keep[i]:
            correct[i] = cos[i, targets[i]] >= cos[i].max()
    return loss, correct
