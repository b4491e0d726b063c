"""Trainer: step equivalence across world sizes, gradient accumulation, LR schedule, export.

Tiny MLP backbones (no batch statistics) and tiny in-memory data keep this fast.
"""

from __future__ import annotations

import copy
import dataclasses
import io
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from common.dist import DistContext
from configs import Config, load_config
from datasets.sampler import DistributedFaceSampler
from partial_fc import ArcFace, PartialFC
from tests.distributed import device_under_test, run_ranks
from trainer.amp import AmpPolicy
from trainer.checkpoint import CheckpointStorage
from trainer.loop import Trainer
from trainer.monitor import Monitor
from trainer.schedule import WarmupPoly

pytestmark = [
    pytest.mark.on_device,  # `pytest --device cuda` reruns these on the GPU
    pytest.mark.usefixtures("one_thread"),
]

IN_DIM, EMB, CLASSES = 12, 8, 11


class TensorLoader:
    """In-memory loader over (x, y) with the project's world-size-independent sampler."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch: int, rank: int, world: int):
        self.x, self.y, self.batch = x, y, batch
        self.sampler = DistributedFaceSampler(len(x), batch, rank, world, seed=3)
        self._done = 0

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    def __len__(self) -> int:
        return len(self.sampler) // self.batch

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self._done = 0
        order = [i for i, _ in self.sampler]
        for j in range(0, len(order), self.batch):
            sel = torch.tensor(order[j : j + self.batch])
            self._done += 1
            yield self.x[sel], self.y[sel]
        self.sampler.consumed = self.sampler.num_samples

    def state_dict(self) -> dict[str, Any]:
        return self.sampler.state_dict(self._done)

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.sampler.load_state_dict(state)
        self._done = 0


def dataset(n: int = 96) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(7)
    y = torch.arange(n) % CLASSES
    centres = torch.randn(CLASSES, IN_DIM, generator=g)
    x = centres[y] + 0.3 * torch.randn(n, IN_DIM, generator=g)
    return x, y


def make_cfg(output: str | Path, *overrides: str) -> Config:
    return load_config(
        "demo",
        [
            f"train.output={output}",
            f"data.num_classes={CLASSES}",
            f"model.embedding_size={EMB}",
            "data.batch_size=8",
            "train.epochs=2",
            "scheduler.warmup_epochs=0.5",
            "checkpoint.every_steps=0",
            "log.tensorboard=false",
            "log.progress_bar=false",
            "log.every_steps=1000",
            *overrides,
        ],
    )


def make_backbone(dropout: float = 0.0) -> nn.Module:
    torch.manual_seed(1)
    layers: list[nn.Module] = [nn.Linear(IN_DIM, 16), nn.Tanh()]
    if dropout:
        layers.append(nn.Dropout(dropout))
    layers.append(nn.Linear(16, EMB))
    return nn.Sequential(*layers)


def make_trainer(
    cfg: Config,
    loader: Any,
    dropout: float = 0.0,
    amp: AmpPolicy | None = None,
    storage: type[CheckpointStorage] = CheckpointStorage,
) -> Trainer:
    """The tiny trainer of these tests; ``storage`` is the class of its checkpoint
    storage (a subclass that counts or fails file operations)."""
    ctx = DistContext.current(device_under_test())
    head = PartialFC(
        CLASSES, EMB, ArcFace(16.0, 0.3), sample_rate=cfg.head.sample_rate, seed=cfg.train.seed,
        device=ctx.device,
    )  # fmt: skip
    return Trainer(
        cfg, make_backbone(dropout), head, loader, ctx, amp=amp,
        checkpoint_storage=storage(Path(cfg.train.output) / "checkpoints", ctx),
    )  # fmt: skip


def gather_state(t: Trainer) -> dict[str, torch.Tensor]:
    """Backbone parameters and the full head matrix (gathered by global class)."""
    out = {f"bb.{k}": v.detach().clone() for k, v in t.backbone.state_dict().items()}
    rows = t.ctx.all_gather_object((t.head.class_start, t.head.weight.detach().clone()))
    out["head.weight"] = torch.cat([w for _, w in sorted(rows, key=lambda r: r[0])])
    return out


# ------------------------------------------------------------- one-step equivalence
CASES = [  # (optimizer, clip, micro-steps per rank)
    ("sgd", None, 1),
    ("sgd", 0.05, 1),
    ("adamw", 0.05, 1),
    ("sgd", 0.05, 2),
]


def _one_step(rank: int, world: int, case: tuple, tmp: str, global_batch: int) -> dict:
    name, clip, k = case
    x, y = dataset()
    b = global_batch // world  # per-rank micro-batch
    cfg = make_cfg(
        tmp,
        f"optimizer.name={name}",
        f"train.clip_grad_norm={clip}",
        f"train.grad_accum={k}",
        f"data.batch_size={b}",
        "optimizer.weight_decay=0.01",
        "optimizer.eps=1e-3",
    )
    t = make_trainer(cfg, TensorLoader(x, y, b, rank, world))
    micro = []
    for j in range(k):  # micro-batch j holds global rows [j*G, (j+1)*G); rank r its slice
        lo = j * global_batch + rank * b
        micro.append((x[lo : lo + b], y[lo : lo + b]))
    result = t.train_step(micro)
    state = gather_state(t)
    state["loss"] = result.loss.detach().clone()
    return state


def _two_rank_matrix(rank: int, world: int, tmp: str) -> list[dict]:
    out = []
    for case in CASES:
        # W=2 with per-rank micro-batch 8: k micro-steps of global batch 16
        out.append(_one_step(rank, world, case, tmp, 16))
    return out


def _assert_close(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], atol=atol, rtol=0, msg=key)


def test_one_step_two_ranks_equals_one_rank_double_batch(tmp_path: Path) -> None:
    """W=2 x batch b == W=1 x batch 2b; k micro-steps == one step of k x batch."""
    two = run_ranks(_two_rank_matrix, 2, str(tmp_path / "w2"))[0]
    for i, case in enumerate(CASES):
        name, clip, k = case
        # one rank, one micro-batch holding all k*16 samples
        single = _one_step(0, 1, (name, clip, 1), str(tmp_path / "w1"), 16 * k)
        _assert_close(two[i], single)
        if k > 1:  # accumulation on one rank too: k micro-batches of 16
            accum = _one_step(0, 1, case, str(tmp_path / "w1a"), 16)
            _assert_close(accum, single)
        # the step changed something (a zero update would pass trivially)
        fresh = make_backbone().state_dict()
        assert not torch.allclose(single["bb.0.weight"], fresh["0.weight"])


# ---------------------------------------------------------------- LR and config
def test_schedule_warmup_poly_and_config_untouched(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "scheduler.warmup_start_factor=0.1", "train.epochs=3")
    before = copy.deepcopy(dataclasses.asdict(cfg))
    x, y = dataset()
    t = make_trainer(cfg, TensorLoader(x, y, 8, 0, 1))
    assert dataclasses.asdict(cfg) == before, "derived values must not be written into cfg"
    assert t.steps_per_epoch == 96 // 8 and t.total_steps == 3 * 12 and t.warmup_steps == 6
    lr = cfg.optimizer.lr
    assert t.opt_backbone.param_groups[0]["lr"] == pytest.approx(0.1 * lr)  # small, not 0
    assert t.opt_head.param_groups[0]["lr"] == pytest.approx(0.1 * lr)
    rule = WarmupPoly(36, 6, 0.1, 2.0)
    assert rule(6) == 1.0 and rule(36) == 0.0 and 0 < rule(5) < 1
    assert all(rule(s) >= rule(s + 1) for s in range(6, 36))
    lrs = []
    for _ in range(8):
        t.train_step([(x[:8], y[:8])])
        lrs.append(t.last_lr)
    assert lrs[0] == pytest.approx(0.1 * lr) and lrs[6] == pytest.approx(lr)
    assert t.opt_head.param_groups[0]["lr"] == t.opt_backbone.param_groups[0]["lr"]


def test_fit_exports_weights_only_backbone(tmp_path: Path) -> None:
    cfg = make_cfg(tmp_path, "train.epochs=1")
    x, y = dataset()
    t = make_trainer(cfg, TensorLoader(x, y, 8, 0, 1))
    t.fit()
    assert t.step == 12
    weights = torch.load(tmp_path / "backbone.pt", weights_only=True)
    fresh = make_backbone()
    fresh.load_state_dict(weights)
    fresh.to(t.ctx.device)  # the exported weights are CPU tensors, the trained ones need not be
    torch.testing.assert_close(fresh.state_dict(), t.backbone.state_dict())
    assert (tmp_path / "checkpoints" / "step-00000012" / "meta.json").exists()


# ------------------------------------------------------------------- fp16 scaling
def _scaled_steps(rank: int, world: int, tmp: str) -> dict:
    x, y = dataset()
    cfg = make_cfg(tmp, "data.batch_size=8", "train.clip_grad_norm=1.0")
    amp = AmpPolicy("fp16", torch.device("cpu"), scaler_only=True)
    t = make_trainer(cfg, TensorLoader(x, y, 8, rank, world), amp=amp)
    scale0 = t.scaler.get_scale()
    poison = {"on": True}

    def overflow_on_rank1(grad: torch.Tensor) -> torch.Tensor:
        return torch.full_like(grad, float("inf")) if poison["on"] and rank == 1 else grad

    t.head.weight.register_hook(overflow_on_rank1)
    before = gather_state(t)
    lo = rank * 8
    t.train_step([(x[lo : lo + 8], y[lo : lo + 8])])  # rank 1's head overflows
    skipped = gather_state(t)
    scale1 = t.scaler.get_scale()
    poison["on"] = False
    t.train_step([(x[lo : lo + 8], y[lo : lo + 8])])
    return {
        "unchanged": all(torch.equal(before[k], skipped[k]) for k in before),
        "scales": (scale0, scale1, t.scaler.get_scale()),
        "after": gather_state(t),
    }


def _unscaled_second_step(tmp: str) -> dict:
    """Reference: one rank, batch 16, the first step skipped (LR schedule advanced)."""
    x, y = dataset()
    cfg = make_cfg(tmp, "data.batch_size=16", "train.clip_grad_norm=1.0")
    t = make_trainer(cfg, TensorLoader(x, y, 16, 0, 1))
    with warnings.catch_warnings():  # "scheduler.step() before optimizer.step()": intended
        warnings.simplefilter("ignore", UserWarning)
        for s in t.schedulers:  # the skipped step still advances the schedule
            s.step()
    t.train_step([(x[:16], y[:16])])
    return gather_state(t)


def test_fp16_overflow_on_one_rank_skips_everywhere(tmp_path: Path) -> None:
    """An overflow in one rank's head shard makes every rank skip both optimizers and
    back off the scale; the next (finite) scaled step equals an unscaled one."""
    results = run_ranks(_scaled_steps, 2, str(tmp_path / "w2"))
    reference = _unscaled_second_step(str(tmp_path / "w1"))
    for r in results:
        assert r["unchanged"]
        s0, s1, s2 = r["scales"]
        assert s1 == s0 / 2 and s2 == s1
        _assert_close(r["after"], reference)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("amp", ["bf16", "fp16"])
def test_amp_on_cuda(tmp_path: Path, amp: str) -> None:
    """Autocast for the backbone, fp32 head, scaler only with fp16."""
    x, y = dataset()
    cfg = make_cfg(tmp_path, f"train.amp={amp}")
    head = PartialFC(CLASSES, EMB, ArcFace(16.0, 0.3))
    ctx = DistContext(device=torch.device("cuda", 0))
    t = Trainer(cfg, make_backbone(), head, TensorLoader(x, y, 8, 0, 1), ctx)
    assert t.amp.scaling == (amp == "fp16")
    start = t.head.weight.detach().clone()
    for i in range(3):
        result = t.train_step([(x[i * 8 : i * 8 + 8], y[i * 8 : i * 8 + 8])])
        assert torch.isfinite(result.loss)
    assert t.head.weight.dtype == torch.float32
    assert not torch.equal(t.head.weight.detach(), start)


# ------------------------------------------------------------------ monitor
class _Stderr(io.StringIO):
    """A stderr that is, or is not, a terminal."""

    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


@pytest.mark.parametrize(("tty", "asked"), [(False, True), (True, True), (True, False)])
def test_progress_bar_only_when_asked_and_stderr_is_a_terminal(
    monkeypatch: pytest.MonkeyPatch, tty: bool, asked: bool
) -> None:
    """In a log file a bar would write a carriage-return frame per step."""
    stderr = _Stderr(tty)
    monkeypatch.setattr(sys, "stderr", stderr)
    monitor = Monitor(True, 10, 0, None, progress_bar=asked)
    shown = monitor.bar is not None
    for _ in range(3):
        monitor.count(8)
    monitor.close()
    assert shown == (tty and asked)
    assert ("\r" in stderr.getvalue()) == (tty and asked)
