"""ONNX export parity, the onnxruntime helper, and the export / verification commands."""

from __future__ import annotations

import json
import logging
import pickle
import warnings

import cv2
import numpy as np
import onnx
import pytest
import torch

from common.face_input import ARCFACE_INPUT
from eval import export_onnx as export_cli
from eval import verification as verification_cli
from eval.onnx_export import check_parity, export_onnx
from eval.onnx_infer import OnnxEmbedder
from tests.eval.test_eval_verification import TinyNet


@pytest.fixture(scope="module")
def tiny_onnx(tmp_path_factory):
    model = TinyNet().eval()
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    export_onnx(model, path, image_size=(32, 32), metadata={"network": "tiny"})  # dynamo
    return model, path


def test_export_graph_interface_and_metadata(tiny_onnx):
    _, path = tiny_onnx
    proto = onnx.load(path)
    assert [i.name for i in proto.graph.input] == ["input"]
    assert [o.name for o in proto.graph.output] == ["embedding"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.dim_value  # symbolic batch axis
    meta = {p.key: p.value for p in proto.metadata_props}
    assert meta["input_mean"] == "127.5" and meta["input_std"] == "127.5"
    assert meta["input_color"] == "RGB" and meta["input_layout"] == "NCHW"
    assert meta["input_size"] == "32x32" and meta["embedding_size"] == "8"
    assert meta["network"] == "tiny"
    assert not list(path.parent.glob(".*"))  # no temp files left behind


def test_onnx_parity_dynamic_batch(tiny_onnx):
    model, path = tiny_onnx
    assert check_parity(model, path, image_size=(32, 32), batch_sizes=(1, 4, 7)) < 1e-4


@pytest.mark.parametrize("exporter", ["dynamo", "torchscript"])
def test_export_is_quiet(tmp_path, exporter: str) -> None:
    # Neither exporter prints anything that does not concern the model: no Python
    # warning, and (without torchvision) no "torchvision is not installed" records,
    # which the dynamo exporter's registry logs on every export.
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    registry = logging.getLogger("torch.onnx._internal.exporter._registration")
    collect = Collect(level=logging.DEBUG)
    registry.addHandler(collect)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            export_onnx(
                TinyNet().eval(), tmp_path / "m.onnx", image_size=(32, 32), exporter=exporter
            )
    finally:
        registry.removeHandler(collect)
    assert [str(w.message) for w in caught] == []
    assert not [m for m in seen if "torchvision" in m]
    batch_dim = onnx.load(tmp_path / "m.onnx").graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch"


def test_embed_faces_normalises_and_handles_bgr(tiny_onnx):
    model, path = tiny_onnx
    sess = OnnxEmbedder(path)
    rng = np.random.default_rng(0)
    faces = rng.integers(0, 256, (5, 32, 32, 3), dtype=np.uint8)
    got = sess.embed_faces(faces)
    x = torch.from_numpy(faces).permute(0, 3, 1, 2).float()
    with torch.no_grad():
        ref = model((x / 255 - 0.5) / 0.5).numpy()
    ref /= np.linalg.norm(ref, axis=1, keepdims=True)
    np.testing.assert_allclose(got, ref, atol=1e-5)
    np.testing.assert_allclose(np.linalg.norm(got, axis=1), 1, atol=1e-6)
    np.testing.assert_allclose(sess.embed_faces(faces[..., ::-1], bgr=True), got, atol=1e-6)
    np.testing.assert_allclose(sess.embed_faces(faces[0]), got[:1], atol=1e-6)
    with pytest.raises(FileNotFoundError):
        OnnxEmbedder(path.parent / "missing.onnx")


def _write_bin(path, n_pairs: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    base = rng.integers(0, 256, (n_pairs, 112, 112, 3), dtype=np.uint8)
    bins = []
    issame = []
    for i in range(n_pairs):
        same = i % 2 == 0
        other = base[i] if same else base[(i + 1) % n_pairs]
        noise = rng.integers(-20, 20, other.shape)
        partner = np.clip(other.astype(int) + noise, 0, 255).astype(np.uint8)
        bins += [cv2.imencode(".png", base[i])[1].tobytes(), cv2.imencode(".png", partner)[1]]
        issame.append(same)
    bins[1::2] = [np.asarray(b) for b in bins[1::2]]  # mix bytes and numpy-encoded images
    path.write_bytes(pickle.dumps((bins, issame), protocol=4))


def test_export_and_verification_commands(tmp_path, capsys, monkeypatch):
    # The commands build `backbones.registry.get_model(name)`; a tiny stand-in keeps this fast
    # (the real backbones are exercised by their own tests).
    from backbones import registry

    monkeypatch.setattr(registry, "get_model", lambda name, **kw: TinyNet())
    monkeypatch.setattr(registry, "input_spec", lambda name: ARCFACE_INPUT)  # a 112 model
    model = TinyNet()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=torch.Generator().manual_seed(1)) * 0.05)
    ckpt = tmp_path / "backbone.pt"
    torch.save(model.state_dict(), ckpt)
    out = tmp_path / "model.onnx"
    diff = export_cli.main(
        [
            *("--network", "tiny", "--checkpoint", str(ckpt)),
            *("--output", str(out), "--exporter", "torchscript"),
        ]
    )
    assert diff < 1e-4
    assert "max abs diff" in capsys.readouterr().out

    bin_path = tmp_path / "lfw.bin"
    _write_bin(bin_path, 20)
    js_pt, js_onnx = tmp_path / "pt.json", tmp_path / "onnx.json"
    res_pt = verification_cli.main(
        [
            *("--checkpoint", str(ckpt), "--network", "tiny", "--bin", str(bin_path)),
            *("--json", str(js_pt), "--batch-size", "16", "--device", "cpu"),
        ]
    )
    res_onnx = verification_cli.main(
        ["--onnx", str(out), "--bin", str(bin_path), "--json", str(js_onnx)]
    )
    printed = capsys.readouterr().out
    assert printed.count("[lfw] accuracy-flip") == 2 and "XNorm" in printed
    assert json.loads(js_pt.read_text()) == res_pt
    for key, value in res_pt["lfw"].items():
        assert res_onnx["lfw"][key] == pytest.approx(value, rel=1e-4, abs=1e-6)
    assert res_pt["lfw"]["num_pairs"] == 20
