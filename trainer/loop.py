"""The training loop: backbone in DDP, Partial-FC head outside it, one optimizer each.

:class:`Trainer` owns the parts of a run and orchestrates them; the maths of one
optimizer step (gradient accumulation, loss scaling, clipping, the device-side skip of
a non-finite step) is :class:`trainer.step.TrainStep`, and what a checkpoint holds and
how it is restored is :class:`trainer.checkpoint.CheckpointManager`.
:meth:`Trainer.train_step` runs one :class:`~trainer.step.TrainStep`, then steps every
LR scheduler once and counts the step.

Auxiliary losses (``aux.*``, :class:`AuxLosses`): the step's loss becomes
``head + aux.center_weight * center + aux.triplet_weight * triplet`` before the one
backward. Learnable centres are class-sharded like the head and get a third
optimizer: :func:`~trainer.optim.build_backbone_optimizer` semantics (SGD with
momentum or AdamW, as ``optimizer.name``) with weight decay 0 (decay would pull the
centres to the origin), on the same LR schedule; they are zeroed, unscaled, clipped
(their squared shard norms summed over ranks like the head's) and stepped with the
head, and checkpointed as ``center-*.pt`` shards that reshard on resume like it.

A skipped step (non-finite loss or gradient on any rank: no update anywhere) has its
batch's sample keys logged. ``train.max_bad_steps`` consecutive skipped steps stop the
run (:class:`TrainingError`); so does a failed or timed-out collective, with a message
naming the step.

No host synchronisation inside a step: the skip flags stay on the device. The host
learns which steps were skipped at the next log step, checkpoint or end of training
(:meth:`Trainer.settle_bad_steps`, one read of all flags since the last time): the
warning, ``bad_steps.jsonl`` and the ``train.max_bad_steps`` stop happen then, naming
the step where the streak reached the limit (steps between that one and the check
have run, skipped or not). The logged loss and accuracy average the steps that were
not skipped; a log window whose steps were all skipped says so instead.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from backbones.weights import save_backbone_weights
from common.atomic import OutputWriteError, append_text, write_json
from common.dist import DistContext
from common.errors import UserError
from common.version import PROJECT_VERSION, git_state
from configs import Config, ConfigError, config_to_dict
from datasets.augment import BatchAugment
from datasets.errors import DataError
from datasets.multi import resume_problem
from partial_fc.sampling import RatePhases, parse_rate_schedule, scheduled_rate
from trainer.amp import AmpPolicy
from trainer.checkpoint import (
    Attributes,
    CheckpointError,
    CheckpointManager,
    CheckpointStorage,
    Fact,
    JsonDict,
    JsonList,
    ModuleState,
    NonFiniteStateError,
    OptimizerState,
    Recorded,
    RngState,
    ScalerState,
    SchedulerStates,
    ShardedModule,
    nonfinite_parts,
    write_error,
)
from trainer.distillation import Distillation
from trainer.finetune import backbone_param_groups
from trainer.monitor import Monitor
from trainer.optim import build_backbone_optimizer, build_head_optimizer
from trainer.preemption import Preempted, PreemptionFlag
from trainer.resume_warning import BatchLayout, batch_change_warning
from trainer.schedule import WarmupPoly, build_schedulers
from trainer.step import Batch, StepResult, TrainStep
from trainer.tracking import TrackerSettings, Tracking, TrackingError, flatten, start_tracking

log = logging.getLogger("trainer")

__all__ = [
    "AuxLosses",
    "Batch",
    "DataLoadError",
    "Evaluator",
    "StepResult",
    "TrainLoader",
    "Trainer",
    "TrainingError",
]

#: Files of ``train.output`` logged as tracking artifacts at the end when present (besides
#: the exported backbone): an ONNX export and a model folder (``python -m eval.export``).
EXPORT_ARTIFACTS = ("backbone.onnx", "model")

#: Collective verification: ``evaluator(backbone) -> {target: {"accuracy": ..., ...}}``,
#: called on every rank (extraction is shared across ranks).
Evaluator = Callable[[nn.Module], dict[str, dict[str, float]]]


class TrainingError(UserError, RuntimeError):
    """Training stopped at a step (diverged, or a collective failed or timed out);
    the message names the step."""


class DataLoadError(TrainingError):
    """The loader failed on this rank (a corrupt record, a bad label or offset); the
    message is the data error's one line (file, key, byte offset), without the
    DataLoader worker's traceback."""


