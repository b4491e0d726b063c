"""Sub-centre outlier removal (Sub-center ArcFace, ECCV 2020): clean a face dataset
with a head trained with K sub-centres per class.

For every class: each of its samples is assigned to its nearest sub-centre (largest
cosine); the *dominant* sub-centre is the one most samples are nearest to (ties: the
lowest index). A sample whose angle to its class's dominant sub-centre exceeds the
threshold (default 75 degrees, the paper's) is an outlier: a label-noise candidate.
The command writes the dataset without the outliers (labels unchanged, so the class
count and a head checkpoint stay valid; a class may end up empty) and a report.

Sharded: rank r handles the classes of ``class_range(C, r, W)`` (the head's
layout), loading only those rows of the head and embedding only the samples
labelled with them; per-class counts, the removed samples and the angle histogram
are combined on rank 0, which writes the outputs::

    torchrun --nproc_per_node=8 -m partial_fc.subcenter_cleaning \\
        --checkpoint-dir runs/r50/checkpoints --data /data/ms1mv3 --network r50 \\
        --output /data/ms1mv3_clean [--threshold-degrees 75]

Outputs in ``--output`` (each written to a temporary name, then renamed):
``train.rec``/``train.idx``/``property`` (face layout, kept samples in class order),
``report.json`` (settings, totals, per-class ``samples``/``removed``/``dominant``/
``dominant_share`` lists indexed by class id; ``dominant = -1`` for a class without
samples), ``removed.tsv`` (one line per outlier: index, record key, label, angle,
nearest sub-centre) and ``angles.png`` (histogram of every sample's angle to its
dominant sub-centre, threshold marked).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch.distributed import ProcessGroup

from datasets.atomic import write_bytes
from partial_fc.collectives import all_reduce_, rank_and_world_size
from partial_fc.sharding import class_range

EmbedFn = Callable[[torch.Tensor], torch.Tensor]
"""``images (n, 3, H, W) float in [-1, 1] -> embeddings (n, D)``."""

HISTOGRAM_BINS = 360  # half-degree bins over [0, 180]


# ----------------------------------------------------------------------------- head rows


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A complete trainer checkpoint: ``path`` itself (it holds ``meta.json``) or the
    newest complete ``step-*`` directory under it (or under ``path/checkpoints``)."""
    from trainer.checkpoint import CheckpointManager

    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = sorted(
            (p for p in root.glob("step-*") if CheckpointManager.is_complete(p)),
            key=lambda p: p.name,
        )
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"--checkpoint-dir {path}: no complete checkpoint (a directory with meta.json, or "
        "step-* directories under it or under its checkpoints/)"
    )


def checkpoint_head_layout(checkpoint: Path) -> tuple[int, int]:
    """``(num_classes, num_subcenters)`` of the head saved in a trainer checkpoint."""
    from trainer.checkpoint import CheckpointManager

    shards = CheckpointManager.read_meta(checkpoint)["shards"]
    return sum(int(s["num_local"]) for s in shards), int(shards[0]["K"])


def load_checkpoint_subcenters(
    checkpoint: Path, class_start: int, num_local: int, num_subcenters: int
) -> torch.Tensor:
    """Rows of classes ``[class_start, class_start + num_local)`` as ``(C_l, K, D)``,
    whatever world size saved the checkpoint (the trainer's resharding loader)."""
    from trainer.checkpoint import CheckpointManager

    state, _ = CheckpointManager.load_head_shard(checkpoint, class_start, num_local, num_subcenters)
    if "weight" not in state:
        raise KeyError(f"{checkpoint}: the head state has no 'weight' (keys: {sorted(state)})")
    return state["weight"].reshape(num_local, num_subcenters, -1)


