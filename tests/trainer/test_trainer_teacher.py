"""The online distillation teacher (:mod:`trainer.teacher`): loaded from a weight file,
frozen, in inference mode, its input converted on the device, its output usable in the
student's loss; files that do not fit are refused naming the file."""

from __future__ import annotations

import pytest
import torch

from backbones.registry import get_model, input_spec
from backbones.weights import BackboneWeightsError, save_backbone_weights
from common.face_input import ARCFACE_INPUT, InputSpec
from partial_fc.distill import Distiller
from trainer.teacher import Teacher, TeacherError, convert_input

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory) -> tuple[str, torch.nn.Module]:
    torch.manual_seed(0)
    model = get_model("mbf_tiny", embedding_size=24).eval()
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_backbone_weights(model.state_dict(), path)
    return str(path), model


def test_teacher_is_frozen_and_matches_its_backbone(teacher_file) -> None:
    path, model = teacher_file
    teacher = Teacher.from_file(path, "mbf_tiny", input_spec("r18"), CPU)
    assert teacher.embedding_size == 24
    assert not teacher.model.training
    assert not any(p.requires_grad for p in teacher.model.parameters())
    images = torch.rand(3, 3, 112, 112) * 2 - 1
    out = teacher(images)
    assert out.dtype == torch.float32 and out.grad_fn is None and not out.is_inference()
    with torch.no_grad():
        torch.testing.assert_close(out, model(images))
    # usable in the student's loss graph (inference tensors could not be saved)
    student = torch.randn(3, 8, requires_grad=True)
    terms = Distiller(8, 24, embedding="cosine")(student, out)
    sum(terms.values()).backward()
    assert student.grad is not None and torch.isfinite(student.grad).all()


def test_teacher_runs_under_the_students_autocast(teacher_file) -> None:
    path, _ = teacher_file
    used = []

    def autocast():
        used.append(True)
        return torch.autocast("cpu", dtype=torch.bfloat16)

    teacher = Teacher.from_file(path, "mbf_tiny", input_spec("mbf_tiny"), CPU, autocast=autocast)
    out = teacher(torch.zeros(2, 3, 112, 112))
    assert used and out.dtype == torch.float32


def test_convert_input_between_conventions() -> None:
    pixels = torch.rand(2, 3, 8, 8) * 255
    bgr = InputSpec(size=8, mean=127.5, std=128.0, color="BGR")
    rgb = InputSpec(size=8, mean=0.0, std=255.0, color="RGB")
    got = convert_input((pixels - 127.5) / 128.0, bgr, rgb)
    torch.testing.assert_close(got, pixels.flip(1) / 255.0)
    same = torch.zeros(1, 3, 8, 8)
    assert convert_input(same, rgb, rgb) is same
    small = InputSpec(size=4, mean=0.0, std=255.0, color="RGB")
    assert convert_input(pixels / 255.0, rgb, small).shape == (2, 3, 4, 4)


def test_teacher_of_another_architecture_refused(teacher_file) -> None:
    path, _ = teacher_file
    with pytest.raises(BackboneWeightsError, match=r"teacher\.pt"):
        Teacher.from_file(path, "mbf", input_spec("mbf_tiny"), CPU)


def test_teacher_of_another_embedding_size_refused(teacher_file) -> None:
    path, _ = teacher_file
    with pytest.raises(TeacherError, match=r"teacher\.pt.*24 dimensions, expected 512"):
        Teacher.from_file(path, "mbf_tiny", input_spec("mbf_tiny"), CPU, embedding_size=512)


def test_teacher_that_rejects_its_input_size_refused(teacher_file) -> None:
    _, model = teacher_file
    wrong = InputSpec(size=40, mean=127.5, std=127.5)
    teacher = Teacher(model, "odd.pt", ARCFACE_INPUT, wrong)
    with pytest.raises(TeacherError, match=r"^odd\.pt: the teacher does not take its input"):
        teacher._probe(CPU)


def test_missing_teacher_file(tmp_path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.pt"):
        Teacher.from_file(tmp_path / "nope.pt", "mbf_tiny", input_spec("mbf_tiny"), CPU)
