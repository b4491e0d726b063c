"""IJB-B/C 1:1: alignment, pooling, ROC / TAR@FAR, and the whole pipeline on a built fixture."""

from __future__ import annotations

import itertools
import json

import cv2
import numpy as np
import pytest
import torch
from torch import nn

from datasets.faces.align import ARCFACE_TEMPLATE, align_face, similarity_transform
from eval import ijb, ijb_protocol
from eval.extract import normalize_pixels
from eval.ijb_data import load_aligned, read_ijb_meta
from eval.metrics import IJB_FAR_TARGETS, roc_curve, tar_at_far
from eval.onnx_export import export_onnx

# ---------------------------------------------------------------- alignment


def _lstsq_similarity(src: np.ndarray, dst: np.ndarray) -> np.ndarray:
    """Direct linear least squares for x' = a x - b y + tx, y' = b x + a y + ty."""
    rows, rhs = [], []
    for (x, y), (u, v) in zip(src, dst, strict=True):
        rows += [[x, -y, 1, 0], [y, x, 0, 1]]
        rhs += [u, v]
    a, b, tx, ty = np.linalg.lstsq(np.array(rows), np.array(rhs), rcond=None)[0]
    return np.array([[a, -b, tx], [b, a, ty]])


def _similarity(scale: float, angle_deg: float, tx: float, ty: float) -> np.ndarray:
    t = np.deg2rad(angle_deg)
    c, s = scale * np.cos(t), scale * np.sin(t)
    return np.array([[c, -s, tx], [s, c, ty]])


def _apply(m: np.ndarray, pts: np.ndarray) -> np.ndarray:
    return pts @ m[:, :2].T + m[:, 2]


def _invert(m: np.ndarray) -> np.ndarray:
    full = np.vstack([m, [0, 0, 1]])
    return np.linalg.inv(full)[:2]


def test_similarity_matches_direct_least_squares():
    rng = np.random.default_rng(0)
    for trial in range(50):
        src = rng.uniform(0, 200, (5, 2))
        if trial % 2:  # noisy similarity images of the template
            m = _similarity(rng.uniform(0.5, 2), rng.uniform(-60, 60), *rng.uniform(-50, 50, 2))
            src = _apply(m, ARCFACE_TEMPLATE) + rng.normal(0, 2, (5, 2))
        elif trial % 4 == 0:  # mirrored configuration: still a proper rotation
            src = ARCFACE_TEMPLATE * [-1, 1] + rng.normal(0, 1, (5, 2))
        np.testing.assert_allclose(
            similarity_transform(src, ARCFACE_TEMPLATE),
            _lstsq_similarity(src, ARCFACE_TEMPLATE),
            atol=1e-8,
        )
    with pytest.raises(ValueError):
        similarity_transform(np.zeros((5, 2)), ARCFACE_TEMPLATE)


def test_known_landmarks_align_back_exactly():
    s = _similarity(1.3, 17.0, 40.0, 25.0)  # aligned -> loose
    landmarks = _apply(s, ARCFACE_TEMPLATE)
    np.testing.assert_allclose(similarity_transform(landmarks, ARCFACE_TEMPLATE), _invert(s))
    aligned = _face(0)
    loose = cv2.warpAffine(aligned, s, (200, 200))
    back = align_face(loose, landmarks.reshape(-1))
    diff = np.abs(back.astype(int) - aligned.astype(int))[16:96, 16:96]
    assert back.shape == (112, 112, 3) and diff.mean() < 3


# ---------------------------------------------------------------- pooling and ROC


def test_template_pooling_hand_checked():
    feats = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -5.0], [4.0, 0.0]])
    templates = np.array([7, 7, 7, 3, 3])
    medias = np.array([5, 5, 6, 1, 2])
    ids, pooled = ijb_protocol.template_features(feats, templates, medias)
    assert ids.tolist() == [3, 7]
    # template 7: mean([1,0],[3,0]) + [0,2] = [2,2]; template 3: [0,-5] + [4,0]
    np.testing.assert_allclose(pooled[1], np.array([2, 2]) / np.sqrt(8))
    np.testing.assert_allclose(pooled[0], np.array([4, -5]) / np.sqrt(41))
    scores = ijb_protocol.pair_scores(
        ids, pooled, np.array([7, 3, 7]), np.array([3, 3, 7]), chunk_size=2
    )
    np.testing.assert_allclose(scores, [(8 - 10) / np.sqrt(8 * 41), 1, 1])
    with pytest.raises(ValueError, match="template 9"):
        ijb_protocol.pair_scores(ids, pooled, np.array([9]), np.array([3]))


