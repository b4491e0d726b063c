"""The training loop: backbone in DDP, Partial-FC head outside it, two optimizers.

One optimizer step (:meth:`Trainer.train_step`) takes ``train.grad_accum`` micro-batches:

1. for each micro-batch: backbone forward under autocast (CUDA only), embeddings cast to
   fp32, their backward gradient multiplied by the world size
   (:func:`trainer.gradients.scale_backbone_grad`, the one place that cancels DDP's
   averaging), head loss (global-batch mean, fp32), backward of ``loss / k`` — so the
   step's gradient is that of the loss averaged over the micro-batches. DDP's
   all-reduce runs only on the last micro-batch (``no_sync`` before it);
2. fp16 only: unscale both gradient sets and skip the step on every rank if any is
   non-finite;
3. clip the joint backbone + head gradient norm (``train.clip_grad_norm``);
4. step both optimizers, then both LR schedulers, once.

Auxiliary losses (``aux.*``, :class:`AuxLosses`): the loss of step 1 becomes
``head + aux.center_weight * center + aux.triplet_weight * triplet`` before the one
backward (the world-size scaling of the embedding gradient applies to the sum
unchanged). Learnable centres are class-sharded like the head and get a third
optimizer: :func:`~trainer.optim.build_backbone_optimizer` semantics (SGD with
momentum or AdamW, as ``optimizer.name``) with weight decay 0 (decay would pull the
centres to the origin), on the same LR schedule; they are zeroed, unscaled, clipped
(their squared shard norms summed over ranks like the head's) and stepped with the
head, and checkpointed as ``center-*.pt`` shards that reshard on resume like it.

A step whose loss (or, with clipping, gradient norm) is non-finite on any rank is
skipped on every rank: no parameter update, the backbone's buffers (BatchNorm
statistics) restored, the batch's sample keys logged. ``train.max_bad_steps``
consecutive skipped steps stop the run (:class:`TrainingError`); so does a failed or
timed-out collective, with a message naming the step.

No host synchronisation inside a step. The skip decision stays on the device: every
optimizer steps with ``found_inf`` (:func:`trainer.optim.step_unless`), which makes
the update a no-op when the step is bad, and the buffers are restored with a
``torch.where``. The host learns which steps were skipped at the next log step,
checkpoint or end of training (:meth:`Trainer.settle_bad_steps`, one read of all
flags since the last time): the warning, ``bad_steps.jsonl`` and the
``train.max_bad_steps`` stop happen then, naming the step where the streak reached
the limit (steps between that one and the check have run, skipped or not).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import logging
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from configs import Config, ConfigError, config_to_dict
from trainer.amp import AmpPolicy
from trainer.checkpoint import CheckpointError, CheckpointManager, head_shard_state
from trainer.distributed import DistContext
from trainer.gradients import clip_, global_grad_norm, scale_backbone_grad
from trainer.monitor import Monitor
from trainer.optim import (
    build_backbone_optimizer,
    build_head_optimizer,
    load_optimizer_state,
    step_unless,
)
from trainer.rng import rng_state, set_rng_state
from trainer.schedule import WarmupPoly, build_schedulers

log = logging.getLogger("trainer")

Batch = tuple[torch.Tensor, torch.Tensor]
#: Collective verification: ``evaluator(backbone) -> {target: {"accuracy": ..., ...}}``,
#: called on every rank (extraction is shared across ranks).
Evaluator = Callable[[nn.Module], dict[str, dict[str, float]]]


class TrainingError(RuntimeError):
    """Training stopped at a step (diverged, or a collective failed or timed out);
    the message names the step."""


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


@dataclass
class StepResult:
    """Outcome of one optimizer step (tensors stay on the device: no host sync)."""

    loss: torch.Tensor
    """Total loss (head plus weighted auxiliary terms) averaged over the micro-batches
    (global-batch mean each)."""
    accuracy: torch.Tensor
    """Top-1 training accuracy averaged over the micro-batches."""
    grad_norm: torch.Tensor | None
    """Joint gradient norm before clipping, if it was computed."""
    samples: int
    """Samples in this step on this rank."""
    skipped: torch.Tensor
    """0-dim bool, True if the step was skipped for a non-finite loss or gradient (no
    update). A device tensor: reading it is a host sync."""
    aux: dict[str, torch.Tensor] = dataclasses.field(default_factory=dict)
    """Unweighted auxiliary loss terms (``center``, ``triplet``) averaged over the
    micro-batches; empty without auxiliary losses."""


class Trainer:
    """Owns the model, head, optimizers, schedulers, scaler, loader position and checkpoints.

    Args:
        cfg: validated configuration (read-only here; derived values live on the trainer).
        backbone: the embedding network (moved to ``ctx.device``, wrapped in DDP when a
            process group is initialised).
        head: a :class:`partial_fc.PartialFC` built for this rank.
        loader: the training loader (see :class:`TrainLoader`).
        ctx: this process's rank layout and device.
        evaluator: optional verification callable (see :data:`Evaluator`).
        aux: optional auxiliary losses (see :class:`AuxLosses`), weighted by ``cfg.aux``.
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
        self.opt_backbone = build_backbone_optimizer(cfg.optimizer, self.backbone.parameters())
        self.opt_head = build_head_optimizer(cfg.optimizer, self.head)
        aux = aux or AuxLosses()
        self.center = aux.center.to(ctx.device) if aux.center is not None else None
        self.triplet = aux.triplet.to(ctx.device) if aux.triplet is not None else None
        self.opt_center: torch.optim.Optimizer | None = None
        if self.center is not None and isinstance(self.center.centers, nn.Parameter):
            no_decay = dataclasses.replace(cfg.optimizer, weight_decay=0.0)
            self.opt_center = build_backbone_optimizer(no_decay, [self.center.centers])
        self.amp = AmpPolicy(cfg.train.amp, ctx.device)
        self.scaler = self.amp.scaler

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
        self.schedulers = build_schedulers(self._optimizers(), self.schedule)
        self.checkpoints = CheckpointManager(
            self.output / "checkpoints", ctx, cfg.checkpoint.keep_last
        )

        self.step = 0
        self.epoch = 0
        self.last_lr = self.opt_backbone.param_groups[0]["lr"]
        self.history: list[dict[str, Any]] = []  # verification results by step
        self._last_saved = -1
        self._last_verified = -1
        # Sums over the good (not skipped) steps since the last log, on the device.
        self._loss_sum = torch.zeros((), device=ctx.device)
        self._acc_sum = torch.zeros((), device=ctx.device)
        self._good_steps = torch.zeros((), device=ctx.device)
        self._aux_sums: dict[str, torch.Tensor] = {}  # unweighted aux terms since the last log
        # (step, result, sample keys) of the steps whose skip flags the host has not read.
        self._unsettled: list[tuple[int, StepResult, list[Any]]] = []
        self._stop = self.total_steps
        self.bad_streak = 0  # consecutive skipped (non-finite) steps

    # ------------------------------------------------------------------ one step
    def _optimizers(self) -> list[torch.optim.Optimizer]:
        """Backbone, head and (if learnable centres) centre optimizers, in that order."""
        extra = [self.opt_center] if self.opt_center is not None else []
        return [self.opt_backbone, self.opt_head, *extra]

    def _sharded_params(self) -> list[nn.Parameter]:
        """Class-sharded parameters outside DDP: head weight and learnable centres."""
        extra = [self.center.centers] if self.opt_center is not None else []  # type: ignore[union-attr]
        return [self.head.weight, *extra]

    def _params(self) -> list[nn.Parameter]:
        return [p for p in self.backbone.parameters() if p.requires_grad] + self._sharded_params()

    def train_step(self, micro_batches: Sequence[Batch]) -> StepResult:
        """One optimizer step over ``micro_batches`` (gradient accumulation if > 1)."""
        k = len(micro_batches)
        if k < 1:
            raise ValueError("train_step needs at least one micro-batch")
        self.model.train()
        self.head.train()
        for opt in self._optimizers():
            opt.zero_grad(set_to_none=True)
        weights = {"center": self.cfg.aux.center_weight, "triplet": self.cfg.aux.triplet_weight}
        aux_losses = {
            name: module
            for name, module in (("center", self.center), ("triplet", self.triplet))
            if module is not None
        }
        aux_sums = {name: torch.zeros((), device=self.ctx.device) for name in aux_losses}
        loss_sum = torch.zeros((), device=self.ctx.device)
        acc_sum = torch.zeros((), device=self.ctx.device)
        samples = 0
        # BatchNorm statistics are updated by the forward: kept to undo a bad step
        buffers = [b.detach().clone() for b in self.backbone.buffers()]
        ddp = isinstance(self.model, DDP)
        for i, (images, labels) in enumerate(micro_batches):
            images = images.to(self.ctx.device, non_blocking=True)
            labels = labels.to(self.ctx.device, non_blocking=True)
            last = i == k - 1
            sync = contextlib.nullcontext() if (last or not ddp) else self.model.no_sync()
            with sync:
                with self.amp.autocast():
                    embeddings = self.model(images)
                embeddings = scale_backbone_grad(embeddings.float(), self.ctx.world_size)
                loss = self.head(embeddings, labels)
                for name, module in aux_losses.items():
                    term = module(embeddings, labels)
                    aux_sums[name] += term.detach()
                    loss = loss + weights[name] * term
                scaled = loss / k
                if self.amp.scaling:
                    scaled = self.scaler.scale(scaled)
                scaled.backward()
            loss_sum += loss.detach()
            acc_sum += self.head.accuracy.detach()
            samples += labels.shape[0]
        grad_norm, skipped = self._optimizer_step(loss_sum)
        with torch.no_grad():
            for b, saved in zip(self.backbone.buffers(), buffers, strict=True):
                b.copy_(torch.where(skipped, saved, b))
        self.last_lr = self.opt_backbone.param_groups[0]["lr"]  # the LR this step used
        for scheduler in self.schedulers:
            scheduler.step()
        self.step += 1
        aux_means = {name: total / k for name, total in aux_sums.items()}
        return StepResult(loss_sum / k, acc_sum / k, grad_norm, samples, skipped, aux_means)

    def _optimizer_step(self, loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Check, clip and apply the gradients; ``(grad_norm, skipped)``, both on the
        device (nothing is read back).

        One all-reduce decides for every rank: flag 0 is a non-finite loss, flag 1 a
        non-finite gradient (the head's overflow with fp16 scaling; the global norm
        without scaling, when clipping computes it). ``skipped`` is True for a
        non-finite loss or (without scaling) gradient; an fp16 overflow with a finite
        loss is the scaler's business (it skips and backs off) and is not counted.
        """
        clip = self.cfg.train.clip_grad_norm
        scaling = self.amp.scaling
        device = self.ctx.device
        grad_bad = torch.zeros((), dtype=torch.bool, device=device)
        grad_norm = None
        if scaling:
            # Unscale the head by hand and fold its overflow into the backbone's, so the
            # scaler skips (and backs off) identically on every rank. The scale stays a
            # device tensor (get_scale() would read it back).
            inv_scale = self.scaler._get_scale_async().double().reciprocal().float()
            for param in self._sharded_params():
                grad = param.grad
                if grad is not None:
                    grad.mul_(inv_scale)
                    grad_bad |= ~torch.isfinite(grad).all()
        elif clip is not None:
            grad_norm = global_grad_norm(
                self.backbone.parameters(), self._sharded_params(), self.ctx
            )
            grad_bad = ~torch.isfinite(grad_norm)
        flags = torch.stack([~torch.isfinite(loss), grad_bad]).float()
        self.ctx.all_reduce_(flags)
        loss_bad = flags[0] > 0
        bad = flags.sum() > 0
        if not scaling:
            if clip is not None:
                clip_(self._params(), grad_norm, clip)
            for opt in self._optimizers():
                step_unless(opt, bad)
            return grad_norm, bad
        # A bad step poisons the backbone's gradient, so the scaler skips it too.
        first = next(p for p in self.backbone.parameters() if p.grad is not None)
        first.grad.masked_fill_(bad, float("inf"))
        self.scaler.unscale_(self.opt_backbone)
        grad_norm = global_grad_norm(self.backbone.parameters(), self._sharded_params(), self.ctx)
        if clip is not None:
            clip_(self._params(), grad_norm, clip)
        self.scaler.step(self.opt_backbone)  # fused: the scaler passes found_inf
        sharded_bad = bad | ~torch.isfinite(grad_norm)
        for opt in self._optimizers()[1:]:
            step_unless(opt, sharded_bad)
        self.scaler.update()
        return grad_norm, loss_bad

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
            self.output / "tensorboard" if cfg.log.tensorboard else None,
            cfg.log.progress_bar,
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
                self.loader.set_epoch(self.epoch)
                batches = iter(self.loader)
                epoch_done = False
                while self.step < stop:
                    micro, keys = self._take(batches, k)
                    if len(micro) < k:  # end of epoch (a partial accumulation is dropped)
                        epoch_done = True
                        break
                    with self._naming_step(self.step + 1):
                        result = self.train_step(micro)
                    with self._naming_step(self.step):
                        self._after_step(result, keys, monitor)
                if epoch_done:
                    self.epoch += 1
                else:
                    with contextlib.suppress(Exception):
                        batches.close()  # type: ignore[attr-defined]
            self.settle_bad_steps()
            if self._last_saved != self.step:
                self.save_checkpoint()
            if self.evaluator is not None and self._last_verified != self.step:
                self.verify()
            self.export_backbone()
        finally:
            monitor.close()

    def _take(self, batches: Iterator[Batch], k: int) -> tuple[list[Batch], list[Any]]:
        """Up to ``k`` micro-batches and their sample keys (``loader.last_keys``)."""
        micro: list[Batch] = []
        keys: list[Any] = []
        for batch in itertools.islice(batches, k):
            micro.append(batch)
            keys.append(_as_list(getattr(self.loader, "last_keys", None)))
        return micro, keys

    @contextlib.contextmanager
    def _naming_step(self, step: int) -> Iterator[None]:
        """Re-raise a failure inside the block (a collective that timed out because a
        peer hangs, a dead peer's closed connection) as :class:`TrainingError` naming
        ``step``."""
        try:
            yield
        except (TrainingError, CheckpointError, ConfigError):
            raise
        except RuntimeError as exc:
            text = str(exc).strip()
            first = text.splitlines()[0] if text else type(exc).__name__
            timed_out = "timed out" in text.lower() or "timeout" in text.lower()
            what = (
                f"a collective timed out after train.collective_timeout_s="
                f"{self.cfg.train.collective_timeout_s:g} s (a peer rank is hung or dead)"
                if timed_out
                else "failed"
            )
            raise TrainingError(f"step {step}: {what}: {first}") from exc

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
                self.output.mkdir(parents=True, exist_ok=True)
                with open(self.output / "bad_steps.jsonl", "a") as fh:
                    fh.write(json.dumps(record, default=_json_default) + "\n")
            if self.bad_streak >= limit:
                good = self.checkpoints.latest()
                raise TrainingError(
                    f"step {step}: {self.bad_streak} consecutive steps with a non-finite "
                    f"loss or gradient (train.max_bad_steps={limit}); stopping. Last good "
                    f"checkpoint: {good or 'none'}; skipped batches are listed in "
                    f"{self.output / 'bad_steps.jsonl'}"
                )

    def _after_step(self, result: StepResult, keys: list[Any], monitor: Monitor) -> None:
        cfg = self.cfg
        self._unsettled.append((self.step, result, keys))
        # A skipped step's NaN would poison the logged mean: masked on the device.
        good = ~result.skipped
        self._loss_sum += torch.where(good, result.loss, 0.0)
        self._acc_sum += torch.where(good, result.accuracy, 0.0)
        for name, value in result.aux.items():
            self._aux_sums[name] = self._aux_sums.get(name, 0.0) + torch.where(good, value, 0.0)
        self._good_steps += good
        monitor.count(result.samples * self.ctx.world_size)
        log_now = self.step % cfg.log.every_steps == 0 or self.step == self._stop
        if log_now:
            self.settle_bad_steps()
        if log_now and self.ctx.is_main:
            n = max(self._good_steps.item(), 1.0)
            scale = self.scaler.get_scale() if self.amp.scaling else None
            monitor.log_step(
                self.step,
                self.epoch,
                (self._loss_sum / n).item(),
                (self._acc_sum / n).item(),
                self.last_lr,
                scale,
                {name: float(total) / n for name, total in self._aux_sums.items()},
            )
        if log_now:
            self._loss_sum.zero_()
            self._acc_sum.zero_()
            self._good_steps.zero_()
            self._aux_sums = {}
        started = time.perf_counter()
        if cfg.eval.every_steps and self.step % cfg.eval.every_steps == 0:
            self.verify()
        due = cfg.checkpoint.every_steps and self.step % cfg.checkpoint.every_steps == 0
        if due:
            self.settle_bad_steps()
        if due and self.bad_streak == 0:  # never save in the middle of a bad streak
            self.save_checkpoint()
        monitor.exclude(time.perf_counter() - started)

    # -------------------------------------------------------------- verification
    def verify(self) -> dict[str, dict[str, float]]:
        """Run the evaluator on every rank; log, record and return its results."""
        if self.evaluator is None:
            return {}
        results = self.evaluator(self.model)
        self._last_verified = self.step
        self.history.append({"step": self.step, "results": results})
        monitor = getattr(self, "monitor", None)
        if monitor is not None:
            monitor.log_verification(self.step, results)
        elif self.ctx.is_main:
            for name, r in results.items():
                log.info("verify step %d [%s] accuracy %.5f", self.step, name, r["accuracy"])
        if self.ctx.is_main:
            self._write_json(self.output / "verification.json", self.history)
        return results

    # --------------------------------------------------------------- checkpoints
    def state_shared(self) -> dict[str, Any]:
        """Replicated state (identical on every rank), saved by rank 0."""
        schedulers = []
        for s in self.schedulers:
            state = s.state_dict()
            # The rule is rebuilt from the config and data at start-up, not restored.
            state["lr_lambdas"] = [None] * len(state.get("lr_lambdas", [None]))
            schedulers.append(state)
        return {
            "backbone": {k: v.detach().cpu() for k, v in self.backbone.state_dict().items()},
            "backbone_optimizer": self.opt_backbone.state_dict(),
            "schedulers": schedulers,
            "scaler": self.scaler.state_dict(),
            "progress": {"step": self.step, "epoch": self.epoch},
            "loader": self.loader.state_dict(),
            "history": json.dumps(self.history),
            "config": json.dumps(config_to_dict(self.cfg)),
        }

    def save_checkpoint(self) -> Path:
        """Write an atomic checkpoint of the current step (collective: all ranks call it)."""
        head = self.head
        path = self.checkpoints.save(
            self.step,
            self.state_shared(),
            head_shard_state(
                head, self.opt_head, head.class_start, head.num_local, head.num_subcenters
            ),
            {"rng": rng_state()},
            extra_meta={
                "num_classes": head.num_classes,
                "embedding_size": head.embedding_size,
                "epoch": self.epoch,
            },
            extra_shards=self._center_shard(),
        )
        self._last_saved = self.step
        log.info("saved checkpoint %s", path)
        return path

    def _center_shard(self) -> dict[str, dict[str, Any]] | None:
        """The centre shard and its optimizer state, by global class range."""
        c = self.center
        if c is None:
            return None
        state = head_shard_state(
            c, self.opt_center, c.class_start, c.num_local, 1, row_keys=("centers",)
        )
        return {"center": state}

    def _load_center(self, path: Path) -> None:
        c = self.center
        if c is None:
            return
        if not CheckpointManager.has_shards(path, "center"):
            if self.ctx.is_main:
                log.warning("checkpoint %s has no centre shards: centres start afresh", path)
            if self.opt_center is not None:  # at the resumed step's LR
                for group in self.opt_center.param_groups:
                    group["lr"] = self.opt_backbone.param_groups[0]["lr"]
            return
        model_state, optim_state = CheckpointManager.load_head_shard(
            path, c.class_start, c.num_local, 1, name="center"
        )
        c.load_state_dict(model_state)
        if self.opt_center is not None and optim_state["param_groups"]:
            load_optimizer_state(self.opt_center, optim_state)

    def resolve_resume(self) -> Path | None:
        """The checkpoint ``checkpoint.resume`` asks for (``auto``: latest complete one)."""
        spec = self.cfg.checkpoint.resume
        if spec == "none":
            return None
        if spec == "auto":
            return self.checkpoints.latest()
        path = Path(spec)
        if not CheckpointManager.is_complete(path):
            raise ConfigError(f"checkpoint.resume: {spec!r} is not a complete checkpoint directory")
        return path

    def maybe_resume(self) -> Path | None:
        """Resume from :meth:`resolve_resume` if it names a checkpoint; return it."""
        path = self.resolve_resume()
        if path is not None:
            self.load_checkpoint(path)
        return path

    def load_checkpoint(self, path: Path) -> None:
        """Restore everything from ``path``, whatever world size saved it."""
        meta = CheckpointManager.read_meta(path)
        head = self.head
        if meta["num_classes"] != head.num_classes:
            raise ConfigError(
                f"data.num_classes={head.num_classes} but checkpoint {path} has "
                f"{meta['num_classes']} classes"
            )
        saved_dim = meta.get("embedding_size", head.embedding_size)
        if saved_dim != head.embedding_size:
            raise ConfigError(
                f"model.embedding_size={head.embedding_size} but checkpoint {path} has "
                f"embeddings of size {saved_dim}"
            )
        shared = CheckpointManager.load_shared(path, self.ctx.device)
        self.backbone.load_state_dict(shared["backbone"])
        load_optimizer_state(self.opt_backbone, shared["backbone_optimizer"])
        saved = shared["schedulers"]
        for i, s in enumerate(self.schedulers):
            # The centre scheduler follows the same rule and step count as the others:
            # a checkpoint saved without one restores it from the backbone's.
            s.load_state_dict(saved[i] if i < len(saved) else saved[0])
        if shared["scaler"]:
            self.scaler.load_state_dict(shared["scaler"])
        self.step = int(shared["progress"]["step"])
        self.epoch = int(shared["progress"]["epoch"])
        self.loader.load_state_dict(shared["loader"])
        self.history = json.loads(shared["history"])
        head_state, optim_state = CheckpointManager.load_head_shard(
            path, head.class_start, head.num_local, head.num_subcenters
        )
        head.load_state_dict(head_state)
        self.opt_head.load_state_dict(optim_state)
        self._load_center(path)
        rank_state = CheckpointManager.load_rank_state(path, self.ctx.rank)
        if rank_state is not None:
            set_rng_state(rank_state["rng"])
        self._last_saved = self.step
        log.info(
            "resumed from %s (step %d, epoch %d, saved on %d ranks, now %d)",
            path,
            self.step,
            self.epoch,
            meta["world_size"],
            self.ctx.world_size,
        )
        if meta["world_size"] != self.ctx.world_size and self.ctx.is_main:
            log.warning(
                "world size changed %d -> %d: the global batch and steps per epoch change "
                "with it; the LR schedule now spans %d steps",
                meta["world_size"],
                self.ctx.world_size,
                self.total_steps,
            )

    # -------------------------------------------------------------------- export
    def export_backbone(self, path: Path | None = None) -> Path:
        """Save the backbone weights alone (rank 0), loadable with
        ``torch.load(path, weights_only=True)``; returns the path."""
        path = path or self.output / "backbone.pt"
        if self.ctx.is_main:
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
            weights = {k: v.detach().cpu().clone() for k, v in self.backbone.state_dict().items()}
            torch.save(weights, tmp)
            os.replace(tmp, path)
            log.info("exported backbone weights to %s", path)
        self.ctx.barrier()
        return path

    def _write_json(self, path: Path, obj: Any) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(obj, indent=2, default=_json_default))
        os.replace(tmp, path)


def _as_list(keys: Any) -> Any:
    if isinstance(keys, torch.Tensor):
        return keys.tolist()
    return list(keys) if keys is not None else None


def _json_default(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.tolist()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return str(value)