def load_head_weights(path: str | os.PathLike, num_subcenters: int | None) -> torch.Tensor:
    """All centres from a ``.pt`` file, as ``(C, K, D)``.

    Accepted contents: a ``(C, K, D)`` tensor; a ``(C * K, D)`` tensor (K from
    ``num_subcenters``); or a dict with ``"weight"`` (either shape) and optionally
    ``"num_subcenters"`` (a head ``state_dict`` is such a dict).
    """
    obj = torch.load(path, map_location="cpu", weights_only=True)
    k = num_subcenters
    if isinstance(obj, dict):
        if "weight" not in obj:
            raise KeyError(f"--head-weights {path}: no 'weight' entry (keys: {sorted(obj)})")
        k = int(obj.get("num_subcenters", k) or 0) or k
        obj = obj["weight"]
    if not isinstance(obj, torch.Tensor):
        raise TypeError(f"--head-weights {path}: expected a tensor or a dict, got {type(obj)}")
    if obj.dim() == 3:
        return obj
    if obj.dim() != 2 or k is None or obj.shape[0] % k:
        raise ValueError(
            f"--head-weights {path}: a (C*K, D) weight of shape {tuple(obj.shape)} needs "
            f"--num-subcenters dividing {obj.shape[0]} (got {k})"
        )
    return obj.reshape(obj.shape[0] // k, k, obj.shape[1])


# ----------------------------------------------------------------------------- the rule


def assign_dominant(
    subcenters: torch.Tensor, embeddings: torch.Tensor, local_labels: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Dominant sub-centre per class and every sample's angle to it.

    Args:
        subcenters: ``(C_l, K, D)`` this rank's classes.
        embeddings: ``(n, D)`` samples of those classes.
        local_labels: ``(n,)`` int64 in ``[0, C_l)`` (label minus ``class_start``).

    Returns:
        dict with ``nearest (n,)`` sub-centre index, ``angle (n,)`` float64 degrees to
        the class's dominant sub-centre, ``dominant (C_l,)`` (-1: class without
        samples), ``samples (C_l,)``, ``dominant_votes (C_l,)``.
    """
    num_local, k, _ = subcenters.shape
    w = F.normalize(subcenters.double(), dim=2)
    x = F.normalize(embeddings.double(), dim=1)
    cos = torch.einsum("nd,nkd->nk", x, w[local_labels])  # (n, K)
    nearest = cos.argmax(dim=1)
    votes = torch.zeros(num_local, k, dtype=torch.int64)
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
    """``(len(indices), D)`` float32 embeddings of ``dataset[indices]`` (no flip)."""
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


# ----------------------------------------------------------------------------- writing


def write_face_rec(dataset: Any, order: np.ndarray, labels: np.ndarray, num_classes: int,
                   out_dir: Path) -> None:  # fmt: skip
    """Write samples ``order`` (sorted by label) in the face layout, keeping
    ``num_classes`` identity records even for classes left without samples."""
    from datasets.recordio import IndexedRecordIO, IRHeader, pack

    writer = IndexedRecordIO(out_dir / "train.idx", out_dir / "train.rec", "w")
    try:
        firsts = np.zeros(num_classes, np.int64)
        ends = np.zeros(num_classes, np.int64)
        key = 1
        for i in order.tolist():
            payload, label, _ = dataset._load(i)
            label = int(label)
            if label != int(labels[i]):
                raise ValueError(f"sample {i}: label {label} differs from the scanned {labels[i]}")
            if ends[label] == 0:
                firsts[label] = key
            ends[label] = key + 1
            writer.write_idx(key, pack(IRHeader(0, float(label), key, 0), bytes(payload)))
            key += 1
        n = key - 1
        writer.write_idx(0, pack(IRHeader(0, [n + 1, n + 1 + num_classes], 0, 1), b""))
        next_first = 1
        for c in range(num_classes):  # empty classes get [k, k) at their position
            first, end = (firsts[c], ends[c]) if ends[c] else (next_first, next_first)
            writer.write_idx(n + 1 + c, pack(IRHeader(0, [float(first), float(end)], n + 1 + c, 0),
                                             b""))  # fmt: skip
            next_first = end
    except BaseException:
        writer.abort()
        raise
    writer.close()
    write_bytes(out_dir / "property", f"{num_classes},112,112\n".encode())


def plot_histogram(counts: np.ndarray, threshold: float, path: Path) -> None:
    """PNG bar chart of the angle histogram (``HISTOGRAM_BINS`` bins over [0, 180])."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    edges = np.linspace(0.0, 180.0, len(counts) + 1)
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.bar(edges[:-1], counts, width=np.diff(edges), align="edge", color="tab:blue")
        ax.axvline(threshold, color="tab:red", linestyle="--", label=f"threshold {threshold:g}°")
        ax.set_xlabel("angle to the class's dominant sub-centre (degrees)")
        ax.set_ylabel("samples")
        ax.set_yscale("symlog", linthresh=1)
        ax.set_xlim(0, 180)
        ax.legend()
        fig.tight_layout()
        fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".png", dir=path.parent)
        os.close(fd)
        try:
            fig.savefig(tmp, format="png", dpi=100)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise
    finally:
        plt.close(fig)


