"""IJB-B / IJB-C 1:1 template verification.

Protocol (as the community reference evaluates it):

1. each face is aligned to 112x112 by the least-squares similarity transform
   of its 5 landmarks onto the ArcFace template (:mod:`datasets.faces.align`);
2. its feature is ``emb(face) + emb(mirrored face)``, *not* normalised, times
   the detector's faceness score;
3. a template's feature is the sum over its media of the mean feature of that
   media's faces, then L2-normalised;
4. a pair's score is the dot product of its two template features (computed in
   bounded-memory chunks: IJB-C has 15.7M pairs);
5. TAR is read at the ROC point whose FPR is closest to each of 1e-6 .. 1e-1.

Command (``torchrun --nproc_per_node N -m eval.ijb ...`` shares the face
embedding across ranks; rank 0 writes)::

    python -m eval.ijb --root /data/IJBC --target IJBC \
        --network r100 --checkpoint backbone.pt --output-dir out/ijbc
    python -m eval.ijb --root /data/IJBB --target IJBB --onnx model.onnx --output-dir out/ijbb

writes ``<target>_scores.npy`` (one float64 score per line of the pair file,
in order), ``<target>_roc.png`` and ``<target>_result.json`` (TAR@FAR table)
to the output directory and prints the table.

No answer comes from non-finite numbers: the meta files are validated as they are read
(:func:`eval.ijb_data.read_ijb_meta`: finite faceness and landmarks, labels 0/1, both
genuine and impostor pairs), a NaN or infinite embedding is a
:class:`~eval.errors.NonFiniteEmbeddingError` naming the model and the image, and a
score that is still not finite is an :class:`~eval.ijb_data.IJBDataError` naming the
pair file and the row.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from common.atomic import atomic_open
from common.cli import run_main
from common.dist import rank_and_world_size
from common.face_input import ARCFACE_INPUT
from eval.errors import NonFiniteEmbeddingError
from eval.extract import (
    Embedder,
    embedder_name,
    eval_mode,
    gather_slices,
    module_embedder,
    normalize_pixels,
    rank_slice,
)
from eval.ijb_data import IJBDataError, IJBMeta, check_pairs, load_aligned, read_ijb_meta
from eval.jsonio import write_json
from eval.metrics import IJB_FAR_TARGETS, roc_curve, tar_at_far
from eval.onnx_infer import add_input_arguments, input_options
from eval.plot import save_roc_png


def image_features(
    embed: Embedder,
    meta: IJBMeta,
    batch_size: int = 128,
    *,
    flip: bool = True,
    workers: int = 4,
    image_size: tuple[int, int] = (ARCFACE_INPUT.size, ARCFACE_INPUT.size),
    progress: bool = True,
    group: dist.ProcessGroup | None = None,
) -> np.ndarray:
    """Flip-test features of every face in ``meta``: float32 ``(N, D)``, not normalised.

    Faces are read and aligned by ``workers`` threads one batch ahead of the model.
    Under ``torch.distributed`` (``group``, ``None`` = the default group if any) each
    rank embeds one contiguous slice of the faces and the slices are gathered, so
    every rank returns all ``N`` rows (a collective: every rank must call it).
    """
    n = len(meta.names)
    rank, world = rank_and_world_size(group)
    lo, hi = rank_slice(n, rank, world)
    starts = list(range(lo, hi, batch_size))
    out: np.ndarray | None = None
    workers = max(1, workers)

    def submit(pool: ThreadPoolExecutor, start: int) -> list[Future[np.ndarray]]:
        stop = min(start + batch_size, hi)
        step = max(1, -(-(stop - start) // workers))
        return [
            pool.submit(_load_range, meta, s, min(s + step, stop), image_size)
            for s in range(start, stop, step)
        ]

    with (
        ThreadPoolExecutor(workers) as pool,
        tqdm(total=hi - lo, unit="img", desc="IJB features", disable=not progress) as bar,
    ):
        pending = submit(pool, starts[0]) if starts else []
        for k, start in enumerate(starts):
            faces = np.concatenate([f.result() for f in pending])
            if k + 1 < len(starts):
                pending = submit(pool, starts[k + 1])
            x = normalize_pixels(torch.from_numpy(faces).permute(0, 3, 1, 2))
            feats = _embed_named(embed, x, meta, start)
            if flip:
                feats = feats + _embed_named(embed, torch.flip(x, dims=[3]), meta, start)
            if out is None:
                out = np.empty((hi - lo, feats.shape[1]), dtype=np.float32)
            out[start - lo : start - lo + len(faces)] = feats.numpy()
            bar.update(len(faces))
    local = out if out is not None else np.zeros((0, 0), dtype=np.float32)
    if world > 1:
        return gather_slices(torch.from_numpy(local), n, group).numpy()
    return local


def _embed_named(embed: Embedder, x: torch.Tensor, meta: IJBMeta, start: int) -> torch.Tensor:
    """``embed(x)`` for faces ``start..``; a non-finite embedding names their images."""
    try:
        return embed(x).detach().float().cpu()
    except NonFiniteEmbeddingError as exc:
        raise exc.naming([meta.image_path(start + r) for r in exc.rows]) from None


def _load_range(meta: IJBMeta, start: int, stop: int, size: tuple[int, int]) -> np.ndarray:
    """Aligned RGB faces ``start..stop-1``: ``(stop - start, H, W, 3)`` uint8."""
    return np.stack([load_aligned(meta, i, size) for i in range(start, stop)])


def template_features(
    feats: np.ndarray, templates: np.ndarray, medias: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Media-then-template pooling.

    Args:
        feats: ``(N, D)`` per-face features (already faceness-weighted if wanted).
        templates: ``(N,)`` template id per face.
        medias: ``(N,)`` media id per face (a media = one still image or one video).
    Returns:
        ``(template_ids (T,), features (T, D) float64)``: ids sorted ascending;
        each feature is the sum over the template's media of the mean of that
        media's faces, L2-normalised.
    """
    feats = np.asarray(feats)
    templates = np.asarray(templates).reshape(-1)
    medias = np.asarray(medias).reshape(-1)
    if not (len(feats) == len(templates) == len(medias)):
        raise ValueError(
            f"{len(feats)} features, {len(templates)} template ids, {len(medias)} media ids"
        )
    keys = np.stack([templates, medias], axis=1)
    groups, group_of = np.unique(keys, axis=0, return_inverse=True)  # sorted (template, media)
    group_of = group_of.reshape(-1)
    counts = np.bincount(group_of, minlength=len(groups))
    media_sums = _grouped_sums(feats, group_of, len(groups))
    media_means = media_sums / counts[:, None]
    template_ids, first = np.unique(groups[:, 0], return_index=True)
    pooled = np.add.reduceat(media_means, first, axis=0)
    norm = np.sqrt(np.einsum("ij,ij->i", pooled, pooled))
    norm[norm == 0] = 1.0
    return template_ids, pooled / norm[:, None]


