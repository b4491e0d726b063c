"""An ONNX model's input convention read from its graph's structure (issue #27, item 1).

Each model is ``flatten(leading ops(input)) @ W`` built here with ``onnx.helper``; the
leading ops normalise or reorder the input under arbitrary node names. Every expected
embedding is computed by hand with numpy from what the leading ops do, independently of
the embedder: feeding the convention the embedder chose must reproduce it.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from eval.onnx_infer import OnnxEmbedder, normalises_in_graph

SIDE = 16
DIM = 5
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def _const(name: str, value) -> onnx.NodeProto:
    """A ``Constant`` node (not an initializer) holding ``value`` as float32."""
    tensor = numpy_helper.from_array(np.asarray(value, np.float32), name + "_value")
    return helper.make_node("Constant", [], [name], name=f"const/{name}", value=tensor)


def _model(path, leading, *, inits=(), shape=None, metadata=None, elem=TensorProto.FLOAT):
    """Write ``flatten(leading(data)) @ W`` (``leading``: nodes from ``data`` to ``x``)."""
    w = np.random.default_rng(0).standard_normal((3 * SIDE * SIDE, DIM)).astype(np.float32)
    nodes = [
        *leading,
        helper.make_node("Flatten", ["x"], ["flat"], name="backbone/flatten", axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["emb"], name="backbone/fc"),
    ]
    graph = helper.make_graph(
        nodes,
        "face",
        [helper.make_tensor_value_info("data", elem, shape or ["N", 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", DIM])],
        initializer=[numpy_helper.from_array(w, "W"), *inits],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, str(path))
    return w.astype(np.float64)


def _faces(n: int = 3) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, SIDE, SIDE, 3), dtype=np.uint8)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _nchw(faces: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) -> float64 (B, 3, H, W)."""
    return faces.transpose(0, 3, 1, 2).astype(np.float64)


