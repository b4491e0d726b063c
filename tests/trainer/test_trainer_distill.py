"""Distillation in the trainer: the ``distill.*`` options and their refusals, the
step's loss (head + weighted distillation terms, against the Distiller computed by hand
on the same batch), the logged terms, the projection P in the optimizer and the
checkpoint, and the build from a teacher file."""

from __future__ import annotations

import copy
import logging
import math
from pathlib import Path

import pytest
import torch
from torch import nn

from backbones.registry import get_model
from backbones.weights import save_backbone_weights
from common.dist import DistContext
from common.face_input import InputSpec
from configs import ConfigError, load_config
from configs.resume_policy import resume_policies
from partial_fc import ArcFace, PartialFC
from partial_fc.distill import Distiller
from tests.tolerances import gamma
from tests.trainer.test_trainer import (
    CLASSES,
    EMB,
    IN_DIM,
    TensorLoader,
    dataset,
    make_backbone,
    make_cfg,
)
from trainer.build import build_distillation
from trainer.distillation import Distillation
from trainer.loop import AuxLosses, Trainer
from trainer.teacher import Teacher

pytestmark = pytest.mark.usefixtures("one_thread")

TEACHER_DIM = 6  # != EMB: the embedding term learns a projection P
SPEC = InputSpec(size=112, mean=127.5, std=127.5)  # same on both sides: no conversion
DISTILL = ("distill.embedding_weight=0.5", "distill.relation_weight=2.0")


def make_teacher() -> Teacher:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(IN_DIM, 10), nn.Tanh(), nn.Linear(10, TEACHER_DIM))
    return Teacher(model, "teacher.pt", SPEC, SPEC)


def make_distillation(cfg, relation: bool = True) -> Distillation:
    torch.manual_seed(cfg.train.seed + 1)
    distiller = Distiller(
        EMB,
        TEACHER_DIM,
        embedding=cfg.distill.embedding_kind,
        relation=relation,
        max_local_batch=cfg.data.batch_size,
    )
    weights = {"embedding": cfg.distill.embedding_weight, "relation": cfg.distill.relation_weight}
    return Distillation(make_teacher(), distiller, weights)


def make_distill_trainer(cfg, loader, distill: Distillation) -> Trainer:
    ctx = DistContext.current()
    head = PartialFC(
        CLASSES, EMB, ArcFace(16.0, 0.3), sample_rate=cfg.head.sample_rate, seed=cfg.train.seed
    )
    return Trainer(cfg, make_backbone(), head, loader, ctx, aux=AuxLosses(distill=distill))


