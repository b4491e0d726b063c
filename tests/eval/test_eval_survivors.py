"""eval: tests written against planted bugs that the rest of the suite let through
(issue 26), and the 10-fold metrics against a brute-force computation (hypothesis).

* ``predict_same = dist < threshold``: distances *equal* to a threshold are predicted
  different. The other metric tests avoid such ties; here they are the point;
* in-graph normalisation is read from what the graph's leading ops do to the pixels (on
  every channel), never from node names: a planted bug took a name-based ``Sub`` *or*
  ``Mul`` for a normalisation.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper, numpy_helper

from eval.metrics import (
    ACC_THRESHOLDS_STEP,
    calculate_roc,
    calculate_val,
    contiguous_folds,
    evaluate,
    pair_distances,
    tar_at_far,
    threshold_at_far,
)
from eval.onnx_infer import normalises_in_graph

U64 = 2.0**-53  # float64 unit roundoff

PROPERTY = settings(
    max_examples=60,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
THRESHOLDS = np.arange(0, 4, ACC_THRESHOLDS_STEP)


# ------------------------------------------------------------ ties at thresholds
def test_a_distance_equal_to_a_threshold_is_predicted_different() -> None:
    """One fold (train = test). Genuine pairs at exactly thresholds[10] and [20],
    impostors at exactly thresholds[30] and [40]: at threshold k a pair counts as
    accepted only when its distance is strictly below."""
    dist = THRESHOLDS[[10, 20, 30, 40]]
    same = np.array([True, True, False, False])
    tpr, fpr, accuracy = calculate_roc(THRESHOLDS, dist, same, nrof_folds=1)
    assert (tpr[10], tpr[11], tpr[20], tpr[21]) == (0.0, 0.5, 0.5, 1.0)
    assert (fpr[30], fpr[31], fpr[40], fpr[41]) == (0.0, 0.5, 0.5, 1.0)
    # best threshold: the first that accepts both genuine and no impostor: index 21
    assert accuracy.tolist() == [1.0]
    # VAL at a far target reached exactly at a tie: thresholds[31] is the first with
    # FAR 0.5 >= 0.5, so the threshold interpolates between [30] and [31]
    val, _, far = calculate_val(THRESHOLDS, dist, same, far_target=0.5, nrof_folds=1)
    assert (val, far) == (1.0, 0.5)


def _brute_roc(thresholds, dist, same, folds):
    """The 10-fold ROC and accuracy, pair by pair and threshold by threshold."""
    n = len(dist)
    tprs, fprs, accuracy = [], [], []
    for train, test in _folds(n, folds):

        def rates(idx, t):
            tp = sum(1 for i in idx if same[i] and dist[i] < t)
            fp = sum(1 for i in idx if not same[i] and dist[i] < t)
            tn = sum(1 for i in idx if not same[i] and not dist[i] < t)
            return tp, fp, tn

        correct = [rates(train, t)[0] + rates(train, t)[2] for t in thresholds]
        best = max(range(len(thresholds)), key=lambda k: (correct[k], -k))
        n_same = sum(1 for i in test if same[i])
        n_diff = len(test) - n_same
        tprs.append([rates(test, t)[0] / n_same if n_same else 0.0 for t in thresholds])
        fprs.append([rates(test, t)[1] / n_diff if n_diff else 0.0 for t in thresholds])
        tp, _, tn = rates(test, thresholds[best])
        accuracy.append((tp + tn) / len(test))
    return np.mean(tprs, axis=0), np.mean(fprs, axis=0), np.array(accuracy)


def _folds(n: int, folds: int):
    """KFold(n_splits=folds, shuffle=False), written out; one fold trains on all."""
    if folds == 1:
        return [(list(range(n)), list(range(n)))]
    sizes = [n // folds + (1 if f < n % folds else 0) for f in range(folds)]
    out, start = [], 0
    for size in sizes:
        test = list(range(start, start + size))
        out.append(([i for i in range(n) if i not in test], test))
        start += size
    return out


@PROPERTY
@given(
    pairs=st.lists(
        st.tuples(
            st.integers(0, 60) | st.floats(0, 0.6, allow_nan=False),  # grid index or free
            st.booleans(),
        ),
        min_size=1,
        max_size=24,
    ),
    folds=st.sampled_from([1, 2, 3, 5, 10]),
)
def test_roc_and_accuracy_equal_a_brute_force_count_with_ties(pairs, folds) -> None:
    """Distances on the threshold grid itself (ties) or between its points."""
    if len(pairs) < folds:
        folds = 1
    thresholds = THRESHOLDS[:61]
    dist = np.array([thresholds[d] if isinstance(d, int) else d for d, _ in pairs])
    same = np.array([s for _, s in pairs])
    tpr, fpr, accuracy = calculate_roc(thresholds, dist, same, nrof_folds=folds)
    want_tpr, want_fpr, want_acc = _brute_roc(thresholds, dist, same, folds)
    # ratios of integer counts, averaged over F folds: the same up to the mean's
    # float64 rounding, at most (F + 1) * U64 relative
    tol = (folds + 1) * U64
    np.testing.assert_allclose(tpr, want_tpr, rtol=tol, atol=0)
    np.testing.assert_allclose(fpr, want_fpr, rtol=tol, atol=0)
    assert accuracy.tolist() == want_acc.tolist()  # one ratio each: exact


def _threshold_at(thresholds, far, target) -> float:
    """The FAR curve reaches ``target`` between the last threshold below it and the
    first at or above it: linear interpolation there (0.0 if never reached)."""
    reached = [k for k, f in enumerate(far) if f >= target]
    if not reached:
        return 0.0
    hi = reached[0]
    if hi == 0:
        return float(thresholds[0])
    f0, f1 = far[hi - 1], far[hi]
    return float(
        thresholds[hi - 1] * (f1 - target) / (f1 - f0) + thresholds[hi] * (target - f0) / (f1 - f0)
    )


@PROPERTY
@given(
    pairs=st.lists(st.tuples(st.integers(0, 40), st.booleans()), min_size=2, max_size=24),
    target=st.sampled_from([0.0, 0.1, 0.25, 0.5, 1.0]),
)
def test_val_at_far_equals_a_brute_force_count_with_ties(pairs, target) -> None:
    thresholds = np.arange(0, 0.5, 0.01)
    dist = np.array([thresholds[d % len(thresholds)] for d, _ in pairs])
    same = np.array([s for _, s in pairs])
    folds = 2
    vals, fars = [], []
    for train, test in contiguous_folds(len(dist), folds):
        diff_train = [dist[i] for i in train if not same[i]]
        curve = [sum(d < t for d in diff_train) / len(diff_train) if diff_train else 0.0
                 for t in thresholds]  # fmt: skip
        t = _threshold_at(thresholds, curve, target)
        n_same = sum(1 for i in test if same[i])
        n_diff = len(test) - n_same
        ta = sum(1 for i in test if same[i] and dist[i] < t)
        fa = sum(1 for i in test if not same[i] and dist[i] < t)
        vals.append(ta / n_same if n_same else 0.0)
        fars.append(fa / n_diff if n_diff else 0.0)
    val, val_std, far = calculate_val(thresholds, dist, same, target, nrof_folds=folds)
    tol = (folds + 1) * U64  # a mean (and std) of F ratios in float64
    assert val == pytest.approx(np.mean(vals), rel=tol, abs=0)
    assert far == pytest.approx(np.mean(fars), rel=tol, abs=0)
    assert val_std == pytest.approx(np.std(vals), rel=8 * tol, abs=8 * tol)


# ------------------------------------------------------ in-graph normalisation
def _graph(path, ops: list[tuple[str, object, str]]) -> str:
    """``data (N, 3, 4, 4)`` through ``ops`` (``(op type, constant operand, node name)``,
    a scalar or one value per channel), then a Flatten."""
    nodes, inits, x = [], [], "data"
    for i, (op, value, name) in enumerate(ops):
        const = np.asarray(value, np.float32)
        if const.ndim:
            const = const.reshape(1, 3, 1, 1)
        inits.append(numpy_helper.from_array(const, f"c{i}"))
        nodes.append(helper.make_node(op, [x, f"c{i}"], [f"t{i}"], name=name))
        x = f"t{i}"
    nodes.append(helper.make_node("Flatten", [x], ["out"], name="flatten0", axis=1))
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, 4, 4])],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["N", 48])],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(path))
    return str(path)


@pytest.mark.parametrize(
    ("ops", "expected"),
    [
        ([("Sub", 127.5, "_minus0"), ("Mul", 1 / 128, "_mul0")], True),  # insightface's
        ([("Sub", 127.5, "conv0"), ("Mul", 1 / 128, "conv1")], True),  # names do not matter
        ([("Add", 0.0, "_minus0"), ("Mul", 1.0, "_mul0")], False),  # nor do they make one
        ([("Sub", 127.5, "s")], True),  # a pixel-scale mean alone: raw pixels go in
        ([("Mul", 1 / 255, "m")], True),  # 0..255 into [0, 1] alone
        ([("Mul", 0.5, "m"), ("Add", 0.5, "a")], False),  # expects normalised input
        ([("Sub", [127.5, 127.5, 0.0], "s")], False),  # one channel left raw
        ([("Sub", [123.7, 116.3, 103.5], "s"), ("Div", [58.4, 57.1, 57.4], "d")], True),
        ([], False),
    ],
)
def test_in_graph_normalisation_is_read_from_the_ops_not_their_names(
    tmp_path, ops, expected
) -> None:
    """A graph normalises raw pixels itself when its leading ops subtract a pixel-scale
    mean or map 0..255 into a small range, on every channel; the nodes' names (which
    insightface's own test reads) decide nothing."""
    assert normalises_in_graph(_graph(tmp_path / "m.onnx", ops)) is expected


