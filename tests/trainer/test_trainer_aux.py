"""Auxiliary losses in the trainer: config wiring, loss sum, world-size equivalence,
checkpoint and resharded resume of the centres."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

from common.dist import DistContext
from configs import ConfigError, load_config
from tests.distributed import run_ranks
from tests.tolerances import gamma
from tests.trainer.test_trainer import (
    CLASSES,
    EMB,
    TensorLoader,
    _assert_close,
    dataset,
    gather_state,
    make_backbone,
    make_cfg,
)
from trainer.build import build_aux_losses
from trainer.loop import Trainer

pytestmark = pytest.mark.usefixtures("one_thread")

AUX = ("aux.center_weight=0.1", "aux.triplet_weight=0.5")


def make_aux_trainer(cfg, loader) -> Trainer:
    from partial_fc import ArcFace, PartialFC

    ctx = DistContext.current()
    head = PartialFC(
        CLASSES, EMB, ArcFace(16.0, 0.3), sample_rate=cfg.head.sample_rate, seed=cfg.train.seed
    )
    aux = build_aux_losses(cfg, ctx.device)
    return Trainer(cfg, make_backbone(), head, loader, ctx, aux=aux)


def gather_aux(t: Trainer) -> dict[str, torch.Tensor]:
    """Backbone, head, and the full centre matrix with its momentum, by global class."""
    out = gather_state(t)
    c = t.center
    buf = t.opt_center.state[c.centers].get("momentum_buffer") if t.opt_center.state else None
    if buf is None:
        buf = torch.zeros_like(c.centers)
    rows = t.ctx.all_gather_object((c.class_start, c.centers.detach().clone(), buf.clone()))
    rows.sort(key=lambda r: r[0])
    out["center"] = torch.cat([r[1] for r in rows])
    out["center.momentum"] = torch.cat([r[2] for r in rows])
    return out


# ------------------------------------------------------------------ config
@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("aux.triplet_mining=foo", "aux.triplet_mining"),
        ("aux.center_weight=-0.1", "aux.center_weight"),
        ("aux.triplet_weight=-1", "aux.triplet_weight"),
        ("aux.center_radius=-1", "aux.center_radius"),
        ("aux.center_distance=l1", "aux.center_distance"),
    ],
)
def test_bad_aux_options_name_the_option(override: str, named: str) -> None:
    with pytest.raises(ConfigError, match=named.replace(".", r"\.")):
        load_config("demo", [override])


def test_aux_off_by_default(tmp_path: Path) -> None:
    aux = build_aux_losses(make_cfg(tmp_path), torch.device("cpu"))
    assert aux.center is None and aux.triplet is None


# ------------------------------------------------------- the step's loss sum
def test_step_loss_is_head_plus_weighted_terms(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, *AUX, "aux.triplet_mining=batch_hard", "aux.center_radius=0.1")
    x, y = dataset()
    t = make_aux_trainer(cfg, TensorLoader(x, y, 8, 0, 1))
    assert t.center.radius == 0.1 and t.triplet.mining == "batch_hard"
    sel = torch.tensor([0, 11, 1, 12, 2, 13, 3, 25])  # labels 0 0 1 1 2 2 3 3
    xb, yb = x[sel], y[sel]
    assert yb.tolist() == [0, 0, 1, 1, 2, 2, 3, 3]
    # independent reference on copies of the initial state
    backbone, head = copy.deepcopy(t.backbone), copy.deepcopy(t.head)
    centres = t.center.centers.detach().clone()
    with torch.no_grad():
        e = backbone(xb).double()
        head_loss = head(e.float(), yb).double()
        center = ((e - centres.double()[yb]).pow(2).sum(1) - 0.1).clamp_min(0).mean()
        d = torch.cdist(e, e).pow(2)
        same = yb[:, None] == yb[None, :]
        eye = torch.eye(8, dtype=torch.bool)
        hardest_pos = d.masked_fill(~same | eye, -1).amax(1)
        hardest_neg = d.masked_fill(same, float("inf")).amin(1)
        triplet = (hardest_pos - hardest_neg + 0.3).clamp_min(0).mean()
    expected = head_loss + 0.1 * center + 0.5 * triplet
    result = t.train_step([(xb, yb)])
    # fp32 terms against float64 ones on the same fp32 embeddings: a squared distance of
    # EMB differences carries EMB + 2 fp32 roundings of the squared scale S, cdist's
    # |a|^2 + |b|^2 - 2 a.b form EMB + 4; the hinge terms and the mean of 8 add 10.
    scale = 4 * max(float(e.pow(2).sum(1).max()), float(centres.double().pow(2).sum(1).max()))
    center_atol = scale * gamma(EMB + 12, torch.float32)
    triplet_atol = 2 * scale * gamma(EMB + 14, torch.float32)
    # the same fp32 head on the same input; the weighted sum adds 4 roundings
    loss_atol = 0.1 * center_atol + 0.5 * triplet_atol + float(expected) * gamma(4, torch.float32)
    torch.testing.assert_close(result.loss.double(), expected, atol=loss_atol, rtol=0)
    torch.testing.assert_close(result.aux["center"].double(), center, atol=center_atol, rtol=0)
    torch.testing.assert_close(result.aux["triplet"].double(), triplet, atol=triplet_atol, rtol=0)
    assert not torch.equal(t.center.centers.detach(), centres)  # the centres learned
    assert len(t.schedulers) == 3
    lrs = {o.param_groups[0]["lr"] for o in t.stepper.optimizers()}
    assert len(lrs) == 1 and t.opt_center.param_groups[0]["weight_decay"] == 0.0


# --------------------------------------------------- world-size equivalence
def _aux_one_step(rank: int, world: int, tmp: str, global_batch: int = 16) -> dict:
    x, y = dataset()
    b = global_batch // world
    cfg = make_cfg(
        tmp, *AUX, f"data.batch_size={b}", "train.clip_grad_norm=0.05", "optimizer.name=sgd"
    )
    t = make_aux_trainer(cfg, TensorLoader(x, y, b, rank, world))
    lo = rank * b
    result = t.train_step([(x[lo : lo + b], y[lo : lo + b])])
    state = gather_aux(t)
    state["loss"] = result.loss.detach().clone()
    return state


def test_two_ranks_equal_one_rank_with_aux_losses(tmp_path: Path) -> None:
    two = run_ranks(_aux_one_step, 2, str(tmp_path / "w2"))
    one = _aux_one_step(0, 1, str(tmp_path / "w1"))
    _assert_close(two[0], one)
    _assert_close(two[1], one)
    assert not torch.equal(one["center.momentum"], torch.zeros_like(one["center.momentum"]))


# ------------------------------------------------------- checkpoint / resume
RESUME = (*AUX, "train.epochs=3", "optimizer.name=sgd")


def _save_stage(rank: int, world: int, out: str) -> dict:
    x, y = dataset()
    batch = 24 // world
    cfg = make_cfg(out, f"data.batch_size={batch}", *RESUME, "train.max_steps=3")
    t = make_aux_trainer(cfg, TensorLoader(x, y, batch, rank, world))
    t.fit()
    return gather_aux(t)


def _resume_stage(rank: int, world: int, out: str) -> dict:
    x, y = dataset()
    batch = 24 // world
    cfg = make_cfg(out, f"data.batch_size={batch}", *RESUME)
    t = make_aux_trainer(cfg, TensorLoader(x, y, batch, rank, world))
    assert t.maybe_resume() is not None and t.step == 3
    state = gather_aux(t)
    state["lr"] = torch.tensor(t.opt_center.param_groups[0]["lr"])
    state["bb_lr"] = torch.tensor(t.opt_backbone.param_groups[0]["lr"])
    return state


def test_centres_and_their_optimizer_reshard_on_resume(tmp_path: Path) -> None:
    """Saved on 2 ranks, resumed on 3 and on 1: centres and momentum by global class."""
    out = str(tmp_path / "run")
    saved = run_ranks(_save_stage, 2, out)[0]
    meta = (tmp_path / "run/checkpoints/step-00000003/meta.json").read_text()
    assert '"center_shards"' in meta and "center-00001.pt" in meta
    for resumed in (run_ranks(_resume_stage, 3, out)[0], _resume_stage(0, 1, out)):
        for key in ("center", "center.momentum", "head.weight"):
            assert torch.equal(resumed[key], saved[key]), key
        assert resumed["lr"] == resumed["bb_lr"]
