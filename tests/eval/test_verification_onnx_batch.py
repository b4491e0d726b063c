"""``eval.verification --onnx`` on the CPU (issue 27): one onnxruntime thread per usable
core, and the batch that measures fastest (or the model's fixed batch)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

from eval.onnx_infer import OnnxEmbedder, usable_cores
from eval.pair_verification import BATCH_CANDIDATES, fastest_batch

SIDE = 16


def _model(path, batch="N"):
    """(batch, 3, 16, 16) -> (batch, 4): Flatten, MatMul."""
    w = np.random.default_rng(0).standard_normal((3 * SIDE * SIDE, 4)).astype(np.float32)
    graph = helper.make_graph(
        [
            helper.make_node("Flatten", ["data"], ["flat"], axis=1),
            helper.make_node("MatMul", ["flat", "W"], ["emb"]),
        ],
        "face",
        [helper.make_tensor_value_info("data", TensorProto.FLOAT, [batch, 3, SIDE, SIDE])],
        [helper.make_tensor_value_info("emb", TensorProto.FLOAT, [batch, 4])],
        initializer=[numpy_helper.from_array(w, "W")],
    )
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    proto.ir_version = 8
    onnx.save(proto, str(path))
    return str(path)


def _images(n):
    return torch.randint(0, 256, (n, 3, SIDE, SIDE), dtype=torch.uint8)


def test_threads_default_to_the_usable_cores(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCAL_WORLD_SIZE", raising=False)
    assert usable_cores() == len(os.sched_getaffinity(0))
    embed = OnnxEmbedder(_model(tmp_path / "m.onnx"))
    assert embed.threads == usable_cores() and embed.on_cpu
    assert OnnxEmbedder(_model(tmp_path / "m.onnx"), intra_op_threads=1).threads == 1
    monkeypatch.setenv("LOCAL_WORLD_SIZE", str(10 * usable_cores()))  # more ranks than cores
    assert usable_cores() == 1


@pytest.mark.parametrize("n", [5, 40, 300])
def test_the_batch_is_a_measured_candidate_up_to_the_set_size(tmp_path, n):
    embed = OnnxEmbedder(_model(tmp_path / "m.onnx"), intra_op_threads=1)
    batch, line = fastest_batch(embed, _images(n), 128)
    assert batch in [b for b in BATCH_CANDIDATES if b <= n]
    assert line.startswith(f"onnx batch {batch} (fastest") and "1 intra-op threads" in line
    assert "128:" in line if n >= 128 else "128:" not in line


def test_a_fixed_batch_model_runs_at_its_batch(tmp_path):
    embed = OnnxEmbedder(_model(tmp_path / "m.onnx", batch=2))
    batch, line = fastest_batch(embed, _images(40), 128)
    assert batch == 2 and "fixed batch" in line


def test_a_module_keeps_the_default(tmp_path):
    assert fastest_batch(torch.nn.Flatten(), _images(4), 128) == (128, None)
