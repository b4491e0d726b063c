"""IJB-B / IJB-C 1:1 template verification and 1:N identification: the library of the
``eval.ijb`` command, which imports it after parsing its arguments.

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

The command writes ``<target>_scores.npy``, ``<target>_roc.png`` and
``<target>_result.json`` (1:1), or the 1:N outputs (:func:`write_1n_outputs`).

``eval.ijb --protocol 1n`` runs IJB-B/C 1:N identification instead (docs/eval.md, "IJB-B/C 1:N
identification"): the same face features and template pooling; the mixed probe templates
are searched in the gallery G1 + G2 (S1 + S2 for IJB-B) in bounded-memory chunks
(:func:`eval.gallery_search.mate_search`); TPIR at FPIR 1e-2 / 1e-1 and rank-1/5/10 as
insightface's ``ijb_1n.py`` reads them; writes ``<target>_1n_result.json``,
``<target>_1n_cmc.png`` and ``<target>_1n_ranks.npz``.

No answer comes from non-finite numbers: the meta files are validated as they are read
(:func:`eval.ijb_data.read_ijb_meta`: finite faceness and landmarks, labels 0/1, both
genuine and impostor pairs), a NaN or infinite embedding is a
:class:`~eval.errors.NonFiniteEmbeddingError` naming the model and the image, and a
score that is still not finite is an :class:`~eval.ijb_data.IJBDataError` naming the
pair file and the row.
"""

from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist
from torch import nn
from tqdm import tqdm

from common.atomic import atomic_open
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
from eval.gallery_search import mate_search
from eval.ijb_data import (
    IJB1NMeta,
    IJBDataError,
    IJBMeta,
    check_pairs,
    load_aligned,
)
from eval.jsonio import write_json
from eval.metrics import (
    IJB_CMC_RANKS,
    IJB_FAR_TARGETS,
    IJB_FPIR_TARGETS,
    cmc_curve,
    nonmates_needed,
    roc_curve,
    tar_at_far,
    tpir_at_fpir,
)
from eval.plot import save_cmc_png, save_roc_png


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


def face_features(
    model: nn.Module | Embedder,
    meta: IJBMeta,
    *,
    batch_size: int = 128,
    flip: bool = True,
    faceness: bool = True,
    workers: int = 4,
    progress: bool = True,
    group: dist.ProcessGroup | None = None,
) -> np.ndarray:
    """Every face's feature as both protocols use it: flip-test embedding (``flip``) times
    the faceness score (``faceness``), not normalised; float32 ``(N, D)``, all finite.

    Raises:
        IJBDataError: a non-finite faceness score (names the image).
        NonFiniteEmbeddingError: the model gave NaN or infinity (names the image).
    """
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
    return feats


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
    feats = face_features(
        model,
        meta,
        batch_size=batch_size,
        flip=flip,
        faceness=faceness,
        workers=workers,
        progress=progress,
        group=group,
    )
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


#: The highest rank the 1:N CMC curve is written to.
CMC_MAX_RANK = 100


@dataclass
class IJB1NResult:
    """Scores and metrics of one IJB 1:N (closed-set identification) evaluation.

    Attributes:
        probe_templates: ``(P,)`` probe template ids, ascending.
        gallery_templates: ``(G,)`` gallery template ids (G1 then G2, each ascending).
        mates: ``(P,)`` the gallery row of each probe's subject.
        mate_scores: ``(P,)`` each probe's score with its mate.
        ranks: ``(P,)`` the mate's rank (1 = first; ties go to the earlier gallery row).
        cmc: ``(min(G, CMC_MAX_RANK),)`` identification rate at rank 1, 2, ...
        rank_k: ``{k: rate}`` for ranks 1, 5, 10.
        tpir_at_fpir: ``{fpir: (tpir, threshold)}`` for FPIR 1e-2 and 1e-1.
    """

    probe_templates: np.ndarray
    gallery_templates: np.ndarray
    mates: np.ndarray
    mate_scores: np.ndarray
    ranks: np.ndarray
    cmc: np.ndarray
    rank_k: dict[int, float]
    tpir_at_fpir: dict[float, tuple[float, float]]


def mate_rows(probe_subjects: np.ndarray, gallery_subjects: np.ndarray, source: str) -> np.ndarray:
    """The gallery row of each probe's subject; :class:`IJBDataError` naming ``source`` when
    a subject is in the gallery not exactly once (as the reference requires)."""
    order = np.argsort(gallery_subjects, kind="stable")
    sorted_subjects = gallery_subjects[order]
    lo = np.searchsorted(sorted_subjects, probe_subjects, side="left")
    hi = np.searchsorted(sorted_subjects, probe_subjects, side="right")
    bad = (hi - lo) != 1
    if bad.any():
        i = int(np.argmax(bad))
        raise IJBDataError(
            f"{source}: probe subject {int(probe_subjects[i])} has {int(hi[i] - lo[i])} "
            f"templates in the galleries ({int(bad.sum())} of {bad.size} probes); closed-set "
            "identification needs exactly one"
        )
    return order[lo]