# ----------------------------------------------------------------------------- driver


def clean_dataset(
    dataset: Any,
    subcenters: torch.Tensor,
    num_classes: int,
    embed_fn: EmbedFn,
    output_dir: str | os.PathLike,
    threshold_degrees: float = 75.0,
    group: ProcessGroup | None = None,
    batch_size: int = 256,
    num_workers: int = 0,
    labels: np.ndarray | None = None,
) -> dict[str, Any]:
    """Find the outliers of this rank's classes, combine on rank 0, write the outputs.

    A collective call when a process group spans several ranks.

    Args:
        dataset: a :class:`datasets.dataset.FaceDataset` opened with ``flip=False``.
        subcenters: ``(C_l, K, D)`` this rank's rows, classes
            ``class_range(num_classes, rank, world_size)``.
        num_classes: C, must equal ``dataset.num_classes``.
        embed_fn: the backbone (see :data:`EmbedFn`), in eval mode.
        output_dir: created if needed; written by rank 0.
        labels: every sample's label (default :func:`datasets.pk_sampler.dataset_labels`).

    Returns:
        the report (on every rank; the files are written by rank 0 only).
    """
    from datasets.pk_sampler import dataset_labels

    rank, world_size = rank_and_world_size(group)
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
    labels = dataset_labels(dataset) if labels is None else np.asarray(labels, np.int64)
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
    result = assign_dominant(subcenters, emb, local_labels)
    angle = result["angle"].numpy()
    outlier = angle > threshold_degrees
    removed_local = np.bincount(local_labels.numpy()[outlier], minlength=num_local)
    hist = torch.from_numpy(
        np.histogram(angle, bins=HISTOGRAM_BINS, range=(0.0, 180.0))[0].astype(np.int64)
    )
    all_reduce_(hist, dist.ReduceOp.SUM, group)
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
    parts = [part]
    if world_size > 1:
        parts = [None] * world_size
        dist.all_gather_object(parts, part, group=group)
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
    if rank == 0:
        _write_outputs(dataset, labels, outliers, report, Path(output_dir))
    if world_size > 1:
        dist.barrier(group=group)
    return report


def _write_outputs(
    dataset: Any,
    labels: np.ndarray,
    outliers: list[tuple[int, int, float, int]],
    report: dict[str, Any],
    out: Path,
) -> None:
    out.mkdir(parents=True, exist_ok=True)
    keep = np.ones(len(labels), bool)
    keep[[o[0] for o in outliers]] = False
    order = np.flatnonzero(keep)
    order = order[np.argsort(labels[order], kind="stable")]
    write_face_rec(dataset, order, labels, report["num_classes"], out)
    keys = getattr(dataset, "image_keys", None)
    lines = ["index\tkey\tlabel\tangle_degrees\tnearest_subcenter"]
    for i, label, angle, nearest in outliers:
        key = int(keys[i]) if keys is not None else -1
        lines.append(f"{i}\t{key}\t{label}\t{angle:.3f}\t{nearest}")
    write_bytes(out / "removed.tsv", ("\n".join(lines) + "\n").encode())
    counts = np.asarray(report["angle_histogram"]["counts"])
    plot_histogram(counts, report["threshold_degrees"], out / "angles.png")
    write_bytes(out / "report.json", (json.dumps(report) + "\n").encode())


