"""Sub-centre outlier removal (Sub-center ArcFace, ECCV 2020): find the label-noise
candidates of a face dataset with a head trained with K sub-centres per class.

For every class: each of its samples is assigned to its nearest sub-centre (largest
cosine); the *dominant* sub-centre is the one most samples are nearest to (ties: the
lowest index). A sample whose angle to its class's dominant sub-centre exceeds the
threshold (default 75 degrees, the paper's) is an outlier: a label-noise candidate.

Sharded: rank r handles the classes of ``class_range(C, r, W)`` (the head's
layout) and embeds only the samples labelled with them; the angle histogram is
all-reduced and the per-class counts and removed samples gathered, so every rank
gets the whole result (:func:`find_outliers`). The collectives run on tensors of the
``device`` passed in (``cuda:LOCAL_RANK`` under NCCL).

This module is the library part (no files, no process group set-up); the command
that loads a checkpoint and writes the cleaned dataset is ``tools.subcenter_cleaning``::

    torchrun --nproc_per_node=8 -m tools.subcenter_cleaning \\
        --checkpoint-dir runs/r50/checkpoints --data /data/ms1mv3 --network r50 \\
        --output /data/ms1mv3_clean [--threshold-degrees 75]
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from common.dist import rank_and_world_size
from partial_fc.collectives import all_reduce_
from partial_fc.sharding import class_range

EmbedFn = Callable[[torch.Tensor], torch.Tensor]
"""``images (n, 3, H, W) float in [-1, 1] -> embeddings (n, D)``."""

HISTOGRAM_BINS = 360  # half-degree bins over [0, 180]

Outlier = tuple[int, int, float, int]
"""``(sample index, label, angle in degrees, nearest sub-centre)``."""


# ----------------------------------------------------------------------------- the rule


def assign_dominant(
    subcenters: torch.Tensor, embeddings: torch.Tensor, local_labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Dominant sub-centre per class and every sample's angle to it.

    Runs on the device of ``subcenters`` (the other inputs are moved there).

    Args:
        subcenters: ``(C_l, K, D)`` this rank's classes.
        embeddings: ``(n, D)`` samples of those classes.
        local_labels: ``(n,)`` int64 in ``[0, C_l)`` (label minus ``class_start``).

    Returns:
        dict with ``nearest (n,)`` sub-centre index, ``angle (n,)`` float64 degrees to
        the class's dominant sub-centre, ``dominant (C_l,)`` (-1: class without
        samples), ``samples (C_l,)``, ``dominant_votes (C_l,)``, all on that device.
    """
    num_local, k, _ = subcenters.shape
    device = subcenters.device
    local_labels = local_labels.to(device)
    w = F.normalize(subcenters.double(), dim=2)
    x = F.normalize(embeddings.to(device).double(), dim=1)
    cos = torch.einsum("nd,nkd->nk", x, w[local_labels])  # (n, K)
    nearest = cos.argmax(dim=1)
    votes = torch.zeros(num_local, k, dtype=torch.int64, device=device)
    votes.index_put_((local_labels, nearest), torch.ones_like(nearest), accumulate=True)
    samples = votes.sum(dim=1)
    dominant = torch.where(samples > 0, votes.argmax(dim=1), torch.full_like(samples, -1))
    own = cos.gather(1, dominant[local_labels].clamp(min=0)[:, None]).squeeze(1)
    angle = torch.rad2deg(torch.arccos(own.clamp(-1.0, 1.0)))
    return {
        "nearest": nearest,
        "angle": angle,
        "dominant": dominant,
        "samples": samples,
        "dominant_votes": votes.max(dim=1).values,
    }


# ----------------------------------------------------------------------------- embedding


def embed_samples(
    dataset: Any, indices: np.ndarray, embed_fn: EmbedFn, batch_size: int, num_workers: int
) -> torch.Tensor:
    """``(len(indices), D)`` float32 embeddings of ``dataset[indices]`` (no flip), on CPU."""
    from torch.utils.data import DataLoader, Subset

    if len(indices) == 0:
        return torch.zeros(0, 0)
    loader = DataLoader(
        Subset(dataset, indices.tolist()),
        batch_size=batch_size,
        num_workers=num_workers,
        shuffle=False,
    )
    out = []
    with torch.no_grad():
        for images, _ in loader:
            out.append(embed_fn(images).float().cpu())
    return torch.cat(out)


# ----------------------------------------------------------------------------- sharded search


@dataclass
class CleaningResult:
    """What :func:`find_outliers` returns, identical on every rank.

    Attributes:
        report: settings, totals, ``angle_histogram`` and ``per_class`` lists indexed by
            class id (``samples``, ``removed``, ``dominant`` (-1: no samples),
            ``dominant_share``); JSON-serialisable.
        outliers: every removed sample as an :data:`Outlier`, sorted by index.
        labels: every sample's label, ``(N,)`` int64.
    """

    report: dict[str, Any]
    outliers: list[Outlier]
    labels: np.ndarray