def _grouped_sums(
    feats: np.ndarray, group_of: np.ndarray, n_groups: int, chunk_rows: int = 65536
) -> np.ndarray:
    """Float64 per-group row sums of ``feats (N, D)``, ``chunk_rows`` rows at a time."""
    sums = torch.zeros((n_groups, feats.shape[1]), dtype=torch.float64)
    index = torch.from_numpy(np.ascontiguousarray(group_of, dtype=np.int64))
    for r0 in range(0, len(feats), chunk_rows):
        block = torch.from_numpy(np.asarray(feats[r0 : r0 + chunk_rows], dtype=np.float64))
        sums.index_add_(0, index[r0 : r0 + chunk_rows], block)
    return sums.numpy()


def pair_scores(
    template_ids: np.ndarray,
    template_feats: np.ndarray,
    t1: np.ndarray,
    t2: np.ndarray,
    chunk_size: int = 32768,
    *,
    progress: bool = False,
) -> np.ndarray:
    """Dot products of the template features of each pair, ``chunk_size`` pairs at a time.

    Args:
        template_ids: ``(T,)`` sorted ids, rows of ``template_feats (T, D)``.
        t1, t2: ``(M,)`` template ids of each pair.
    Returns:
        ``(M,)`` float64 scores.
    Raises:
        ValueError: a pair names a template that has no faces.
    """
    t1 = np.asarray(t1).reshape(-1)
    t2 = np.asarray(t2).reshape(-1)
    rows = []
    for t in (t1, t2):
        r = np.searchsorted(template_ids, t)
        r = np.minimum(r, len(template_ids) - 1)
        bad = template_ids[r] != t
        if bad.any():
            raise ValueError(f"pair list names template {int(t[bad][0])}, which has no faces")
        rows.append(r)
    scores = np.empty(len(t1), dtype=np.float64)
    for start in tqdm(
        range(0, len(t1), chunk_size), desc="IJB pairs", unit="chunk", disable=not progress
    ):
        stop = start + chunk_size
        a = template_feats[rows[0][start:stop]]
        b = template_feats[rows[1][start:stop]]
        scores[start:stop] = np.einsum("ij,ij->i", a, b)
    return scores


