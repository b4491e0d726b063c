"""IJB-B/C 1:N identification: the chunked mate search against brute force (ties
included), and the whole protocol on a small IJB-like tree against a brute-force
computation written from insightface's ``ijb_1n.py`` definitions."""

from __future__ import annotations

import heapq
import json
import math

import cv2
import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from datasets.faces.align import ARCFACE_TEMPLATE
from eval import ijb, ijb_protocol
from eval.extract import normalize_pixels
from eval.gallery_search import mate_search
from eval.ijb_data import IJBDataError, load_aligned, read_1n_meta, read_ijb_meta
from eval.metrics import cmc_curve, nonmates_needed, tpir_at_fpir
from eval.onnx_export import export_onnx
from tests.eval.test_eval_ijb import PoolNet, _apply, _face, _similarity


def _brute_mates(gallery, probes, mates):
    s = probes.astype(np.float64) @ gallery.astype(np.float64).T
    mate_scores = s[np.arange(len(s)), mates]
    ranks = []
    for i, row in enumerate(s):
        order = sorted(range(len(row)), key=lambda j, r=row: (-r[j], j))
        ranks.append(order.index(mates[i]) + 1)
    nonmate = [row[j] for i, row in enumerate(s) for j in range(len(row)) if j != mates[i]]
    return mate_scores, np.array(ranks), np.array(sorted(nonmate, reverse=True))


@settings(max_examples=60, deadline=None)
@given(
    st.integers(2, 25),
    st.integers(1, 12),
    st.integers(1, 6),
    st.integers(1, 5),
    st.integers(0, 40),
    st.integers(0, 2**31 - 1),
)
def test_mate_search_equals_brute_force_with_ties(g, p, gc, pc, keep, seed):
    rng = np.random.default_rng(seed)
    gallery = rng.integers(-2, 3, (g, 3)).astype(np.float64)
    gallery[rng.random(g) < 0.3] = gallery[0]
    probes = rng.integers(-2, 3, (p, 3)).astype(np.float64)
    mates = rng.integers(0, g, p)
    ms, ranks, top = mate_search(gallery, probes, mates, keep, gallery_chunk=gc, probe_chunk=pc)
    e_ms, e_ranks, e_nonmate = _brute_mates(gallery, probes, mates)
    np.testing.assert_array_equal(ms, e_ms)
    np.testing.assert_array_equal(ranks, e_ranks)
    np.testing.assert_array_equal(top, e_nonmate[:keep])


def test_tpir_and_cmc_hand_checked():
    mate = np.array([0.9, 0.5, 0.3, 0.7])
    nonmate = np.array([0.8, 0.6, 0.4, 0.2])  # the highest, descending
    # FPIR 0.25 -> ceil(4 * 0.25) = 1st non-mate 0.8 -> mates above: 0.9 -> 1/4;
    # FPIR 0.5 -> 2nd, 0.6 -> 0.9, 0.7 -> 2/4; FPIR 0.75 -> 0.4 -> 3/4.
    got = tpir_at_fpir(mate, nonmate, (0.25, 0.5, 0.75, 2.0))
    assert got[0.25] == (0.25, 0.8) and got[0.5] == (0.5, 0.6) and got[0.75] == (0.75, 0.4)
    assert np.isnan(got[2.0][0])  # needs 8 non-mates, 4 known
    assert nonmates_needed(19593) == 1960
    np.testing.assert_array_equal(cmc_curve(np.array([1, 3, 1, 7]), 4), [0.5, 0.5, 0.75, 0.75])


# ---------------------------------------------------------------- an IJB-like tree

SUBJECTS = 6
G1, G2 = (0, 1, 2), (3, 4, 5)


def _write_face(root, rng, name, bgr):
    s = _similarity(rng.uniform(0.9, 1.2), rng.uniform(-20, 20), *rng.uniform(-12, 12, 2))
    s[:, 2] += 100 - _apply(s, np.array([[56.0, 56.0]]))[0]
    loose = cv2.warpAffine(bgr, s, (200, 200))
    cv2.imwrite(str(root / "loose_crop" / name), loose, [cv2.IMWRITE_JPEG_QUALITY, 98])
    pts = _apply(s, ARCFACE_TEMPLATE).reshape(-1)
    return " ".join(f"{v:.6f}" for v in pts) + f" {rng.uniform(0.5, 1.0):.6f}"


