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

Exact search (:func:`exact_topk`) runs in torch over gallery chunks x probe chunks, with
a running top-k merge, so the score matrix in memory is at most
``probe_chunk x gallery_chunk`` whatever the gallery's size. Ties are broken by the
gallery's order (the lower template index first), so results are deterministic.

Refused, as :class:`SearchError` naming the file and the numbers, before anything is
written: a gallery whose embedding size differs from the probes', a probe folder or file
without a photo with an embedding, a Parquet file without a ``path`` or ``embedding``
column, a gallery without any embedded photo.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from common.atomic import atomic_open, atomic_path
from common.cli import run_main
from common.errors import UserError
from datasets.faces.arguments import add_face_arguments
from eval.faces import printable
from eval.onnx_infer import add_input_arguments

#: Rows of gallery templates scored at once.
GALLERY_CHUNK = 65536
#: Probes scored at once.
PROBE_CHUNK = 256


class SearchError(UserError, ValueError):
    """A gallery or probe set that cannot be searched; names the file and the numbers."""


# ------------------------------------------------------------------ exact search


def _order_by_score(scores: torch.Tensor, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows sorted by score descending, then index ascending."""
    by_index = torch.argsort(index, dim=1)
    scores, index = scores.gather(1, by_index), index.gather(1, by_index)
    by_score = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return scores.gather(1, by_score), index.gather(1, by_score)


def _chunk_topk(s: torch.Tensor, k: int, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-``k`` of each row of ``s`` (ties: lower column first), indices + offset."""
    if k < s.shape[1]:
        top, idx = torch.topk(s, k + 1, dim=1)
        # A tie across the k-th place (the k+1-th score equals the k-th): topk's pick
        # among the tied columns is arbitrary, so those rows are sorted in full.
        crowded = top[:, k] == top[:, k - 1]
        top, idx = top[:, :k], idx[:, :k]
    else:
        top, idx = torch.topk(s, k, dim=1)
        crowded = torch.zeros(len(s), dtype=torch.bool)
    if bool(crowded.any()):
        rows = torch.nonzero(crowded).flatten()
        full = torch.sort(s[rows], dim=1, descending=True, stable=True)
        top[rows], idx[rows] = full.values[:, :k], full.indices[:, :k]
    top, idx = _order_by_score(top, idx)
    return top, idx + offset


def exact_topk(
    gallery: np.ndarray | torch.Tensor,
    probes: np.ndarray | torch.Tensor,
    k: int,
    *,
    gallery_chunk: int = GALLERY_CHUNK,
    probe_chunk: int = PROBE_CHUNK,
) -> tuple[np.ndarray, np.ndarray]:
    """The ``k`` highest dot products of each probe with the gallery's rows.

    Args:
        gallery: ``(G, D)`` rows (unit rows give cosine scores).
        probes: ``(P, D)`` rows, same dtype as ``gallery`` after conversion.
        k: results per probe; ``min(k, G)`` are returned.
    Returns:
        ``(scores (P, k'), indices (P, k'))``: scores descending, ties in gallery order;
        the scores' dtype is the inputs' (float32 or float64).
    """
    g = torch.as_tensor(gallery)
    p = torch.as_tensor(probes).to(g.dtype)
    if g.ndim != 2 or p.ndim != 2 or g.shape[1] != p.shape[1]:
        raise ValueError(f"gallery {tuple(g.shape)} and probes {tuple(p.shape)}: (N, D) each")
    if k < 1 or gallery_chunk < 1 or probe_chunk < 1:
        raise ValueError("k, gallery_chunk and probe_chunk must be >= 1")
    k = min(k, g.shape[0])
    out_s = torch.empty((p.shape[0], k), dtype=g.dtype)
    out_i = torch.empty((p.shape[0], k), dtype=torch.int64)
    for p0 in range(0, p.shape[0], probe_chunk):
        pc = p[p0 : p0 + probe_chunk]
        best_s = best_i = None
        for g0 in range(0, g.shape[0], gallery_chunk):
            s = pc @ g[g0 : g0 + gallery_chunk].T
            top, idx = _chunk_topk(s, min(k, s.shape[1]), g0)
            if best_s is None:
                best_s, best_i = top, idx
                continue
            # Earlier chunks hold lower indices: a stable sort keeps gallery order in ties.
            both_s, both_i = torch.cat([best_s, top], 1), torch.cat([best_i, idx], 1)
            order = torch.sort(both_s, dim=1, descending=True, stable=True).indices[:, :k]
            best_s, best_i = both_s.gather(1, order), both_i.gather(1, order)
        out_s[p0 : p0 + len(pc)], out_i[p0 : p0 + len(pc)] = best_s, best_i
    return out_s.numpy(), out_i.numpy()


def mate_search(
    gallery: np.ndarray,
    probes: np.ndarray,
    mates: np.ndarray,
    nonmate_top: int,
    *,
    gallery_chunk: int = GALLERY_CHUNK,
    probe_chunk: int = PROBE_CHUNK,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What closed-set identification metrics need, in bounded memory.

    Args:
        gallery: ``(G, D)``; probes: ``(P, D)``; mates: ``(P,)`` the gallery row of each
            probe's identity.
        nonmate_top: how many of the highest non-mate scores (over all probes) to keep.
    Returns:
        ``(mate_scores (P,), mate_ranks (P,), top_nonmate (K,))``: a mate's rank is 1 plus
        the non-mates scoring above it, plus the tied ones earlier in the gallery (the
        order :func:`exact_topk` gives); the highest non-mate scores, descending.
    """
    g = torch.as_tensor(gallery)
    p = torch.as_tensor(probes).to(g.dtype)
    mates_t = torch.as_tensor(np.asarray(mates, dtype=np.int64))
    n_p, n_g = p.shape[0], g.shape[0]
    mate_scores = torch.empty(n_p, dtype=g.dtype)
    ranks = torch.ones(n_p, dtype=torch.int64)
    top = torch.empty(0, dtype=g.dtype)
    for p0 in range(0, n_p, probe_chunk):
        pc, mc = p[p0 : p0 + probe_chunk], mates_t[p0 : p0 + probe_chunk]
        rows = torch.arange(len(pc))
        for g0 in range(0, n_g, gallery_chunk):  # pass 1: the mates' scores, as matmul gives
            s = pc @ g[g0 : g0 + gallery_chunk].T
            here = (mc >= g0) & (mc < g0 + s.shape[1])
            mate_scores[p0 + rows[here]] = s[rows[here], mc[here] - g0]
        ms = mate_scores[p0 : p0 + len(pc)]
        for g0 in range(0, n_g, gallery_chunk):  # pass 2: ranks and the top non-mates
            s = pc @ g[g0 : g0 + gallery_chunk].T
            col = torch.arange(g0, g0 + s.shape[1])
            nonmate = col[None, :] != mc[:, None]
            above = (s > ms[:, None]) | ((s == ms[:, None]) & (col[None, :] < mc[:, None]))
            ranks[p0 : p0 + len(pc)] += (above & nonmate).sum(1)
            if nonmate_top > 0:
                flat = s.masked_fill(~nonmate, float("-inf")).flatten()
                cand = torch.topk(flat, min(nonmate_top, flat.numel())).values
                top = torch.topk(torch.cat([top, cand]), min(nonmate_top, len(top) + len(cand)))
                top = top.values
    n_nonmate = n_p * (n_g - 1)
    return mate_scores.numpy(), ranks.numpy(), top[: min(nonmate_top, n_nonmate)].numpy()


# ------------------------------------------------------------------ galleries and probes


@dataclass
class Embedded:
    """Embedded photos read from a Parquet file or a folder.

    Attributes:
        source: the file or folder (for messages).
        paths: ``(N,)`` photo paths (relative to the folder ``eval.embed`` read).
        identities: ``(N,)`` identity of each photo (or ``None`` for probes).
        embeddings: float32 ``(N, D)`` unit rows, photos with an embedding only.
        skipped: photos listed without an embedding.
        metadata: the Parquet file's schema metadata (``{}`` for a folder).
    """

    source: str
    paths: list[str]
    identities: list[str] | None
    embeddings: np.ndarray
    skipped: int
    metadata: dict[str, str]


def identity_of(path: str) -> str:
    """A photo's identity from its path: the parent folder's name ("" when none)."""
    parts = path.replace("\\", "/").split("/")
    return parts[-2] if len(parts) >= 2 else ""


def read_embeddings(path: str | os.PathLike[str], *, need_identity: bool) -> Embedded:
    """Rows of an :mod:`eval.embed` Parquet file that have an embedding.

    Raises:
        SearchError: no ``path``/``embedding`` column, embeddings of mixed sizes, a
            gallery photo with no identity, no embedded photo.
    """
    import pyarrow.parquet as pq

    source = printable(path)
    try:
        table = pq.read_table(os.fspath(path))
    except (OSError, ValueError) as exc:
        if isinstance(exc, FileNotFoundError):
            raise
        raise SearchError(f"{source}: not a Parquet file eval.embed wrote ({exc})") from None
    missing = [c for c in ("path", "embedding") if c not in table.column_names]
    if missing:
        raise SearchError(
            f"{source}: no {' or '.join(repr(c) for c in missing)} column (it has "
            f"{', '.join(table.column_names) or 'none'}); expected a file from eval.embed"
        )
    paths_all = table.column("path").to_pylist()
    embs = table.column("embedding").to_pylist()
    ids_all = table.column("identity").to_pylist() if "identity" in table.column_names else None
    keep = [i for i, e in enumerate(embs) if e is not None and len(e) and np.isfinite(e).all()]
    sizes = sorted({len(embs[i]) for i in keep})
    if len(sizes) > 1:
        raise SearchError(f"{source}: embeddings of several sizes {sizes}")
    meta = {
        k.decode("utf-8", "replace"): v.decode("utf-8", "replace")
        for k, v in (table.schema.metadata or {}).items()
    }
    emb = (
        np.asarray([embs[i] for i in keep], dtype=np.float32)
        if keep
        else np.zeros((0, 0), np.float32)
    )
    paths = [paths_all[i] for i in keep]
    identities = None
    if need_identity:
        identities = [
            str(ids_all[i]) if ids_all is not None and ids_all[i] is not None else identity_of(p)
            for i, p in zip(keep, paths, strict=True)
        ]
        bad = [p for p, who in zip(paths, identities, strict=True) if not who]
        if bad:
            raise SearchError(
                f"{source}: {len(bad)} photos have no identity (first: {bad[0]!r}); put each "
                "person's photos in a folder named after them, or add an 'identity' column"
            )
    return Embedded(source, paths, identities, _unit(emb), len(embs) - len(keep), meta)


def _unit(emb: np.ndarray) -> np.ndarray:
    if emb.size == 0:
        return emb
    norm = np.linalg.norm(emb.astype(np.float64), axis=1, keepdims=True)
    norm[norm == 0] = 1.0
    return (emb / norm).astype(np.float32)


def make_templates(
    identities: Sequence[str], embeddings: np.ndarray
) -> tuple[list[str], np.ndarray]:
    """One template per identity: the mean of its unit rows, L2-normalised.

    Returns:
        ``(names sorted, float32 (T, D) unit templates)``.
    """
    names, group = np.unique(np.asarray(list(identities), dtype=object), return_inverse=True)
    emb = _unit(np.asarray(embeddings, dtype=np.float32)).astype(np.float64)
    sums = np.zeros((len(names), emb.shape[1]))
    np.add.at(sums, group.reshape(-1), emb)
    counts = np.bincount(group.reshape(-1), minlength=len(names))[:, None]
    return [str(n) for n in names], _unit((sums / counts).astype(np.float32))


@dataclass
class Match:
    """The search results of every probe: ``scores``/``indices`` ``(P, k)`` into ``names``."""

    probes: list[str]
    names: list[str]
    scores: np.ndarray
    indices: np.ndarray

    def rows(self, threshold: float | None = None) -> list[dict[str, Any]]:
        """One dict per probe and rank (``--out``'s rows)."""
        out = []
        for p, (ss, ii) in enumerate(zip(self.scores, self.indices, strict=True)):
            for rank, (s, i) in enumerate(zip(ss, ii, strict=True), 1):
                row = {
                    "probe": self.probes[p],
                    "rank": rank,
                    "identity": self.names[i],
                    "score": float(s),
                }
                if threshold is not None:
                    row["accepted"] = bool(s >= threshold)
                out.append(row)
        return out


def search(
    gallery: Embedded, probes: Embedded, k: int, *, gallery_chunk: int = GALLERY_CHUNK
) -> Match:
    """Templates of ``gallery``'s identities, then the top ``k`` for each probe.

    Raises:
        SearchError: an empty gallery or probe set, embedding sizes that differ.
    """
    if gallery.embeddings.size == 0:
        raise SearchError(
            f"GALLERY {gallery.source}: no photo with an embedding (of {gallery.skipped})"
        )
    if probes.embeddings.size == 0:
        raise SearchError(
            f"PROBES {probes.source}: no photo with an embedding (of {probes.skipped})"
        )
    dg, dp = gallery.embeddings.shape[1], probes.embeddings.shape[1]
    if dg != dp:
        raise SearchError(
            f"GALLERY {gallery.source} has {dg}-d embeddings but PROBES {probes.source} "
            f"has {dp}-d; embed both with the same model"
        )
    assert gallery.identities is not None
    names, templates = make_templates(gallery.identities, gallery.embeddings)
    scores, idx = exact_topk(templates, probes.embeddings, k, gallery_chunk=gallery_chunk)
    return Match(probes.paths, names, scores, idx)


def write_results(path: str | os.PathLike[str], rows: list[dict[str, Any]]) -> None:
    """``rows`` to ``path`` (``.csv`` or ``.parquet`` by suffix), atomically."""
    columns = ["probe", "rank", "identity", "score"]
    if rows and "accepted" in rows[0]:
        columns.append("accepted")
    if os.fspath(path).lower().endswith(".parquet"):
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table({c: [r[c] for r in rows] for c in columns})
        with atomic_path(path) as tmp:
            pq.write_table(table, str(tmp))
        return
    import csv

    with atomic_open(path, "w") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(columns)
        for r in rows:
            w.writerow([f"{r[c]:.6f}" if c == "score" else r[c] for c in columns])


def format_results(match: Match, threshold: float | None) -> str:
    """The printed answer: each probe, then its ranked identities and scores."""
    lines = []
    for p, (ss, ii) in enumerate(zip(match.scores, match.indices, strict=True)):
        head = match.probes[p]
        if threshold is not None and ss[0] < threshold:
            head += f": unknown (best score {ss[0]:.4f} < threshold {threshold:g})"
        lines.append(head)
        for rank, (s, i) in enumerate(zip(ss, ii, strict=True), 1):
            lines.append(f"  {rank:>3}. {match.names[i]}  {s:.4f}")
    return "\n".join(lines)


# ------------------------------------------------------------------ command


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
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--workers", type=int, default=1, help="processes detecting faces")
    p.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    p.add_argument("--gallery-chunk", type=int, default=GALLERY_CHUNK, help=argparse.SUPPRESS)
    add_face_arguments(p)
    add_input_arguments(p)
    args = p.parse_args(argv)
    if min(args.top_k, args.batch_size, args.workers, args.gallery_chunk) < 1:
        p.error("--top-k, --batch-size and --workers must be >= 1")
    if args.threshold is not None and not np.isfinite(args.threshold):
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


def _embed_dir(
    path: str,
    embed_folder: Any,
    embed: Any,
    options: Any,
    args: argparse.Namespace,
    need_identity: bool,
) -> Embedded:
    """A folder's photos embedded as ``eval.embed`` does (``embed_folder`` is
    :func:`eval.embed.embed_folder`, ``embed`` and ``options`` its model and face options)."""
    paths, results, emb = embed_folder(
        path, embed, options, batch_size=args.batch_size, workers=args.workers
    )
    keep = [i for i, r in enumerate(results) if r.ok and emb is not None]
    kept = [printable(paths[i]) for i in keep]
    rows = emb[keep] if emb is not None else np.zeros((0, 0), np.float32)
    ids = None
    if need_identity:
        ids = [identity_of(p) for p in kept]
        bad = [p for p, who in zip(kept, ids, strict=True) if not who]
        if bad:
            raise SearchError(
                f"{printable(path)}: {len(bad)} photos are not in an identity folder "
                f"(first: {bad[0]!r}); put each person's photos in a folder named after them"
            )
    return Embedded(printable(path), kept, ids, _unit(rows), len(paths) - len(keep), {})


def main(argv: Sequence[str] | None = None) -> Match:
    """Command-line entry point; returns the :class:`Match`."""
    args = _parse_args(argv)
    if args.threshold is None and args.model:
        from eval.calibrate import describe_entry, pick_entry, read_calibration

        record = read_calibration(args.model)  # before any work: refuses another model's
        if record is not None:
            entry = pick_entry(record, args.far)
            args.threshold = float(entry["threshold"])
            print(
                f"threshold {args.threshold:.4f}: calibration {printable(record['path'])}, "
                f"{describe_entry(entry)} (a 1:1 false-accept rate: in 1:N the chance of a "
                "false match grows with the gallery's size)"
            )
    folder: tuple[Any, Any, Any] | None = None
    if not (_is_parquet(args.gallery) and _is_parquet(args.probes)):
        from eval.embed import embed_folder
        from eval.faces import finder_options, open_model
        from eval.onnx_infer import input_options

        embed, size = open_model(args.model, args.network, args.device, input_options(args))
        folder = (embed_folder, embed, finder_options(args, size, args.model))

    def load(path: str, need_identity: bool) -> Embedded:
        if _is_parquet(path):
            return read_embeddings(path, need_identity=need_identity)
        assert folder is not None
        return _embed_dir(path, *folder, args, need_identity)

    gallery = load(args.gallery, True)
    probes = load(args.probes, False)
    match = search(gallery, probes, args.top_k, gallery_chunk=args.gallery_chunk)
    assert gallery.identities is not None
    print(
        f"gallery: {len(match.names)} identities from {len(gallery.paths)} photos"
        + (f" ({gallery.skipped} without a face left out)" if gallery.skipped else "")
        + f"; probes: {len(probes.paths)}"
        + (f" ({probes.skipped} without a face left out)" if probes.skipped else "")
    )
    print(format_results(match, args.threshold))
    if args.out is not None:
        write_results(args.out, match.rows(args.threshold))
        print(f"results: {printable(args.out)}")
    return match


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.search"))
