"""ONNX models from elsewhere: input size, normalisation and colour read from the
model (metadata, or the insightface convention), overridable, and bad inputs refused.

The models are built here with ``onnx.helper``: a flattened linear map, so each
expected embedding is one numpy product written independently of the embedder.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
import torch.nn.functional as F
from onnx import TensorProto, helper, numpy_helper

from eval import verification as verification_cli
from eval.onnx_infer import OnnxEmbedder, _providers
from tests.eval.test_eval_onnx import _write_bin

SIDE = 16
DIM = 4


def _weights(side: int = SIDE) -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.standard_normal((3 * side * side, DIM)).astype(np.float32)


def _model(
    path,
    *,
    input_shape: list,
    normalise_in_graph: bool = False,
    metadata: dict[str, str] | None = None,
    side: int = SIDE,
) -> np.ndarray:
    """Write ``flatten(input) @ W`` (after ``(x - 127.5) * (1 / 128)`` if
    ``normalise_in_graph``, with insightface's node names) and return ``W``."""
    w = _weights(side)
    nodes, inits, x = [], [numpy_helper.from_array(w, "W")], "data"
    if normalise_in_graph:
        inits += [
            numpy_helper.from_array(np.array(127.5, np.float32), "mean"),
            numpy_helper.from_array(np.array(1 / 128, np.float32), "scale"),
        ]
        nodes += [
            helper.make_node("Sub", [x, "mean"], ["centred"], name="_minus0"),
            helper.make_node("Mul", ["centred", "scale"], ["scaled"], name="_mul0"),
        ]
        x = "scaled"
    nodes += [
        helper.make_node("Flatten", [x], ["flat"], name="flatten0", axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["fc1"], name="fc0"),
    ]
    graph = helper.make_graph(
        nodes,
        "face",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, input_shape)],
        [helper.make_tensor_value_info("fc1", TensorProto.FLOAT, ["N", DIM])],
        initializer=inits,
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    for key, value in (metadata or {}).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.save(proto, path)
    return w


def _faces(n: int = 3, side: int = SIDE) -> np.ndarray:
    return np.random.default_rng(1).integers(0, 256, (n, side, side, 3), dtype=np.uint8)


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _flat(faces: np.ndarray) -> np.ndarray:
    """uint8 (B, H, W, 3) RGB -> float64 (B, 3*H*W) in NCHW order."""
    return faces.transpose(0, 3, 1, 2).reshape(len(faces), -1).astype(np.float64)


def test_insightface_model_with_in_graph_normalisation_gets_raw_pixels(tmp_path):
    path = tmp_path / "w600k_like.onnx"
    w = _model(path, input_shape=["None", 3, SIDE, SIDE], normalise_in_graph=True)
    emb = OnnxEmbedder(path)
    assert (emb.mean, emb.std, emb.color, emb.input_hw) == (0.0, 1.0, "RGB", (SIDE, SIDE))
    faces = _faces()
    expected = _unit(((_flat(faces) - 127.5) / 128) @ w)
    np.testing.assert_allclose(emb.embed_faces(faces), expected, rtol=1e-4, atol=1e-5)
    # the trainer's pipeline hands over [-1, 1] RGB tensors
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).double() / 127.5 - 1
    got = _unit(emb(x.float()).double().numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)


def test_model_without_metadata_or_normalisation_gets_insightface_scaling(tmp_path):
    path = tmp_path / "plain.onnx"
    w = _model(path, input_shape=["N", 3, SIDE, SIDE])
    emb = OnnxEmbedder(path)
    assert (emb.mean, emb.std) == (127.5, 127.5)
    faces = _faces()
    expected = _unit(((_flat(faces) - 127.5) / 127.5) @ w)
    np.testing.assert_allclose(emb.embed_faces(faces), expected, rtol=1e-4, atol=1e-5)