class TrainLoader(Protocol):
    """What the trainer needs from a loader (``datasets.loader.FaceLoader`` fits).

    ``len()`` before any iteration is the number of per-rank batches in a full epoch;
    ``state_dict()`` is the position after the batches yielded so far. Optionally, a
    ``last_keys`` attribute holds the sample keys of the batch just yielded (logged
    when a step has to be skipped).
    """

    def set_epoch(self, epoch: int) -> None: ...
    def __iter__(self) -> Iterator[Batch]: ...
    def __len__(self) -> int: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


@dataclass
class AuxLosses:
    """Optional auxiliary losses (built by ``trainer.build.build_aux_losses``); each is
    ``loss(local_embeddings, local_labels) -> global-batch value`` and is weighted by
    ``aux.center_weight`` / ``aux.triplet_weight``."""

    center: nn.Module | None = None
    """A :class:`partial_fc.ShardedCenterLoss` built for this rank, or ``None``."""
    triplet: nn.Module | None = None
    """A :class:`partial_fc.TripletLoss`, or ``None``."""
    distill: Distillation | None = None
    """The teacher and distillation terms (``distill.*``, built on the device), or
    ``None``; its projection ``P`` trains in the backbone optimizer and is checkpointed
    as the replicated part ``distill``."""


class Trainer:
    """Owns the model, head, optimizers, schedulers, scaler, loader and checkpoints.

    Args:
        cfg: validated configuration (read-only here; derived values live on the trainer).
        backbone: the embedding network (moved to ``ctx.device``, wrapped in DDP when a
            process group is initialised).
        head: a :class:`partial_fc.PartialFC` built for this rank.
        loader: the training loader (see :class:`TrainLoader`).
        ctx: this process's rank layout and device.
        evaluator: optional verification callable (see :data:`Evaluator`).
        aux: optional auxiliary losses (see :class:`AuxLosses`), weighted by ``cfg.aux``.
        amp: mixed-precision policy; default ``AmpPolicy(cfg.train.amp, ctx.device)``
            (the tests pass ``AmpPolicy(..., scaler_only=True)`` for fp16 scaling on CPU).
        checkpoint_storage: where checkpoints are written and read; default
            ``CheckpointStorage(<train.output>/checkpoints, ctx)``.
    """

    def __init__(
        self,
        cfg: Config,
        backbone: nn.Module,
        head: nn.Module,
        loader: TrainLoader,
        ctx: DistContext,
        evaluator: Evaluator | None = None,
        aux: AuxLosses | None = None,
        amp: AmpPolicy | None = None,
        checkpoint_storage: CheckpointStorage | None = None,
    ) -> None:
        self.cfg = cfg
        self.ctx = ctx
        self.output = Path(cfg.train.output)
        self.backbone = backbone.to(ctx.device)
        self.head = head.to(ctx.device)
        if ctx.distributed:
            device_ids = [ctx.device.index] if ctx.device.type == "cuda" else None
            self.model: nn.Module = DDP(self.backbone, device_ids=device_ids)
        else:
            self.model = self.backbone
        self.loader = loader
        self.evaluator = evaluator
        # lr x optimizer.backbone_lr_mult; frozen parameters (model.freeze_*) left out
        self.distill = aux.distill if aux is not None else None
        self.opt_backbone = build_backbone_optimizer(
            cfg.optimizer,
            backbone_param_groups(self.backbone, cfg.optimizer)
            + (self.distill.param_groups(cfg.optimizer) if self.distill is not None else []),
        )
        self.opt_head = build_head_optimizer(cfg.optimizer, self.head)
        aux = aux or AuxLosses()
        self.center = aux.center.to(ctx.device) if aux.center is not None else None
        self.triplet = aux.triplet.to(ctx.device) if aux.triplet is not None else None
        self.opt_center: torch.optim.Optimizer | None = None
        if self.center is not None and isinstance(self.center.centers, nn.Parameter):
            no_decay = dataclasses.replace(cfg.optimizer, weight_decay=0.0)
            self.opt_center = build_backbone_optimizer(no_decay, [self.center.centers])
        self.amp = amp or AmpPolicy(cfg.train.amp, ctx.device)
        self.scaler = self.amp.scaler
        self.augment = BatchAugment.from_config(cfg.augment)
        weighted = (
            ("center", self.center, cfg.aux.center_weight),
            ("triplet", self.triplet, cfg.aux.triplet_weight),
        )
        self.stepper = TrainStep(
            self.model,
            self.backbone,
            self.head,
            self.opt_backbone,
            self.opt_head,
            {name: (module, w) for name, module, w in weighted if module is not None},
            self.opt_center,
            self.amp,
            ctx,
            cfg.train.clip_grad_norm,
            distill=self.distill,
        )

        # Derived quantities: computed here, never written back into ``cfg``.
        k = cfg.train.grad_accum
        self.batches_per_epoch = len(loader)
        self.steps_per_epoch = self.batches_per_epoch // k
        if self.steps_per_epoch < 1:
            raise ConfigError(
                f"data.batch_size={cfg.data.batch_size} x train.grad_accum={k} x "
                f"{ctx.world_size} ranks leaves no full step per epoch; lower them"
            )
        self.total_steps = cfg.train.epochs * self.steps_per_epoch
        self.warmup_steps = round(cfg.scheduler.warmup_epochs * self.steps_per_epoch)
        self.schedule = WarmupPoly(
            self.total_steps,
            self.warmup_steps,
            cfg.scheduler.warmup_start_factor,
            cfg.scheduler.power,
        )
        self.schedulers = build_schedulers(self.stepper.optimizers(), self.schedule)
        # head.sample_rate_schedule's phases (None: the head keeps its own rate); the
        # rate of a step is a function of self.step alone, so a resume reproduces it.
        self.sample_rates: RatePhases | None = None
        if cfg.head.sample_rate_schedule:
            self.sample_rates = parse_rate_schedule(
                cfg.head.sample_rate_schedule, cfg.head.sample_rate, "head.sample_rate_schedule"
            )

        self.step = 0
        self.epoch = 0
        # optimizer.lr x schedule (the head's; the backbone's is x backbone_lr_mult)
        self.last_lr = self.opt_head.param_groups[0]["lr"]
        self.history: list[dict[str, Any]] = []  # verification results by step
        self.tracking_runs: dict[str, str] = {}  # tracking backend -> its run id (resume)
        self.monitor: Monitor | None = None  # while fit() runs
        self.checkpointer = self._build_checkpointer(
            checkpoint_storage or CheckpointStorage(self.output / "checkpoints", ctx)
        )
        self._last_saved = -1
        # SIGTERM/SIGUSR1 noted once train_dist.py installs it; asked at log steps
        self.preemption = PreemptionFlag()
        # The newest checkpoint known to hold finite values: the last one this run
        # saved (every save checks) or resumed from (every load checks).
        self.last_good: Path | None = None
        self._last_verified = -1
        # Sums over the good (not skipped) steps since the last log, on the device.
        self._loss_sum = torch.zeros((), device=ctx.device)
        self._acc_sum = torch.zeros((), device=ctx.device)
        self._good_steps = torch.zeros((), device=ctx.device)
        self._aux_sums: dict[str, torch.Tensor] = {}  # unweighted aux terms since the last log
        self._window_steps = 0  # steps since the last log, skipped or not (a host count)
        # (step, result, sample keys) of the steps whose skip flags the host has not read.
        self._unsettled: list[tuple[int, StepResult, list[Any]]] = []
        self._stop = self.total_steps
        self.bad_streak = 0  # consecutive skipped (non-finite) steps

    def _build_checkpointer(self, storage: CheckpointStorage) -> CheckpointManager:
        """Every stateful part of the run, under its on-disk name."""
        head, center = self.head, self.center
        sharded = {"head": ShardedModule(head, self.opt_head, head.num_subcenters)}
        if center is not None:
            sharded["center"] = ShardedModule(center, self.opt_center, row_keys=("centers",))
        replicated: dict[str, ModuleState] = {}
        if self.distill is not None and self.distill.params():  # the projection P
            replicated["distill"] = ModuleState(self.distill.distiller)
        facts = {
            "num_classes": Fact(head.num_classes, "data.num_classes", "{} classes"),
            "embedding_size": Fact(
                head.embedding_size, "model.embedding_size", "embeddings of size {}"
            ),
        }
        table = getattr(self.loader, "dataset_table", None)
        if callable(table):  # the data.root list and its label offsets (datasets/multi.py)
            facts["datasets"] = Fact(table(), "data.root", "{}", check=resume_problem)
        return CheckpointManager(
            storage,
            Attributes(self, ("step", "epoch")),
            replicated={
                "backbone": ModuleState(self.backbone),
                "backbone_optimizer": OptimizerState(self.opt_backbone),
                "schedulers": SchedulerStates(self.schedulers),
                "scaler": ScalerState(self.scaler),
                "loader": self.loader,
                "history": JsonList(self.history),
                "tracking": JsonDict(self.tracking_runs),
                "config": Recorded(json.dumps(config_to_dict(self.cfg))),
                **replicated,
            },
            sharded=sharded,
            per_rank={"rng": RngState()},
            facts=facts,
            keep_last=self.cfg.checkpoint.keep_last,
        )

    # ------------------------------------------------------------------ one step
    def train_step(self, micro_batches: Sequence[Batch]) -> StepResult:
        """One optimizer step over ``micro_batches`` (gradient accumulation if > 1),
        then one step of every LR scheduler (a skipped step advances them too)."""
        if self.augment.enabled:  # keyed by (seed, step, rank, micro): reproduced on resume
            micro_batches = [
                (
                    self.augment(
                        images.to(self.ctx.device, non_blocking=True),
                        self.step,
                        self.ctx.rank,
                        self.cfg.train.seed,
                        micro=i,
                    ),
                    labels,
                    *cached,  # a teacher's cached rows: those of the unaugmented images
                )
                for i, (images, labels, *cached) in enumerate(micro_batches)
            ]
        if self.sample_rates is not None:  # host maths on the host's step count
            rate = scheduled_rate(self.sample_rates, self.step)
            if rate != self.head.sample_rate:
                log.info("head.sample_rate_schedule: rate %g from step %d", rate, self.step)
                self.head.set_sample_rate(rate)
        result = self.stepper(micro_batches)
        self.last_lr = self.opt_head.param_groups[0]["lr"]  # the LR this step used
        for scheduler in self.schedulers:
            scheduler.step()
        self.step += 1
        return result

    # ------------------------------------------------------------------ the loop
    def fit(self) -> None:
        """Train until the schedule's end (or ``train.max_steps``), verifying, logging and
        checkpointing as configured; finish with a checkpoint, a verification and the
        exported backbone weights."""
        cfg = self.cfg
        stop = self.total_steps
        if cfg.train.max_steps is not None:
            stop = min(stop, cfg.train.max_steps)
        self._stop = stop
        monitor = Monitor(
            self.ctx.is_main,
            self.total_steps,
            self.step,
            None,
            cfg.log.progress_bar,
            self._start_tracking(),
        )
        self.monitor = monitor
        log.info(
            "training %s: %d ranks, %d steps/epoch, %d steps (warm-up %d), starting at step %d",
            cfg.name,
            self.ctx.world_size,
            self.steps_per_epoch,
            self.total_steps,
            self.warmup_steps,
            self.step,
        )
        if cfg.eval.at_start and self.step == 0:
            started = time.perf_counter()
            self.verify()
            monitor.exclude(time.perf_counter() - started)
        k = cfg.train.grad_accum
        try:
            while self.step < stop and self.epoch < cfg.train.epochs:
                try:  # a data file that changed since the start stops the run here
                    self.loader.set_epoch(self.epoch)
                except DataError as exc:
                    raise DataLoadError(_data_error_line(exc)) from exc
                batches = iter(self.loader)
                epoch_done = False
                while self.step < stop:
                    try:
                        waited = time.perf_counter()
                        micro, keys = self._take(batches, k)
                        monitor.waited(time.perf_counter() - waited)
                    except Exception as exc:  # bad training data: one line naming it
                        raise DataLoadError(self._loader_failure(exc)) from exc
                    if len(micro) < k:  # end of epoch (a partial accumulation is dropped)
                        epoch_done = True
                        break
                    current = self.step + 1
                    try:
                        self._after_step(self.train_step(micro), keys, monitor)
                    except (TrainingError, CheckpointError, ConfigError):
                        raise
                    except RuntimeError as exc:  # a collective failed or timed out
                        # (or a loader worker died meanwhile: torch raises that anywhere)
                        failure = self._explain_loader_failure(exc)
                        if failure is not None:
                            raise DataLoadError(failure) from exc
                        raise _step_failure(exc, current, cfg.train.collective_timeout_s) from exc
                if epoch_done:
                    self.epoch += 1
                elif hasattr(batches, "close"):
                    # stop the loader's workers now; the run is over whatever they say
                    with contextlib.suppress(Exception):
                        batches.close()
            self.settle_bad_steps()
            self._refuse_bad_ending()
            if self._last_saved != self.step:
                self.save_checkpoint()
            if self.evaluator is not None and self._last_verified != self.step:
                self.verify()
            exported = self.export_backbone()
            if self.ctx.is_main:
                for path in (exported, *(self.output / n for n in EXPORT_ARTIFACTS)):
                    if path.exists():
                        monitor.tracking.log_artifact(path)
        finally:
            monitor.close()
            self.monitor = None

    def _start_tracking(self) -> Tracking:
        """Start ``log.backends`` on rank 0 (a collective: a backend that cannot start
        stops every rank with :class:`~trainer.tracking.TrackingError`), log the flattened
        config with the git state, and record the run ids for the checkpoints."""
        tracking = Tracking({})
        failure: str | None = None
        if self.ctx.is_main:
            settings = TrackerSettings(
                output=self.output,
                experiment=self.cfg.log.experiment or self.cfg.name,
                run_name=f"{self.cfg.name} ({self.output.name})",
                mlflow_uri=self.cfg.log.mlflow_uri,
                run_ids=dict(self.tracking_runs),
            )
            try:
                tracking = start_tracking(self.cfg.log.active_backends(), settings)
            except (UserError, OSError) as exc:  # TrackingError; TensorBoard's dir unwritable
                failure = str(exc)
        try:  # the run's first collective: a peer hung at start-up shows here
            failure = self.ctx.broadcast_object(failure)
        except RuntimeError as exc:
            raise _step_failure(
                exc, f"start-up (before step {self.step + 1})", self.cfg.train.collective_timeout_s
            ) from exc
        if failure is not None:
            raise TrackingError(failure)
        if self.ctx.is_main:
            git = git_state()
            params = flatten(config_to_dict(self.cfg))
            params.update(
                {"git.commit": git.commit, "git.dirty": git.dirty, "version": PROJECT_VERSION}
            )
            tracking.log_params(params)
            self.tracking_runs.update(tracking.run_ids)
        self.tracking_runs.update(self.ctx.broadcast_object(dict(self.tracking_runs)))
        return tracking

    def _explain_loader_failure(self, exc: BaseException) -> str | None:
        """The loader's one line for ``exc`` if it is a loader worker's death
        (``FaceLoader.explain_failure``: a data file truncated under the workers)."""
        explain = getattr(self.loader, "explain_failure", None)
        failure = explain(exc) if callable(explain) else None
        return None if failure is None else _data_error_line(failure)

    def _loader_failure(self, exc: BaseException) -> str:
        """The one line of an error raised by the loader's iteration."""
        return self._explain_loader_failure(exc) or _data_error_line(exc)

    def _take(self, batches: Iterator[Batch], k: int) -> tuple[list[Batch], list[Any]]:
        """Up to ``k`` micro-batches and their sample keys (``loader.last_keys``)."""
        micro: list[Batch] = []
        keys: list[Any] = []
        for batch in itertools.islice(batches, k):
            micro.append(batch)
            keys.append(_as_list(getattr(self.loader, "last_keys", None)))
        return micro, keys

    def settle_bad_steps(self) -> None:
        """Read the skip flags of the steps since the last call (one host sync, on every
        rank alike), log each skipped step with every rank's sample keys, and stop after
        ``train.max_bad_steps`` consecutive ones (:class:`TrainingError` naming the
        step where the streak reached the limit)."""
        pending, self._unsettled = self._unsettled, []
        if not pending:
            return
        flags = torch.stack([result.skipped for _, result, _ in pending]).tolist()
        limit = self.cfg.train.max_bad_steps
        for (step, result, keys), skipped in zip(pending, flags, strict=True):
            if not skipped:
                self.bad_streak = 0
                continue
            self.bad_streak += 1
            per_rank = self.ctx.all_gather_object(keys)  # only on bad steps: rare
            if self.ctx.is_main:
                loss = result.loss.item()
                log.warning(
                    "step %d: non-finite loss/gradient (loss %s); step skipped (%d in a row, "
                    "limit train.max_bad_steps=%d); sample keys by rank: %s",
                    step,
                    loss,
                    self.bad_streak,
                    limit,
                    "; ".join(f"rank {r}: {k}" for r, k in enumerate(per_rank)),
                )
                record = {"step": step, "loss": str(loss), "keys": per_rank}
                # keys of a type JSON lacks (numpy scalars) are written as text
                append_text(self.output / "bad_steps.jsonl", json.dumps(record, default=str) + "\n")
            if self.bad_streak >= limit:
                raise TrainingError(
                    f"step {step}: {self.bad_streak} consecutive steps with a non-finite "
                    f"loss or gradient (train.max_bad_steps={limit}); stopping. Last good "
                    f"checkpoint: {self.last_good or 'none'}; skipped batches are listed in "
                    f"{self.output / 'bad_steps.jsonl'}"
                )

    def _after_step(self, result: StepResult, keys: list[Any], monitor: Monitor) -> None:
        """Book-keeping after a step: accumulate the log window on the device; at a log
        step settle the skip flags and log, then verify and checkpoint when due."""
        cfg = self.cfg
        self._unsettled.append((self.step, result, keys))
        # A skipped step's NaN would poison the logged mean: masked on the device.
        good = ~result.skipped
        self._loss_sum += torch.where(good, result.loss, 0.0)
        self._acc_sum += torch.where(good, result.accuracy, 0.0)
        for name, value in result.aux.items():
            self._aux_sums[name] = self._aux_sums.get(name, 0.0) + torch.where(good, value, 0.0)
        self._good_steps += good
        self._window_steps += 1
        monitor.count(result.samples * self.ctx.world_size)
        if self.step % cfg.log.every_steps == 0 or self.step == self._stop:
            self.settle_bad_steps()
            if self.ctx.is_main:
                self._log_window(monitor)
            self._loss_sum.zero_()
            self._acc_sum.zero_()
            self._good_steps.zero_()
            self._aux_sums = {}
            self._window_steps = 0
        started = time.perf_counter()
        if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
            self.verify()
        due = cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0
        if due:
            self.settle_bad_steps()
        if due and self.bad_streak == 0:  # never save in the middle of a bad streak
            self.save_checkpoint()
        monitor.exclude(time.perf_counter() - started)
        if self.step % cfg.log.every_steps == 0 or self.step == self._stop:
            self._stop_if_preempted()

    def _stop_if_preempted(self) -> None:
        """At a log step: if any rank got a preemption signal (one all-reduce), save a
        checkpoint here (unless in a bad streak: the last good one stays) and raise
        :class:`~trainer.preemption.Preempted` on every rank."""
        if not self.preemption.requested(self.ctx):
            return
        self.settle_bad_steps()
        if self.bad_streak == 0 and self._last_saved != self.step:
            self.save_checkpoint()
        last = self.last_good
        raise Preempted(self.step, self.preemption.signal_name, str(last) if last else None)

    def _log_window(self, monitor: Monitor) -> None:
        """Log the means over the window's good steps (one read of the device sums); a
        window of skipped steps only is logged as such, not as a zero loss."""
        names = list(self._aux_sums)
        sums = [self._loss_sum, self._acc_sum, self._good_steps, *self._aux_sums.values()]
        loss, acc, good, *terms = torch.stack(sums).tolist()
        skipped = self._window_steps - round(good)
        scale = self.scaler.get_scale() if self.amp.scaling else None
        if good == 0:
            monitor.log_step(self.step, self.epoch, None, None, self.last_lr, scale, None, skipped)
            return
        monitor.log_step(
            self.step,
            self.epoch,
            loss / good,
            acc / good,
            self.last_lr,
            scale,
            {name: total / good for name, total in zip(names, terms, strict=True)},
            skipped,
        )

    # -------------------------------------------------------------- verification
    def verify(self) -> dict[str, dict[str, float]]:
        """Run the evaluator on every rank; log, record and return its results."""
        if self.evaluator is None:
            return {}
        results = self.evaluator(self.model)
        self._last_verified = self.step
        self.history.append({"step": self.step, "results": results})
        if self.monitor is not None:
            self.monitor.log_verification(self.step, results)
        elif self.ctx.is_main:
            for name, r in results.items():
                log.info("verify step %d [%s] accuracy %.5f", self.step, name, r["accuracy"])
        if self.ctx.is_main:
            write_json(self.output / "verification.json", self.history)
        return results

    # --------------------------------------------------------------- checkpoints
    def _refuse_bad_ending(self) -> None:
        """A run whose last steps were skipped (non-finite) ends with an error naming
        the last good checkpoint: no checkpoint, verification or export of that state."""
        if self.bad_streak:
            raise TrainingError(
                f"step {self.step}: training ended in a bad streak: the last "
                f"{self.bad_streak} steps had a non-finite loss or gradient and were skipped "
                f"(limit train.max_bad_steps={self.cfg.train.max_bad_steps}); nothing saved "
                f"or exported. Last good checkpoint: {self.last_good or 'none'}; skipped "
                f"batches are listed in {self.output / 'bad_steps.jsonl'}"
            )

    def save_checkpoint(self) -> Path:
        """Write an atomic checkpoint of every part at the current step (collective:
        all ranks call it); see :class:`~trainer.checkpoint.CheckpointManager`. State
        holding a NaN or Inf is never saved: :class:`TrainingError` naming the last good
        checkpoint instead."""
        try:
            path = self.checkpointer.save()
        except NonFiniteStateError as exc:
            raise TrainingError(
                f"step {self.step}: {exc} (the weights diverged: optimizer.lr or "
                f"optimizer.weight_decay too large?). Last good checkpoint: "
                f"{self.last_good or 'none'}"
            ) from None
        self._last_saved = self.step
        self.last_good = path
        log.info("saved checkpoint %s", path)
        return path

    def maybe_resume(self) -> Path | None:
        """Resume from the checkpoint ``checkpoint.resume`` names (``auto``: the latest
        complete one), whatever world size saved it; return it, or ``None``."""
        resumed = self.checkpointer.resume(self.cfg.checkpoint.resume)
        if resumed is None:
            return None
        path, meta = resumed
        self._last_saved = self.step
        self.last_good = path
        note = batch_change_warning(
            BatchLayout.from_config(self.checkpointer.resumed_config, meta["world_size"]),
            BatchLayout(self.cfg.data.batch_size, self.cfg.train.grad_accum, self.ctx.world_size),
            self.steps_per_epoch,
            self.total_steps,
        )
        if note and self.ctx.is_main:
            log.warning(note)
        return path

    # -------------------------------------------------------------------- export
    def export_backbone(self, path: Path | None = None) -> Path:
        """Save the backbone weights alone (rank 0, atomically:
        :func:`backbones.weights.save_backbone_weights`), loadable with
        ``torch.load(path, weights_only=True)`` (``safetensors`` for a ``.safetensors``
        path) into our model or arcface_torch's; returns the path."""
        path = path or self.output / "backbone.pt"
        bad = [p for p in nonfinite_parts(dict(self.backbone.state_dict())) if p]
        if any(self.ctx.all_gather_object(bad)):
            raise TrainingError(
                f"step {self.step}: the backbone holds NaN/Inf values in "
                f"{', '.join(bad) or 'another rank'}; {path} not exported. Last good "
                f"checkpoint: {self.last_good or 'none'}"
            )
        failure: OutputWriteError | None = None
        if self.ctx.is_main:
            # arcface_torch's names: the file loads into its model code too; a path
            # ending in .safetensors is written as safetensors
            try:
                save_backbone_weights(self.backbone.state_dict(), path)
            except (OSError, RuntimeError) as exc:  # torch's writer raises RuntimeError
                failure = write_error(path, exc)
            else:
                log.info("exported backbone weights to %s", path)
        # (in place of a barrier) every rank learns whether rank 0's write failed
        message = self.ctx.broadcast_object(None if failure is None else str(failure))
        if failure is not None:
            raise failure
        if message is not None:
            raise TrainingError(f"step {self.step}: rank 0 could not export: {message}")
        return path