# ------------------------------------------------ defaults and inputs (mutation survivors)
#: The FAR columns of the IJB-B/C 1:1 report (insightface's ``IJB_11.py``): 1e-6 .. 1e-1.
IJB_PROTOCOL_FARS = [1e-6, 1e-5, 1e-4, 1e-3, 1e-2, 1e-1]


def test_tar_at_far_reports_the_ijb_protocols_far_columns_by_default() -> None:
    """Default targets: the documented IJB table. Each TAR is read, by brute force, at
    the ROC point whose FPR is closest to the target (highest TPR among ties)."""
    fpr = np.array([0.0, 0.0, 2e-6, 2e-5, 3e-4, 2e-3, 0.02, 0.3, 1.0])
    tpr = np.array([0.0, 0.05, 0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 1.0])
    table = tar_at_far(fpr, tpr)
    assert list(table) == IJB_PROTOCOL_FARS
    for target in IJB_PROTOCOL_FARS:
        gaps = [abs(f - target) for f in fpr]
        want = max(t for f, t in zip(fpr, tpr, strict=True) if abs(f - target) == min(gaps))
        assert table[target] == want, target


@pytest.mark.parametrize("shape", [(3, 2), (5, 4), (4,)])
def test_pair_distances_refuses_rows_that_do_not_form_pairs(shape) -> None:
    with pytest.raises(ValueError, match=rf"even number of rows, got \({shape[0]},"):
        pair_distances(np.zeros(shape))


