"""The GPU fitness of the hot path, checked on any device by counting dispatched operators.

* The head's forward + backward dispatches a number of operators that does not grow
  with the number of local classes at a fixed chunk count (no Python loop over rows).
* A training step (head, sampling, margins, auxiliary losses, optimizers, loss
  scaling, clipping, the non-finite check, the loader hand-off) dispatches no
  operator that would make the host wait for a GPU; only the log steps read back.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any
from unittest import mock

import pytest
import torch

from common.dist import DistContext
from partial_fc import ArcFace, CombinedMargin, PartialFC
from partial_fc.optim import PartialFCAdamW, PartialFCSGD
from tests.dispatch_count import DispatchCounter
from tests.distributed import device_under_test, run_ranks
from tests.trainer.test_trainer import TensorLoader, dataset, make_backbone, make_cfg
from trainer.amp import AmpPolicy
from trainer.build import build_aux_losses, build_head
from trainer.loop import Trainer

pytestmark = pytest.mark.on_device

DIM, BATCH = 8, 16


def _head_step_ops(num_local: int, sample_rate: float, k: int, device: torch.device) -> int:
    """Operators dispatched by one head forward + backward over ``num_local`` classes in
    two chunks of the classes in use."""
    used = num_local if sample_rate == 1.0 else round(sample_rate * num_local)
    head = PartialFC(
        num_local, DIM, ArcFace(), num_subcenters=k, sample_rate=sample_rate,
        chunk_classes=(used + 1) // 2, max_local_batch=BATCH, device=device,
    )  # fmt: skip
    g = torch.Generator().manual_seed(0)
    x = torch.randn(BATCH, DIM, generator=g).to(device).requires_grad_(True)
    y = torch.randint(0, num_local, (BATCH,), generator=g).to(device)
    with DispatchCounter() as counter:
        head(x, y).backward()
    assert counter.host_syncs == [], counter.host_syncs
    return counter.total


@pytest.mark.parametrize(("sample_rate", "k"), [(1.0, 1), (0.1, 1), (1.0, 3)])
def test_head_dispatches_the_same_operators_for_any_number_of_classes(
    sample_rate: float, k: int, device: torch.device
) -> None:
    small = _head_step_ops(16_384, sample_rate, k, device)
    large = _head_step_ops(65_536, sample_rate, k, device)
    assert small == large


@pytest.mark.parametrize("optimizer", [PartialFCSGD, PartialFCAdamW])
@pytest.mark.parametrize("sample_rate", [1.0, 0.3])
def test_head_and_its_optimizer_never_read_back(
    optimizer: type, sample_rate: float, device: torch.device
) -> None:
    head = PartialFC(
        500, DIM, CombinedMargin(32.0, 1.0, 0.3, 0.1), num_subcenters=2,
        sample_rate=sample_rate, max_local_batch=BATCH, chunk_classes=64,
        interclass_filtering_threshold=0.3, device=device,
    )  # fmt: skip
    opt = optimizer(head, lr=0.1)
    g = torch.Generator().manual_seed(1)
    with DispatchCounter() as counter:
        for _ in range(2):
            opt.zero_grad()
            x = torch.randn(BATCH, DIM, generator=g).to(device).requires_grad_(True)
            y = torch.randint(0, 500, (BATCH,), generator=g).to(device)
            head(x, y).backward()
            opt.found_inf = torch.zeros((), device=device)
            opt.step()
    assert counter.host_syncs == [], counter.host_syncs
    assert counter.total > 0


class _StepSyncs(DispatchCounter):
    """Records host syncs except while ``allowed``: the start-up before the first step
    (resume, the trackers' start-up collective), a log step's bookkeeping, and
    everything after the last step (final checkpoint, verification, export)."""

    def __init__(self) -> None:
        super().__init__()
        self.allowed = False
        self.allowed_syncs = 0

    @classmethod
    def watching(cls, trainer: Trainer, log_every: int, last_step: int) -> _StepSyncs:
        """A counter that allows reads only in the bookkeeping after a log step
        (``trainer._after_step``) and once ``last_step`` is done."""
        counter = cls()
        counter.allowed = True  # start-up: until the first step begins
        real_after_step = trainer._after_step
        real_train_step = trainer.train_step

        def train_step(micro_batches):  # type: ignore[no-untyped-def]
            counter.allowed = False
            return real_train_step(micro_batches)

        def after_step(result, keys, monitor) -> None:
            counter.allowed = trainer.step % log_every == 0
            try:
                real_after_step(result, keys, monitor)
            finally:
                counter.allowed = trainer.step >= last_step  # the end may read back

        trainer._after_step = after_step  # type: ignore[method-assign]
        trainer.train_step = train_step  # type: ignore[method-assign]
        return counter

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[override]
        before = len(self.host_syncs)
        out = super().__torch_dispatch__(func, types, args, kwargs)
        if self.allowed and len(self.host_syncs) > before:
            self.allowed_syncs += len(self.host_syncs) - before
            del self.host_syncs[before:]
        return out


def _syncs_between_log_steps(rank: int, world: int, tmp: str, fp16: bool) -> dict[str, Any]:
    """Train 6 steps (log every 3) with sampling, both auxiliary losses, clipping and
    gradient accumulation; return the host syncs seen outside the log steps."""
    x, y = dataset()
    cfg = make_cfg(
        tmp,
        "data.num_classes=200",
        "head.sample_rate=0.3",
        "aux.center_weight=0.1",
        "aux.triplet_weight=0.1",
        "train.clip_grad_norm=1.0",
        "train.grad_accum=2",
        "train.max_steps=6",
        "log.every_steps=3",
        "eval.at_start=false",
    )
    ctx = DistContext.current(device_under_test())
    aux = build_aux_losses(cfg, ctx.device)
    amp = AmpPolicy("fp16", ctx.device, scaler_only=ctx.device.type == "cpu") if fp16 else None
    t = Trainer(
        cfg, make_backbone(), build_head(cfg, ctx.device), TensorLoader(x, y, 8, rank, world),
        ctx, aux=aux, amp=amp,
    )  # fmt: skip
    assert t.amp.scaling == fp16
    counter = _StepSyncs.watching(t, cfg.log.every_steps, last_step=6)
    with counter:
        t.fit()
    return {
        "syncs": counter.host_syncs,
        "allowed": counter.allowed_syncs,
        "step": t.step,
    }


@pytest.mark.parametrize(("world", "fp16"), [(1, False), (1, True), (2, False)])
def test_training_steps_never_read_back_between_log_steps(
    tmp_path: Path, world: int, fp16: bool
) -> None:
    for r in run_ranks(_syncs_between_log_steps, world, str(tmp_path), fp16):
        assert r["step"] == 6
        assert r["syncs"] == [], r["syncs"]
        assert r["allowed"] > 0  # the log steps did read back: the counter was live


@pytest.mark.parametrize("distill", ["none", "online", "cached"])
def test_real_pipeline_steps_never_read_back_between_log_steps(
    synthetic_data, tmp_path_factory: pytest.TempPathFactory, device: torch.device, distill: str
) -> None:
    """The demo configuration as ``train_dist`` builds it: RecordIO loader (its hand-off
    to the device), MobileFaceNet with BatchNorm in train mode, sampled head; then with
    every distillation term (embedding with a projection, relation, logit) from an
    online teacher, and from a teacher's cache served by the loader."""
    from backbones.registry import get_model
    from backbones.weights import save_backbone_weights
    from configs import load_config
    from tools.teacher_embed import main as teacher_embed
    from trainer.build import build_trainer

    data = synthetic_data(8, 4, 4, 2, seed=5)
    extra: list[str] = []
    if distill != "none":
        work = tmp_path_factory.mktemp("teacher")
        torch.manual_seed(0)
        teachers = {d: work / f"teacher{d}.pt" for d in (16, 512)}
        for dim, path in teachers.items():
            save_backbone_weights(get_model("mbf_tiny", embedding_size=dim).state_dict(), path)
        terms = ["distill.embedding_weight=1", "distill.relation_weight=1"]
        extra = [f"distill.teacher={teachers[16]}", "distill.teacher_network=mbf_tiny", *terms]
        if distill == "cached":  # the student's size: the logit term too
            argv = [str(data), "--teacher", str(teachers[512]), "--teacher-network", "mbf_tiny"]
            teacher_embed(
                [*argv, "--out", str(work / "cache"), "--num-workers", "0", "--no-progress"]
            )
            extra = [f"distill.cache={work / 'cache'}", *terms, "distill.logit_weight=1"]
    cfg = load_config(
        "configs/demo",
        [
            f"data.root={data}",
            "data.num_classes=8",
            "data.num_images=32",
            "data.batch_size=4",
            "data.num_workers=0",
            "head.sample_rate=0.5",
            f"train.output={tmp_path_factory.mktemp('run')}",
            "train.max_steps=4",
            "log.every_steps=2",
            "log.tensorboard=false",
            "log.progress_bar=false",
            "eval.targets=",
            "eval.at_start=false",
            "checkpoint.every_steps=0",
            *extra,
        ],
    )
    t = build_trainer(cfg, DistContext(device=device))
    assert (t.distill is None) == (distill == "none")
    counter = _StepSyncs.watching(t, cfg.log.every_steps, last_step=4)
    # Each epoch's DataLoader iterator draws its base seed with .item() on a CPU
    # generator: host memory, no device involved (on CPU the counter cannot tell).
    real_get_iterator = torch.utils.data.DataLoader._get_iterator

    def get_iterator(loader):
        counter.allowed = True
        try:
            return real_get_iterator(loader)
        finally:
            counter.allowed = False

    with mock.patch.object(torch.utils.data.DataLoader, "_get_iterator", get_iterator), counter:
        t.fit()
    assert t.step == 4
    assert counter.host_syncs == [], counter.host_syncs
    assert counter.allowed_syncs > 0


@pytest.mark.parametrize("name", ["adaface", "magface", "curricular", "elastic_plus"])
def test_batch_aware_margins_never_read_back(name: str, device: torch.device) -> None:
    from partial_fc import AdaFace, CurricularFace, ElasticFace, MagFace

    margin = {
        "adaface": lambda: AdaFace(),
        "magface": lambda: MagFace(),
        "curricular": lambda: CurricularFace(),
        "elastic_plus": lambda: ElasticFace(plus=True),
    }[name]()
    head = PartialFC(
        500, DIM, margin, sample_rate=0.3, max_local_batch=BATCH, chunk_classes=64,
        device=device,
    )  # fmt: skip
    g = torch.Generator().manual_seed(2)
    x = (torch.randn(BATCH, DIM, generator=g) * 30).to(device).requires_grad_(True)
    y = torch.randint(0, 500, (BATCH,), generator=g).to(device)
    with DispatchCounter() as counter:
        head(x, y).backward()
    assert counter.host_syncs == [], counter.host_syncs
