"""Evaluation faults (issue 24, items 5, 8, 11, 13 and 14, eval part): no answer from
non-finite numbers, validated IJB and ``.bin`` labels, capped model input sizes, one
line naming the file for every expected failure of the ``eval`` commands.

The models are built here with ``onnx.helper`` (a few nodes each). Commands run in
process through :func:`common.cli.run_main`, which is what their ``python -m`` entry
points call: an expected failure is one line on stderr, ``eval.<name>: error: ...``.
New names are imported inside the tests, so that each test fails on its own assertion
against the code before the fix.
"""

from __future__ import annotations

import json
import math
import os
import pickle
import runpy
import sys
import zipfile

import cv2
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from common.cli import run_main
from datasets.faces.align import ARCFACE_TEMPLATE
from eval import compare as compare_cli
from eval import embed as embed_cli
from eval import ijb as ijb_cli
from eval import ijb_protocol
from eval import verification as verification_cli
from eval.bin_io import load_bin
from eval.onnx_infer import OnnxEmbedder

pytestmark = pytest.mark.usefixtures("one_thread")

SIDE = 16

# ---------------------------------------------------------------- helpers


def _save(path, nodes, inputs, outputs, inits=()) -> str:
    graph = helper.make_graph(nodes, "face", inputs, outputs, initializer=list(inits))
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, path)
    return str(path)


def _linear(path, *, batch="N", side=SIDE, nan=False, dtype=TensorProto.FLOAT) -> str:
    """``flatten(input) @ W`` (W NaN with ``nan``), input ``(batch, 3, side, side)``."""
    w = np.random.default_rng(0).standard_normal((3 * side * side, 4)).astype(np.float32)
    if nan:
        w[:] = np.nan
    x, nodes = "data", []
    if dtype != TensorProto.FLOAT:
        nodes.append(helper.make_node("Cast", ["data"], ["xf"], to=TensorProto.FLOAT))
        x = "xf"
    nodes += [
        helper.make_node("Flatten", [x], ["flat"], axis=1),
        helper.make_node("MatMul", ["flat", "W"], ["emb"]),
    ]
    return _save(
        path,
        nodes,
        [helper.make_tensor_value_info("data", dtype, [batch, 3, side, side])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [batch, 4])],
        [numpy_helper.from_array(w, "W")],
    )


def _pooling(path, shape, *, flatten=True) -> str:
    """Global average pooling (3-d embedding; ``flatten=False``: a 4-D output)."""
    nodes = [helper.make_node("GlobalAveragePool", ["data"], ["pooled"])]
    out, out_shape = "pooled", [shape[0], 3, 1, 1]
    if flatten:
        nodes.append(helper.make_node("Flatten", ["pooled"], ["emb"], axis=1))
        out, out_shape = "emb", [shape[0], 3]
    return _save(
        path,
        nodes,
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, shape)],
        [helper.make_tensor_value_info(out, TensorProto.FLOAT, out_shape)],
    )


def _run(module, argv, capsys, prog: str) -> tuple[int, str]:
    """``run_main(module.main, argv)``: ``(exit code, the error line)``, or ``(0, stdout
    and stderr)``; a failure must be exactly one line naming the command, no traceback."""
    capsys.readouterr()
    code = run_main(module.main, [str(a) for a in argv], prog=prog)
    captured = capsys.readouterr()
    if code:
        lines = [ln for ln in captured.err.splitlines() if ln.startswith(f"{prog}: error: ")]
        assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
        return code, lines[0]
    return code, captured.out + captured.err


@pytest.fixture(scope="module")
def crops(tmp_path_factory):
    """Two aligned 112x112 crops (random pixels: compare --aligned needs no face)."""
    d = tmp_path_factory.mktemp("crops")
    for i in range(2):
        img = np.random.default_rng(i).integers(0, 256, (112, 112, 3), dtype=np.uint8)
        cv2.imwrite(str(d / f"p{i}.png"), img)
    return d / "p0.png", d / "p1.png"