def identification(
    gallery: np.ndarray,
    probes: np.ndarray,
    mates: np.ndarray,
    *,
    gallery_chunk: int = 4096,
    probe_chunk: int = 1024,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[int, float], dict[float, tuple[float, float]]]:
    """``(mate_scores, ranks, cmc, rank_k, tpir_at_fpir)`` of unit template features
    (chunked: :func:`eval.gallery_search.mate_search`)."""
    need = nonmates_needed(len(probes), IJB_FPIR_TARGETS)
    mate_scores, ranks, top = mate_search(
        gallery, probes, mates, need, gallery_chunk=gallery_chunk, probe_chunk=probe_chunk
    )
    cmc = cmc_curve(ranks, min(len(gallery), CMC_MAX_RANK))
    rank_k = {k: float(np.mean(ranks <= k)) for k in IJB_CMC_RANKS}
    return mate_scores, ranks, cmc, rank_k, tpir_at_fpir(mate_scores, top, IJB_FPIR_TARGETS)


def evaluate_ijb_1n(
    model: nn.Module | Embedder,
    meta: IJBMeta,
    sets: IJB1NMeta,
    *,
    batch_size: int = 128,
    flip: bool = True,
    faceness: bool = True,
    workers: int = 4,
    chunk_size: int = 4096,
    progress: bool = True,
    group: dist.ProcessGroup | None = None,
) -> IJB1NResult:
    """The 1:N protocol: the mixed probe templates searched in the gallery G1 + G2 (S1 + S2
    for IJB-B), templates pooled exactly as in 1:1 (:func:`template_features`).

    Raises:
        IJBDataError: a probe subject without exactly one gallery template, a
            non-finite faceness score or template score.
        NonFiniteEmbeddingError: the model gave NaN or infinity (names the image).
    """
    g_templates = np.concatenate([t for t, _ in sets.galleries.values()])
    g_subjects = np.concatenate([s for _, s in sets.galleries.values()])
    mates = mate_rows(sets.probe_subjects, g_subjects, sets.files["probe"])
    feats = face_features(
        model,
        meta,
        batch_size=batch_size,
        flip=flip,
        faceness=faceness,
        workers=workers,
        progress=progress,
        group=group,
    )
    wanted = np.union1d(g_templates, sets.probe_templates)
    keep = np.isin(meta.templates, wanted)
    ids, tfeats = template_features(feats[keep], meta.templates[keep], meta.medias[keep])
    gallery = tfeats[np.searchsorted(ids, g_templates)]
    probes = tfeats[np.searchsorted(ids, sets.probe_templates)]
    for name, rows, t in (
        ("gallery", gallery, g_templates),
        ("probe", probes, sets.probe_templates),
    ):
        bad = ~np.isfinite(rows).all(axis=1)
        if bad.any():
            raise IJBDataError(
                f"{meta.root}: {int(bad.sum())} {name} template features are not finite "
                f"(first: template {int(t[np.argmax(bad)])})"
            )
    mate_scores, ranks, cmc, rank_k, tpir = identification(
        gallery, probes, mates, gallery_chunk=chunk_size
    )
    return IJB1NResult(
        sets.probe_templates, g_templates, mates, mate_scores, ranks, cmc, rank_k, tpir
    )


def format_1n_table(name: str, result: IJB1NResult) -> str:
    """TPIR@FPIR and rank-k rates as two aligned text rows (percent)."""
    cols = [f"TPIR@{f:.0e}" for f in result.tpir_at_fpir] + [f"rank-{k}" for k in result.rank_k]
    vals = [t for t, _ in result.tpir_at_fpir.values()] + list(result.rank_k.values())
    head = f"| {'1:N':<6} | " + " | ".join(f"{c:>10}" for c in cols) + " |"
    row = f"| {name:<6} | " + " | ".join(f"{100 * v:>10.2f}" for v in vals) + " |"
    rule = "+" + "-" * (len(head) - 2) + "+"
    return "\n".join([rule, head, row, rule])


def write_1n_outputs(result: IJB1NResult, output_dir: str, target: str) -> dict[str, str]:
    """Write the ranks and mate scores (``.npz``), the CMC (``.png``) and the table
    (``.json``) atomically."""
    os.makedirs(output_dir, exist_ok=True)
    stem = os.path.join(output_dir, target.lower())
    paths = {
        "ranks": f"{stem}_1n_ranks.npz",
        "cmc": f"{stem}_1n_cmc.png",
        "json": f"{stem}_1n_result.json",
    }
    with atomic_open(paths["ranks"], "wb") as f:
        np.savez(
            f,
            probe_templates=result.probe_templates,
            gallery_templates=result.gallery_templates,
            mates=result.mates,
            mate_scores=result.mate_scores,
            ranks=result.ranks,
        )
    save_cmc_png(paths["cmc"], {target: result.cmc}, title=f"{target} 1:N identification (CMC)")
    write_json(
        paths["json"],
        {
            "target": target,
            "protocol": "1n",
            "tpir_at_fpir": {f"{f:.0e}": t for f, (t, _) in result.tpir_at_fpir.items()},
            "threshold_at_fpir": {f"{f:.0e}": th for f, (_, th) in result.tpir_at_fpir.items()},
            "rank": {str(k): v for k, v in result.rank_k.items()},
            "cmc": result.cmc.tolist(),
            "num_probes": int(result.probe_templates.size),
            "num_gallery": int(result.gallery_templates.size),
        },
    )
    return paths
