"""Sub-centre outlier removal over a dataset: the library of the
``tools.subcenter_cleaning`` command (see it for the inputs and the outputs), which
imports it after parsing its arguments so that ``--help`` stays fast. The rule and the
sharded search are :mod:`partial_fc.subcenter_cleaning`'s; here: the head rows from a
checkpoint or a ``.pt`` (:func:`load_checkpoint_subcenters`, :func:`load_head_weights`),
and :func:`clean_dataset` (the cleaned face layout, ``report.json``, ``removed.tsv``,
``angles.png``)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from common.atomic import atomic_open, write_json, write_text
from common.dist import rank_and_world_size
from datasets.face_layout import FaceRecWriter
from partial_fc.subcenter_cleaning import EmbedFn, Outlier, find_outliers
from trainer.checkpoint import CheckpointDir, CheckpointStorage

# ----------------------------------------------------------------------------- head rows


def find_checkpoint(path: str | os.PathLike) -> Path:
    """A complete trainer checkpoint: ``path`` itself (it holds ``meta.json``) or the
    newest complete ``step-*`` directory under it (or under ``path/checkpoints``)."""
    path = Path(path)
    if (path / "meta.json").is_file():
        return path
    for root in (path, path / "checkpoints"):
        found = CheckpointStorage(root).complete()
        if found:
            return found[-1]
    raise FileNotFoundError(
        f"--checkpoint-dir {path}: no complete checkpoint (a directory with meta.json, or "
        "step-* directories under it or under its checkpoints/)"
    )


def _open(checkpoint: Path) -> CheckpointDir:
    """The complete checkpoint at ``checkpoint`` (``FileNotFoundError`` otherwise)."""
    found = CheckpointStorage(checkpoint.parent).open(checkpoint)
    if found.problem is not None:
        raise FileNotFoundError(f"{checkpoint} is not a complete checkpoint: {found.problem}")
    return found


def checkpoint_head_layout(checkpoint: Path) -> tuple[int, int]:
    """``(num_classes, num_subcenters)`` of the head saved in a trainer checkpoint."""
    shards = _open(checkpoint).shard_infos("head")
    return sum(int(s["num_local"]) for s in shards), int(shards[0]["K"])


def load_checkpoint_subcenters(
    checkpoint: Path, class_start: int, num_local: int, num_subcenters: int
) -> torch.Tensor:
    """Rows of classes ``[class_start, class_start + num_local)`` as ``(C_l, K, D)``,
    whatever world size saved the checkpoint (the trainer's resharding loader)."""
    storage = CheckpointStorage(checkpoint.parent)
    state, _ = storage.load_head_shard(_open(checkpoint), class_start, num_local, num_subcenters)
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


# ----------------------------------------------------------------------------- writing


def write_face_rec(dataset: Any, order: np.ndarray, labels: np.ndarray, num_classes: int,
                   out_dir: Path) -> None:  # fmt: skip
    """Write samples ``order`` (sorted by label) in the face layout, keeping
    ``num_classes`` identity records even for classes left without samples."""
    writer = FaceRecWriter(out_dir, num_classes=num_classes)
    try:
        for i in order.tolist():
            payload, label, _ = dataset._load(i)
            if int(label) != int(labels[i]):
                raise ValueError(f"sample {i}: label {label} differs from the scanned {labels[i]}")
            writer.add(int(label), bytes(payload))
        writer.close()
    except BaseException:
        writer.abort()
        raise


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
        with atomic_open(path, "wb") as f:
            fig.savefig(f, format="png", dpi=100)
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
    device: torch.device | str | None = None,
) -> dict[str, Any]:
    """:func:`partial_fc.subcenter_cleaning.find_outliers`, then rank 0 writes the outputs.

    A collective call when a process group spans several ranks; the arguments are
    those of ``find_outliers`` (``labels``: default ``dataset.labels()``; ``device``:
    where its collectives run, default the device of ``subcenters``) plus ``output_dir``
    (created if needed).

    Returns:
        the report (on every rank; the files are written by rank 0 only).
    """
    if labels is None:
        labels = dataset.labels()  # a bad label raises DataError naming its record
    found = find_outliers(
        dataset, labels, subcenters, num_classes, embed_fn, threshold_degrees, group,
        batch_size, num_workers, device,
    )  # fmt: skip
    rank, world_size = rank_and_world_size(group)
    if rank == 0:
        _write_outputs(dataset, found.labels, found.outliers, found.report, Path(output_dir))
    if world_size > 1:
        dist.barrier(group=group)  # the outputs are complete when any rank returns
    return found.report


def _write_outputs(
    dataset: Any,
    labels: np.ndarray,
    outliers: list[Outlier],
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
    write_text(out / "removed.tsv", "\n".join(lines) + "\n")
    counts = np.asarray(report["angle_histogram"]["counts"])
    plot_histogram(counts, report["threshold_degrees"], out / "angles.png")
    write_json(out / "report.json", report, indent=None, sort_keys=False)