def _as_list(keys: Any) -> Any:
    """Sample keys as a JSON-able list (tensors and arrays converted), or ``None``."""
    if keys is None:
        return None
    return keys.tolist() if hasattr(keys, "tolist") else list(keys)


def _step_failure(exc: RuntimeError, where: int | str, timeout_s: float) -> TrainingError:
    """A failure during step ``where`` (or the named phase: a collective that timed out
    because a peer hangs, a dead peer's closed connection) as a :class:`TrainingError`
    naming it."""
    text = str(exc).strip()
    first = text.splitlines()[0] if text else type(exc).__name__
    if "timed out" in text.lower() or "timeout" in text.lower():
        what = (
            f"a collective timed out after train.collective_timeout_s={timeout_s:g} s "
            f"(a peer rank is hung or dead)"
        )
    elif peer := re.search(r"Connection (closed|reset) by peer[^.\s]*( \S+)?", text):
        # the peer's process went away: say so, without the transport's chatter
        what = "failed (a peer rank stopped; its own error line says why)"
        first = peer.group(0).rstrip(".")
    else:
        what = "failed"
    label = f"step {where}" if isinstance(where, int) else where
    return TrainingError(f"{label}: {what}: {first}")


def _data_error_line(exc: BaseException) -> str:
    """The one line of a loader error: the data error's own message, also when a
    DataLoader worker re-raised it with its traceback
    (``Caught X in DataLoader worker process 0. Original Traceback ... X: message``)."""
    text = str(exc).strip()
    if text.startswith("Caught ") and "Original Traceback" in text:
        last = text.splitlines()[-1].strip()
        name, sep, message = last.partition(": ")
        text = message if sep and re.fullmatch(r"[\w.]+", name) else last
    first = text.splitlines()[0].strip() if text else ""
    return first or type(exc).__name__