@pytest.fixture(scope="module")
def faces(tmp_path_factory):
    """A folder of one face photo (the bundled astronaut) under a UTF-8 name and under a
    name that is not UTF-8 (``caf\\xe9.jpg``)."""
    from tests.face_photos import source

    d = tmp_path_factory.mktemp("faces")
    data = cv2.imencode(".jpg", source("astronaut"))[1]
    (d / "a.jpg").write_bytes(data.tobytes())
    with open(os.fsencode(d) + b"/caf\xe9.jpg", "wb") as f:
        f.write(data.tobytes())
    return d


# ---------------------------------------------------------------- item 5: NaN embeddings


def test_compare_with_a_nan_onnx_model_is_an_error_naming_model_and_photo(tmp_path, crops, capsys):
    model = _linear(tmp_path / "nan.onnx", nan=True)
    out = tmp_path / "r.json"
    a, _ = crops
    argv = [a, a, "--aligned", "--model", model, "--threshold", "0.3", "--json", out]
    code, line = _run(compare_cli, argv, capsys, "eval.compare")
    assert code == 1
    assert "nan.onnx: the model gave a non-finite embedding (NaN or infinity)" in line
    assert str(a) in line
    assert not out.exists()  # nothing written, no "different people"


def test_compare_with_a_nan_checkpoint_is_an_error(tmp_path, crops, capsys):
    from backbones.registry import get_model

    state = get_model("mbf_tiny").state_dict()
    for v in state.values():
        if v.is_floating_point():
            v.fill_(float("nan"))
    torch.save(state, tmp_path / "nan.pt")
    a, b = crops
    argv = [a, b, "--aligned", "--model", tmp_path / "nan.pt", "--network", "mbf_tiny"]
    code, line = _run(compare_cli, [*argv, "--device", "cpu"], capsys, "eval.compare")
    assert code == 1 and "nan.pt: the model gave a non-finite embedding" in line
    assert f"{a}, {b}" in line


def test_embed_gives_non_finite_rows_a_reason_and_does_not_count_them(tmp_path, faces, capsys):
    import pyarrow.parquet as pq

    model = _linear(tmp_path / "nan.onnx", nan=True)
    out = tmp_path / "emb.parquet"
    argv = [faces, "--model", model, "--out", out, "--no-progress", "--device", "cpu"]
    code, printed = _run(embed_cli, argv, capsys, "eval.embed")
    assert code == 0 and "embedded 0 of 2 photos" in printed
    assert "nan.onnx gave a non-finite embedding (NaN or infinity) for 2 of 2 faces" in printed
    rows = pq.read_table(out).to_pylist()
    assert [r["reason"] for r in rows] == ["non_finite_embedding"] * 2
    for r in rows:  # the face was found: its detection is kept, the embedding is not
        assert r["embedding"] is None and r["score"] > 0.9 and len(r["landmarks"]) == 10
        assert "nan.onnx: the model gave a non-finite embedding" in r["detail"]


def test_embed_aligned_keeps_the_finite_rows_of_a_batch():
    from eval.extract import CheckedEmbedder
    from eval.faces import embed_aligned, embed_aligned_rows

    def half_nan(x: torch.Tensor) -> torch.Tensor:
        out = x.mean(dim=(2, 3))
        out[1] = float("nan")
        return out

    embed = CheckedEmbedder(half_nan, "half.onnx")
    crops = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    emb, finite = embed_aligned_rows(embed, crops)
    assert finite.tolist() == [True, False, True]
    assert np.isfinite(emb[[0, 2]]).all() and np.isnan(emb[1]).all()
    with pytest.raises(ValueError, match=r"half\.onnx: .* for b\.jpg; its weights"):
        embed_aligned(embed, crops, names=["a.jpg", "b.jpg", "c.jpg"])


