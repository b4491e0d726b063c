"""The maths of one optimizer step, without a single host synchronisation.

:class:`TrainStep` takes ``train.grad_accum`` micro-batches:

1. for each micro-batch: backbone forward under autocast (CUDA only), embeddings cast to
   fp32, their backward gradient multiplied by the world size
   (:func:`trainer.gradients.scale_backbone_grad`, the one place that cancels DDP's
   averaging), head loss (global-batch mean, fp32) plus the weighted auxiliary losses
   and (with a :class:`~trainer.distillation.Distillation`) the weighted distillation
   terms against the teacher's embeddings of the same images (the teacher's forward
   under the same autocast), backward of ``loss / k`` — so the step's gradient is that
   of the loss averaged over the micro-batches. DDP's all-reduce runs only on the last
   micro-batch (``no_sync`` before it);
2. fp16 only: unscale both gradient sets and skip the step on every rank if any is
   non-finite;
3. clip the joint backbone + sharded gradient norm (``train.clip_grad_norm``);
4. step every optimizer once (the LR schedulers and the step count are the loop's).

A step whose loss (or, with clipping, gradient norm) is non-finite on any rank is
skipped on every rank: every optimizer steps with ``found_inf``
(:func:`trainer.optim.step_unless`), which makes the update a no-op on the device, and
the backbone's buffers (BatchNorm statistics) are restored with a ``torch.where``.
The skip flag stays a device tensor in the :class:`StepResult`; reading it is a host
sync, which the loop does only at log and checkpoint steps.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from common.dist import DistContext
from partial_fc.sparse_grad import grad_values
from trainer.amp import AmpPolicy
from trainer.distillation import Distillation
from trainer.gradients import clip_, global_grad_norm, scale_backbone_grad
from trainer.optim import step_unless

Batch = tuple[torch.Tensor, ...]
"""``(images, labels)``, or ``(images, labels, targets)`` when the loader serves the
teacher's cached ``(b, D_t)`` embeddings with each batch (``distill.cache``)."""


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
    """Unweighted auxiliary loss terms (``center``, ``triplet``, and the distillation
    terms ``distill_embedding``, ``distill_relation``) averaged over the micro-batches;
    empty without auxiliary losses."""


