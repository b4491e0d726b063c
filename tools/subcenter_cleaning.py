"""Sub-centre outlier removal, the command: clean a face dataset with a head trained
with K sub-centres per class (Sub-center ArcFace, ECCV 2020).

The rule and the sharded search are :mod:`partial_fc.subcenter_cleaning`, the rest of
the work :mod:`tools.cleaning`'s; this command loads the head rows (a trainer
checkpoint, any saving world size, or a ``.pt`` of centres) and the backbone, joins the
torchrun job through :func:`common.dist.init_distributed` (``nccl`` on
``cuda:LOCAL_RANK`` when CUDA is available, ``gloo`` on CPU; ``--device`` overrides),
and rank 0 writes the dataset without the outliers (labels unchanged, so the class count
and a head checkpoint stay valid; a class may end up empty) and a report::

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
import sys

from common.cli import run_main
from common.errors import UsageError

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
    p.add_argument("--network", required=True, help="backbone name (backbones.registry.get_model)")
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
    p.add_argument(
        "--threshold-degrees", type=float, default=75.0, help="outlier: farther than this"
    )
    p.add_argument("--batch-size", type=int, default=256, help="images per forward pass")
    p.add_argument("--num-workers", type=int, default=2, help="data loader workers")
    p.add_argument(
        "--device",
        default=None,
        help="default: cuda:LOCAL_RANK if available, else cpu ('cuda' means cuda:LOCAL_RANK)",
    )
    return p


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit code (errors raise)."""
    args = _parser().parse_args(argv)
    import torch

    from backbones.registry import get_model
    from backbones.weights import load_backbone_weights
    from common.dist import distributed_command
    from datasets.discovery import open_dataset
    from partial_fc.sharding import class_range
    from tools.cleaning import (
        checkpoint_head_layout,
        clean_dataset,
        find_checkpoint,
        load_checkpoint_subcenters,
        load_head_weights,
    )

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
    sys.exit(run_main(main, prog="tools.subcenter_cleaning"))
