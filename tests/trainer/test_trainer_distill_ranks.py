"""A distilled training step is the same on 2 gloo ranks as on 1 rank with the same
global batch: the embedding term (with its projection P), the relation term over the
global batch and the logit term over the sharded class centres, from an online teacher
and from teacher rows served with the batch (a cache)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from common.dist import DistContext
from common.face_input import InputSpec
from partial_fc import ArcFace, PartialFC
from partial_fc.distill import Distiller
from tests.distributed import run_ranks
from tests.trainer.test_trainer import (
    CLASSES,
    EMB,
    IN_DIM,
    TensorLoader,
    _assert_close,
    dataset,
    gather_state,
    make_backbone,
    make_cfg,
)
from trainer.distillation import Distillation
from trainer.loop import AuxLosses, Trainer
from trainer.teacher import Teacher

pytestmark = pytest.mark.usefixtures("one_thread")

SPEC = InputSpec(size=112, mean=127.5, std=127.5)
WEIGHTS = {"embedding": 0.5, "relation": 2.0, "logit": 1.0}


def _teacher(dim: int) -> nn.Module:
    torch.manual_seed(5)
    return nn.Sequential(nn.Linear(IN_DIM, 10), nn.Tanh(), nn.Linear(10, dim))


def _step(rank: int, world: int, tmp: str, teacher_dim: int, cached: bool) -> dict:
    """One step over the global batch x[:16], this rank's rows x[16/W r : 16/W (r+1)]."""
    x, y = dataset()
    b = 16 // world
    cfg = make_cfg(tmp, f"data.batch_size={b}", "optimizer.name=sgd", "distill.teacher=t.pt")
    teacher = Teacher(_teacher(teacher_dim), "teacher.pt", SPEC, SPEC)
    torch.manual_seed(11)  # P: the same on every rank and world size
    logit = teacher_dim == EMB
    distiller = Distiller(
        EMB, teacher_dim, relation=True, max_local_batch=b, logit=logit, logit_scale=16.0,
        temperature=2.0,
    )  # fmt: skip
    distill = Distillation(None if cached else teacher, distiller, WEIGHTS)
    head = PartialFC(CLASSES, EMB, ArcFace(16.0, 0.3), seed=cfg.train.seed, max_local_batch=b)
    ctx = DistContext.current()
    t = Trainer(cfg, make_backbone(), head, TensorLoader(x, y, b, rank, world), ctx,
                aux=AuxLosses(distill=distill))  # fmt: skip
    lo = rank * b
    xb, yb = x[lo : lo + b], y[lo : lo + b]
    batch = (xb, yb, teacher(xb)) if cached else (xb, yb)
    result = t.train_step([batch])
    state = gather_state(t)
    state["loss"] = result.loss.detach().clone()
    for name, value in result.aux.items():
        state[name] = value.detach().clone()
    if distiller.projection is not None:
        state["P"] = distiller.projection.weight.detach().clone()
    return state


@pytest.mark.parametrize(
    ("teacher_dim", "cached"),
    [(6, False), (EMB, False), (EMB, True)],
    ids=["projection-online", "logit-online", "logit-cached"],
)
def test_two_ranks_equal_one_rank_with_distillation(
    tmp_path: Path, teacher_dim: int, cached: bool
) -> None:
    two = run_ranks(_step, 2, str(tmp_path / "w2"), teacher_dim, cached)
    one = _step(0, 1, str(tmp_path / "w1"), teacher_dim, cached)
    expected = {"distill_embedding", "distill_relation"} | (
        {"distill_logit"} if teacher_dim == EMB else set()
    )
    assert expected <= one.keys()
    for name in expected:
        assert one[name] > 0, name  # every term is live, not a trivially equal zero
    _assert_close(two[0], one)
    _assert_close(two[1], one)
