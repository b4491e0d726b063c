"""1:N search with FAISS (``eval.search --index faiss-hnsw|faiss-ivf``) against a
brute-force numpy top-k, the ``--recall-check`` line against a hand count, and, without
FAISS installed (or with its import made to fail), the one-line error naming the option
and how to install it. The tests that need FAISS skip when it is missing."""

from __future__ import annotations

import re
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from eval import gallery_search, search


def _brute_topk(gallery: np.ndarray, probes: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Float64 scores; order: score descending, then gallery index ascending."""
    s = probes.astype(np.float64) @ gallery.astype(np.float64).T
    cols = np.arange(s.shape[1])
    idx = np.array([np.lexsort((cols, -row))[:k] for row in s]).reshape(len(s), -1)
    return np.take_along_axis(s, idx, 1), idx


def _unit_rows(rng: np.random.Generator, n: int, d: int) -> np.ndarray:
    return gallery_search._unit(rng.normal(size=(n, d)).astype(np.float32))


@pytest.fixture(scope="module")
def small():
    """2,000 random unit templates of 64-d and 100 random unit probes (seeded)."""
    rng = np.random.default_rng(0)
    return _unit_rows(rng, 2000, 64), _unit_rows(rng, 100, 64)


def _found(exact: np.ndarray, approx: np.ndarray) -> int:
    return sum(len(set(e) & set(a)) for e, a in zip(exact.tolist(), approx.tolist(), strict=True))


def test_ivf_with_every_list_probed_is_exact(small):
    pytest.importorskip("faiss")
    gallery, probes = small
    index = gallery_search.build_index(gallery, gallery_search.IndexOptions("faiss-ivf"))
    assert index.nlist == gallery_search.default_nlist(2000) == 51  # 4 sqrt(2000) > 2000 // 39
    index.options = gallery_search.IndexOptions("faiss-ivf", nprobe=index.nlist)
    scores, idx = index.search(probes, 5)
    e_scores, e_idx = _brute_topk(gallery, probes, 5)
    assert [set(r) for r in idx.tolist()] == [set(r) for r in e_idx.tolist()]
    np.testing.assert_array_equal(idx, e_idx)  # random scores: no ties, the same order
    np.testing.assert_allclose(scores, e_scores, atol=1e-5)
    assert scores.dtype == np.float32 and idx.dtype == np.int64
    # a few lists of 51: approximate, and the recall helper agrees with a hand count
    index.options = gallery_search.IndexOptions("faiss-ivf", nprobe=4)
    few = index.search(probes, 5)[1]
    r = gallery_search.recall_at_k(e_idx, few)
    assert (r.found, r.total) == (_found(e_idx, few), 500) and r.found < 500


def test_hnsw_recall_on_an_easy_set(small):
    """Default M=32 (64 links a node on the base layer) and efSearch=128: the search keeps
    128 candidates, 6% of these 2,000 templates, so it is nearly exhaustive; measured
    recall@5 1.000 on seeds 0-4 (200 probes each). The 0.95 bound leaves room for 25 of
    the 500 results to change with FAISS's version or SIMD. With efSearch = N the beam
    reaches the whole (connected) graph: exact."""
    pytest.importorskip("faiss")
    gallery, probes = small
    e_idx = _brute_topk(gallery, probes, 5)[1]
    index = gallery_search.build_index(gallery, gallery_search.IndexOptions("faiss-hnsw"))
    idx = index.search(probes, 5)[1]
    assert _found(e_idx, idx) / e_idx.size >= 0.95
    index.options = gallery_search.IndexOptions("faiss-hnsw", ef_search=len(gallery))
    np.testing.assert_array_equal(index.search(probes, 5)[1], e_idx)


def test_faiss_results_follow_the_exact_order_in_ties():
    """Every template twice (rows i and i + 300): each pair ties, and the lower index comes
    first, as exact_topk orders them (k = 4: whole pairs)."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(1)
    base = _unit_rows(rng, 300, 16)
    gallery, probes = np.concatenate([base, base]), _unit_rows(rng, 20, 16)
    expected = gallery_search.exact_topk(gallery, probes, 4)[1]
    assert (expected[:, 0] + 300 == expected[:, 1]).all()
    for kind in ("faiss-ivf", "faiss-hnsw"):
        options = gallery_search.IndexOptions(kind, nprobe=10**6, ef_search=600)
        got = gallery_search.build_index(gallery, options).search(probes, 4)[1]
        np.testing.assert_array_equal(got, expected)


def test_k_beyond_the_gallery_and_short_ivf_lists():
    """k > N gives N results; IVF lists that hold fewer than k templates: those probes
    are searched exactly (never a -1 index)."""
    pytest.importorskip("faiss")
    rng = np.random.default_rng(2)
    gallery, probes = _unit_rows(rng, 80, 8), _unit_rows(rng, 30, 8)
    ivf = gallery_search.build_index(
        gallery, gallery_search.IndexOptions("faiss-ivf", nlist=40, nprobe=1)
    )
    scores, idx = ivf.search(probes, 10)
    assert (idx >= 0).all() and ivf.exact_fallbacks > 0
    assert (np.diff(scores, axis=1) <= 0).all()
    hnsw = gallery_search.build_index(gallery[:3], gallery_search.IndexOptions("faiss-hnsw"))
    np.testing.assert_array_equal(hnsw.search(probes, 7)[1], _brute_topk(gallery[:3], probes, 3)[1])


def _parquet(path, paths, emb, identity=None):
    cols = {
        "path": pa.array(paths, pa.string()),
        "embedding": pa.array([list(map(float, e)) for e in emb], pa.list_(pa.float32())),
    }
    if identity is not None:
        cols["identity"] = pa.array(identity, pa.string())
    pq.write_table(pa.table(cols), str(path))
    return str(path)


@pytest.fixture
def files(tmp_path):
    """300 identities of one photo each (64-d) and 40 probes."""
    rng = np.random.default_rng(5)
    emb = _unit_rows(rng, 300, 64)
    names = [f"id{i:03d}" for i in range(300)]
    gallery = _parquet(tmp_path / "g.parquet", [f"{n}/0.jpg" for n in names], emb, names)
    probes_emb = _unit_rows(rng, 40, 64)
    probes = _parquet(tmp_path / "p.parquet", [f"q{i}.jpg" for i in range(40)], probes_emb)
    return gallery, probes, emb, probes_emb


def _recall_line(printed: str) -> tuple[float, int, int, int]:
    m = re.search(
        r"^recall@5 against exact search: ([0-9.]+) \((\d+) of (\d+) exact top-5 identities "
        r"found, (\d+) probes\)$",
        printed,
        re.M,
    )
    assert m, printed
    return float(m[1]), int(m[2]), int(m[3]), int(m[4])


def test_recall_check_line_matches_a_hand_count(files, capsys):
    """A poor index on purpose (M=4, efSearch=5): the printed recall is the hand count of
    the exact top-5 identities that are in the command's top-5, over all 40 probes."""
    pytest.importorskip("faiss")
    gallery, probes, emb, probes_emb = files
    args = [gallery, probes, "--top-k", "5", "--index", "faiss-hnsw", "--hnsw-m", "4"]
    m = search.main([*args, "--ef-search", "5", "--recall-check", "100"])
    printed = capsys.readouterr().out
    assert "index: faiss-hnsw (M=4, efSearch=5), built in" in printed
    _, templates = gallery_search.make_templates(m.names, emb)
    exact = _brute_topk(templates, probes_emb, 5)[1]
    found = _found(exact, m.indices)
    recall, got_found, total, n = _recall_line(printed)
    assert (got_found, total, n) == (found, 200, 40) and 0 < found < 200
    assert recall == pytest.approx(found / 200, abs=5e-5)
    # IVF probing every list, recall checked on 10 of the 40 probes: 1.0
    m = search.main([gallery, probes, "--index", "faiss-ivf", "--nprobe", "1000",
                     "--recall-check", "10"])  # fmt: skip
    assert _recall_line(capsys.readouterr().out) == (1.0, 50, 50, 10)
    np.testing.assert_array_equal(m.indices, exact)


def test_exact_index_recall_check_needs_no_faiss(files, capsys, monkeypatch):
    """The default index never imports faiss; its recall check is 1 by construction."""
    monkeypatch.setitem(sys.modules, "faiss", None)  # `import faiss` raises ImportError
    gallery, probes, emb, probes_emb = files
    m = search.main([gallery, probes, "--recall-check", "7"])
    printed = capsys.readouterr().out
    assert _recall_line(printed) == (1.0, 35, 35, 7) and "index:" not in printed
    _, templates = gallery_search.make_templates(m.names, emb)
    np.testing.assert_array_equal(m.indices, _brute_topk(templates, probes_emb, 5)[1])


@pytest.mark.parametrize("kind", ["faiss-hnsw", "faiss-ivf"])
def test_without_faiss_one_line_names_option_and_install(files, tmp_path, monkeypatch, kind):
    monkeypatch.setitem(sys.modules, "faiss", None)
    gallery, probes, emb, _ = files
    out = tmp_path / "r.csv"
    with pytest.raises(gallery_search.SearchError) as err:
        search.main([gallery, probes, "--index", kind, "--out", str(out)])
    message = str(err.value)
    assert f"--index {kind} needs FAISS" in message and "pip install faiss-cpu" in message
    assert "\n" not in message and not out.exists()
    with pytest.raises(gallery_search.SearchError, match=f"--index {kind} needs FAISS"):
        gallery_search.build_index(emb, gallery_search.IndexOptions(kind))


def test_help_defaults_are_the_librarys_and_bad_values_exit_2(files, capsys):
    """The light command repeats the library's defaults (it may not import it before
    parsing): they must agree."""
    with pytest.raises(SystemExit):
        search.main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert f"neighbours per node (default: {gallery_search.HNSW_M})" in text
    assert f"candidates per search (>= k) (default: {gallery_search.EF_SEARCH})" in text
    assert f"lists searched (nlist: exact) (default: {gallery_search.NPROBE})" in text
    assert "{exact,faiss-hnsw,faiss-ivf}" in text
    assert tuple(gallery_search.INDEX_KINDS) == ("exact", "faiss-hnsw", "faiss-ivf")
    gallery, probes, _, _ = files
    for bad in (["--nprobe", "0"], ["--hnsw-m", "0"], ["--recall-check", "-1"],
                ["--index", "faiss-flat"]):  # fmt: skip
        with pytest.raises(SystemExit) as exit_:
            search.main([gallery, probes, *bad])
        assert exit_.value.code == 2
