"""eval.calibrate and eval.compare's default calibration (issue #27, items 3 and 4).

Thresholds are checked against a brute-force search over the pair scores, and the pair
scores against embeddings computed by hand with numpy from the ONNX model's weights.
"""

from __future__ import annotations

import hashlib
import json
import pickle

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from common.cli import run_main
from eval import calibrate as calibrate_cli
from eval import compare as compare_cli
from eval import make_bin
from eval.calibrate import CalibrationError, calibrate_scores, threshold_at_far
from eval.models import build_backbone
from eval.onnx_export import export_onnx
from tests.eval.test_eval_make_bin import _folder

SIDE = 112
DIM = 8


def _brute_force(scores, same, far):
    """The lowest impostor score t with mean(impostor > t) <= far; FAR and TAR there."""
    imp, gen = scores[~same], scores[same]
    ok = [t for t in np.unique(imp) if np.mean(imp > t) <= far]
    t = min(ok)
    return t, np.mean(imp > t), np.mean(gen > t)


@pytest.mark.parametrize("seed", range(5))
def test_thresholds_equal_a_brute_force_search(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(50, 400))
    scores = np.round(rng.normal(0, 0.3, n), 2)  # rounded: ties at the threshold
    same = rng.random(n) < 0.4
    scores[same] += 0.5
    for far in (0.3, 0.1, 0.05, 0.01, 1e-3):
        entry = calibrate_scores(scores, same, [far])[0]
        t, f, tar = _brute_force(scores, same, far)
        assert entry["threshold"] == t
        assert entry["far"] == pytest.approx(f) and entry["far"] <= far
        assert entry["tar"] == pytest.approx(tar)
        assert entry["impostor"] == (~same).sum() and entry["genuine"] == same.sum()
        assert entry["few_impostors"] == ((~same).sum() < 10 / far)
        lower = np.unique(scores[~same])
        lower = lower[lower < t]
        if lower.size:  # the next impostor score down would accept too many
            assert np.mean(scores[~same] > lower[-1]) > far
    with pytest.raises(CalibrationError):
        threshold_at_far(np.array([]), 0.1)


def _model(path, seed=0):
    w = np.random.default_rng(seed).standard_normal((3 * SIDE * SIDE, DIM)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["data"], ["flat"], name="f", axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["emb"], name="fc"),
        ],
        "face",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", DIM])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(path))
    return w.astype(np.float64)


def _embed_by_hand(w, bgr_images):
    """Flip-test embeddings: (p - 127.5) / 127.5 RGB NCHW, e(x) + e(mirror x), unit."""
    x = (np.stack(bgr_images)[..., ::-1].astype(np.float64) - 127.5) / 127.5
    x = x.transpose(0, 3, 1, 2)
    e = x.reshape(len(x), -1) @ w + x[..., ::-1].reshape(len(x), -1) @ w
    return e / np.linalg.norm(e, axis=1, keepdims=True)