def test_roc_and_tar_at_far_match_sklearn_and_reference_selection():
    metrics = pytest.importorskip("sklearn.metrics")
    rng = np.random.default_rng(0)
    labels = (rng.random(3000) < 0.2).astype(np.int8)
    scores = np.round(rng.normal(labels * 1.5, 1.0), 2)  # rounded: many ties
    fpr, tpr, thr = roc_curve(labels, scores)
    e_fpr, e_tpr, e_thr = metrics.roc_curve(labels, scores)
    np.testing.assert_allclose(fpr, e_fpr)
    np.testing.assert_allclose(tpr, e_tpr)
    np.testing.assert_allclose(thr[1:], e_thr[1:])
    table = tar_at_far(fpr, tpr)
    f, t = np.flipud(e_fpr), np.flipud(e_tpr)
    for far in IJB_FAR_TARGETS:  # the reference's selection rule
        _, i = min(zip(abs(f - far), range(len(f)), strict=True))
        assert table[far] == t[i]


def test_tar_at_far_hand_checked():
    # 4 genuine, 10 impostor pairs.
    labels = np.array([1, 1, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0])
    scores = np.array([0.9, 0.8, 0.7, 0.6, 0.5, 0.4, 0.3, 0.2, 0.1, 0.0, -0.1, -0.2, -0.3, -0.4])
    fpr, tpr, _ = roc_curve(labels, scores)
    # ROC points (fp, tp): (0,0) (0,1) (0,2) (1,2) (1,3) (9,3) (9,4) (10,4); the collinear
    # points (2,3) .. (8,3) are dropped, as sklearn's roc_curve does by default.
    assert fpr.tolist() == [0, 0, 0, 0.1, 0.1, 0.9, 0.9, 1.0]
    table = tar_at_far(fpr, tpr, (1e-6, 0.1, 0.3, 0.6))
    # FPR 0 -> best TPR 0.5; 0.1 and 0.3 -> the (1,3) corner; 0.6 -> nearest corner FPR 0.9,
    # whose best TPR is 1.0.
    assert table == {1e-6: 0.5, 0.1: 0.75, 0.3: 0.75, 0.6: 1.0}


# ---------------------------------------------------------------- fixture and pipeline


def _face(identity: int) -> np.ndarray:
    """A smooth random 112x112 BGR pattern standing for an aligned face."""
    rng = np.random.default_rng(100 + identity)
    small = rng.integers(0, 256, (7, 7, 3), dtype=np.uint8)
    return cv2.resize(small, (112, 112), interpolation=cv2.INTER_LINEAR)


