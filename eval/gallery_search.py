"""1:N search: the library of ``eval.search`` (see that command for the inputs and the
output), which imports it after parsing its arguments so that ``--help`` stays fast;
:func:`mate_search` and :func:`exact_topk` also serve the IJB 1:N protocol (``eval.ijb``).

Exact search (:func:`exact_topk`) runs in torch over gallery chunks x probe chunks, with
a running top-k merge, so the score matrix in memory is at most
``probe_chunk x gallery_chunk`` whatever the gallery's size. Ties are broken by the
gallery's order (the lower template index first), so results are deterministic.

Approximate search (:func:`build_index` with ``faiss-hnsw`` or ``faiss-ivf``) uses FAISS
(``faiss-cpu``, an optional dependency imported only when such an index is built): inner
product over the same unit float32 templates, so its scores are cosines too, and its
results are put in the exact path's order (score descending, then template index).
:func:`recall_check` measures it against exact search.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from common.atomic import atomic_open, atomic_path
from common.errors import UserError
from datasets.faces.options import FaceOptions
from eval.extract import Embedder
from eval.jsonio import printable
from eval.photo_embeddings import embed_folder

#: Rows of gallery templates scored at once.
GALLERY_CHUNK = 65536
#: Probes scored at once.
PROBE_CHUNK = 256

#: The search indexes: ``exact`` (:func:`exact_topk`), and FAISS's HNSW graph and IVF lists.
INDEX_KINDS = ("exact", "faiss-hnsw", "faiss-ivf")
#: HNSW: neighbours per node (``--hnsw-m``) and the build's candidate list (FAISS's default).
HNSW_M = 32
HNSW_EF_CONSTRUCTION = 40
#: HNSW: candidate list of a search (``--ef-search``; at least k is used).
EF_SEARCH = 128
#: IVF: lists searched per probe (``--nprobe``; at most nlist is used).
NPROBE = 32
#: IVF k-means: training rows per list (a sample of the templates), and iterations.
IVF_TRAIN_PER_LIST = 64
IVF_NITER = 20
#: How to install the optional dependency, for the message that says it is missing.
FAISS_INSTALL = "pip install faiss-cpu (optional; see requirements.txt)"


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


# ------------------------------------------------------------------ indexes


@dataclass(frozen=True)
class IndexOptions:
    """Which index searches the templates, and its parameters.

    Attributes:
        kind: one of :data:`INDEX_KINDS`.
        hnsw_m: HNSW neighbours per node (more: better recall, more memory, slower build).
        ef_search: HNSW candidates kept while searching (more: better recall, slower).
        nlist: IVF lists (``None``: :func:`default_nlist` of the gallery's size).
        nprobe: IVF lists searched per probe (``nprobe = nlist`` is exact search).
    """

    kind: str = "exact"
    hnsw_m: int = HNSW_M
    ef_search: int = EF_SEARCH
    nlist: int | None = None
    nprobe: int = NPROBE


def default_nlist(n: int) -> int:
    """IVF lists for ``n`` templates: about ``4 sqrt(n)``, at most ``n // 39`` (k-means
    wants 39 training rows per centroid) and at least 1."""
    return max(1, min(round(4 * math.sqrt(n)), n // 39))


class SearchIndex(Protocol):
    """Templates ready to be searched; ``search`` answers as :func:`exact_topk`."""

    size: int
    build_seconds: float

    def search(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]: ...

    def describe(self) -> str: ...


@dataclass
class ExactIndex:
    """:func:`exact_topk` over ``templates``."""

    templates: np.ndarray
    gallery_chunk: int = GALLERY_CHUNK
    build_seconds: float = 0.0

    @property
    def size(self) -> int:
        return len(self.templates)

    def search(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        return exact_topk(self.templates, probes, k, gallery_chunk=self.gallery_chunk)

    def describe(self) -> str:
        return "exact"


def import_faiss(kind: str) -> Any:
    """The ``faiss`` module, or a :class:`SearchError` naming ``--index kind`` and how to
    install it."""
    try:
        import faiss
    except ImportError as exc:
        raise SearchError(
            f"--index {kind} needs FAISS, which is not installed ({exc}): {FAISS_INSTALL}; "
            "or use --index exact"
        ) from None
    return faiss


@dataclass
class FaissIndex:
    """A FAISS inner-product index (HNSW or IVF-flat) over unit float32 templates.

    ``search`` returns :func:`exact_topk`'s contract: ``min(k, size)`` results per probe,
    scores descending and ties in template order. A probe for which FAISS finds fewer than
    ``k`` templates (IVF lists holding fewer, in a small gallery) is searched exactly.
    """

    templates: np.ndarray
    options: IndexOptions
    index: Any = None
    nlist: int = 0
    build_seconds: float = 0.0
    exact_fallbacks: int = field(default=0, init=False)

    @property
    def size(self) -> int:
        return len(self.templates)

    def search(self, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        p = np.ascontiguousarray(probes, dtype=np.float32)
        if p.ndim != 2 or p.shape[1] != self.templates.shape[1]:
            raise ValueError(f"templates {self.templates.shape} and probes {p.shape}: (N, D)")
        if k < 1:
            raise ValueError("k must be >= 1")
        k = min(k, self.size)
        if self.options.kind == "faiss-hnsw":
            self.index.hnsw.efSearch = max(self.options.ef_search, k)
        else:
            self.index.nprobe = min(self.options.nprobe, self.nlist)
        scores, idx = self.index.search(p, k)
        short = np.flatnonzero((idx < 0).any(1))
        if len(short):  # fewer than k found: those probes searched exactly
            self.exact_fallbacks += len(short)
            scores[short], idx[short] = exact_topk(self.templates, p[short], k)
        s, i = _order_by_score(torch.from_numpy(scores), torch.from_numpy(idx.astype(np.int64)))
        return s.numpy(), i.numpy()

    def describe(self) -> str:
        o = self.options
        if o.kind == "faiss-hnsw":
            return f"faiss-hnsw (M={o.hnsw_m}, efSearch={o.ef_search})"
        return f"faiss-ivf (nlist={self.nlist}, nprobe={min(o.nprobe, self.nlist)})"


def build_index(
    templates: np.ndarray,
    options: IndexOptions | None = None,
    *,
    gallery_chunk: int = GALLERY_CHUNK,
    seed: int = 0,
) -> ExactIndex | FaissIndex:
    """An index of ``(N, D)`` unit templates (``options.kind``: see :data:`INDEX_KINDS`).

    Raises:
        SearchError: a FAISS index without ``faiss`` installed.
        ValueError: an unknown kind, parameters below 1, no templates.
    """
    options = options or IndexOptions()
    if options.kind not in INDEX_KINDS:
        raise ValueError(f"index {options.kind!r}: expected one of {', '.join(INDEX_KINDS)}")
    if min(options.hnsw_m, options.ef_search, options.nprobe, options.nlist or 1) < 1:
        raise ValueError(f"{options}: the parameters must be >= 1")
    if options.kind == "exact":
        return ExactIndex(templates, gallery_chunk)
    faiss = import_faiss(options.kind)
    t = np.ascontiguousarray(templates, dtype=np.float32)
    if t.ndim != 2 or len(t) == 0:
        raise ValueError(f"templates {t.shape}: expected (N, D) with N >= 1")
    n, d = t.shape
    t0 = time.perf_counter()
    nlist = 0
    if options.kind == "faiss-hnsw":
        index = faiss.IndexHNSWFlat(d, options.hnsw_m, faiss.METRIC_INNER_PRODUCT)
        index.hnsw.efConstruction = max(HNSW_EF_CONSTRUCTION, options.hnsw_m)
    else:
        nlist = min(options.nlist or default_nlist(n), n)
        quantizer = faiss.IndexFlatIP(d)
        index = faiss.IndexIVFFlat(quantizer, d, nlist, faiss.METRIC_INNER_PRODUCT)
        index.cp.spherical = True  # unit centroids: inner product to the nearest list
        index.cp.niter = IVF_NITER
        index.cp.seed = seed
        index.cp.max_points_per_centroid = IVF_TRAIN_PER_LIST
        index.cp.min_points_per_centroid = 1  # no warning for a small gallery
        index.train(t)
    index.add(t)
    out = FaissIndex(t, options, index, nlist)
    out.build_seconds = time.perf_counter() - t0
    return out


@dataclass
class Recall:
    """Approximate top-k against exact top-k over ``probes`` probes: ``found`` of the
    ``total`` exact results (``probes x k``) are in the approximate ones."""

    k: int
    probes: int
    found: int
    total: int

    @property
    def recall(self) -> float:
        return self.found / self.total if self.total else 1.0

    def line(self) -> str:
        return (
            f"recall@{self.k} against exact search: {self.recall:.4f} ({self.found} of "
            f"{self.total} exact top-{self.k} identities found, {self.probes} probes)"
        )


def recall_at_k(exact: np.ndarray, approx: np.ndarray, k: int | None = None) -> Recall:
    """How many of each row's first ``k`` ``exact`` indices are among its first ``k``
    ``approx`` indices (``k``: all columns), summed over the rows."""
    k = exact.shape[1] if k is None else min(k, exact.shape[1])
    found = sum(
        len(set(e[:k].tolist()) & set(a[:k].tolist())) for e, a in zip(exact, approx, strict=True)
    )
    return Recall(k, len(exact), int(found), len(exact) * k)


def recall_check(
    index: SearchIndex,
    templates: np.ndarray,
    probes: np.ndarray,
    k: int,
    n: int,
    *,
    approx: np.ndarray | None = None,
    seed: int = 0,
) -> Recall:
    """Recall@k of ``index`` against :func:`exact_topk` on ``n`` probes drawn at random
    (seeded; all of them when there are no more than ``n``). ``approx``: the index's
    indices for all ``probes``, when already searched."""
    rows = np.arange(len(probes))
    if n < len(probes):
        rows = np.sort(np.random.default_rng(seed).choice(len(probes), n, replace=False))
    exact = exact_topk(templates, probes[rows], k)[1]
    found = approx[rows] if approx is not None else index.search(probes[rows], k)[1]
    return recall_at_k(exact, found)


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
    """The search results of every probe: ``scores``/``indices`` ``(P, k)`` into ``names``;
    ``index``: the index's description and build time; ``recall``: its recall check."""

    probes: list[str]
    names: list[str]
    scores: np.ndarray
    indices: np.ndarray
    index: str = "exact"
    recall: Recall | None = None

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
    gallery: Embedded,
    probes: Embedded,
    k: int,
    *,
    gallery_chunk: int = GALLERY_CHUNK,
    index: IndexOptions | None = None,
    recall_probes: int = 0,
) -> Match:
    """Templates of ``gallery``'s identities, then the top ``k`` for each probe, with the
    ``index`` (default exact); ``recall_probes > 0``: :func:`recall_check` on that many.

    Raises:
        SearchError: an empty gallery or probe set, embedding sizes that differ, a FAISS
            index without ``faiss``.
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
    built = build_index(templates, index, gallery_chunk=gallery_chunk)
    scores, idx = built.search(probes.embeddings, k)
    about = built.describe()
    if isinstance(built, FaissIndex):
        about += f", built in {built.build_seconds:.2f} s"
        if built.exact_fallbacks:
            about += f"; {built.exact_fallbacks} probes searched exactly (fewer than k found)"
    recall = None
    if recall_probes > 0:
        recall = recall_check(built, templates, probes.embeddings, k, recall_probes, approx=idx)
    return Match(probes.paths, names, scores, idx, about, recall)


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


def embed_photo_dir(
    path: str,
    embed: Embedder,
    options: FaceOptions,
    *,
    need_identity: bool,
    batch_size: int = 64,
    workers: int = 1,
) -> Embedded:
    """A folder's photos embedded as ``eval.embed`` does
    (:func:`eval.photo_embeddings.embed_folder`, with ``embed`` and the face ``options``);
    ``need_identity``: each photo's identity is its folder (one folder per person)."""
    paths, results, emb = embed_folder(path, embed, options, batch_size=batch_size, workers=workers)
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