@dataclass
class IJBResult:
    """Scores and metrics of one IJB evaluation.

    Attributes:
        scores: ``(M,)`` pair scores, in pair-file order.
        labels: ``(M,)`` int8 labels.
        fpr, tpr: the ROC.
        tar_at_far: ``{far: tar}`` for 1e-6 .. 1e-1.
    """

    scores: np.ndarray
    labels: np.ndarray
    fpr: np.ndarray
    tpr: np.ndarray
    tar_at_far: dict[float, float]


def evaluate_ijb(
    model: nn.Module | Embedder,
    meta: IJBMeta,
    *,
    batch_size: int = 128,
    flip: bool = True,
    faceness: bool = True,
    workers: int = 4,
    chunk_size: int = 32768,
    progress: bool = True,
    group: dist.ProcessGroup | None = None,
) -> IJBResult:
    """Run the whole 1:1 protocol on ``meta`` with a backbone or an embedder.

    Under ``torch.distributed`` the face features are shared across the ranks of
    ``group`` (see :func:`image_features`); every rank then scores all pairs and
    returns the same result.

    Raises:
        IJBDataError: labels that are not 0/1 or not of both kinds, a non-finite
            faceness score, a pair score that is not finite (names the pair file).
        NonFiniteEmbeddingError: the model gave NaN or infinity (names the image).
    """
    source = meta.pairs_file or f"{meta.root} (pair list)"
    check_pairs(meta.labels, source)
    if faceness and not np.isfinite(meta.faceness).all():
        i = int(np.argmax(~np.isfinite(meta.faceness)))
        raise IJBDataError(
            f"{meta.image_path(i)}: faceness score {meta.faceness[i]} is not a finite number"
        )
    kwargs = {"flip": flip, "workers": workers, "progress": progress, "group": group}
    if isinstance(model, nn.Module):
        with eval_mode(model):
            feats = image_features(module_embedder(model), meta, batch_size, **kwargs)
        name = ""
    else:
        feats = image_features(model, meta, batch_size, **kwargs)
        name = embedder_name(model)
    if faceness:
        feats = feats * meta.faceness[:, None]
    finite = np.isfinite(feats).all(axis=1)
    if not finite.all():  # an unchecked embedder, or a flip/faceness product overflowed
        rows = np.flatnonzero(~finite).tolist()
        names = [meta.image_path(r) for r in rows]
        raise NonFiniteEmbeddingError(name, rows, len(finite), None, names)
    ids, tfeats = template_features(feats, meta.templates, meta.medias)
    scores = pair_scores(ids, tfeats, meta.pair_t1, meta.pair_t2, chunk_size, progress=progress)
    bad = ~np.isfinite(scores)
    if bad.any():
        row = int(np.argmax(bad))
        raise IJBDataError(
            f"{source}: {int(bad.sum())} of {bad.size} pair scores are not finite (first: "
            f"pair row {row + 1}, templates {int(meta.pair_t1[row])} and "
            f"{int(meta.pair_t2[row])}); no TAR@FAR from them"
        )
    fpr, tpr, _ = roc_curve(meta.labels, scores)
    return IJBResult(scores, meta.labels, fpr, tpr, tar_at_far(fpr, tpr, IJB_FAR_TARGETS))


