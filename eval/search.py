"""1:N search: the gallery identities closest to each probe face.

::

    python -m eval.search gallery.parquet probes.parquet --top-k 5
    python -m eval.search gallery.parquet probes/ --model model.onnx --threshold 0.35 \
        --out results.csv

``GALLERY`` is a Parquet file written by :mod:`eval.embed`, or a folder of identities
(one sub-folder per person, embedded here with ``--model`` and the face options of
``eval.embed``). A photo's identity is the ``identity`` column when the file has one,
else the name of the photo's parent folder (``eval.embed`` records paths relative to its
folder, so ``alice/1.jpg`` is ``alice``; a photo at the top of the folder has no identity
and is refused). The photos of one identity make one **template**, the way IJB pools
faces: the mean of the unit embeddings, L2-normalised. Photos without an embedding
(no face, ...) are left out and counted.

``PROBES`` is a Parquet file from :mod:`eval.embed` or a folder of photos (``--model``).
Each probe with an embedding gets its ``--top-k`` identities with cosine scores; with
``--threshold T`` a probe whose best score is below ``T`` is printed as ``unknown``.
``--out`` (``.csv`` or ``.parquet``, written atomically) has one row per probe and
rank: ``probe``, ``rank`` (1..k), ``identity``, ``score``, and ``accepted`` (score at or
above the threshold) when ``--threshold`` is given.

Exact search (:func:`eval.gallery_search.exact_topk`) runs in torch over gallery chunks x
probe chunks, with a running top-k merge, so the score matrix in memory is at most
``probe_chunk x gallery_chunk`` whatever the gallery's size. Ties are broken by the
gallery's order (the lower template index first), so results are deterministic.

``--index faiss-hnsw`` or ``faiss-ivf`` searches with FAISS instead (``faiss-cpu``, an
optional dependency: without it the command stops with one line saying how to install
it): an HNSW graph (``--hnsw-m``, ``--ef-search``) or IVF lists (``--nlist``,
``--nprobe``) over the same templates, by inner product. Approximate: ``--recall-check N``
also searches N random probes exactly and prints recall@k, the fraction of the exact top-k
identities that the index found. Worth it from about a million templates (docs/eval.md).

Refused, as :class:`~eval.gallery_search.SearchError` naming the file and the numbers,
before anything is written: a gallery whose embedding size differs from the probes', a
probe folder or file without a photo with an embedding, a Parquet file without a
``path`` or ``embedding`` column, a gallery without any embedded photo.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from common.cli import run_main
from datasets.faces.arguments import add_face_arguments
from eval.jsonio import printable
from eval.onnx_options import add_input_arguments

if TYPE_CHECKING:
    from eval.gallery_search import Match


def _is_parquet(path: str) -> bool:
    return os.path.isfile(path) and path.lower().endswith(".parquet")


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.search",
        description="1:N search: the top-k gallery identities of each probe photo.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("gallery", help="a .parquet from eval.embed, or a folder of identity folders")
    p.add_argument("probes", help="a .parquet from eval.embed, or a folder of photos")
    p.add_argument("--top-k", type=int, default=5, help="identities per probe")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help="best score below it: unknown (default: the --model's calibration from "
        "eval.calibrate at --far, if there is one)",
    )
    p.add_argument("--far", type=float, default=1e-3, help="target FAR of the calibration")
    p.add_argument("--out", default=None, help="results .csv or .parquet (one row per rank)")
    p.add_argument("--model", help="ONNX file or checkpoint, for a folder GALLERY or PROBES")
    p.add_argument("--network", help="backbone name for a checkpoint (r50, mbf, ...)")
    p.add_argument("--batch-size", type=int, default=64, help="faces per model call")
    p.add_argument("--workers", type=int, default=1, help="processes detecting faces")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--gallery-chunk", type=int, default=None, help=argparse.SUPPRESS)
    p.add_argument(
        "--index",
        choices=("exact", "faiss-hnsw", "faiss-ivf"),
        default="exact",
        help="exact search, or approximate with FAISS (pip install faiss-cpu): an HNSW graph "
        "or IVF lists, for galleries of about a million templates and more",
    )
    p.add_argument("--hnsw-m", type=int, default=32, help="faiss-hnsw: neighbours per node")
    p.add_argument(
        "--ef-search", type=int, default=128, help="faiss-hnsw: candidates per search (>= k)"
    )
    p.add_argument(
        "--nlist",
        type=int,
        default=None,
        help="faiss-ivf: lists (default: 4 sqrt(templates), at most templates/39)",
    )
    p.add_argument(
        "--nprobe", type=int, default=32, help="faiss-ivf: lists searched (nlist: exact)"
    )
    p.add_argument(
        "--recall-check",
        type=int,
        default=0,
        metavar="N",
        help="also search N random probes (all if fewer) exactly and print recall@k",
    )
    add_face_arguments(p)
    add_input_arguments(p)
    args = p.parse_args(argv)
    if min(args.top_k, args.batch_size, args.workers, args.gallery_chunk or 1) < 1:
        p.error("--top-k, --batch-size and --workers must be >= 1")
    if min(args.hnsw_m, args.ef_search, args.nprobe, args.nlist or 1) < 1:
        p.error("--hnsw-m, --ef-search, --nlist and --nprobe must be >= 1")
    if args.recall_check < 0:
        p.error(f"--recall-check {args.recall_check}: a number of probes, >= 0")
    if args.threshold is not None and not math.isfinite(args.threshold):
        p.error(f"--threshold {args.threshold}: not a finite number")
    if args.out is not None:
        if not args.out.lower().endswith((".csv", ".parquet")):
            p.error(f"--out {printable(args.out)}: expected a .csv or .parquet file name")
        if not os.path.isdir(os.path.dirname(os.path.abspath(args.out))):
            p.error(f"--out {printable(args.out)}: its directory does not exist")
    for name in ("gallery", "probes"):
        path = getattr(args, name)
        if not os.path.exists(path):
            p.error(f"{name.upper()} {printable(path)}: no such file or folder")
        if not _is_parquet(path) and not os.path.isdir(path):
            p.error(f"{name.upper()} {printable(path)}: expected a .parquet file or a folder")
        if os.path.isdir(path) and not args.model:
            p.error(f"{name.upper()} {printable(path)} is a folder: its photos need --model")
    return args


def main(argv: Sequence[str] | None = None) -> Match:
    """Command-line entry point; returns the :class:`Match`."""
    args = _parse_args(argv)
    from eval.gallery_search import (
        GALLERY_CHUNK,
        Embedded,
        IndexOptions,
        embed_photo_dir,
        format_results,
        import_faiss,
        read_embeddings,
        search,
        write_results,
    )

    index = IndexOptions(args.index, args.hnsw_m, args.ef_search, args.nlist, args.nprobe)
    if args.index != "exact":
        import_faiss(args.index)  # before any work: one line saying how to install it

    if args.threshold is None and args.model:
        from eval.calibrate import (
            calibration_source,
            describe_entry,
            pick_entry,
            read_calibration,
        )

        record = read_calibration(args.model)  # before any work: refuses another model's
        if record is not None:
            entry = pick_entry(record, args.far)
            args.threshold = float(entry["threshold"])
            print(
                f"threshold {args.threshold:.4f}: calibration {calibration_source(record)}, "
                f"{describe_entry(entry)} (a 1:1 false-accept rate: in 1:N the chance of a "
                "false match grows with the gallery's size)"
            )
    model = None
    if not (_is_parquet(args.gallery) and _is_parquet(args.probes)):
        from eval.faces import finder_options, open_model
        from eval.onnx_options import input_options

        embed, size = open_model(args.model, args.network, args.device, input_options(args))
        model = (embed, finder_options(args, size, args.model))

    def load(path: str, need_identity: bool) -> Embedded:
        if _is_parquet(path):
            return read_embeddings(path, need_identity=need_identity)
        assert model is not None
        return embed_photo_dir(
            path,
            *model,
            need_identity=need_identity,
            batch_size=args.batch_size,
            workers=args.workers,
        )

    gallery = load(args.gallery, True)
    probes = load(args.probes, False)
    match = search(
        gallery,
        probes,
        args.top_k,
        gallery_chunk=args.gallery_chunk or GALLERY_CHUNK,
        index=index,
        recall_probes=args.recall_check,
    )
    assert gallery.identities is not None
    print(
        f"gallery: {len(match.names)} identities from {len(gallery.paths)} photos"
        + (f" ({gallery.skipped} without a face left out)" if gallery.skipped else "")
        + f"; probes: {len(probes.paths)}"
        + (f" ({probes.skipped} without a face left out)" if probes.skipped else "")
    )
    if args.index != "exact":
        print(f"index: {match.index}")
    if match.recall is not None:
        print(match.recall.line())
    print(format_results(match, args.threshold))
    if args.out is not None:
        write_results(args.out, match.rows(args.threshold))
        print(f"results: {printable(args.out)}")
    return match


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.search"))