def test_json_output_is_strict_and_names_the_key(tmp_path):
    from eval.jsonio import dumps, write_json

    with pytest.raises(ValueError, match=r"r\.json: .*non-finite number at a\.b\[1\]"):
        write_json(tmp_path / "r.json", {"a": {"b": [1.0, math.nan]}})
    assert not (tmp_path / "r.json").exists()
    assert json.loads(dumps({"x": 1.5})) == {"x": 1.5}


# ---------------------------------------------------------------- item 8: IJB and .bin labels


def _ijb_root(
    root, *, faceness: float | str = 0.9, pairs: str = "1 2 1\n1 3 0\n", images: bool = False
):
    """Three one-image templates (1, 2, 3) with landmarks on the ArcFace template."""
    (root / "meta").mkdir(parents=True)
    (root / "loose_crop").mkdir()
    points = " ".join(f"{v:.4f}" for v in ARCFACE_TEMPLATE.reshape(-1))
    tid, lms = [], []
    for t in (1, 2, 3):
        tid.append(f"{t}.jpg {t} {t}")
        lms.append(f"{t}.jpg {points} {faceness if t == 2 else 0.9}")
        if images:
            img = np.random.default_rng(t).integers(0, 256, (112, 112, 3), dtype=np.uint8)
            cv2.imwrite(str(root / "loose_crop" / f"{t}.jpg"), img)
    (root / "meta" / "ijbc_face_tid_mid.txt").write_text("\n".join(tid) + "\n")
    (root / "meta" / "ijbc_name_5pts_score.txt").write_text("\n".join(lms) + "\n")
    (root / "meta" / "ijbc_template_pair_label.txt").write_text(pairs)
    return root


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ({"faceness": "nan"}, r"ijbc_name_5pts_score\.txt:2: the faceness score is 'nan'"),
        ({"faceness": "inf"}, r"ijbc_name_5pts_score\.txt:2: the faceness score is 'inf'"),
        ({"pairs": "1 2 1\n1 3 1\n"}, r"ijbc_template_pair_label\.txt: no impostor pairs"),
        ({"pairs": "1 2 0\n1 3 0\n"}, r"ijbc_template_pair_label\.txt: no genuine pairs"),
        ({"pairs": "1 2 1\n1 3 2\n"}, r"label\.txt: pair row 2 has label 2; labels must be 0"),
        ({"pairs": "1 2 -1\n1 3 0\n"}, r"label\.txt: pair row 1 has label -1"),
        ({"pairs": ""}, r"ijbc_template_pair_label\.txt: no pairs \(an empty pair file\)"),
        ({"pairs": "1 9 1\n1 3 0\n"}, r"label\.txt: pair row 1 names template 9, which has no"),
    ],
)
def test_ijb_meta_is_validated_naming_the_file(tmp_path, case, expected, capsys):
    from eval.ijb_data import read_ijb_meta

    root = _ijb_root(tmp_path / "IJBC", **case)
    with pytest.raises(ValueError, match=expected):  # an IJBDataError
        read_ijb_meta(root)
    # the command: one line, before any model is loaded
    argv = ["--root", root, "--onnx", tmp_path / "absent.onnx", "--output-dir", tmp_path / "o"]
    code, line = _run(ijb_cli, argv, capsys, "eval.ijb")
    assert code == 1 and len(line.split("error: ", 1)[1]) > 10
    assert not (tmp_path / "o").exists()


def test_ijb_never_scores_from_a_non_finite_feature(tmp_path):
    from eval.ijb_data import read_ijb_meta

    meta = read_ijb_meta(_ijb_root(tmp_path / "IJBC", images=True))

    def overflowing(x: torch.Tensor) -> torch.Tensor:  # an unchecked embedder
        return torch.full((x.shape[0], 4), 3e38)  # + its mirror: inf

    with pytest.raises(ValueError, match=r"non-finite embedding .*loose_crop/1\.jpg"):
        ijb_protocol.evaluate_ijb(overflowing, meta, workers=1, progress=False)
    meta.faceness[1] = np.nan  # set after reading: checked again before scoring
    with pytest.raises(ValueError, match=r"2\.jpg: faceness score nan is not a finite"):
        ijb_protocol.evaluate_ijb(lambda x: x.mean(dim=(2, 3)), meta, workers=1, progress=False)