def combine_shards(
    histogram: np.ndarray,
    part: dict[str, Any],
    device: torch.device | str,
    group: ProcessGroup | None = None,
) -> tuple[np.ndarray, list[dict[str, Any]]]:
    """Sum the ranks' angle histograms and gather their per-class parts.

    The histogram is all-reduced as a tensor on ``device``, which must be one the
    group's backend accepts (``cuda:LOCAL_RANK`` under NCCL, with that device made
    current for the object gather; ``cpu`` under gloo). One rank: no collective.

    Returns:
        the summed histogram and every rank's ``part``, in rank order.
    """
    _, world_size = rank_and_world_size(group)
    hist = torch.as_tensor(histogram, dtype=torch.int64).to(device)
    all_reduce_(hist, dist.ReduceOp.SUM, group)
    parts: list[Any] = [part]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, part, group=group)
    return hist.cpu().numpy(), parts


def find_outliers(
    dataset: Any,
    labels: np.ndarray,
    subcenters: torch.Tensor,
    num_classes: int,
    embed_fn: EmbedFn,
    threshold_degrees: float = 75.0,
    group: ProcessGroup | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device | str | None = None,
) -> CleaningResult:
    """Find the outliers of this rank's classes and combine every rank's findings.

    A collective call when a process group spans several ranks.

    Args:
        dataset: a :class:`datasets.dataset.FaceDataset` opened with ``flip=False``.
        labels: every sample's label, ``(N,)`` (its ``labels()``).
        subcenters: ``(C_l, K, D)`` this rank's rows, classes
            ``class_range(num_classes, rank, world_size)``.
        num_classes: C, must equal ``dataset.num_classes``.
        embed_fn: the backbone (see :data:`EmbedFn`), in eval mode.
        threshold_degrees: samples farther than this from their class's dominant
            sub-centre are outliers.
        group: process group (``None``: the default group, if any).
        device: where the assignment and the collectives run; default the device of
            ``subcenters``. Under NCCL this must be the rank's CUDA device.

    Returns:
        the combined :class:`CleaningResult`, the same on every rank.
    """
    rank, world_size = rank_and_world_size(group)
    device = torch.device(device) if device is not None else subcenters.device
    class_start, num_local = class_range(num_classes, rank, world_size)
    if subcenters.dim() != 3 or subcenters.shape[0] != num_local:
        raise ValueError(
            f"rank {rank} owns {num_local} classes from {class_start}; expected sub-centres "
            f"(num_local, K, D), got {tuple(subcenters.shape)}"
        )
    if int(dataset.num_classes) != num_classes:
        raise ValueError(f"the head has {num_classes} classes, the dataset {dataset.num_classes}")
    if not 0.0 < threshold_degrees < 180.0:
        raise ValueError(f"--threshold-degrees must be in (0, 180), got {threshold_degrees}")
    labels = np.asarray(labels, np.int64)
    if labels.shape != (len(dataset),):
        raise ValueError(f"{labels.shape} labels for a dataset of {len(dataset)} samples")
    mine = np.flatnonzero((labels >= class_start) & (labels < class_start + num_local))
    emb = embed_samples(dataset, mine, embed_fn, batch_size, num_workers)
    if len(mine) == 0:
        emb = torch.zeros(0, subcenters.shape[2])
    if emb.shape[1] != subcenters.shape[2]:
        raise ValueError(
            f"the backbone gives {emb.shape[1]}-d embeddings, the head has "
            f"{subcenters.shape[2]}-d centres"
        )
    local_labels = torch.from_numpy(labels[mine] - class_start)
    result = {
        k: v.cpu() for k, v in assign_dominant(subcenters.to(device), emb, local_labels).items()
    }
    angle = result["angle"].numpy()
    outlier = angle > threshold_degrees
    removed_local = np.bincount(local_labels.numpy()[outlier], minlength=num_local)
    hist_local = np.histogram(angle, bins=HISTOGRAM_BINS, range=(0.0, 180.0))[0]
    part = {
        "class_start": class_start,
        "samples": result["samples"].tolist(),
        "removed": removed_local.tolist(),
        "dominant": result["dominant"].tolist(),
        "dominant_votes": result["dominant_votes"].tolist(),
        "outliers": [
            (int(i), int(labels[i]), float(a), int(n))
            for i, a, n in zip(
                mine[outlier], angle[outlier], result["nearest"].numpy()[outlier], strict=True
            )
        ],
    }
    hist, parts = combine_shards(hist_local, part, device, group)
    parts.sort(key=lambda p: p["class_start"])
    samples = [v for p in parts for v in p["samples"]]
    removed = [v for p in parts for v in p["removed"]]
    dominant = [v for p in parts for v in p["dominant"]]
    votes = [v for p in parts for v in p["dominant_votes"]]
    outliers = sorted(o for p in parts for o in p["outliers"])
    num_removed = len(outliers)
    report = {
        "threshold_degrees": threshold_degrees,
        "num_classes": num_classes,
        "num_subcenters": int(subcenters.shape[1]),
        "world_size": world_size,
        "num_samples": len(labels),
        "num_removed": num_removed,
        "num_kept": len(labels) - num_removed,
        "classes_without_samples": sum(1 for s in samples if s == 0),
        "classes_emptied": sum(1 for s, r in zip(samples, removed, strict=True) if s and s == r),
        "classes_with_removals": sum(1 for r in removed if r),
        "angle_histogram": {"range": [0.0, 180.0], "counts": hist.tolist()},
        "per_class": {
            "samples": samples,
            "removed": removed,
            "dominant": dominant,
            "dominant_share": [
                round(v / s, 6) if s else None for v, s in zip(votes, samples, strict=True)
            ],
        },
    }
    return CleaningResult(report, outliers, labels)