def test_calculate_roc_runs_ten_folds_by_default() -> None:
    """The protocol's 10 contiguous folds, against the brute-force count."""
    rng = np.random.default_rng(5)
    dist = rng.choice(THRESHOLDS[:40], size=23)
    same = rng.random(23) < 0.5
    thresholds = THRESHOLDS[:40]
    tpr, fpr, accuracy = calculate_roc(thresholds, dist, same)
    want_tpr, want_fpr, want_acc = _brute_roc(thresholds, dist, same, 10)
    assert accuracy.tolist() == want_acc.tolist() and len(accuracy) == 10
    np.testing.assert_allclose(tpr, want_tpr, rtol=11 * U64, atol=0)
    np.testing.assert_allclose(fpr, want_fpr, rtol=11 * U64, atol=0)


def test_threshold_at_far_takes_any_array_like_far_curve_in_float64() -> None:
    """A list, and a float32 curve: both interpolated in float64 (the brute-force
    interpolation of the float64 values; float32 arithmetic would be ~1e-8 off)."""
    thresholds = [0.0, 1.0, 2.0, 3.0]
    far = [0.0, 0.1, 0.3, 0.7]
    assert threshold_at_far(thresholds, far, 0.2) == _threshold_at(thresholds, far, 0.2)
    far32 = np.array(far, np.float32)
    want = _threshold_at(thresholds, [float(f) for f in far32], 0.2)
    assert threshold_at_far(np.array(thresholds), far32, 0.2) == want
    assert abs(want - 1.5) < 1e-6  # the float32 values themselves are close to far


def test_evaluate_reads_val_on_the_protocols_fine_threshold_grid() -> None:
    """VAL@FAR=1e-3 on thresholds ``np.arange(0, 4, 0.001)`` (the documented protocol),
    not the accuracy grid's 0.01: two folds, each with 5 impostors at distance 1.0055
    and 5 genuine pairs at 1.003. On the fine grid the training FAR first exceeds 1e-3
    at 1.006, so the threshold is ~1.005 and the genuine pairs are accepted; on the
    0.01 grid it would be ~1.00 and they would not."""
    dists = np.tile(np.r_[np.full(5, 1.0055), np.full(5, 1.003)], 2)
    same = np.tile(np.r_[np.zeros(5, bool), np.ones(5, bool)], 2)
    emb = np.zeros((2 * dists.size, 2))
    emb[1::2, 0] = np.sqrt(dists)
    got_dist = np.sum(np.square(emb[0::2] - emb[1::2]), 1)  # what the protocol compares
    fine = np.arange(0, 4, 0.001)
    vals, fars = [], []
    for train, test in _folds(dists.size, 2):
        diff_train = np.array([got_dist[i] for i in train if not same[i]])
        curve = [float(np.mean(diff_train < t)) for t in fine]
        t = _threshold_at(fine, curve, 1e-3)
        vals.append(np.mean([got_dist[i] < t for i in test if same[i]]))
        fars.append(np.mean([got_dist[i] < t for i in test if not same[i]]))
    _, _, _, val, val_std, far = evaluate(emb, same, nrof_folds=2)
    assert (val, val_std, far) == (np.mean(vals), np.std(vals), np.mean(fars))
    assert val == 1.0  # the genuine pairs fall between the two grids' thresholds