def _png() -> bytes:
    return cv2.imencode(".png", np.full((8, 8, 3), 128, np.uint8))[1].tobytes()


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([1, 0, 2, -1, 5], r"issame_list\[2\] is 2; labels must be booleans or exactly 0/1"),
        ([True, "yes"], r"issame_list\[1\] is 'yes'"),
        (np.array([0.0, 1.0]), r"issame_list\[0\] is 0\.0"),
    ],
)
def test_bin_labels_are_booleans_or_exactly_0_1(tmp_path, labels, expected):
    path = tmp_path / "lab.bin"
    path.write_bytes(pickle.dumps(([_png()] * (2 * len(labels)), labels), protocol=4))
    with pytest.raises(ValueError, match=rf"lab\.bin: {expected}"):
        load_bin(path)
    ok = tmp_path / "ok.bin"
    ok.write_bytes(pickle.dumps(([_png()] * 6, [1, np.bool_(False), True]), protocol=4))
    assert load_bin(ok).issame.tolist() == [True, False, True]


# ---------------------------------------------------------------- item 11: input size cap


def test_a_huge_model_input_is_refused_naming_model_and_shape(tmp_path, crops, capsys):
    huge = _pooling(tmp_path / "huge.onnx", [1, 3, 100000, 100000])
    bin_path = tmp_path / "t.bin"
    bin_path.write_bytes(pickle.dumps(([_png()] * 20, [True, False] * 5), protocol=4))
    argv = ["--onnx", huge, "--bin", bin_path, "--device", "cpu"]
    code, line = _run(verification_cli, argv, capsys, "eval.verification")
    assert code == 1
    assert "huge.onnx: input 'data' has shape [1, 3, 100000, 100000]" in line
    assert "over 1024 pixels are refused" in line
    a, b = crops
    code, line = _run(compare_cli, [a, b, "--aligned", "--model", huge], capsys, "eval.compare")
    assert code == 1 and "huge.onnx: input 'data' has shape" in line
    assert "--image-size" not in line  # compare has no such option


def test_a_huge_input_size_option_is_refused_naming_the_option(tmp_path, capsys):
    model = _pooling(tmp_path / "any.onnx", ["N", 3, "h", "w"])
    bin_path = tmp_path / "t.bin"
    bin_path.write_bytes(pickle.dumps(([_png()] * 20, [True, False] * 5), protocol=4))
    argv = ["--onnx", model, "--bin", bin_path, "--input-size", "60000", "--device", "cpu"]
    code, line = _run(verification_cli, argv, capsys, "eval.verification")
    assert code == 2
    assert "--input-size 60000: must be 1 to 1024 pixels (model" in line
    assert "any.onnx" in line and "['N', 3, 'h', 'w']" in line


# ---------------------------------------------------------------- item 13: model files


def _bad_model(tmp_path, kind: str) -> str:
    if kind == "zip.onnx":
        with zipfile.ZipFile(tmp_path / kind, "w") as z:
            z.writestr("a", "b")
    elif kind == "pickle.onnx":
        (tmp_path / kind).write_bytes(pickle.dumps({"weights": [1, 2, 3]}))
    elif kind == "empty.onnx":
        (tmp_path / kind).write_bytes(b"")
    elif kind == "int64.onnx":
        _linear(tmp_path / kind, dtype=TensorProto.INT64)
    elif kind == "out4d.onnx":
        _pooling(tmp_path / kind, ["N", 3, SIDE, SIDE], flatten=False)
    elif kind == "zip.pt":
        with zipfile.ZipFile(tmp_path / kind, "w") as z:
            z.writestr("a", "b")
    return str(tmp_path / kind)


