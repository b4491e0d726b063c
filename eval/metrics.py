"""Verification metrics: the 10-fold pair protocol and ROC / TAR@FAR.

Pure NumPy, no IO and no models. Everything here takes embeddings or scores
that were already computed.

The pair protocol reproduces the numbers of the community reference
(insightface ``arcface_torch/eval/verification.py``) on the same embeddings:

* distances are squared Euclidean distances between rows ``2i`` and ``2i+1``,
  computed in the embeddings' own dtype, and compared to the thresholds in
  float64 (``predict_same = dist < threshold``);
* folds are contiguous, unshuffled, sized like ``sklearn.model_selection.KFold``
  (the first ``n % k`` folds get one extra pair);
* accuracy: thresholds ``np.arange(0, 4, 0.01)``; the first threshold of
  maximal accuracy on the training folds is applied to the test fold;
* VAL@FAR: thresholds ``np.arange(0, 4, 0.001)``; the threshold at which the
  training folds' FAR reaches the target is found by linear interpolation of
  the (FAR, threshold) curve, 0 if the FAR never reaches the target.

The reference interpolates with ``scipy.interpolate.interp1d(kind='slinear')``,
which raises on current SciPy as soon as two thresholds share a FAR value (and
they practically always do: every threshold below the smallest impostor
distance has FAR 0). FAR is a non-decreasing step function of the threshold,
so the interpolation is made well defined here by bracketing the target
between the *last* threshold whose FAR is below it and the *first* threshold
whose FAR reaches it, and interpolating linearly between those two points.
Where FAR values do not repeat this is exactly what ``interp1d`` computes.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np

ACC_THRESHOLDS_STEP = 0.01
VAL_THRESHOLDS_STEP = 0.001
DEFAULT_FAR_TARGET = 1e-3
IJB_FAR_TARGETS: tuple[float, ...] = (1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1)


def contiguous_folds(n: int, n_folds: int) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield ``(train_idx, test_idx)`` for ``n_folds`` contiguous, unshuffled folds.

    Fold sizes follow ``KFold(n_splits=n_folds, shuffle=False)``: ``n // n_folds``
    each, plus one for the first ``n % n_folds`` folds. With ``n_folds == 1`` the
    single fold trains and tests on everything (as the reference does).
    """
    if n_folds < 1:
        raise ValueError(f"nrof_folds must be >= 1, got {n_folds}")
    indices = np.arange(n)
    if n_folds == 1:
        yield indices, indices
        return
    if n < n_folds:
        raise ValueError(f"cannot split {n} pairs into {n_folds} folds")
    sizes = np.full(n_folds, n // n_folds, dtype=np.int64)
    sizes[: n % n_folds] += 1
    start = 0
    for size in sizes:
        stop = start + int(size)
        test = indices[start:stop]
        train = np.concatenate([indices[:start], indices[stop:]])
        yield train, test
        start = stop


def pair_distances(embeddings: np.ndarray) -> np.ndarray:
    """Squared L2 distance of each pair: rows ``2i`` and ``2i+1`` of ``(2P, D)`` -> ``(P,)``.

    Computed in the input dtype, like the reference.
    """
    emb = np.asarray(embeddings)
    if emb.ndim != 2 or emb.shape[0] % 2:
        raise ValueError(f"embeddings must be (2P, D) with an even number of rows, got {emb.shape}")
    diff = np.subtract(emb[0::2], emb[1::2])
    return np.sum(np.square(diff), 1)


def _count_below(sorted_values: np.ndarray, thresholds: np.ndarray) -> np.ndarray:
    """For each threshold, how many values are ``< threshold`` (NaN never is)."""
    return np.searchsorted(sorted_values, thresholds, side="left").astype(np.int64)


class _Split:
    """Sorted distances of one index subset, split into same / different pairs."""

    def __init__(self, dist: np.ndarray, same: np.ndarray) -> None:
        self.n = int(dist.size)
        self.same = np.sort(dist[same])
        self.diff = np.sort(dist[~same])
        self.n_same = int(self.same.size)
        self.n_diff = int(self.diff.size)

    def counts(self, thresholds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(tp, fp)`` per threshold, with ``predict_same = dist < threshold``."""
        return _count_below(self.same, thresholds), _count_below(self.diff, thresholds)


def _safe_ratio(num: np.ndarray, den: int) -> np.ndarray:
    num = np.asarray(num, dtype=np.float64)
    if den == 0:
        return np.zeros_like(num)
    return num / float(den)


def calculate_roc(
    thresholds: np.ndarray, dist: np.ndarray, issame: np.ndarray, nrof_folds: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fold-averaged ROC and per-fold best-threshold accuracy.

    Args:
        thresholds: ``(T,)`` increasing distance thresholds.
        dist: ``(P,)`` pair distances.
        issame: ``(P,)`` booleans.
    Returns:
        ``tpr (T,)`` and ``fpr (T,)`` averaged over the test folds, and
        ``accuracy (nrof_folds,)``: each test fold's accuracy at the threshold
        that maximised accuracy on the other folds (first maximum).
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    dist64 = np.asarray(dist).astype(np.float64)
    issame = np.asarray(issame, dtype=bool)
    tprs = np.zeros((nrof_folds, thresholds.size))
    fprs = np.zeros((nrof_folds, thresholds.size))
    accuracy = np.zeros(nrof_folds)
    for fold, (train, test) in enumerate(contiguous_folds(dist64.size, nrof_folds)):
        tr = _Split(dist64[train], issame[train])
        tp, fp = tr.counts(thresholds)
        correct = tp + (tr.n_diff - fp)  # tp + tn, integer: argmax ties resolve exactly
        best = int(np.argmax(correct))
        te = _Split(dist64[test], issame[test])
        tp, fp = te.counts(thresholds)
        tprs[fold] = _safe_ratio(tp, te.n_same)
        fprs[fold] = _safe_ratio(fp, te.n_diff)
        tp_b, fp_b = int(tp[best]), int(fp[best])
        accuracy[fold] = float(tp_b + (te.n_diff - fp_b)) / float(te.n)
    return tprs.mean(0), fprs.mean(0), accuracy


def threshold_at_far(thresholds: np.ndarray, far: np.ndarray, far_target: float) -> float:
    """Threshold at which a non-decreasing ``far(threshold)`` curve reaches ``far_target``.

    Linear interpolation between the last threshold with ``far < far_target``
    and the first with ``far >= far_target``; 0.0 if the curve never reaches
    the target (the reference's convention); ``thresholds[0]`` if it starts at
    or above it. Repeated FAR values are fine.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    far = np.asarray(far, dtype=np.float64)
    if far.size == 0 or not np.max(far) >= far_target:
        return 0.0
    hi = int(np.argmax(far >= far_target))
    if hi == 0:
        return float(thresholds[0])
    lo = hi - 1
    x_lo, x_hi = far[lo], far[hi]
    # Evaluated in the form of a degree-1 B-spline (what interp1d 'slinear' does).
    w_lo = (x_hi - far_target) / (x_hi - x_lo)
    w_hi = (far_target - x_lo) / (x_hi - x_lo)
    return float(thresholds[lo] * w_lo + thresholds[hi] * w_hi)


def calculate_val(
    thresholds: np.ndarray,
    dist: np.ndarray,
    issame: np.ndarray,
    far_target: float = DEFAULT_FAR_TARGET,
    nrof_folds: int = 10,
) -> tuple[float, float, float]:
    """VAL (true accept rate) at a FAR target, 10-fold.

    On each fold the threshold is chosen on the training folds with
    :func:`threshold_at_far` and VAL = TA / n_same, FAR = FA / n_diff are
    measured on the test fold (0 when a fold has no pairs of that kind).

    Returns:
        ``(val_mean, val_std, far_mean)`` over the folds.
    """
    thresholds = np.asarray(thresholds, dtype=np.float64)
    dist64 = np.asarray(dist).astype(np.float64)
    issame = np.asarray(issame, dtype=bool)
    val = np.zeros(nrof_folds)
    far = np.zeros(nrof_folds)
    for fold, (train, test) in enumerate(contiguous_folds(dist64.size, nrof_folds)):
        tr = _Split(dist64[train], issame[train])
        _, fa = tr.counts(thresholds)
        far_train = _safe_ratio(fa, tr.n_diff)
        threshold = threshold_at_far(thresholds, far_train, far_target)
        te = _Split(dist64[test], issame[test])
        ta, fa = te.counts(np.array([threshold]))
        val[fold] = _safe_ratio(ta, te.n_same)[0]
        far[fold] = _safe_ratio(fa, te.n_diff)[0]
    return float(np.mean(val)), float(np.std(val)), float(np.mean(far))


def evaluate(
    embeddings: np.ndarray, issame: Sequence[bool] | np.ndarray, nrof_folds: int = 10
) -> tuple[np.ndarray, np.ndarray, np.ndarray, float, float, float]:
    """The standard pair-verification protocol on precomputed embeddings.

    Args:
        embeddings: ``(2P, D)``; rows ``2i`` and ``2i+1`` form pair ``i``. Pass
            the flip-test embeddings, L2-normalised (as the reference does; this
            function does not normalise).
        issame: ``(P,)`` booleans, True for a genuine pair.
        nrof_folds: number of contiguous folds.
    Returns:
        ``(tpr, fpr, accuracy, val, val_std, far)``: ``tpr``/``fpr`` ``(400,)``
        over thresholds ``0..3.99``; ``accuracy`` ``(nrof_folds,)`` per-fold
        test accuracy (report ``mean ± std``); ``val``, ``val_std``, ``far`` at
        FAR target 1e-3.
    """
    emb = np.asarray(embeddings)
    same = np.asarray(issame, dtype=bool).reshape(-1)
    if emb.ndim != 2 or emb.shape[0] != 2 * same.size:
        raise ValueError(
            f"embeddings must be (2P, D) with P = len(issame) = {same.size}, got {emb.shape}"
        )
    dist = pair_distances(emb)
    thresholds = np.arange(0, 4, ACC_THRESHOLDS_STEP)
    tpr, fpr, accuracy = calculate_roc(thresholds, dist, same, nrof_folds=nrof_folds)
    thresholds = np.arange(0, 4, VAL_THRESHOLDS_STEP)
    val, val_std, far = calculate_val(
        thresholds, dist, same, DEFAULT_FAR_TARGET, nrof_folds=nrof_folds
    )
    return tpr, fpr, accuracy, val, val_std, far


def l2_normalize(x: np.ndarray) -> np.ndarray:
    """Divide rows of ``(N, D)`` by their L2 norm (zero rows stay zero), dtype kept.

    Same arithmetic as ``sklearn.preprocessing.normalize``, which the reference uses.
    """
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"expected (N, D), got {x.shape}")
    norm = np.sqrt(np.einsum("ij,ij->i", x, x))
    norm[norm == 0] = 1
    return x / norm[:, None]


def roc_curve(labels: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ROC of ``scores`` (higher = more likely genuine) against boolean ``labels``.

    Same points as ``sklearn.metrics.roc_curve`` with its default
    ``drop_intermediate=True``: one point per distinct score, collinear
    interior points dropped, and a leading ``(0, 0)`` point at threshold +inf.

    Returns:
        ``(fpr, tpr, thresholds)``, each ``(K,)``.
    """
    labels = np.asarray(labels).reshape(-1).astype(bool)
    scores = np.asarray(scores).reshape(-1)
    if labels.size != scores.size:
        raise ValueError(f"{labels.size} labels but {scores.size} scores")
    order = np.argsort(scores, kind="mergesort")[::-1]
    s = scores[order]
    y = labels[order].astype(np.int64)
    distinct = np.where(np.diff(s))[0]
    idx = np.r_[distinct, y.size - 1]
    tps = np.cumsum(y)[idx]
    fps = 1 + idx - tps
    thr = s[idx]
    if tps.size > 2:
        keep = np.where(np.r_[True, np.logical_or(np.diff(fps, 2), np.diff(tps, 2)), True])[0]
        tps, fps, thr = tps[keep], fps[keep], thr[keep]
    tps = np.r_[0, tps]
    fps = np.r_[0, fps]
    thr = np.r_[np.inf, thr]
    fpr = fps / fps[-1] if fps[-1] > 0 else np.full(fps.shape, np.nan)
    tpr = tps / tps[-1] if tps[-1] > 0 else np.full(tps.shape, np.nan)
    return fpr, tpr, thr


def tar_at_far(
    fpr: np.ndarray, tpr: np.ndarray, far_targets: Sequence[float] = IJB_FAR_TARGETS
) -> dict[float, float]:
    """TAR at the ROC point whose FPR is closest to each target.

    Ties (several points equally close, e.g. a vertical run at the same FPR)
    resolve to the point with the highest TPR, as in the IJB reference.
    """
    fpr = np.asarray(fpr, dtype=np.float64)[::-1]
    tpr = np.asarray(tpr, dtype=np.float64)[::-1]
    out: dict[float, float] = {}
    for target in far_targets:
        i = int(np.argmin(np.abs(fpr - target)))
        out[float(target)] = float(tpr[i])
    return out


#: FPIR targets and CMC ranks of the IJB-B/C 1:N report (insightface's ``ijb_1n.py``).
IJB_FPIR_TARGETS: tuple[float, ...] = (1e-2, 1e-1)
IJB_CMC_RANKS: tuple[int, ...] = (1, 5, 10)


def nonmates_needed(n_probes: int, fpir_targets: Sequence[float] = IJB_FPIR_TARGETS) -> int:
    """How many of the highest non-mate scores :func:`tpir_at_fpir` reads:
    ``ceil(n_probes * max FPIR)``."""
    return max((int(np.ceil(n_probes * f)) for f in fpir_targets), default=0)


def tpir_at_fpir(
    mate_scores: np.ndarray,
    top_nonmate: np.ndarray,
    fpir_targets: Sequence[float] = IJB_FPIR_TARGETS,
) -> dict[float, tuple[float, float]]:
    """TPIR at each FPIR the way insightface's IJB 1:N evaluation reads it.

    The threshold for FPIR ``f`` is the ``ceil(P * f)``-th highest of all ``P x (G - 1)``
    non-mate scores (``P`` probes, ``G`` gallery templates); TPIR is the fraction of
    probes whose mate scores strictly above it (whatever its rank).

    Args:
        mate_scores: ``(P,)`` each probe's score with its mate.
        top_nonmate: the highest non-mate scores, descending, at least
            :func:`nonmates_needed` of them (all of them when there are fewer).
    Returns:
        ``{fpir: (tpir, threshold)}``; ``(nan, nan)`` when there are fewer non-mate
        scores than the FPIR needs.
    """
    mate = np.asarray(mate_scores, dtype=np.float64).reshape(-1)
    top = np.asarray(top_nonmate, dtype=np.float64).reshape(-1)
    out: dict[float, tuple[float, float]] = {}
    for f in fpir_targets:
        need = int(np.ceil(mate.size * f))
        if need < 1 or need > top.size:
            out[float(f)] = (float("nan"), float("nan"))
            continue
        th = float(top[need - 1])
        out[float(f)] = (float(np.mean(mate > th)), th)
    return out


def cmc_curve(ranks: np.ndarray, max_rank: int) -> np.ndarray:
    """``(max_rank,)``: the fraction of probes whose mate has rank ``<= r``, r = 1..max_rank."""
    ranks = np.asarray(ranks).reshape(-1)
    if ranks.size == 0:
        return np.full(max_rank, np.nan)
    counts = np.bincount(np.minimum(ranks, max_rank + 1), minlength=max_rank + 2)
    return np.cumsum(counts[1 : max_rank + 1]) / ranks.size