def test_calibrate_writes_the_sidecar_and_compare_uses_it(tmp_path, capsys):
    src = _folder(tmp_path / "people")
    model = tmp_path / "m.onnx"
    w = _model(model)
    out = tmp_path / "mine.bin"
    make_bin.main([str(src), "--out", str(out), "--pairs", "40"])
    record = calibrate_cli.main(["--model", str(model), "--bin", str(out), "--far", "0.1", "1e-3"])
    printed = capsys.readouterr()
    side = json.loads((tmp_path / "m.onnx.calibration.json").read_text())
    assert side == record
    assert side["model_sha256"] == hashlib.sha256(model.read_bytes()).hexdigest()
    assert side["bin_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    # independent scores: the trusted file read with pickle, embedded with numpy
    bins, issame = pickle.loads(out.read_bytes())
    images = [cv2.imdecode(np.frombuffer(b, np.uint8), cv2.IMREAD_COLOR) for b in bins]
    e = _embed_by_hand(w, images)
    scores, same = np.einsum("ij,ij->i", e[0::2], e[1::2]), np.array(issame)
    by_far = {x["far_target"]: x for x in side["entries"]}
    for far in (0.1, 1e-3):
        t, f, tar = _brute_force(scores, same, far)
        assert by_far[far]["threshold"] == pytest.approx(t, abs=1e-5)
        assert (by_far[far]["far"], by_far[far]["tar"]) == (pytest.approx(f), pytest.approx(tar))
        assert by_far[far]["impostor"] == 20
    # 20 impostor pairs: enough for neither 1e-3 (10 / FAR = 10000) nor 0.1 (100)
    assert by_far[1e-3]["few_impostors"] and by_far[0.1]["few_impostors"]
    assert "target FAR 0.001" in printed.out and "measured FAR" in printed.out
    assert "too few impostor pairs" in printed.err

    # compare: the calibration is used by default, named, and gives an answer
    a, b = src / "id1" / "0.png", src / "id1" / "1.png"
    got = compare_cli.main([str(a), str(b), "--model", str(model), "--aligned", "--far", "0.1"])
    text = capsys.readouterr().out
    assert got["threshold"] == by_far[0.1]["threshold"]
    assert got["same"] is (got["similarity"] > got["threshold"])
    assert "m.onnx.calibration.json" in text and "target FAR 0.1" in text
    assert text.splitlines()[-1] in ("same person", "different people")

    # a calibration of another model file is refused, naming both hashes
    _model(model, seed=1)
    new = hashlib.sha256(model.read_bytes()).hexdigest()
    with pytest.raises(CalibrationError) as info:
        compare_cli.main([str(a), str(b), "--model", str(model), "--aligned"])
    assert side["model_sha256"] in str(info.value) and new in str(info.value)
    # an explicit threshold needs no calibration
    assert (
        compare_cli.main(
            [str(a), str(b), "--model", str(model), "--aligned", "--threshold", "0.5"]
        )["threshold"]
        == 0.5
    )


# ------------------------------------------------- calibration in the ONNX metadata


@pytest.fixture(scope="module")
def our_model(tmp_path_factory):
    """An ``mbf_tiny`` exported by this project's exporter, and a .bin of our people."""
    root = tmp_path_factory.mktemp("ours")
    model = root / "ours.onnx"
    torch.manual_seed(0)
    export_onnx(build_backbone("mbf_tiny"), model, exporter="torchscript")
    src = _folder(root / "people")
    out = root / "mine.bin"
    make_bin.main([str(src), "--out", str(out), "--pairs", "40"])
    return model, out, src


def _graph_hash_by_hand(path):
    """SHA-256 of the model serialised deterministically without its calibration entry."""
    proto = onnx.load(str(path))
    kept = [(e.key, e.value) for e in proto.metadata_props if e.key != "calibration"]
    del proto.metadata_props[:]
    for key, value in kept:
        proto.metadata_props.add(key=key, value=value)
    return hashlib.sha256(proto.SerializeToString(deterministic=True)).hexdigest()


def test_calibration_into_our_model_round_trips(our_model, tmp_path, capsys):
    model, out, src = our_model
    mine = tmp_path / "m.onnx"
    mine.write_bytes(model.read_bytes())
    before = _graph_hash_by_hand(mine)
    argv = ["--model", str(mine), "--bin", str(out), "--far", "0.1", "--into-model"]
    record = calibrate_cli.main(argv)
    assert "calibration -> the metadata of" in capsys.readouterr().out
    assert not (tmp_path / "m.onnx.calibration.json").exists()  # no sidecar
    meta = {e.key: e.value for e in onnx.load(str(mine)).metadata_props}
    assert json.loads(meta["calibration"]) == record
    assert meta["input_formula"]  # the rest of the metadata is kept
    assert record["model_hash"] == "onnx-without-calibration"
    assert record["model_sha256"] == before == _graph_hash_by_hand(mine)
    assert record["bin_sha256"] == hashlib.sha256(out.read_bytes()).hexdigest()
    # calibrating again replaces the entry: one calibration, the same graph hash
    calibrate_cli.main(argv)
    capsys.readouterr()
    keys = [e.key for e in onnx.load(str(mine)).metadata_props]
    assert keys.count("calibration") == 1 and _graph_hash_by_hand(mine) == before

    # compare finds it by default and says where it is
    a, b = src / "id1" / "0.png", src / "id1" / "1.png"
    got = compare_cli.main([str(a), str(b), "--model", str(mine), "--aligned", "--far", "0.1"])
    text = capsys.readouterr().out
    assert got["threshold"] == record["entries"][0]["threshold"]
    assert got["calibration"]["source"] == "metadata"
    assert "calibration in the metadata of" in text and "m.onnx" in text
    assert text.splitlines()[-1] in ("same person", "different people")


def test_a_tampered_model_refuses_its_calibration(our_model, tmp_path):
    model, out, src = our_model
    mine = tmp_path / "m.onnx"
    mine.write_bytes(model.read_bytes())
    record = calibrate_cli.main(
        ["--model", str(mine), "--bin", str(out), "--far", "0.1", "--into-model"]
    )
    proto = onnx.load(str(mine))
    w = proto.graph.initializer[0]
    w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(w) * 1.01, w.name))
    onnx.save(proto, str(mine))
    changed = _graph_hash_by_hand(mine)
    a, b = src / "id1" / "0.png", src / "id1" / "1.png"
    with pytest.raises(CalibrationError) as info:
        compare_cli.main([str(a), str(b), "--model", str(mine), "--aligned"])
    message = str(info.value)
    assert record["model_sha256"] in message and changed in message
    assert "m.onnx" in message and "\n" not in message


def test_into_model_refuses_a_model_we_did_not_export(tmp_path, capsys):
    src = _folder(tmp_path / "people")
    model = tmp_path / "m.onnx"
    _model(model)
    before = model.read_bytes()
    out = tmp_path / "mine.bin"
    make_bin.main([str(src), "--out", str(out), "--pairs", "40"])
    argv = ["--model", str(model), "--bin", str(out), "--into-model"]
    assert run_main(calibrate_cli.main, argv, prog="eval.calibrate") == 1
    err = capsys.readouterr().err.strip()
    assert "m.onnx" in err and "--into-model" in err and len(err.splitlines()) == 1
    assert model.read_bytes() == before
    assert not (tmp_path / "m.onnx.calibration.json").exists()