@pytest.mark.parametrize("command", ["compare", "embed"])
@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("zip.onnx", r"zip\.onnx: onnxruntime cannot load this model: INVALID_PROTOBUF"),
        ("pickle.onnx", r"pickle\.onnx: onnxruntime cannot load this model"),
        ("empty.onnx", r"empty\.onnx: onnxruntime cannot load this model: .*No graph"),
        (
            "int64.onnx",
            r"int64\.onnx: input 'data' is tensor\(int64\) of shape \['N', 3, 16, 16\]; "
            r"expected a float",
        ),
        ("out4d.onnx", r"out4d\.onnx: output 'pooled' has shape \['N', 3, 1, 1\]; expected"),
        ("zip.pt", r"zip\.pt: not a readable weights file"),
    ],
)
def test_a_bad_model_file_is_one_line_naming_it(tmp_path, crops, capsys, command, kind, expected):
    import re

    model = _bad_model(tmp_path, kind)
    net = ["--network", "mbf_tiny"] if kind.endswith(".pt") else []
    if command == "compare":
        argv = [*crops, "--aligned", "--model", model, *net, "--device", "cpu"]
        code, line = _run(compare_cli, argv, capsys, "eval.compare")
    else:
        argv = [crops[0].parent, "--model", model, *net, "--out", tmp_path / "e.parquet"]
        code, line = _run(embed_cli, [*argv, "--device", "cpu"], capsys, "eval.embed")
    assert code == 1 and re.search(expected, line), line


def test_a_refused_pickle_does_not_repeat_torchs_advice(tmp_path, crops, capsys):
    class Payload:
        def __reduce__(self):
            return (os.system, ("true",))

    torch.save({"w": Payload()}, tmp_path / "evil.pt")
    argv = [*crops, "--aligned", "--model", tmp_path / "evil.pt", "--network", "mbf_tiny"]
    code, line = _run(compare_cli, argv, capsys, "eval.compare")
    assert code == 1 and "evil.pt: refused: the file holds objects other than tensors" in line
    assert "posix.system" in line and "weights_only" not in line


def test_a_fixed_batch_model_runs_in_chunks(tmp_path):
    fixed = OnnxEmbedder(_linear(tmp_path / "fixed.onnx", batch=2))
    dynamic = OnnxEmbedder(_linear(tmp_path / "dynamic.onnx"))
    faces = np.random.default_rng(0).integers(0, 256, (5, SIDE, SIDE, 3), dtype=np.uint8)
    np.testing.assert_allclose(fixed.embed_faces(faces), dynamic.embed_faces(faces), atol=1e-6)
    x = torch.rand(3, 3, SIDE, SIDE) * 2 - 1
    np.testing.assert_allclose(fixed(x).numpy(), dynamic(x).numpy(), atol=1e-5)
    assert fixed.fixed_batch == 2 and "fixed batch 2" in fixed.describe()


def test_embed_writes_a_file_name_that_is_not_utf8(tmp_path, faces, capsys):
    import pyarrow.parquet as pq

    model = _pooling(tmp_path / "pool.onnx", ["N", 3, "h", "w"])
    out = tmp_path / "emb.parquet"
    argv = [faces, "--model", model, "--out", out, "--no-progress", "--device", "cpu"]
    code, printed = _run(embed_cli, argv, capsys, "eval.embed")
    assert code == 0 and "embedded 2 of 2 photos" in printed
    rows = pq.read_table(out).to_pylist()
    assert [r["path"] for r in rows] == ["a.jpg", "caf\\xe9.jpg"]
    assert [r["path_bytes"] for r in rows] == [b"a.jpg", b"caf\xe9.jpg"]
    assert rows[0]["embedding"] == rows[1]["embedding"] is not None  # the same photo