def format_table(name: str, table: dict[float, float]) -> str:
    """The TAR@FAR table as two aligned text rows (TAR in percent)."""
    head = "| FAR    | " + " | ".join(f"{far:>7.0e}" for far in table) + " |"
    row = f"| {name:<6} | " + " | ".join(f"{100 * tar:>7.2f}" for tar in table.values()) + " |"
    rule = "+" + "-" * (len(head) - 2) + "+"
    return "\n".join([rule, head, row, rule])


def write_outputs(result: IJBResult, output_dir: str, target: str) -> dict[str, str]:
    """Write scores (``.npy``), ROC (``.png``) and the table (``.json``) atomically."""
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.join(output_dir, target.lower())
    paths = {
        "scores": f"{stem}_scores.npy",
        "roc": f"{stem}_roc.png",
        "json": f"{stem}_result.json",
    }
    with atomic_open(paths["scores"], "wb") as f:
        np.save(f, result.scores)
    save_roc_png(
        paths["roc"],
        {target: (result.fpr, result.tpr)},
        title=f"{target} 1:1 verification",
        tar_at_far=result.tar_at_far,
    )
    write_json(
        paths["json"],
        {
            "target": target,
            "tar_at_far": {f"{far:.0e}": tar for far, tar in result.tar_at_far.items()},
            "num_pairs": int(result.scores.size),
            "num_genuine": int(np.sum(result.labels == 1)),
        },
    )
    return paths


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m eval.ijb", description="IJB-B/C 1:1 verification.")
    p.add_argument("--root", required=True, help="IJB root with loose_crop/ and meta/")
    p.add_argument("--target", default="IJBC", choices=["IJBC", "IJBB"])
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--checkpoint", help="backbone state_dict saved with torch.save")
    src.add_argument("--onnx", help="an ONNX model: exported by eval.export_onnx, or insightface's")
    p.add_argument("--network", help="backbone name for --checkpoint")
    p.add_argument("--output-dir", required=True)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--workers", type=int, default=4, help="image reading/alignment threads")
    p.add_argument("--chunk-size", type=int, default=32768, help="pairs scored per chunk")
    p.add_argument(
        "--device",
        default=None,
        help="default: cuda:LOCAL_RANK when CUDA is available, else cpu ('cuda' = cuda:LOCAL_RANK)",
    )
    p.add_argument("--no-flip", action="store_true", help="skip the mirrored embedding")
    p.add_argument("--no-faceness", action="store_true", help="skip faceness weighting")
    p.add_argument("--no-progress", action="store_true")
    add_input_arguments(p)
    args = p.parse_args(argv)
    if not args.onnx and any(v is not None for v in input_options(args).values()):
        p.error("--input-mean/--input-std/--input-color/--input-size apply to --onnx models only")
    if args.checkpoint and not args.network:
        p.error("--network is required with --checkpoint")
    if min(args.batch_size, args.workers, args.chunk_size) < 1:
        p.error("--batch-size, --workers and --chunk-size must be >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> IJBResult:
    """Command-line entry point."""
    from eval.models import command_embedder

    args = _parse_args(argv)
    meta = read_ijb_meta(args.root, args.target)
    onnx_input = input_options(args)
    with command_embedder(args.network, args.checkpoint, args.onnx, args.device, onnx_input) as (
        ctx,
        embed,
    ):
        result = evaluate_ijb(
            embed,
            meta,
            batch_size=args.batch_size,
            flip=not args.no_flip,
            faceness=not args.no_faceness,
            workers=args.workers,
            chunk_size=args.chunk_size,
            progress=not args.no_progress and ctx.is_main,
        )
        if ctx.is_main:  # every rank has the same result; one writes it
            paths = write_outputs(result, args.output_dir, args.target)
            print(format_table(args.target, result.tar_at_far))
            for kind, path in paths.items():
                print(f"{kind}: {path}")
        return result


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.ijb"))
