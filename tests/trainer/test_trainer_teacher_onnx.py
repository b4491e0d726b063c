"""An ONNX teacher (``distill.teacher=M.onnx``): onnxruntime on the student's device,
its input convention read from the model, the batch converted to it on the device.

Reference: the same backbone run by PyTorch on the images in its own convention; the
two runtimes' float32 kernels differ only in rounding."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from backbones.registry import get_model, input_spec
from common.face_input import ARCFACE_INPUT, InputSpec
from configs import ConfigError
from datasets.teacher_cache import TeacherCache
from eval.errors import ModelError
from eval.onnx_export import export_onnx
from tests.trainer.test_trainer import make_cfg
from tests.trainer.test_trainer_distill_cache import IDS, PER_ID, _images
from tools.teacher_embed import main as teacher_embed
from trainer.build import build_distillation
from trainer.teacher import Teacher, TeacherError

pytestmark = pytest.mark.usefixtures("one_thread")

CPU = torch.device("cpu")
U32 = 2.0**-24
# Relative error of a float32 conv net, worst case: depth x fan-in x u. mbf_tiny has
# about 20 layers of fan-in at most 9 x 64, so 20 * 576 * u ~ 7e-4 bounds the relative
# difference of two correct float32 runtimes.
REL_TOL = 20 * 576 * U32


class BgrPixels(nn.Module):
    """``net`` behind a first op that reads BGR 0..255 pixels: a model whose convention
    differs from ours in colour order and normalisation."""

    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net((x.flip(1) - ARCFACE_INPUT.mean) / ARCFACE_INPUT.std)


@pytest.fixture(scope="module")
def backbone() -> nn.Module:
    torch.manual_seed(0)
    return get_model("mbf_tiny", embedding_size=16).eval()


@pytest.fixture(scope="module")
def onnx_models(backbone, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("onnx")
    plain, bgr = root / "teacher.onnx", root / "bgr.onnx"
    export_onnx(backbone, plain, spec=ARCFACE_INPUT, exporter="torchscript")
    bgr_spec = InputSpec(size=112, mean=0.0, std=1.0, color="BGR")
    export_onnx(BgrPixels(backbone), bgr, spec=bgr_spec, exporter="torchscript")
    return {"plain": plain, "bgr": bgr}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", ["plain", "bgr"])
def test_onnx_teacher_matches_the_backbone(backbone, onnx_models, kind: str) -> None:
    teacher = Teacher.load(onnx_models[kind], None, input_spec("mbf_tiny"), CPU)
    assert teacher.embedding_size == 16
    if kind == "bgr":  # read from the metadata: converted on the device before the run
        assert teacher.teacher_input == InputSpec(size=112, mean=0.0, std=1.0, color="BGR")
    g = torch.Generator().manual_seed(1)
    x = torch.rand(3, 3, 112, 112, generator=g) * 2 - 1  # our convention: RGB in [-1, 1]
    with torch.no_grad():
        expected = backbone(x)
    got = teacher(x)
    assert got.dtype == torch.float32 and not got.requires_grad
    assert _rel(got, expected) <= REL_TOL


def test_onnx_teacher_must_not_name_a_network(onnx_models) -> None:
    with pytest.raises(TeacherError, match="carries its own network"):
        Teacher.load(onnx_models["plain"], "r18", input_spec("mbf_tiny"), CPU)


def test_onnx_model_that_is_no_face_model_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "table.onnx"
    # images in, but a (B, 3, 4, 2) output: not (batch, D) embeddings
    export_onnx(nn.Linear(4, 2), path, image_size=(4, 4), exporter="torchscript")
    with pytest.raises((ModelError, TeacherError), match=str(path)):
        Teacher.load(path, None, input_spec("mbf_tiny"), CPU)


def test_onnx_teacher_of_another_embedding_size_is_refused(onnx_models) -> None:
    with pytest.raises(TeacherError, match="16 dimensions, expected 32"):
        Teacher.from_onnx(onnx_models["plain"], input_spec("mbf_tiny"), CPU, embedding_size=32)


def test_cache_from_an_onnx_teacher(onnx_models, synthetic_data, tmp_path: Path) -> None:
    data = synthetic_data(IDS, PER_ID, 4, 2, seed=1)
    out = tmp_path / "cache"
    argv = [str(data), "--teacher", str(onnx_models["bgr"]), "--out", str(out)]
    manifest = teacher_embed([*argv, "--num-workers", "0", "--no-progress"])
    assert manifest["teacher_network"] == "onnx"
    teacher = Teacher.load(onnx_models["bgr"], None, input_spec("mbf_tiny"), CPU)
    expected = teacher(_images(data, list(range(IDS * PER_ID)))).numpy()
    got = TeacherCache.open(out).lookup(np.arange(IDS * PER_ID))
    assert np.array_equal(got, expected)  # the same session on the same batch


def test_the_trainer_builds_an_onnx_teacher_from_distill_teacher(
    backbone, onnx_models, tmp_path: Path
) -> None:
    """``distill.teacher=M.onnx`` runs the model by onnxruntime (not as backbone weights
    of ``model.network``); naming a network for it is refused at start-up."""
    teacher = onnx_models["bgr"]
    cfg = make_cfg(tmp_path, f"distill.teacher={teacher}", "distill.relation_weight=1")
    distillation = build_distillation(cfg, CPU)
    assert distillation is not None and distillation.teacher is not None
    x = torch.rand(2, 3, 112, 112, generator=torch.Generator().manual_seed(2)) * 2 - 1
    with torch.no_grad():
        expected = backbone(x)
    assert _rel(distillation.teacher(x), expected) <= REL_TOL
    with pytest.raises(ConfigError, match=r"distill\.teacher_network: .* ONNX model"):
        make_cfg(tmp_path, f"distill.teacher={teacher}", "distill.teacher_network=mbf_tiny")