def _check(emb: OnnxEmbedder, expected_of_rgb) -> None:
    """Embeddings of RGB uint8 faces, and of our pipeline's [-1, 1] tensors, equal
    ``unit(expected_of_rgb(faces))``."""
    faces = _faces()
    expected = _unit(expected_of_rgb(faces))
    np.testing.assert_allclose(emb.embed_faces(faces), expected, rtol=1e-4, atol=1e-5)
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1
    got = _unit(emb(x).double().numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_in_graph_normalisation_under_arbitrary_names_gets_raw_pixels(tmp_path):
    path = tmp_path / "renamed.onnx"
    w = _model(
        path,
        [
            _const("m", 127.5),
            _const("s", 1 / 128),
            helper.make_node("Sub", ["data", "m"], ["centred"], name="normalize/sub"),
            helper.make_node("Mul", ["centred", "s"], ["x"], name="x1"),
        ],
    )
    emb = OnnxEmbedder(path)
    assert (emb.mean, emb.std, emb.color, emb.layout) == (0.0, 1.0, "RGB", "NCHW")
    assert emb.sources["normalisation"].startswith("graph constants")
    assert emb.sources["color"] == "default"
    assert "(x - 127.5) / 128" in emb.describe()
    assert normalises_in_graph(str(path))
    _check(emb, lambda f: ((_nchw(f) - 127.5) / 128).reshape(len(f), -1) @ w)


def test_a_sub_only_and_a_mul_only_graph_get_raw_pixels(tmp_path):
    sub = tmp_path / "sub.onnx"
    inits = [numpy_helper.from_array(np.array(127.5, np.float32), "c")]
    shape_of = helper.make_node("Shape", ["data"], ["dims"], name="s")  # reads no values
    w = _model(
        sub, [shape_of, helper.make_node("Sub", ["data", "c"], ["x"], name="a")], inits=inits
    )
    emb = OnnxEmbedder(sub)
    assert (emb.mean, emb.std) == (0.0, 1.0) and "graph" in emb.sources["normalisation"]
    _check(emb, lambda f: (_nchw(f) - 127.5).reshape(len(f), -1) @ w)

    mul = tmp_path / "mul.onnx"
    inits = [numpy_helper.from_array(np.array(1 / 255, np.float32), "c")]
    w = _model(mul, [helper.make_node("Mul", ["c", "data"], ["x"], name="b")], inits=inits)
    emb = OnnxEmbedder(mul)
    assert (emb.mean, emb.std) == (0.0, 1.0) and "graph" in emb.sources["normalisation"]
    _check(emb, lambda f: (_nchw(f) / 255).reshape(len(f), -1) @ w)


def test_per_channel_constants_through_a_cast(tmp_path):
    path = tmp_path / "imagenet.onnx"
    inits = [
        numpy_helper.from_array(MEAN.reshape(1, 3, 1, 1).astype(np.float32), "mean"),
        numpy_helper.from_array(STD.reshape(3, 1, 1).astype(np.float32), "std"),
    ]
    w = _model(
        path,
        [
            helper.make_node("Cast", ["data"], ["f"], name="n0", to=TensorProto.FLOAT),
            helper.make_node("Sub", ["f", "mean"], ["c"], name="n1"),
            helper.make_node("Div", ["c", "std"], ["x"], name="n2"),
        ],
        inits=inits,
    )
    emb = OnnxEmbedder(path)
    assert (emb.mean, emb.std) == (0.0, 1.0)
    np.testing.assert_allclose(emb.graph_input.mean, MEAN, rtol=1e-6)
    np.testing.assert_allclose(emb.graph_input.std, STD, rtol=1e-6)
    ref = lambda f: ((_nchw(f) - MEAN[:, None, None]) / STD[:, None, None]).reshape(len(f), -1)  # noqa: E731
    _check(emb, lambda f: ref(f) @ w)


@pytest.mark.parametrize("how", ["split_concat", "gather"])
def test_a_channel_reversing_first_op_gets_bgr(tmp_path, how):
    """The graph reverses the fed channels, so the network behind it reads RGB from BGR."""
    path = tmp_path / f"{how}.onnx"
    inits = [numpy_helper.from_array(np.array(127.5, np.float32), "c")]
    if how == "split_concat":
        reverse = [
            helper.make_node("Split", ["data"], ["r", "g", "b"], name="p", axis=1),
            helper.make_node("Concat", ["b", "g", "r"], ["swapped"], name="q", axis=1),
        ]
    else:
        inits.append(numpy_helper.from_array(np.array([2, 1, 0], np.int64), "idx"))
        reverse = [helper.make_node("Gather", ["data", "idx"], ["swapped"], name="p", axis=1)]
    w = _model(
        path, [*reverse, helper.make_node("Sub", ["swapped", "c"], ["x"], name="q2")], inits=inits
    )
    emb = OnnxEmbedder(path)
    assert emb.color == "BGR" and emb.sources["color"].startswith("graph")
    assert (emb.mean, emb.std) == (0.0, 1.0)
    _check(emb, lambda f: (_nchw(f) - 127.5).reshape(len(f), -1) @ w)


def test_an_nhwc_input_transposed_by_the_graph_is_fed_nhwc(tmp_path):
    path = tmp_path / "tflite_like.onnx"
    w = _model(
        path,
        [
            helper.make_node("Transpose", ["data"], ["t"], name="tr", perm=[0, 3, 1, 2]),
            _const("k", 1 / 127.5),
            _const("o", -1.0),
            helper.make_node("Mul", ["t", "k"], ["u"], name="m"),
            helper.make_node("Add", ["u", "o"], ["x"], name="a"),
        ],
        shape=[2, SIDE, SIDE, 3],  # a fixed batch of 2, as TFLite converters make
    )
    emb = OnnxEmbedder(path)
    assert (emb.layout, emb.input_hw, emb.fixed_batch) == ("NHWC", (SIDE, SIDE), 2)
    assert (emb.mean, emb.std) == (0.0, 1.0)
    np.testing.assert_allclose(emb.graph_input.mean, [127.5] * 3)
    _check(emb, lambda f: (_nchw(f) / 127.5 - 1).reshape(len(f), -1) @ w)


def test_an_affine_that_expects_normalised_input_keeps_the_default(tmp_path):
    """``x * 0.5 + 0.5`` maps [-1, 1] to [0, 1]: the graph does not normalise raw pixels."""
    path = tmp_path / "half.onnx"
    inits = [numpy_helper.from_array(np.array(0.5, np.float32), "h")]
    w = _model(
        path,
        [
            helper.make_node("Mul", ["data", "h"], ["u"], name="m"),
            helper.make_node("Add", ["u", "h"], ["x"], name="a"),
        ],
        inits=inits,
    )
    emb = OnnxEmbedder(path)
    assert (emb.mean, emb.std, emb.sources["normalisation"]) == (127.5, 127.5, "default")
    _check(emb, lambda f: ((_nchw(f) - 127.5) / 127.5 * 0.5 + 0.5).reshape(len(f), -1) @ w)


def test_metadata_and_options_win_and_say_so(tmp_path):
    path = tmp_path / "meta.onnx"
    inits = [numpy_helper.from_array(np.array(127.5, np.float32), "c")]
    meta = {"input_mean": "127.5", "input_std": "127.5", "input_color": "RGB"}
    w = _model(
        path, [helper.make_node("Sub", ["data", "c"], ["x"], name="s")], inits=inits, metadata=meta
    )
    emb = OnnxEmbedder(path)
    assert emb.sources == {"normalisation": "metadata", "color": "metadata"}
    assert emb.convention()["sources"] == emb.sources
    _check(emb, lambda f: ((_nchw(f) - 127.5) / 127.5 - 127.5).reshape(len(f), -1) @ w)
    emb = OnnxEmbedder(path, input_mean=0.0, input_std=1.0, input_color="RGB")
    assert emb.sources == {"normalisation": "option", "color": "option"}
    _check(emb, lambda f: (_nchw(f) - 127.5).reshape(len(f), -1) @ w)


@pytest.mark.parametrize(
    ("elem", "shape"),
    [
        (TensorProto.UINT8, ["N", 3, SIDE, SIDE]),
        (TensorProto.FLOAT, ["N", 3 * SIDE * SIDE]),
        (TensorProto.FLOAT, ["N", 4, SIDE, SIDE]),
        (TensorProto.FLOAT, ["N", SIDE, SIDE, 3]),  # NHWC without a transposing first op
    ],
)
def test_a_non_feedable_input_is_refused_at_load(tmp_path, elem, shape):
    path = tmp_path / "bad.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["data"], ["out"], name="id")],
        "face",
        [helper.make_tensor_value_info("data", elem, shape)],
        [helper.make_tensor_value_info("out", elem, shape)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(path))
    with pytest.raises(ValueError) as info:
        OnnxEmbedder(path)
    message = str(info.value)
    assert str(path) in message and "'data'" in message and str(shape) in message


def test_embed_prints_the_convention_once_and_records_it(tmp_path, capsys):
    import json

    import cv2
    import pyarrow.parquet as pq

    from eval import embed as embed_cli

    path = tmp_path / "m.onnx"
    inits = [numpy_helper.from_array(np.array(127.5, np.float32), "c")]
    _model(path, [helper.make_node("Sub", ["data", "c"], ["x"], name="any")], inits=inits)
    photos = tmp_path / "photos"
    photos.mkdir()
    cv2.imwrite(str(photos / "blank.png"), np.full((64, 64, 3), 128, np.uint8))
    out = tmp_path / "e.parquet"
    embed_cli.main([str(photos), "--model", str(path), "--out", str(out), "--device", "cpu"])
    err = capsys.readouterr().err
    assert err.count("normalisation from graph constants") == 1
    recorded = json.loads(pq.read_schema(out).metadata[b"input_convention"])
    assert recorded == OnnxEmbedder(path).convention()
    assert (recorded["mean"], recorded["std"]) == (0.0, 1.0)


def test_make_bin_and_calibrate_failures_are_one_line(tmp_path, capsys):
    import cv2

    from common.cli import run_main
    from eval import calibrate as calibrate_cli
    from eval import make_bin

    (tmp_path / "p" / "a").mkdir(parents=True)
    cv2.imwrite(str(tmp_path / "p" / "a" / "0.png"), np.zeros((112, 112, 3), np.uint8))
    argv = [str(tmp_path / "p"), "--out", str(tmp_path / "x.bin"), "--pairs", "20"]
    assert run_main(make_bin.main, argv, prog="eval.make_bin") == 1
    err = capsys.readouterr().err.strip()
    assert err.startswith("eval.make_bin: error: 20 pairs need 10 genuine") and "\n" not in err
    argv = ["--model", str(tmp_path / "none.onnx"), "--bin", str(tmp_path / "x.bin")]
    assert run_main(calibrate_cli.main, argv, prog="eval.calibrate") == 1
    assert "none.onnx: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:  # argparse: exit 2, before any import of torch
        calibrate_cli.main([*argv, "--far", "2"])
    assert info.value.code == 2
