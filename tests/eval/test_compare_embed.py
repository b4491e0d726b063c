"""``eval.compare`` and ``eval.embed`` end to end on real photos with a tiny model
(``mbf_tiny``, random weights, as a checkpoint and as ONNX), against a direct
computation: the backbone run by hand on the aligned crops."""

from __future__ import annotations

import json
import pickle

import cv2
import numpy as np
import pytest
import torch

from datasets.faces.arguments import DEFAULT_MIN_SIZE
from datasets.faces.finder import FaceFinder
from datasets.faces.options import FaceOptions
from datasets.synthetic import make_identity, render_face
from eval import compare as compare_cli
from eval import embed as embed_cli
from eval.onnx_export import export_onnx
from tests.face_photos import background, place, source, write_photo


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    from backbones.registry import get_model

    torch.manual_seed(0)
    net = get_model("mbf_tiny").eval()
    d = tmp_path_factory.mktemp("models")
    torch.save(net.state_dict(), d / "backbone.pt")
    export_onnx(net, d / "backbone.onnx", exporter="torchscript")
    return net, d / "backbone.pt", d / "backbone.onnx"


@pytest.fixture(scope="module")
def photos(tmp_path_factory):
    """a1/a2: the astronaut under two transforms; c: the cameraman; plus no-face and
    corrupt files."""
    root = tmp_path_factory.mktemp("photos")
    finder = FaceFinder(FaceOptions())
    astro, cam = source("astronaut"), source("camera")
    la, lc = finder.find(astro).landmarks, finder.find(cam).landmarks
    for name, img, lm, s, a, c in [
        ("a1.jpg", astro, la, 0.9, 6.0, (300, 250)),
        ("sub/a2.png", astro, la, 0.6, -14.0, (360, 200)),
        ("c.jpg", cam, lc, 1.1, 3.0, (320, 240)),
    ]:
        canvas = background((480, 640), seed=len(name))
        place(canvas, img, lm, s, a, c)
        write_photo(root / name, canvas)
    write_photo(root / "nf.png", source("coffee"))
    (root / "broken.jpg").write_bytes(b"\xff\xd8 nope")
    return root


def _direct(net, crops_bgr: list[np.ndarray]) -> np.ndarray:
    """The reference: RGB in [-1, 1], backbone(x) + backbone(mirror(x)), L2-normalised,
    in float64 after the network."""
    x = torch.from_numpy(np.stack([c[..., ::-1] for c in crops_bgr]).copy())
    x = x.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    with torch.no_grad():
        e = (net(x) + net(torch.flip(x, dims=[3]))).double().numpy()
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def _crop(path) -> np.ndarray:
    r = FaceFinder(FaceOptions(min_size=DEFAULT_MIN_SIZE)).find_file(path)
    assert r.ok
    return r.crop


def test_compare_similarity_equals_direct_computation(models, photos, capsys, tmp_path):
    net, ckpt, onnx_path = models
    a1, a2, c = photos / "a1.jpg", photos / "sub/a2.png", photos / "c.jpg"
    e = _direct(net, [_crop(a1), _crop(a2), _crop(c)])
    want_same, want_diff = float(e[0] @ e[1]), float(e[0] @ e[2])
    assert want_same > want_diff  # the photo's warped copy is closer than another face

    common = ["--model", str(ckpt), "--network", "mbf_tiny", "--device", "cpu"]
    out = compare_cli.main([str(a1), str(a2), *common, "--threshold", "0.5"])
    assert out["similarity"] == pytest.approx(want_same, abs=1e-5)
    printed = capsys.readouterr().out.splitlines()
    assert printed[2] == f"similarity {want_same:.4f}"
    assert printed[-1] == ("same person" if want_same > 0.5 else "different people")
    out = compare_cli.main([str(a1), str(c), *common, "--json", str(tmp_path / "r.json")])
    assert out["similarity"] == pytest.approx(want_diff, abs=1e-5)
    assert out["same"] is None and "no threshold" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["similarity"] == out["similarity"]
    # the same model as ONNX: the same number
    out = compare_cli.main([str(a1), str(a2), "--model", str(onnx_path), "--device", "cpu"])
    assert out["similarity"] == pytest.approx(want_same, abs=1e-4)
    # the answer flips at the threshold
    t = (want_same + want_diff) / 2
    assert compare_cli.main([str(a1), str(a2), *common, "--threshold", str(t)])["same"] is True
    assert compare_cli.main([str(a1), str(c), *common, "--threshold", str(t)])["same"] is False
    # already aligned crops
    cv2.imwrite(str(tmp_path / "crop1.png"), _crop(a1))
    cv2.imwrite(str(tmp_path / "crop2.png"), _crop(a2))
    out = compare_cli.main(
        [str(tmp_path / "crop1.png"), str(tmp_path / "crop2.png"), *common, "--aligned"]
    )
    assert out["similarity"] == pytest.approx(want_same, abs=1e-5)