def test_metadata_wins_over_the_convention_and_options_win_over_metadata(tmp_path):
    path = tmp_path / "meta.onnx"
    meta = {"input_mean": "0", "input_std": "255", "input_color": "BGR"}
    w = _model(path, input_shape=["N", 3, SIDE, SIDE], normalise_in_graph=True, metadata=meta)
    faces = _faces()
    bgr = faces[..., ::-1]
    emb = OnnxEmbedder(path)
    expected = _unit(((_flat(bgr) / 255 - 127.5) / 128) @ w)
    np.testing.assert_allclose(emb.embed_faces(faces), expected, rtol=1e-4, atol=1e-5)
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float() / 127.5 - 1
    np.testing.assert_allclose(_unit(emb(x).double().numpy()), expected, rtol=1e-4, atol=1e-5)

    emb = OnnxEmbedder(path, input_mean=10.0, input_std=2.0, input_color="RGB")
    expected = _unit((((_flat(faces) - 10) / 2 - 127.5) / 128) @ w)
    np.testing.assert_allclose(emb.embed_faces(faces), expected, rtol=1e-4, atol=1e-5)


def test_faces_of_another_size_are_resized_to_the_model_input(tmp_path):
    path = tmp_path / "big.onnx"
    w = _model(path, input_shape=["N", 3, 24, 24], side=24)
    emb = OnnxEmbedder(path)
    assert emb.input_hw == (24, 24)
    x = torch.from_numpy(_faces()).permute(0, 3, 1, 2).double() / 127.5 - 1
    resized = F.interpolate(x, size=(24, 24), mode="bilinear", align_corners=False)
    expected = resized.reshape(3, -1).numpy() @ w
    np.testing.assert_allclose(emb(x.float()).numpy(), expected, rtol=1e-4, atol=1e-3)


def test_symbolic_sides_take_the_input_size_option(tmp_path):
    # a global pooling model accepts any size; the option picks what it is fed
    path = tmp_path / "any.onnx"
    graph = helper.make_graph(
        [
            helper.make_node("GlobalAveragePool", ["data"], ["pooled"], name="gap"),
            helper.make_node("Flatten", ["pooled"], ["emb"], name="flat", axis=1),
        ],
        "face",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, ["N", 3, "h", "w"])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, ["N", 3])],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, path)
    assert OnnxEmbedder(path).input_hw == (112, 112)
    assert OnnxEmbedder(path, input_size=20).input_hw == (20, 20)
    with pytest.raises(ValueError, match="contradicts"):
        OnnxEmbedder(_fixed(tmp_path), input_size=20)


def _fixed(tmp_path):
    path = tmp_path / "fixed.onnx"
    _model(path, input_shape=["N", 3, SIDE, SIDE])
    return path


@pytest.mark.parametrize(
    "shape", [["N", SIDE, SIDE, 3], ["N", 3 * SIDE * SIDE], ["N", 1, SIDE, SIDE]]
)
def test_an_input_that_is_not_3xHxW_is_refused_naming_model_and_shape(tmp_path, shape):
    path = tmp_path / "nhwc.onnx"
    graph = helper.make_graph(
        [helper.make_node("Identity", ["data"], ["out"], name="id")],
        "face",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, shape)],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, path)
    with pytest.raises(ValueError) as info:
        OnnxEmbedder(path)
    message = str(info.value)
    assert str(path) in message and str(shape) in message and "(batch, 3, H, W)" in message


def test_cuda_provider_is_chosen_for_the_rank_device(monkeypatch):
    import onnxruntime as ort

    monkeypatch.setattr(
        ort, "get_available_providers", lambda: ["CUDAExecutionProvider", "CPUExecutionProvider"]
    )
    assert _providers("cuda:1") == [
        ("CUDAExecutionProvider", {"device_id": 1}),
        "CPUExecutionProvider",
    ]
    assert _providers("cuda")[0] == ("CUDAExecutionProvider", {})
    assert _providers("cpu") == ["CPUExecutionProvider"]
    monkeypatch.setattr(ort, "get_available_providers", lambda: ["CPUExecutionProvider"])
    assert _providers("cuda:0") == ["CPUExecutionProvider"]


def test_verification_command_runs_an_insightface_model(tmp_path, capsys):
    model = tmp_path / "w600k_like.onnx"
    _model(model, input_shape=["None", 3, 112, 112], normalise_in_graph=True, side=112)
    bin_path = tmp_path / "lfw.bin"
    _write_bin(bin_path, 20)
    results = verification_cli.main(["--onnx", str(model), "--bin", str(bin_path), "--nfolds", "2"])
    assert results["lfw"]["num_pairs"] == 20
    assert "(pixel - 0) / 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        verification_cli.main(
            ["--checkpoint", "x.pt", "--network", "r18", "--bin", "b", "--input-mean", "0"]
        )