class PoolNet(nn.Module):
    """Embedding = 8x8 average-pooled pixels (192-d): same pattern -> same embedding."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.adaptive_avg_pool2d(x, 8).flatten(1)


@pytest.fixture(scope="module")
def ijb_root(tmp_path_factory):
    """4 identities x 2 templates x (1 still + a 2-frame video), all template pairs."""
    root = tmp_path_factory.mktemp("IJBC")
    (root / "loose_crop").mkdir()
    (root / "meta").mkdir()
    rng = np.random.default_rng(1)
    tid_mid, lms, truth = [], [], {}
    n = 0
    for identity in range(4):
        for k in range(2):
            template = 100 + 10 * identity + k
            for media, count in ((2 * template, 1), (2 * template + 1, 2)):
                for _ in range(count):
                    n += 1
                    name = f"{n}.jpg"
                    s = _similarity(
                        rng.uniform(0.9, 1.2), rng.uniform(-20, 20), *rng.uniform(-12, 12, 2)
                    )
                    s[:, 2] += 100 - _apply(s, np.array([[56.0, 56.0]]))[0]  # centre in canvas
                    loose = cv2.warpAffine(_face(identity), s, (200, 200))
                    cv2.imwrite(
                        str(root / "loose_crop" / name), loose, [cv2.IMWRITE_JPEG_QUALITY, 98]
                    )
                    pts = _apply(s, ARCFACE_TEMPLATE)
                    score = rng.uniform(0.5, 1.0)
                    tid_mid.append(f"{name} {template} {media}")
                    lms.append(
                        name + " " + " ".join(f"{v:.6f}" for v in pts.reshape(-1)) + f" {score:.6f}"
                    )
                    truth[name] = (s, identity)
    templates = [100 + 10 * i + k for i in range(4) for k in range(2)]
    pairs = [
        f"{a} {b} {int((a - 100) // 10 == (b - 100) // 10)}"
        for a, b in itertools.combinations(templates, 2)
    ]
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(reversed(lms)) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text("\n".join(pairs) + "\n")
    return root, truth


def test_meta_reading_and_alignment(ijb_root):
    root, truth = ijb_root
    meta = read_ijb_meta(root, "IJBC")  # landmark file is in reverse order: matched by name
    assert len(meta.names) == 24 and len(meta.pair_t1) == 28 and meta.labels.sum() == 4
    for i, name in enumerate(meta.names):
        s, identity = truth[name]
        np.testing.assert_allclose(meta.landmarks[i], _apply(s, ARCFACE_TEMPLATE), atol=1e-4)
        m = similarity_transform(meta.landmarks[i], ARCFACE_TEMPLATE)
        np.testing.assert_allclose(m, _invert(s), atol=1e-4)
        np.testing.assert_allclose(
            m, _lstsq_similarity(meta.landmarks[i], ARCFACE_TEMPLATE), atol=1e-8
        )
        face = load_aligned(meta, i)
        expected = cv2.cvtColor(_face(identity), cv2.COLOR_BGR2RGB).astype(int)
        assert np.abs(face.astype(int) - expected)[16:96, 16:96].mean() < 4
    with pytest.raises(FileNotFoundError, match="ijbb_face_tid_mid"):
        read_ijb_meta(root, "IJBB")


def test_pipeline_scores_and_table(ijb_root):
    root, _ = ijb_root
    meta = read_ijb_meta(root)
    model = PoolNet()
    result = ijb_protocol.evaluate_ijb(
        model, meta, batch_size=5, workers=2, chunk_size=7, progress=False
    )
    # Independent recomputation of every step.
    faces = torch.from_numpy(np.stack([load_aligned(meta, i) for i in range(24)]))
    x = normalize_pixels(faces.permute(0, 3, 1, 2))
    feats = (model(x) + model(x.flip(3))).numpy().astype(np.float64) * meta.faceness[:, None]
    expected_t = {}
    for t in np.unique(meta.templates):
        sel = meta.templates == t
        v = sum(feats[sel & (meta.medias == m)].mean(0) for m in np.unique(meta.medias[sel]))
        expected_t[t] = v / np.linalg.norm(v)
    expected = [
        expected_t[a] @ expected_t[b] for a, b in zip(meta.pair_t1, meta.pair_t2, strict=True)
    ]
    np.testing.assert_allclose(result.scores, expected, rtol=1e-5, atol=1e-6)
    genuine = result.scores[meta.labels == 1]
    impostor = result.scores[meta.labels == 0]
    assert genuine.min() > 0.95 and impostor.max() < genuine.min()
    assert result.tar_at_far == dict.fromkeys(IJB_FAR_TARGETS, 1.0)


def test_command_with_onnx(ijb_root, tmp_path, capsys):
    root, _ = ijb_root
    onnx_path = export_onnx(PoolNet(), tmp_path / "pool.onnx", exporter="torchscript")
    out = tmp_path / "out"
    result = ijb.main(
        [
            *("--root", str(root), "--onnx", onnx_path, "--output-dir", str(out)),
            *("--no-progress", "--batch-size", "8", "--chunk-size", "5"),
        ]
    )
    printed = capsys.readouterr().out
    assert "| IJBC" in printed and "100.00" in printed
    assert (out / "ijbc_roc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    scores = np.load(out / "ijbc_scores.npy")
    np.testing.assert_allclose(scores, result.scores)
    meta = read_ijb_meta(root)
    reference = ijb_protocol.evaluate_ijb(PoolNet(), meta, progress=False)
    np.testing.assert_allclose(scores, reference.scores, rtol=1e-5, atol=1e-6)
    table = json.loads((out / "ijbc_result.json").read_text())
    assert table["num_pairs"] == 28 and table["num_genuine"] == 4
    assert table["tar_at_far"]["1e-04"] == 1.0
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def _ijb_command_on_ranks(rank: int, world_size: int, argv: list[str]) -> dict:
    """``eval.ijb.main`` inside a gloo group, recording the devices the gathers get."""
    import os

    import torch.distributed as dist

    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world_size))
    devices: list[str] = []
    real = dist.all_gather

    def all_gather_spy(out: list[torch.Tensor], tensor: torch.Tensor, **kw) -> None:
        devices.extend(str(t.device) for t in [*out, tensor])
        real(out, tensor, **kw)

    dist.all_gather = all_gather_spy
    result = ijb.main(argv)
    return {"scores": result.scores, "devices": devices}


def test_command_shares_features_across_ranks(ijb_root, tmp_path):
    """Under torchrun each rank embeds half of the faces; the gathered features give the
    single-process scores on every rank, and rank 0 writes the outputs."""
    from tests.distributed import run_ranks

    root, _ = ijb_root
    onnx_path = export_onnx(PoolNet(), tmp_path / "pool.onnx", exporter="torchscript")
    argv = [
        *("--root", str(root), "--onnx", onnx_path, "--output-dir", str(tmp_path / "out")),
        *("--no-progress", "--batch-size", "5", "--workers", "1"),
    ]
    reference = ijb_protocol.evaluate_ijb(PoolNet(), read_ijb_meta(root), progress=False)
    ranks = run_ranks(_ijb_command_on_ranks, 2, argv)
    for got in ranks:
        np.testing.assert_allclose(got["scores"], reference.scores, rtol=1e-5, atol=1e-6)
        assert got["devices"] and set(got["devices"]) == {"cpu"}  # ONNX: gloo on CPU
    np.testing.assert_allclose(np.load(tmp_path / "out" / "ijbc_scores.npy"), ranks[0]["scores"])