def distill_cfg(tmp_path: Path, *overrides: str):
    """make_cfg with a teacher path that exists (the tests hand the Teacher in)."""
    teacher = tmp_path / "teacher.pt"
    teacher.touch()
    return make_cfg(tmp_path / "run", f"distill.teacher={teacher}", *DISTILL, *overrides)


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("overrides", "named"),
    [
        (["distill.embedding_weight=0.5"], "distill.embedding_weight"),  # no teacher
        (["distill.relation_weight=1"], "distill.relation_weight"),  # no teacher
        (["distill.teacher=t.pt", "distill.embedding_weight=-0.1"], "distill.embedding_weight"),
        (["distill.teacher=t.pt", "distill.relation_weight=nan"], "distill.relation_weight"),
        (["distill.teacher=t.pt", "distill.relation_weight=inf"], "distill.relation_weight"),
        (["distill.teacher=t.pt", "distill.embedding_kind=l1"], "distill.embedding_kind"),
        (["distill.teacher_network=r18"], "distill.teacher_network"),  # no teacher
    ],
)
def test_bad_distill_options_name_the_option(overrides: list[str], named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("demo", overrides)


def test_distill_off_by_default_and_resume_policy(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path)
    assert cfg.distill.teacher == "" and build_distillation(cfg, torch.device("cpu")) is None
    policies = resume_policies(type(cfg))
    for key in ("distill.teacher", "distill.teacher_network"):
        assert not policies[key].may_change and "teacher" in policies[key].why
    for key in ("distill.embedding_weight", "distill.relation_weight", "distill.embedding_kind"):
        assert policies[key].may_change


def test_missing_teacher_file_names_the_option(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, f"distill.teacher={tmp_path / 'nope.pt'}")
    with pytest.raises(ConfigError, match=r"distill\.teacher.*nope\.pt"):
        build_distillation(cfg, torch.device("cpu"))


def test_unknown_teacher_network_names_the_option(tmp_path: Path) -> None:
    teacher = tmp_path / "t.pt"
    teacher.touch()
    cfg = make_cfg(tmp_path, f"distill.teacher={teacher}", "distill.teacher_network=nonet")
    with pytest.raises(ConfigError, match=r"distill\.teacher_network"):
        build_distillation(cfg, torch.device("cpu"))


# ------------------------------------------------------- the step's loss sum
def test_step_loss_is_head_plus_weighted_distill_terms(tmp_path: Path) -> None:
    cfg = distill_cfg(tmp_path)
    x, y = dataset()
    distill = make_distillation(cfg)
    t = make_distill_trainer(cfg, TensorLoader(x, y, 8, 0, 1), distill)
    p0 = distill.distiller.projection.weight.detach().clone()
    # P trains with the backbone: its own group of the backbone optimizer
    groups = t.opt_backbone.param_groups
    assert any(p is distill.distiller.projection.weight for p in groups[-1]["params"])
    assert groups[-1]["initial_lr"] == cfg.optimizer.lr  # the peak before the schedule
    xb, yb = x[:8], y[:8]
    backbone, head = copy.deepcopy(t.backbone), copy.deepcopy(t.head)
    reference = copy.deepcopy(distill.distiller)
    with torch.no_grad():
        e = backbone(xb)
        head_loss = head(e, yb)
        terms = reference(e, distill.teacher(xb))
    expected = head_loss + 0.5 * terms["embedding"] + 2.0 * terms["relation"]
    result = t.train_step([(xb, yb)])
    assert set(result.aux) == {"distill_embedding", "distill_relation"}
    # The same fp32 modules on the same inputs: each term is the reference's; the
    # weighted sum of three rounds 4 times, relative to the sum of their magnitudes.
    magnitude = float(
        head_loss.abs() + 0.5 * terms["embedding"].abs() + 2 * terms["relation"].abs()
    )
    atol = gamma(4, torch.float32) * magnitude
    torch.testing.assert_close(result.loss, expected, atol=atol, rtol=0)
    torch.testing.assert_close(result.aux["distill_embedding"], terms["embedding"], rtol=0, atol=0)
    torch.testing.assert_close(result.aux["distill_relation"], terms["relation"], rtol=0, atol=0)
    assert not torch.equal(distill.distiller.projection.weight.detach(), p0)  # P learned


def test_zero_weights_log_but_do_not_train(tmp_path: Path) -> None:
    """Weights 0: the embedding term is logged and the loss is the head's alone."""
    cfg = distill_cfg(tmp_path, "distill.embedding_weight=0", "distill.relation_weight=0")
    x, y = dataset()
    t = make_distill_trainer(cfg, TensorLoader(x, y, 8, 0, 1), make_distillation(cfg, False))
    head = copy.deepcopy(t.head)
    with torch.no_grad():
        expected = head(copy.deepcopy(t.backbone)(x[:8]), y[:8])
    result = t.train_step([(x[:8], y[:8])])
    # the head's loss + 0 * terms: the same fp32 operations, and adding zeros is exact
    torch.testing.assert_close(result.loss, expected, atol=0, rtol=0)
    assert set(result.aux) == {"distill_embedding"} and result.aux["distill_embedding"] > 0


# ---------------------------------------------------------- training, logs, resume
RESUME = ("train.epochs=3", "optimizer.name=sgd", "checkpoint.every_steps=3", "log.every_steps=1")


def test_distilled_run_logs_finite_terms_and_resume_keeps_p(tmp_path: Path, caplog) -> None:
    x, y = dataset()
    cfg = distill_cfg(tmp_path, *RESUME, "train.max_steps=3")
    first = make_distill_trainer(cfg, TensorLoader(x, y, 8, 0, 1), make_distillation(cfg))
    with caplog.at_level(logging.INFO, logger="trainer"):
        first.fit()
    lines = [r.getMessage() for r in caplog.records if " aux " in r.getMessage()]
    assert len(lines) == 3, lines
    for line in lines:
        words = line.split()
        for name in ("distill_embedding", "distill_relation"):
            assert math.isfinite(float(words[words.index(name) + 1])), line
    saved_p = first.distill.distiller.projection.weight.detach().clone()
    saved_buf = first.opt_backbone.state[first.distill.distiller.projection.weight]
    saved_buf = saved_buf["momentum_buffer"].clone()
    assert not torch.equal(saved_buf, torch.zeros_like(saved_buf))

    # a new run whose P starts elsewhere: the checkpoint's P and momentum win
    cfg2 = distill_cfg(tmp_path, *RESUME, "distill.relation_weight=1.0")  # weights may change
    other = make_distillation(cfg2)
    with torch.no_grad():
        other.distiller.projection.weight.normal_()
    second = make_distill_trainer(cfg2, TensorLoader(x, y, 8, 0, 1), other)
    assert second.maybe_resume() is not None and second.step == 3
    weight = second.distill.distiller.projection.weight
    assert torch.equal(weight.detach(), saved_p)
    assert torch.equal(second.opt_backbone.state[weight]["momentum_buffer"], saved_buf)


def test_another_teacher_is_refused_on_resume(tmp_path: Path) -> None:
    x, y = dataset()
    cfg = distill_cfg(tmp_path, *RESUME, "train.max_steps=3")
    make_distill_trainer(cfg, TensorLoader(x, y, 8, 0, 1), make_distillation(cfg)).fit()
    other = tmp_path / "other.pt"
    other.touch()
    cfg2 = make_cfg(tmp_path / "run", f"distill.teacher={other}", *DISTILL, *RESUME)
    second = make_distill_trainer(cfg2, TensorLoader(x, y, 8, 0, 1), make_distillation(cfg2))
    with pytest.raises(ConfigError, match=r"distill\.teacher"):
        second.maybe_resume()


# ------------------------------------------------------------ build from a file
def test_build_distillation_from_a_teacher_file(tmp_path: Path) -> None:
    """A real teacher file (mbf_tiny, 16-d) for a 32-d student: P is 16x32, seeded by
    train.seed (the same for every build), and the teacher is frozen."""
    torch.manual_seed(0)
    path = tmp_path / "teacher.pt"
    save_backbone_weights(get_model("mbf_tiny", embedding_size=16).state_dict(), path)
    overrides = [
        f"train.output={tmp_path / 'run'}",
        "model.network=mbf_tiny",
        "model.embedding_size=32",
        f"distill.teacher={path}",
        "distill.embedding_weight=1",
    ]
    cfg = load_config("demo", overrides)
    one = build_distillation(cfg, torch.device("cpu"))
    torch.manual_seed(123)  # the global stream does not matter
    two = build_distillation(cfg, torch.device("cpu"))
    assert one is not None and two is not None
    assert one.teacher.embedding_size == 16 and one.names() == ["distill_embedding"]
    assert one.distiller.projection.weight.shape == (16, 32)
    assert torch.equal(one.distiller.projection.weight, two.distiller.projection.weight)
    assert not any(p.requires_grad for p in one.teacher.model.parameters())