# ----------------------------------------------------------------------------- command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m partial_fc.subcenter_cleaning",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    head = p.add_mutually_exclusive_group(required=True)
    head.add_argument(
        "--checkpoint-dir",
        help="trainer checkpoint (step-* dir, or a dir holding them / checkpoints/); gives "
        "the head shards and, unless --backbone-checkpoint is given, the backbone",
    )
    head.add_argument("--head-weights", help=".pt with the centres: (C, K, D), (C*K, D), or a "
                      "dict with 'weight' [and 'num_subcenters']")  # fmt: skip
    p.add_argument("--num-subcenters", type=int, default=None, help="K for a (C*K, D) weight")
    p.add_argument("--data", required=True, help="training data (dir with train.rec, .rec, ...)")
    p.add_argument("--network", required=True, help="backbone name (backbones.get_model)")
    p.add_argument("--embedding-size", type=int, default=None, help="default: the head's D")
    p.add_argument(
        "--model-kwargs",
        default="{}",
        help="JSON object of extra backbone arguments (the run's model.kwargs)",
    )
    p.add_argument(
        "--backbone-checkpoint",
        default=None,
        help="backbone weights: a state_dict .pt or a trainer.pt (its 'backbone' entry)",
    )
    p.add_argument("--output", required=True, help="directory for the cleaned data and report")
    p.add_argument("--threshold-degrees", type=float, default=75.0)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--num-workers", type=int, default=2)
    p.add_argument("--device", default=None, help="default: cuda:LOCAL_RANK if available, else cpu")
    return p


def _load_backbone_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"--backbone-checkpoint {path} does not exist")
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "backbone" in state and isinstance(state["backbone"], dict):
        state = state["backbone"]
    if not isinstance(state, dict):
        raise TypeError(f"{path}: expected a state_dict or a dict with 'backbone'")
    return {k.removeprefix("module."): v for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    from backbones import get_model
    from datasets.dataset import open_dataset

    started_group = False
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
        started_group = True
    try:
        rank, world_size = rank_and_world_size(None)
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        device = torch.device(
            args.device or (f"cuda:{local_rank}" if torch.cuda.is_available() else "cpu")
        )
        backbone_path = args.backbone_checkpoint
        if args.checkpoint_dir:
            checkpoint = find_checkpoint(args.checkpoint_dir)
            num_classes, k = checkpoint_head_layout(checkpoint)
            start, count = class_range(num_classes, rank, world_size)
            subcenters = load_checkpoint_subcenters(checkpoint, start, count, k)
            backbone_path = backbone_path or str(checkpoint / "trainer.pt")
        else:
            if not backbone_path:
                raise ValueError("--head-weights needs --backbone-checkpoint")
            every = load_head_weights(args.head_weights, args.num_subcenters)
            num_classes = every.shape[0]
            start, count = class_range(num_classes, rank, world_size)
            subcenters = every[start : start + count].clone()
            del every
        dim = args.embedding_size or subcenters.shape[2]
        try:
            model_kwargs = json.loads(args.model_kwargs)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--model-kwargs is not valid JSON: {exc}") from None
        if not isinstance(model_kwargs, dict):
            raise ValueError(f"--model-kwargs must be a JSON object, got {args.model_kwargs!r}")
        backbone = get_model(args.network, embedding_size=dim, **model_kwargs)
        backbone.load_state_dict(_load_backbone_state(Path(backbone_path)))
        backbone.to(device).eval()

        def embed(images: torch.Tensor) -> torch.Tensor:
            return backbone(images.to(device))

        dataset = open_dataset(args.data, flip=False)
        report = clean_dataset(
            dataset,
            subcenters,
            num_classes,
            embed,
            args.output,
            args.threshold_degrees,
            batch_size=args.batch_size,
            num_workers=args.num_workers,
        )
        if rank == 0:
            pct = 100.0 * report["num_removed"] / max(report["num_samples"], 1)
            print(
                f"removed {report['num_removed']} of {report['num_samples']} samples "
                f"({pct:.2f}%) from {report['classes_with_removals']} classes; "
                f"{report['classes_without_samples']} classes had no samples; wrote {args.output}"
            )
    finally:
        if started_group:
            dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main())
