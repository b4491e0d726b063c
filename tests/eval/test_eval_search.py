"""1:N search: chunked exact top-k against a brute-force float64 top-k, templates, the
unknown threshold, the CSV / Parquet results, and the refusals."""

from __future__ import annotations

import csv

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from common.errors import UserError
from eval import gallery_search, search


def _brute_topk(gallery: np.ndarray, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 scores; order: score descending, then gallery index ascending."""
    s = probes.astype(np.float64) @ gallery.astype(np.float64).T
    idx = np.array([sorted(range(s.shape[1]), key=lambda j, r=r: (-r[j], j))[:k] for r in s])
    idx = idx.reshape(len(s), -1)
    return np.take_along_axis(s, idx, 1), idx


@settings(max_examples=60, deadline=None)
@given(
    st.integers(1, 40),  # gallery rows
    st.integers(1, 9),  # probes
    st.integers(1, 8),  # k
    st.integers(1, 7),  # gallery chunk
    st.integers(1, 4),  # probe chunk
    st.integers(0, 2**31 - 1),
)
def test_exact_topk_equals_brute_force_with_ties_and_chunk_edges(g, p, k, gc, pc, seed):
    rng = np.random.default_rng(seed)
    # Small integer vectors: exact float arithmetic and many tied scores.
    gallery = rng.integers(-2, 3, (g, 3)).astype(np.float64)
    gallery[rng.random(g) < 0.3] = gallery[0]  # repeated rows: ties across chunks
    probes = rng.integers(-2, 3, (p, 3)).astype(np.float64)
    scores, idx = gallery_search.exact_topk(gallery, probes, k, gallery_chunk=gc, probe_chunk=pc)
    e_scores, e_idx = _brute_topk(gallery, probes, k)
    assert idx.shape == (p, min(k, g))
    np.testing.assert_array_equal(scores, e_scores)
    np.testing.assert_array_equal(idx, e_idx)


def test_exact_topk_float32_random_matches_float64():
    rng = np.random.default_rng(0)
    gallery = gallery_search._unit(rng.normal(size=(1000, 64)).astype(np.float32))
    probes = gallery_search._unit(rng.normal(size=(37, 64)).astype(np.float32))
    scores, idx = gallery_search.exact_topk(gallery, probes, 10, gallery_chunk=97, probe_chunk=8)
    e_scores, e_idx = _brute_topk(gallery, probes, 10)
    assert scores.dtype == np.float32
    np.testing.assert_allclose(scores, e_scores, atol=1e-5)
    assert (idx == e_idx).mean() > 0.99  # float32 rounding may swap near-equal scores


def test_templates_are_mean_of_unit_rows_normalised():
    emb = np.array([[3.0, 0.0], [0.0, 1.0], [0.0, -2.0], [1.0, 1.0]], np.float32)
    names, t = gallery_search.make_templates(["b", "b", "a", "a"], emb)
    assert names == ["a", "b"]
    np.testing.assert_allclose(t[1], np.array([1, 1]) / np.sqrt(2), rtol=1e-6)
    a = np.array([0, -1]) + np.array([1, 1]) / np.sqrt(2)
    np.testing.assert_allclose(t[0], a / np.linalg.norm(a), rtol=1e-6)


def _embed_parquet(path, paths, emb, *, identity=None, drop=()):
    cols = {
        "path": pa.array(paths, pa.string()),
        "embedding": pa.array(
            [None if e is None else list(map(float, e)) for e in emb], pa.list_(pa.float32())
        ),
    }
    if identity is not None:
        cols["identity"] = pa.array(identity, pa.string())
    for c in drop:
        cols.pop(c)
    pq.write_table(pa.table(cols), str(path))
    return str(path)


@pytest.fixture
def sets(tmp_path):
    """3 identities x 2 photos (one photo without a face), and 4 probes."""
    rng = np.random.default_rng(3)
    centres = gallery_search._unit(rng.normal(size=(3, 16)).astype(np.float32))
    gp, ge = [], []
    for i, name in enumerate(["ann", "bob", "cy"]):
        for j in range(2):
            gp.append(f"{name}/{j}.jpg")
            ge.append(centres[i] + 0.1 * rng.normal(size=16))
    gp.append("cy/none.jpg")
    ge.append(None)
    gallery = _embed_parquet(tmp_path / "g.parquet", gp, ge)
    pe = [centres[1] + 0.05 * rng.normal(size=16), centres[2], -centres[0], None]
    probes = _embed_parquet(tmp_path / "p.parquet", ["x.jpg", "y.jpg", "z.jpg", "n.jpg"], pe)
    return gallery, probes, centres, ge


def test_search_command_prints_and_writes_csv_and_parquet(sets, tmp_path, capsys):
    gallery, probes, _, ge = sets
    out = tmp_path / "r.csv"
    m = search.main([gallery, probes, "--top-k", "2", "--threshold", "0.5", "--out", str(out)])
    printed = capsys.readouterr().out
    assert "3 identities from 6 photos (1 without a face left out)" in printed
    assert "probes: 3 (1 without a face left out)" in printed
    assert m.names == ["ann", "bob", "cy"] and m.probes == ["x.jpg", "y.jpg", "z.jpg"]
    assert [m.names[i] for i in m.indices[:2, 0]] == ["bob", "cy"]
    assert "z.jpg: unknown (best score" in printed and "x.jpg: unknown" not in printed
    # scores against templates and probes computed here
    templates = []
    for i in range(3):
        u = gallery_search._unit(np.array(ge[2 * i : 2 * i + 2], np.float32)).astype(np.float64)
        templates.append(u.mean(0) / np.linalg.norm(u.mean(0)))
    probe_rows = gallery_search.read_embeddings(probes, need_identity=False).embeddings
    expected = probe_rows.astype(np.float64) @ np.array(templates).T
    np.testing.assert_allclose(m.scores, -np.sort(-expected, 1)[:, :2], atol=1e-5)
    rows = list(csv.DictReader(out.open()))
    assert len(rows) == 3 * 2
    assert list(rows[0]) == ["probe", "rank", "identity", "score", "accepted"]
    z = [r for r in rows if r["probe"] == "z.jpg"]
    assert [r["rank"] for r in z] == ["1", "2"] and all(r["accepted"] == "False" for r in z)
    assert rows[0]["identity"] == "bob" and rows[0]["accepted"] == "True"
    assert abs(float(rows[0]["score"]) - expected[0, 1]) < 1e-5
    out2 = tmp_path / "r.parquet"
    search.main([gallery, probes, "--top-k", "3", "--out", str(out2)])
    table = pq.read_table(out2).to_pydict()
    assert list(table) == ["probe", "rank", "identity", "score"]
    assert table["rank"][:3] == [1, 2, 3] and len(table["probe"]) == 9
    np.testing.assert_allclose(table["score"][:3], -np.sort(-expected[0]), atol=1e-5)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_identity_column_wins_over_folder(tmp_path):
    rng = np.random.default_rng(0)
    e = gallery_search._unit(rng.normal(size=(2, 8)).astype(np.float32))
    g = _embed_parquet(tmp_path / "g.parquet", ["a/1.jpg", "a/2.jpg"], e, identity=["p", "q"])
    p = _embed_parquet(tmp_path / "p.parquet", ["x.jpg"], e[1:])
    m = search.main([g, p, "--top-k", "1"])
    assert m.names == ["p", "q"] and m.names[m.indices[0, 0]] == "q"
    np.testing.assert_allclose(m.scores[0, 0], 1.0, rtol=1e-6)


def test_refusals_name_the_file_and_numbers(sets, tmp_path):
    gallery, probes, _, _ = sets
    other = _embed_parquet(tmp_path / "o.parquet", ["a.jpg"], [np.ones(8)])
    out = tmp_path / "r.csv"
    with pytest.raises(
        gallery_search.SearchError, match=r"g\.parquet has 16-d .*/o\.parquet has 8-d"
    ):
        search.main([gallery, other, "--out", str(out)])
    empty = _embed_parquet(tmp_path / "e.parquet", ["a.jpg"], [None])
    with pytest.raises(
        gallery_search.SearchError, match=r"PROBES .*e\.parquet: no photo with an embed"
    ):
        search.main([gallery, empty, "--out", str(out)])
    nocol = _embed_parquet(tmp_path / "c.parquet", ["a/b.jpg"], [np.ones(16)], drop=["embedding"])
    with pytest.raises(gallery_search.SearchError, match=r"c\.parquet: no 'embedding' column"):
        search.main([nocol, probes, "--out", str(out)])
    top = _embed_parquet(tmp_path / "t.parquet", ["b.jpg"], [np.ones(16)])
    with pytest.raises(gallery_search.SearchError, match=r"t\.parquet: 1 photos have no identity"):
        search.main([top, probes, "--out", str(out)])
    folder = tmp_path / "probes"
    folder.mkdir()
    with pytest.raises(SystemExit):  # a folder needs --model
        search.main([gallery, str(folder)])
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_command_one_line_errors(sets, tmp_path):
    import subprocess
    import sys

    gallery, _, _, _ = sets
    other = _embed_parquet(tmp_path / "o.parquet", ["a.jpg"], [np.ones(8)])
    r = subprocess.run(
        [sys.executable, "-m", "eval.search", gallery, other, "--out", str(tmp_path / "r.csv")],
        capture_output=True,
        text=True,
        env={"OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"},
    )
    assert r.returncode == 1 and len(r.stderr.strip().splitlines()) == 1
    assert "16-d" in r.stderr and "8-d" in r.stderr
    assert not (tmp_path / "r.csv").exists()


def test_the_models_calibration_sets_the_unknown_threshold(sets, tmp_path, capsys):
    """Without --threshold, the --model's calibration (eval.calibrate's sidecar) at --far
    decides "unknown"; the same answers as passing its threshold by hand."""
    from eval.calibrate import write_calibration

    gallery, probes, _, _ = sets
    model = tmp_path / "m.onnx"
    model.write_bytes(b"model bytes: only hashed here")
    pairs = tmp_path / "mine.bin"
    pairs.write_bytes(b"pairs")
    entry = {"far_target": 1e-3, "threshold": 0.5, "far": 0.0, "false_accepts": 0,
             "tar": 0.9, "genuine": 10, "impostor": 10, "few_impostors": True}  # fmt: skip
    write_calibration(model, str(pairs), [entry, {**entry, "far_target": 1e-4, "threshold": 0.9}])
    search.main([gallery, probes, "--top-k", "2", "--model", str(model)])
    printed = capsys.readouterr().out
    assert "threshold 0.5000: calibration" in printed and "target FAR 0.001" in printed
    by_hand = search.main([gallery, probes, "--top-k", "2", "--threshold", "0.5"])
    assert printed.split("\n", 1)[1] == capsys.readouterr().out
    assert by_hand.names == ["ann", "bob", "cy"]
    search.main([gallery, probes, "--top-k", "2", "--model", str(model), "--far", "1e-4"])
    assert "threshold 0.9000" in capsys.readouterr().out
    model.write_bytes(b"another model")
    with pytest.raises(UserError, match="was made for a model file with SHA-256"):
        search.main([gallery, probes, "--model", str(model)])