def test_embed_checks_its_output_directory_before_any_work(tmp_path, faces, capsys):
    model = _pooling(tmp_path / "pool.onnx", ["N", 3, "h", "w"])
    argv = [faces, "--model", model, "--out", tmp_path / "missing" / "e.parquet"]
    with pytest.raises(SystemExit) as info:
        embed_cli.main([str(a) for a in argv])
    assert info.value.code == 2
    assert "missing/e.parquet: its directory does not exist" in capsys.readouterr().err


# ---------------------------------------------------------------- item 14: messages


def test_a_one_pair_bin_names_the_file_and_the_fold_count(tmp_path, capsys):
    model = _pooling(tmp_path / "any.onnx", ["N", 3, "h", "w"])
    one = tmp_path / "one.bin"
    one.write_bytes(pickle.dumps(([_png(), _png()], [True]), protocol=4))
    argv = ["--onnx", model, "--bin", one, "--device", "cpu"]
    code, line = _run(verification_cli, argv, capsys, "eval.verification")
    assert code == 1
    assert f"{one}: 1 pair, fewer than the 10 folds of the protocol" in line


def test_a_bin_with_one_kind_of_pair_is_refused(tmp_path):
    from eval.pair_verification import verify_pairset

    path = tmp_path / "same.bin"
    path.write_bytes(pickle.dumps(([_png()] * 20, [True] * 10), protocol=4))
    with pytest.raises(ValueError, match=r"same\.bin: no impostor pairs among its 10"):
        verify_pairset(lambda x: x.mean(dim=(2, 3)), load_bin(path))


# ---------------------------------------------------------------- one error path


@pytest.mark.filterwarnings("ignore:.*found in sys.modules:RuntimeWarning")  # runpy: re-run
@pytest.mark.parametrize(
    ("module", "argv", "code", "expected"),
    [
        ("eval.compare", ["a.png", "b.png", "--model", "{t}/no.onnx"], 1, "no.onnx: no such"),
        ("eval.embed", ["{t}", "--model", "{t}/no.onnx", "--out", "{t}/e.parquet"], 1, "no.onnx"),
        ("eval.verification", ["--onnx", "{t}/no.onnx", "--bin", "x.bin"], 1, "no.onnx"),
        ("eval.ijb", ["--root", "{t}", "--onnx", "m.onnx", "--output-dir", "{t}/o"], 1, "meta"),
        ("eval.export_onnx", ["--network", "nope", "--output", "{t}/m.onnx"], 2, "'nope'"),
    ],
)
def test_every_entry_point_prints_one_line(
    tmp_path, monkeypatch, capsys, module, argv, code, expected
):
    args = [a.replace("{t}", str(tmp_path)) for a in argv]
    monkeypatch.setattr(sys, "argv", [module, *args])
    with pytest.raises(SystemExit) as info:
        runpy.run_module(module, run_name="__main__", alter_sys=True)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.startswith(f"{module}: error: ")]
    assert info.value.code == code and len(lines) == 1 and "Traceback" not in err, err
    assert expected in lines[0]


def test_eval_errors_are_user_errors_keeping_their_builtin_base():
    from backbones.weights import BackboneWeightsError
    from common.errors import UsageError, UserError
    from eval.bin_io import BinFileError, BinPickleError
    from eval.errors import EvalUsageError, ModelError, NonFiniteEmbeddingError
    from eval.ijb_data import IJBDataError
    from eval.onnx_export import ParityError

    for cls in (
        compare_cli.NoFaceError,
        BinFileError,
        ParityError,
        IJBDataError,
        ModelError,
        NonFiniteEmbeddingError,
        BackboneWeightsError,
    ):
        assert issubclass(cls, UserError) and issubclass(cls, ValueError), cls
    assert issubclass(BinPickleError, pickle.UnpicklingError)
    assert issubclass(EvalUsageError, UsageError) and issubclass(EvalUsageError, ValueError)