@pytest.fixture(scope="module")
def ijb_1n_root(tmp_path_factory):
    """6 subjects: one gallery template each (G1: 0-2, G2: 3-5; a still and a two-frame
    video), two probe templates each whose faces are blends with another subject's."""
    root = tmp_path_factory.mktemp("IJBC1N")
    (root / "loose_crop").mkdir()
    (root / "meta").mkdir()
    rng = np.random.default_rng(5)
    tid_mid, lms = [], []
    csv_rows = {"G1": [], "G2": [], "probe": []}
    n = 0

    def add(template, media, subject, bgr, csv_name):
        nonlocal n
        n += 1
        name = f"{n}.jpg"
        lms.append(f"{name} {_write_face(root, rng, name, bgr)}")
        tid_mid.append(f"{name} {template} {media}")
        csv_rows[csv_name].append(f"{template},{subject},img/{name},0,0,10,10")

    for subject in range(SUBJECTS):
        template = 1000 + subject
        csv_name = "G1" if subject in G1 else "G2"
        add(template, 2 * template, subject, _face(subject), csv_name)
        for _ in range(2):
            add(template, 2 * template + 1, subject, _face(subject), csv_name)
        for k in range(2):
            template = 2000 + 10 * subject + k
            other = (subject + 1 + k) % SUBJECTS
            a = rng.uniform(0.2, 0.65)
            blend = cv2.addWeighted(_face(subject), 1 - a, _face(other), a, 0)
            add(template, 2 * template, subject, blend, "probe")
    meta = root / "meta"
    (meta / "ijbc_face_tid_mid.txt").write_text("\n".join(tid_mid) + "\n")
    (meta / "ijbc_name_5pts_score.txt").write_text("\n".join(lms) + "\n")
    head = "TEMPLATE_ID,SUBJECT_ID,FILENAME,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT\n"
    for key, fname in (("G1", "G1"), ("G2", "G2"), ("probe", None)):
        file = f"ijbc_1N_gallery_{fname}.csv" if fname else "ijbc_1N_probe_mixed.csv"
        (meta / file).write_text(head + "\n".join(csv_rows[key]) + "\n")
    return root


def _reference_1n(meta, sets, model):
    """ijb_1n.py's computation, restated: F2 flip features times faceness, media means
    summed per template then normalised, gallery = G1 + G2, argsort top-k, and TPIR from
    the ceil(P * FPIR)-th largest of all non-mate scores."""
    faces = torch.from_numpy(np.stack([load_aligned(meta, i) for i in range(len(meta.names))]))
    x = normalize_pixels(faces.permute(0, 3, 1, 2))
    with torch.no_grad():
        feats = (model(x) + model(x.flip(3))).numpy().astype(np.float64)
    feats = feats * meta.faceness[:, None]

    def templates(choose):
        out = []
        for t in np.unique(choose):
            ind = np.where(meta.templates == t)[0]
            medias = meta.medias[ind]
            v = sum(feats[ind[medias == m]].mean(0) for m in np.unique(medias))
            out.append(v / np.sqrt(np.sum(v**2)))
        return np.array(out)

    g_t = np.concatenate([sets.galleries["G1"][0], sets.galleries["G2"][0]])
    g_s = np.concatenate([sets.galleries["G1"][1], sets.galleries["G2"][1]])
    gallery = np.concatenate(
        [templates(sets.galleries["G1"][0]), templates(sets.galleries["G2"][0])]
    )
    probes = templates(sets.probe_templates)
    mask = [int(np.flatnonzero(g_s == s)[0]) for s in sets.probe_subjects]
    sim = probes @ gallery.T
    top = np.argsort(-sim)
    q = len(probes)
    rank = {k: sum(mask[i] in top[i, :k] for i in range(q)) / q for k in (1, 5, 10)}
    pos = np.array([sim[i, mask[i]] for i in range(q)])
    neg = [sim[i, j] for i in range(q) for j in range(len(g_t)) if j != mask[i]]
    tpir = {}
    for far in (0.01, 0.1):
        need = math.ceil(q * far)
        th = heapq.nlargest(need, neg)[need - 1]
        tpir[far] = (np.sum(pos > th) / q, th)
    ranks = np.array([list(top[i]).index(mask[i]) + 1 for i in range(q)])
    return rank, tpir, ranks, pos