class TrainStep:
    """One optimizer step over the parts it is given (see the module docstring).

    Args:
        model: the backbone as trained (in DDP when distributed).
        backbone: the bare backbone (its parameters and buffers).
        head: a :class:`partial_fc.PartialFC` shard.
        opt_backbone, opt_head: their optimizers.
        aux: auxiliary losses by name (``center``, ``triplet``) with their weights.
        opt_center: the learnable centres' optimizer, or ``None``.
        amp: autocast and loss scaling.
        ctx: this process's rank layout and device.
        clip: ``train.clip_grad_norm`` (``None``: no clipping).
        distill: the teacher and distillation terms, or ``None``. Its learned
            parameters (``P``) are replicated: they must be in ``opt_backbone`` (unscaled,
            skipped and stepped with the backbone) and count in the norm as the
            backbone's.
    """

    def __init__(
        self,
        model: nn.Module,
        backbone: nn.Module,
        head: nn.Module,
        opt_backbone: torch.optim.Optimizer,
        opt_head: torch.optim.Optimizer,
        aux: dict[str, tuple[nn.Module, float]],
        opt_center: torch.optim.Optimizer | None,
        amp: AmpPolicy,
        ctx: DistContext,
        clip: float | None,
        distill: Distillation | None = None,
    ) -> None:
        self.model = model
        self.backbone = backbone
        self.head = head
        self.opt_backbone = opt_backbone
        self.opt_head = opt_head
        self.aux = aux
        self.opt_center = opt_center
        self.amp = amp
        self.ctx = ctx
        self.clip = clip
        self.distill = distill

    def optimizers(self) -> list[torch.optim.Optimizer]:
        """Backbone, head and (if learnable centres) centre optimizers, in that order."""
        extra = [self.opt_center] if self.opt_center is not None else []
        return [self.opt_backbone, self.opt_head, *extra]

    def sharded_params(self) -> list[nn.Parameter]:
        """Class-sharded parameters outside DDP: head weight and learnable centres."""
        # the centre optimizer holds exactly the centres (one group, one parameter)
        extra = self.opt_center.param_groups[0]["params"] if self.opt_center is not None else []
        return [self.head.weight, *extra]

    def replicated_params(self) -> list[nn.Parameter]:
        """Parameters identical on every rank: the backbone's, then the distillation
        projection's (if any)."""
        extra = self.distill.params() if self.distill is not None else []
        return [p for p in self.backbone.parameters() if p.requires_grad] + extra

    def params(self) -> list[nn.Parameter]:
        """Every trained parameter: the replicated ones, then the sharded ones."""
        return self.replicated_params() + self.sharded_params()

    def __call__(self, micro_batches: Sequence[Batch]) -> StepResult:
        """Forward, backward and update over ``micro_batches`` (gradient accumulation
        if more than one)."""
        k = len(micro_batches)
        if k < 1:
            raise ValueError("train_step needs at least one micro-batch")
        device = self.ctx.device
        scaler = self.amp.scaler
        self.model.train()
        self.head.train()
        for opt in self.optimizers():
            opt.zero_grad(set_to_none=True)
        names = [*self.aux, *(self.distill.names() if self.distill is not None else ())]
        aux_sums = {name: torch.zeros((), device=device) for name in names}
        loss_sum = torch.zeros((), device=device)
        acc_sum = torch.zeros((), device=device)
        samples = 0
        # BatchNorm statistics are updated by the forward: kept to undo a bad step
        buffers = [b.detach().clone() for b in self.backbone.buffers()]
        ddp = isinstance(self.model, DDP)
        for i, (images, labels, *cached) in enumerate(micro_batches):
            images = images.to(device, non_blocking=True)
            labels = labels.to(device, non_blocking=True)
            last = i == k - 1
            sync = contextlib.nullcontext() if (last or not ddp) else self.model.no_sync()
            with sync:
                with self.amp.autocast():
                    embeddings = self.model(images)
                embeddings = scale_backbone_grad(embeddings.float(), self.ctx.world_size)
                loss = self.head(embeddings, labels)
                for name, (module, weight) in self.aux.items():
                    term = module(embeddings, labels)
                    aux_sums[name] += term.detach()
                    loss = loss + weight * term
                if self.distill is not None:
                    if cached:
                        targets = cached[0].to(device, non_blocking=True)
                    else:
                        with self.amp.autocast():
                            targets = self.distill.targets(images)
                    terms = self.distill(embeddings, targets, class_centres=self.head.weight)
                    for name, (term, weight) in terms.items():
                        aux_sums[name] += term.detach()
                        loss = loss + weight * term
                scaled = loss / k
                if self.amp.scaling:
                    scaled = scaler.scale(scaled)
                scaled.backward()
            loss_sum += loss.detach()
            acc_sum += self.head.accuracy.detach()
            samples += labels.shape[0]
        grad_norm, skipped = self._update(loss_sum)
        with torch.no_grad():
            for b, saved in zip(self.backbone.buffers(), buffers, strict=True):
                b.copy_(torch.where(skipped, saved, b))
        aux_means = {name: total / k for name, total in aux_sums.items()}
        return StepResult(loss_sum / k, acc_sum / k, grad_norm, samples, skipped, aux_means)

    def _update(self, loss: torch.Tensor) -> tuple[torch.Tensor | None, torch.Tensor]:
        """Check, clip and apply the gradients; ``(grad_norm, skipped)``, both on the
        device (nothing is read back).

        One all-reduce decides for every rank: flag 0 is a non-finite loss, flag 1 a
        non-finite gradient (the head's overflow with fp16 scaling; the global norm
        without scaling, when clipping computes it). ``skipped`` is True for a
        non-finite loss or (without scaling) gradient; an fp16 overflow with a finite
        loss is the scaler's business (it skips and backs off) and is not counted.
        """
        clip = self.clip
        scaler = self.amp.scaler
        scaling = self.amp.scaling
        sharded = self.sharded_params()
        grad_bad = torch.zeros((), dtype=torch.bool, device=self.ctx.device)
        grad_norm = None
        if scaling:
            # Unscale the head by hand and fold its overflow into the backbone's, so the
            # scaler skips (and backs off) identically on every rank. The scale stays a
            # device tensor (get_scale() would read it back).
            inv_scale = scaler._get_scale_async().double().reciprocal().float()
            for param in sharded:
                grad = param.grad
                if grad is not None:
                    # A sampled head's gradient is row-sparse: its stored entries are
                    # what to unscale and check (an alias: scaled in place).
                    values = grad_values(grad)
                    values.mul_(inv_scale)
                    grad_bad |= ~torch.isfinite(values).all()
        elif clip is not None:
            grad_norm = global_grad_norm(self.replicated_params(), sharded, self.ctx)
            grad_bad = ~torch.isfinite(grad_norm)
        flags = torch.stack([~torch.isfinite(loss), grad_bad]).float()
        self.ctx.all_reduce_(flags)
        loss_bad = flags[0] > 0
        bad = flags.sum() > 0
        if not scaling:
            if clip is not None:
                clip_(self.params(), grad_norm, clip)
            for opt in self.optimizers():
                step_unless(opt, bad)
            return grad_norm, bad
        # A bad step poisons the backbone's gradient, so the scaler skips it too.
        first = next(p for p in self.backbone.parameters() if p.grad is not None)
        first.grad.masked_fill_(bad, float("inf"))
        scaler.unscale_(self.opt_backbone)
        grad_norm = global_grad_norm(self.replicated_params(), sharded, self.ctx)
        if clip is not None:
            clip_(self.params(), grad_norm, clip)
        scaler.step(self.opt_backbone)  # fused: the scaler passes found_inf
        sharded_bad = bad | ~torch.isfinite(grad_norm)
        for opt in self.optimizers()[1:]:
            step_unless(opt, sharded_bad)
        scaler.update()
        return grad_norm, loss_bad