def test_compare_refuses_photos_without_a_face(models, photos):
    _, ckpt, _ = models
    common = ["--model", str(ckpt), "--network", "mbf_tiny", "--device", "cpu"]
    with pytest.raises(compare_cli.NoFaceError, match=r"nf\.png: no_face: the detector found"):
        compare_cli.main([str(photos / "a1.jpg"), str(photos / "nf.png"), *common])
    with pytest.raises(compare_cli.NoFaceError, match=r"broken\.jpg: unreadable"):
        compare_cli.main([str(photos / "broken.jpg"), str(photos / "a1.jpg"), *common])
    with pytest.raises(ValueError, match="needs --network"):
        compare_cli.main([str(photos / "a1.jpg"), str(photos / "c.jpg"), "--model", str(ckpt)])


def _calibration_bin(path, photos) -> list[bool]:
    """A small LFW-format .bin: genuine pairs are two renderings of one synthetic identity
    (or the astronaut's two crops), impostor pairs two identities."""
    rng = np.random.default_rng(0)
    imgs, same = [], []
    for k in range(12):
        a, b = make_identity(7, 0, k), make_identity(7, 0, k + 100)
        imgs += [render_face(a, rng), render_face(a if k % 2 else b, rng)]
        same.append(bool(k % 2))
    for f in ("a1.jpg", "sub/a2.png"):
        imgs.append(cv2.imencode(".png", _crop(photos / f))[1].tobytes())
    same.append(True)
    path.write_bytes(pickle.dumps((imgs, same), protocol=4))
    return same


def test_compare_calibrates_the_threshold_on_a_bin(models, photos, tmp_path):
    net, ckpt, _ = models
    same = np.array(_calibration_bin(tmp_path / "cal.bin", photos))
    data, _ = pickle.loads((tmp_path / "cal.bin").read_bytes())
    crops = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in data]
    crops = [cv2.resize(c, (112, 112), interpolation=cv2.INTER_AREA) for c in crops]
    e = _direct(net, crops)
    dist = ((e[0::2] - e[1::2]) ** 2).sum(1)  # squared distance = 2 - 2 cos
    imp = dist[~same]
    far = 0.25
    # the rule written out: FAR(t) = share of impostors with distance < t on the 0.001
    # grid; interpolate linearly between the last grid point under the target and the
    # first one at or above it
    grid = np.arange(0, 4, 0.001)
    curve = np.array([np.mean(imp < t) for t in grid])
    hi = int(np.argmax(curve >= far))
    lo = hi - 1
    t = grid[lo] + (far - curve[lo]) / (curve[hi] - curve[lo]) * (grid[hi] - grid[lo])
    out = compare_cli.main(
        [
            str(photos / "a1.jpg"),
            str(photos / "c.jpg"),
            "--model",
            str(ckpt),
            "--network",
            "mbf_tiny",
            "--device",
            "cpu",
            "--calibrate-bin",
            str(tmp_path / "cal.bin"),
            "--far",
            str(far),
        ]
    )
    cal = out["calibration"]
    assert cal["threshold"] == pytest.approx(1 - t / 2, abs=1e-6)
    assert (cal["genuine"], cal["impostor"]) == (7, 6)
    assert cal["far"] == pytest.approx(np.mean(imp < t))
    assert out["same"] == (out["similarity"] > cal["threshold"])


def test_embed_writes_one_row_per_photo(models, photos, tmp_path, capsys):
    import pyarrow.parquet as pq

    net, ckpt, onnx_path = models
    out = tmp_path / "emb.parquet"
    summary = embed_cli.main(
        [
            str(photos),
            "--model",
            str(onnx_path),
            "--out",
            str(out),
            "--batch-size",
            "2",
            "--workers",
            "2",
        ]
    )
    assert summary["embedded"] == 3 and summary["photos"] == 5 and summary["non_finite"] == 0
    assert "embedded 3 of 5 photos" in capsys.readouterr().out
    table = pq.read_table(out)
    rows = table.to_pylist()
    assert [r["path"] for r in rows] == ["a1.jpg", "broken.jpg", "c.jpg", "nf.png", "sub/a2.png"]
    assert [r["reason"] for r in rows] == [None, "unreadable", None, "no_face", None]
    finder = FaceFinder(FaceOptions(min_size=DEFAULT_MIN_SIZE))
    kept = [r for r in rows if r["reason"] is None]
    found = [finder.find_file(photos / r["path"]) for r in kept]
    want = _direct(net, [f.crop for f in found])
    for r, f, w in zip(kept, found, want, strict=True):
        np.testing.assert_allclose(r["embedding"], w, atol=1e-4)
        np.testing.assert_allclose(r["landmarks"], f.landmarks.ravel(), atol=1e-9)
        assert r["score"] == pytest.approx(f.score) and r["faces"] == 1
    for r in rows:
        if r["reason"] is not None:
            assert r["embedding"] is None and r["landmarks"] is None and r["score"] is None
    meta = table.schema.metadata
    assert meta[b"embedding_size"] == b"512" and meta[b"image_size"] == b"112"
    # a checkpoint, one worker: the same embeddings
    out2 = tmp_path / "emb2.parquet"
    embed_cli.main(
        [
            str(photos),
            "--model",
            str(ckpt),
            "--network",
            "mbf_tiny",
            "--device",
            "cpu",
            "--out",
            str(out2),
        ]
    )
    rows2 = pq.read_table(out2).to_pylist()
    for r, r2 in zip(rows, rows2, strict=True):
        if r["embedding"] is not None:
            np.testing.assert_allclose(r["embedding"], r2["embedding"], atol=1e-4)
