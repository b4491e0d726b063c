"""``python -m datasets.prepare``: a folder of real photos (scikit-image's astronaut and
cameraman warped into canvases, photos without a face, a corrupt file) to face-layout
training data, reports, near-duplicates, resume and idempotence."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import cv2
import numpy as np
import pytest

from common.cli import run_main
from common.outdir import MANIFEST_NAME
from datasets import preparation
from datasets import prepare as prep
from datasets.dataset import RecordIODataset
from datasets.face_layout import inspect_layout, read_property
from datasets.faces.finder import FaceFinder
from datasets.faces.options import FaceOptions
from datasets.recordio import IndexedRecordIO, unpack, unpack_img
from tests.face_photos import (
    background,
    noise_photo,
    place,
    source,
    write_exif_jpeg,
    write_photo,
)

OUTPUT_FILES = (
    "train.rec",
    "train.idx",
    "property",
    "report.json",
    "rejected.tsv",
    "faces.tsv",
    "labels.tsv",
)

# alice: the astronaut; bob: the cameraman; carol: no face at all
EXPECTED_REJECTED = [
    ("alice/broken.jpg", "unreadable"),
    ("alice/cat.jpg", "no_face"),
    ("bob/coffee.png", "no_face"),
    ("carol/empty.jpg", "unreadable"),
    ("carol/noise.png", "no_face"),
    ("carol/rocket.jpg", "no_face"),
]
ALICE_KEPT = [
    "alice/a1.jpg",
    "alice/a2.png",
    "alice/a3.webp",
    "alice/a4_exif.jpg",
    "alice/x/a5.jpg",
]
BOB_KEPT = ["bob/b1.png", "bob/b2.jpg", "bob/two_faces.jpg"]


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> tuple[Path, dict[str, np.ndarray]]:
    """RAW_DIR and the true landmarks of every photo with a face (truth: the detector's
    landmarks on the untouched sample, through the known transform)."""
    root = tmp_path_factory.mktemp("raw")
    finder = FaceFinder(FaceOptions())
    astro, cam = source("astronaut"), source("camera")
    l_astro, l_cam = finder.find(astro).landmarks, finder.find(cam).landmarks
    truth: dict[str, np.ndarray] = {}

    def face(rel, img, lm, scale, angle, centre, size=(480, 640), seed=0):
        canvas = background(size, seed)
        _, truth[rel] = place(canvas, img, lm, scale, angle, centre)
        return canvas

    write_photo(root / "alice/a1.jpg", face("alice/a1.jpg", astro, l_astro, 0.9, 5, (320, 240)))
    write_photo(
        root / "alice/a2.png", face("alice/a2.png", astro, l_astro, 0.6, -15, (200, 300), seed=1)
    )
    write_photo(
        root / "alice/a3.webp", face("alice/a3.webp", astro, l_astro, 1.2, 12, (400, 260), seed=2)
    )
    # stored turned a quarter; EXIF orientation 6 tells viewers to turn it back
    shown = face("alice/a4_exif.jpg", astro, l_astro, 0.8, -5, (300, 320), (640, 480), seed=3)
    (root / "alice").mkdir(exist_ok=True)
    write_exif_jpeg(root / "alice/a4_exif.jpg", shown, 6)
    write_photo(
        root / "alice/x/a5.jpg", face("alice/x/a5.jpg", astro, l_astro, 0.7, 0, (330, 200), seed=4)
    )
    write_photo(root / "alice/cat.jpg", source("chelsea"))
    (root / "alice/broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 this is not a JPEG")
    (root / "alice/readme.txt").write_text("not a photo")
    write_photo(root / "bob/b1.png", face("bob/b1.png", cam, l_cam, 1.0, 0, (300, 240), seed=5))
    write_photo(root / "bob/b2.jpg", face("bob/b2.jpg", cam, l_cam, 1.3, 8, (340, 250), seed=6))
    two = face("bob/two_faces.jpg", cam, l_cam, 1.4, 0, (200, 300), (600, 800), seed=7)
    place(two, astro, l_astro, 0.5, 0, (600, 200))  # a smaller second face
    write_photo(root / "bob/two_faces.jpg", two)
    write_photo(root / "bob/coffee.png", source("coffee"))
    write_photo(root / "carol/rocket.jpg", source("rocket"))
    write_photo(root / "carol/noise.png", noise_photo((480, 640), 0))
    (root / "carol/empty.jpg").write_bytes(b"")
    (root / "notes.txt").write_text("top-level files are not identities")
    (root / ".hidden").mkdir()
    write_photo(root / ".hidden/h.jpg", source("astronaut"))
    return root, truth


@pytest.fixture(scope="module")
def prepared(raw, tmp_path_factory):
    root, _ = raw
    out = tmp_path_factory.mktemp("out")
    result = preparation.prepare(root, out, workers=1, progress=False)
    return out, result


def _copy_cache(ref: Path, out: Path) -> None:
    """Seed ``out`` with the cache of ``ref`` and its ownership manifest (a folder
    holding anything without the manifest is not ``datasets.prepare``'s to write into)."""
    shutil.copytree(ref / preparation.CACHE_DIR, out / preparation.CACHE_DIR)
    shutil.copy2(ref / MANIFEST_NAME, out / MANIFEST_NAME)


def _rows(path: Path) -> list[list[str]]:
    lines = path.read_text().splitlines()
    return [line.split("\t") for line in lines[1:]]


def test_report_counts_per_identity_and_reason(prepared):
    out, result = prepared
    report = json.loads((out / "report.json").read_text())
    assert result.report == report
    t = report["totals"]
    assert (t["identities"], t["labelled_identities"], t["photos"], t["kept"]) == (3, 2, 14, 8)
    assert t["reasons"] == {
        "unreadable": 2,
        "not_a_file": 0,
        "too_large": 0,
        "no_face": 4,
        "too_small": 0,
        "low_score": 0,
        "several_faces": 0,
    }
    assert t["ignored_files"] == 2 and report["ignored_files"] == ["alice/readme.txt", "notes.txt"]
    ids = report["identities"]
    assert ids["alice"]["label"] == 0 and ids["bob"]["label"] == 1 and ids["carol"]["label"] is None
    assert [ids[n]["photos"] for n in ("alice", "bob", "carol")] == [7, 4, 3]
    assert [ids[n]["kept"] for n in ("alice", "bob", "carol")] == [5, 3, 0]
    assert ids["alice"]["rejected"] == {"unreadable": 1, "no_face": 1}
    assert ids["carol"]["rejected"] == {"unreadable": 1, "no_face": 2}
    assert (ids["alice"]["several_faces_found"], ids["bob"]["several_faces_found"]) == (0, 1)
    assert report["options"]["policy"] == "largest" and report["options"]["min_size"] == 40


def test_rejected_tsv_lists_every_photo_not_kept_with_its_reason(prepared):
    out, _ = prepared
    rows = _rows(out / "rejected.tsv")
    assert [(f, r) for f, r, _ in rows] == EXPECTED_REJECTED
    detail = {f: d for f, _, d in rows}
    assert detail["carol/empty.jpg"] == "cannot decode an empty file as an image"
    assert detail["alice/broken.jpg"] == (
        "cannot decode 23 bytes as an image: no JPEG frame header (SOF): the file is "
        "truncated or not a JPEG"
    )
    assert _rows(out / "labels.tsv") == [["0", "alice", "5"], ["1", "bob", "3"]]


def test_training_files_hold_the_aligned_faces_in_sorted_order(prepared, raw):
    out, _ = prepared
    _, truth = raw
    assert read_property(out) == (2, 112, 112)
    reader = IndexedRecordIO(out / "train.idx", out / "train.rec", "r")
    layout = inspect_layout(reader)
    assert layout.face_layout and layout.num_classes == 2
    assert list(layout.image_keys) == list(range(1, 9))
    labels = [unpack(reader.read_idx(k))[0].label for k in range(1, 9)]
    assert labels == [0] * 5 + [1] * 3
    ds = RecordIODataset(out / "train.rec")
    assert (len(ds), ds.num_classes) == (8, 2)
    faces = _rows(out / "faces.tsv")
    assert [r[2] for r in faces] == ALICE_KEPT + BOB_KEPT
    assert [r[0] for r in faces] == [str(k) for k in range(1, 9)]
    for key, _, rel, score, n, _, lm in faces:
        # the 5 points found, in the photo as displayed (EXIF applied): within 3 px
        pts = np.array([float(v) for v in lm.split(",")]).reshape(5, 2)
        assert np.linalg.norm(pts - truth[rel], axis=1).max() < 3.0, rel
        assert float(score) >= 0.9 and int(n) == (2 if rel == "bob/two_faces.jpg" else 1)
        img = unpack_img(reader.read_idx(int(key)))[1]
        assert img.shape == (112, 112, 3)


def _phash_reference(bgr: np.ndarray) -> np.ndarray:
    """The documented measure, written with SciPy's DCT: 63 bits of the 8x8 lowest
    orthonormal DCT-II coefficients (no DC) of the 32x32 area-resized grey image, each
    above their median."""
    from scipy.fft import dctn

    grey = cv2.resize(cv2.cvtColor(bgr, cv2.COLOR_BGR2GRAY), (32, 32), interpolation=cv2.INTER_AREA)
    c = dctn(grey.astype(np.float64), type=2, norm="ortho")[:8, :8].ravel()[1:]
    return c > np.median(c)


def test_near_duplicates_reported_by_perceptual_hash_of_the_stored_crops(prepared):
    out, _ = prepared
    report = json.loads((out / "report.json").read_text())
    reader = IndexedRecordIO(out / "train.idx", out / "train.rec", "r")
    faces = _rows(out / "faces.tsv")
    bits = {r[2]: _phash_reference(unpack_img(reader.read_idx(int(r[0])))[1]) for r in faces}
    want = []
    for ident, files in (("alice", ALICE_KEPT), ("bob", BOB_KEPT)):
        for i, a in enumerate(files):
            for b in files[i + 1 :]:
                d = int(np.count_nonzero(bits[a] != bits[b]))
                if d <= 6:
                    want.append({"identity": ident, "a": a, "b": b, "distance": d})
    assert report["near_duplicates"] == want
    # every two warped copies of one photo are near-duplicates (alice: 5 copies, bob: 3),
    # two different faces are far apart
    assert [p["identity"] for p in want] == ["alice"] * 10 + ["bob"] * 3
    assert int(np.count_nonzero(bits["alice/a1.jpg"] != bits["bob/b1.png"])) > 16


def test_interrupted_run_resumes_to_the_same_bytes(prepared, raw, tmp_path):
    ref, _ = prepared
    root, _ = raw
    out = tmp_path / "out"
    with pytest.raises(preparation.PrepareInterrupted):
        preparation.prepare(root, out, workers=2, progress=False, chunk_photos=2, interrupt_after=2)
    assert not (out / "train.rec").exists() and not (out / "report.json").exists()
    chunks = sorted((out / preparation.CACHE_DIR).glob("*.chunk"))
    assert len(chunks) == 2  # two chunks finished before the "crash"
    # a torn chunk (a copy made by hand, say) and a stray temporary file of a killed write
    chunks[0].write_bytes(chunks[0].read_bytes()[:-10])
    (out / preparation.CACHE_DIR / ".x.chunk.abc.tmp").write_bytes(b"partial")
    result = preparation.prepare(root, out, workers=2, progress=False, chunk_photos=2)
    # 8 chunks of up to 2 photos (alice 7, bob 4, carol 3): one was valid
    assert (result.cached_chunks, result.computed_chunks) == (1, 7)
    for name in OUTPUT_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    # the cache holds exactly the 8 chunks of this run: the stray temporary file is gone
    left = sorted(p.name for p in (out / preparation.CACHE_DIR).iterdir())
    assert len(left) == 8 and all(n.endswith(".chunk") and not n.startswith(".") for n in left)


def test_rerun_is_idempotent_and_uses_the_cache(prepared, raw, tmp_path):
    ref, _ = prepared
    root, _ = raw
    out = tmp_path / "again"
    shutil.copytree(ref, out)
    result = preparation.prepare(root, out, workers=1, progress=False)
    assert (result.computed_chunks, result.cached_chunks) == (0, 3)
    for name in OUTPUT_FILES:
        assert (out / name).read_bytes() == (ref / name).read_bytes(), name
    # a changed photo is detected again; the outputs follow
    (root / "carol/noise.png").unlink()
    try:
        result = preparation.prepare(root, out, workers=1, progress=False)
        assert (result.computed_chunks, result.cached_chunks) == (1, 2)
        report = json.loads((out / "report.json").read_text())
        assert report["totals"]["photos"] == 13 and report["identities"]["carol"]["photos"] == 2
    finally:
        write_photo(root / "carol/noise.png", noise_photo((480, 640), 0))


def test_arrow_shards_hold_the_same_images(raw, prepared, tmp_path):
    from datasets.arrow_io import ArrowDataset

    root, _ = raw
    ref, _ = prepared
    out = tmp_path / "arrow_out"
    _copy_cache(ref, out)  # cached: no detection
    opts = preparation.PrepareOptions(arrow=True, shard_size=3)
    preparation.prepare(root, out, opts, workers=1, progress=False)
    shards = ArrowDataset(out / "arrow", flip=False)
    rec = RecordIODataset(ref / "train.rec", flip=False)
    assert (len(shards), shards.num_classes) == (8, 2)
    for i in range(8):
        a, la = shards[i]
        b, lb = rec[i]
        assert la == lb and bool((a == b).all())


def test_command_line(raw, prepared, tmp_path, capsys):
    root, _ = raw
    ref, _ = prepared
    out = tmp_path / "cli"
    _copy_cache(ref, out)
    assert run_main(prep.main, [str(root), str(out), "--workers", "1", "--no-progress"]) == 0
    text = capsys.readouterr().out
    assert "kept 8 of 14 photos in 2 identities (of 3); rejected: unreadable 2, no_face 4" in text
    assert (out / "train.rec").read_bytes() == (ref / "train.rec").read_bytes()
    assert run_main(prep.main, [str(root), str(out), "--min-score", "2"]) == 2
    assert "error: --min-score must be in [0, 1], got 2.0" in capsys.readouterr().err
    assert run_main(prep.main, [str(tmp_path / "nope"), str(out)]) == 2
    assert "nope: no such directory" in capsys.readouterr().err
    assert run_main(prep.main, [str(root), str(root / "alice" / "out")]) == 2
    assert "must not be inside RAW_DIR" in capsys.readouterr().err
    # nothing to keep: exit 1, reports written, no training files
    only = tmp_path / "raw_noface"
    write_photo(only / "dave" / "coffee.png", source("coffee"))
    assert run_main(prep.main, [str(only), str(tmp_path / "o2"), "--workers", "1"]) == 1
    assert "no face kept" in capsys.readouterr().err
    assert (tmp_path / "o2" / "rejected.tsv").is_file()
    assert not (tmp_path / "o2" / "train.rec").exists()