def test_1n_meta_reading(ijb_1n_root):
    meta = read_ijb_meta(ijb_1n_root, "IJBC", pairs=False)  # no pair file needed
    sets = read_1n_meta(ijb_1n_root, meta, "IJBC")
    assert sets.galleries["G1"][1].tolist() == [0, 1, 2]
    assert sets.galleries["G2"][0].tolist() == [1003, 1004, 1005]  # one entry per template
    assert len(sets.probe_templates) == 12 and sorted(set(sets.probe_subjects)) == list(range(6))
    with pytest.raises(FileNotFoundError, match=r"ijbb_1N_gallery_S1\.csv"):
        read_1n_meta(ijb_1n_root, meta, "IJBB")


def test_1n_protocol_equals_reference_restatement(ijb_1n_root):
    meta = read_ijb_meta(ijb_1n_root, pairs=False)
    sets = read_1n_meta(ijb_1n_root, meta)
    model = PoolNet()
    result = ijb_protocol.evaluate_ijb_1n(
        model, meta, sets, batch_size=7, chunk_size=4, progress=False
    )
    rank, tpir, ranks, pos = _reference_1n(meta, sets, model)
    np.testing.assert_allclose(result.mate_scores, pos, rtol=1e-6, atol=1e-7)
    np.testing.assert_array_equal(result.ranks, ranks)
    assert result.rank_k == pytest.approx(rank)
    for far, (t, th) in tpir.items():
        assert result.tpir_at_fpir[far][0] == pytest.approx(t)
        assert result.tpir_at_fpir[far][1] == pytest.approx(th, rel=1e-6)
    assert 0 < result.rank_k[1] < 1 and result.rank_k[10] == 1.0  # not a trivial fixture
    assert result.cmc.shape == (6,) and result.cmc[-1] == 1.0


def test_1n_command_writes_table_plot_and_json(ijb_1n_root, tmp_path, capsys):
    onnx_path = export_onnx(PoolNet(), tmp_path / "pool.onnx", exporter="torchscript")
    out = tmp_path / "out"
    result = ijb.main(
        [
            *("--root", str(ijb_1n_root), "--onnx", onnx_path, "--output-dir", str(out)),
            *("--protocol", "1n", "--no-progress", "--chunk-size", "5"),
        ]
    )
    printed = capsys.readouterr().out
    assert "TPIR@1e-02" in printed and "rank-1" in printed
    assert (out / "ijbc_1n_cmc.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    table = json.loads((out / "ijbc_1n_result.json").read_text())
    assert table["num_probes"] == 12 and table["num_gallery"] == 6
    assert table["rank"]["1"] == pytest.approx(result.rank_k[1])
    saved = np.load(out / "ijbc_1n_ranks.npz")
    np.testing.assert_array_equal(saved["ranks"], result.ranks)
    assert not [p for p in out.iterdir() if p.name.startswith(".")]


def test_1n_probe_without_a_gallery_mate_is_refused(ijb_1n_root, tmp_path):
    meta = read_ijb_meta(ijb_1n_root, pairs=False)
    sets = read_1n_meta(ijb_1n_root, meta)
    sets.probe_subjects = sets.probe_subjects.copy()
    sets.probe_subjects[3] = 99
    with pytest.raises(IJBDataError, match=r"probe_mixed\.csv: probe subject 99 has 0 templates"):
        ijb_protocol.evaluate_ijb_1n(PoolNet(), meta, sets, progress=False)
