"""Sub-centre outlier removal, the command: clean a face dataset with a head trained
with K sub-centres per class (Sub-center ArcFace, ECCV 2020).

The rule and the sharded search are :mod:`partial_fc.subcenter_cleaning`; this
command loads the head rows (a trainer checkpoint, any saving world size, or a
``.pt`` of centres) and the backbone, joins the torchrun job through
:func:`common.dist.init_distributed` (``nccl`` on ``cuda:LOCAL_RANK`` when
CUDA is available, ``gloo`` on CPU; ``--device`` overrides), and rank 0 writes the
dataset without the outliers (labels unchanged, so the class count and a head
checkpoint stay valid; a class may end up empty) and a report::

    torchrun --nproc_per_node=8 -m tools.subcenter_cleaning \\
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
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.distributed import ProcessGroup

from common.atomic import atomic_open, write_json, write_text
from common.dist import distributed_command, rank_and_world_size
from common.errors import UsageError
from datasets.face_layout import FaceRecWriter
from partial_fc.sharding import class_range
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


# ----------------------------------------------------------------------------- command


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m tools.subcenter_cleaning",
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
    p.add_argument(
        "--device",
        default=None,
        help="default: cuda:LOCAL_RANK if available, else cpu ('cuda' means cuda:LOCAL_RANK)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (errors raise)."""
    args = _parser().parse_args(argv)
    from backbones import get_model, load_backbone_weights
    from datasets.discovery import open_dataset

    with distributed_command(args.device) as ctx:
        rank, world_size, device = ctx.rank, ctx.world_size, ctx.device
        if ctx.is_main:
            print(ctx.describe(), file=sys.stderr, flush=True)
        backbone_path = args.backbone_checkpoint
        if args.checkpoint_dir:
            checkpoint = find_checkpoint(args.checkpoint_dir)
            num_classes, k = checkpoint_head_layout(checkpoint)
            start, count = class_range(num_classes, rank, world_size)
            subcenters = load_checkpoint_subcenters(checkpoint, start, count, k)
            backbone_path = backbone_path or str(checkpoint / "trainer.pt")
        else:
            if not backbone_path:
                raise UsageError("--head-weights needs --backbone-checkpoint")
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
        load_backbone_weights(backbone, backbone_path)
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
            device=device,  # the collectives' tensors: cuda:LOCAL_RANK under NCCL
        )
        if rank == 0:
            pct = 100.0 * report["num_removed"] / max(report["num_samples"], 1)
            print(
                f"removed {report['num_removed']} of {report['num_samples']} samples "
                f"({pct:.2f}%) from {report['classes_with_removals']} classes; "
                f"{report['classes_without_samples']} classes had no samples; wrote {args.output}"
            )
    return 0


if __name__ == "__main__":
    from common.cli import run_main

    sys.exit(run_main(main, prog="tools.subcenter_cleaning"))
