"""The stateful parts of a run, each saving and restoring itself.

Every adapter here has ``state_dict()`` and ``load_state_dict(state)``: the
:class:`Stateful` protocol of ``torch.distributed.checkpoint`` (the same structural
protocol, declared here so that importing it does not load that package). A
``state_dict()`` returns tensors and plain containers only, as
``torch.load(weights_only=True)`` reads them back.

Optimizer hyper-parameters (momentum, weight decay, betas, eps) and the learning
rate's peak are never restored: a resumed run takes them from its configuration
(:func:`load_keeping_hyperparameters`, :class:`SchedulerStates`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from common.rng import rng_state, set_rng_state
from trainer.checkpoint.resharding import shard_state, split_shard
from trainer.optim import load_optimizer_state


@runtime_checkable
class Stateful(Protocol):
    """A part of a run that saves and restores itself
    (``torch.distributed.checkpoint.stateful.Stateful``)."""

    def state_dict(self) -> Any: ...
    def load_state_dict(self, state: Any) -> None: ...


class ModuleState:
    """A module's ``state_dict`` as CPU tensors (a checkpoint loads on any device)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module

    def state_dict(self) -> dict[str, Any]:
        return {k: v.detach().cpu() for k, v in self.module.state_dict().items()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.module.load_state_dict(state)


def load_keeping_hyperparameters(optimizer: torch.optim.Optimizer, state: dict[str, Any]) -> None:
    """Restore ``optimizer``'s buffers from ``state`` (:func:`~trainer.optim.
    load_optimizer_state`), keeping this run's hyper-parameters: momentum, weight decay,
    betas, eps, ... and ``initial_lr`` (the schedule's peak) stay as the current
    configuration built them, and ``lr`` as it is (the resumed scheduler sets it,
    before or after this call)."""
    kept = [{k: v for k, v in group.items() if k != "params"} for group in optimizer.param_groups]
    load_optimizer_state(optimizer, state)
    for group, mine in zip(optimizer.param_groups, kept, strict=True):
        group.update(mine)


class OptimizerState:
    """An optimizer's state; restored with :func:`load_keeping_hyperparameters` (the
    saved buffers, this run's hyper-parameters and ``fused``/``foreach`` flags)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_keeping_hyperparameters(self.optimizer, state)


class SchedulerStates:
    """The LR schedulers, one per optimizer, all following one rule.

    The rule (``lr_lambdas``) is not saved: it is rebuilt from the configuration and
    the data at start-up (the world size may have changed the run's length). A
    checkpoint with fewer schedulers than this run (saved without the centres'
    optimizer) restores the missing ones from the first, which follows the same rule
    and step count."""

    def __init__(self, schedulers: Sequence[torch.optim.lr_scheduler.LRScheduler]) -> None:
        self.schedulers = list(schedulers)

    def state_dict(self) -> list[dict[str, Any]]:
        states = []
        for scheduler in self.schedulers:
            state = scheduler.state_dict()
            state["lr_lambdas"] = [None] * len(state.get("lr_lambdas", [None]))
            states.append(state)
        return states

    def load_state_dict(self, state: list[dict[str, Any]]) -> None:
        for i, scheduler in enumerate(self.schedulers):
            base_lrs = list(scheduler.base_lrs)  # this run's optimizer.lr
            scheduler.load_state_dict(state[i] if i < len(state) else state[0])
            # The step count is the checkpoint's; the peak LR and the rule are this
            # run's: the resumed step's LR is recomputed from them (equal to the saved
            # one when neither changed).
            scheduler.base_lrs = base_lrs
            lrs = [
                base * rule(scheduler.last_epoch)
                for rule, base in zip(scheduler.lr_lambdas, base_lrs, strict=True)
            ]
            scheduler._last_lr = lrs  # type: ignore[attr-defined]
            # A scheduler's state does not reach its optimizer: set the LR there too.
            for group, lr in zip(scheduler.optimizer.param_groups, lrs, strict=True):
                group["lr"] = lr


class ScalerState:
    """The fp16 grad scaler (scale, growth tracker); an empty state (saved by a
    disabled scaler) restores nothing."""

    def __init__(self, scaler: torch.amp.GradScaler) -> None:
        self.scaler = scaler

    def state_dict(self) -> dict[str, Any]:
        return self.scaler.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state:
            self.scaler.load_state_dict(state)


class Attributes:
    """Plain integer attributes of an object (the loop's ``step`` and ``epoch``)."""

    def __init__(self, owner: object, names: Sequence[str]) -> None:
        self.owner = owner
        self.names = tuple(names)

    def state_dict(self) -> dict[str, int]:
        return {name: int(getattr(self.owner, name)) for name in self.names}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for name in self.names:
            setattr(self.owner, name, int(state[name]))


class JsonList:
    """A list of JSON-able records (the verification history), saved as one JSON
    string and restored in place (whoever holds the list sees the restored one)."""

    def __init__(self, items: list[Any]) -> None:
        self.items = items

    def state_dict(self) -> str:
        return json.dumps(self.items)

    def load_state_dict(self, state: str) -> None:
        self.items[:] = json.loads(state)


class JsonDict:
    """A dict of JSON-able values (the experiment trackers' run ids), saved as one JSON
    string and restored in place. ``optional``: a checkpoint written before this part
    existed resumes without it (the dict stays as it is)."""

    optional = True

    def __init__(self, items: dict[str, Any]) -> None:
        self.items = items

    def state_dict(self) -> str:
        return json.dumps(self.items, sort_keys=True)

    def load_state_dict(self, state: str) -> None:
        self.items.clear()
        self.items.update(json.loads(state))


class Recorded:
    """A value saved for the record and never restored (the configuration: on resume,
    the command line decides)."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def state_dict(self) -> Any:
        return self.value

    def load_state_dict(self, state: Any) -> None:
        del state  # the current run's value stands


class RngState:
    """This process's Python, NumPy, torch (and CUDA) generators."""

    def state_dict(self) -> dict[str, Any]:
        return rng_state()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_rng_state(state)


class ShardedModule:
    """A module sharded by class over ranks, with the optimizer of its one sharded
    parameter (``None`` if nothing in it learns); its state is a shard state of
    :mod:`~trainer.checkpoint.resharding`.

    The module has ``class_start`` and ``num_local`` (this rank's classes) and
    ``num_subcenters`` rows per class; ``row_keys`` name its ``(num_local *
    num_subcenters, ...)`` state entries (the rest, e.g. margins and step counters, are
    replicated). The optimizer's per-parameter tensors whose first dimension is the row
    count are row-indexed too (:mod:`partial_fc.optim`'s ``momentum_buffer``,
    ``exp_avg``, ``exp_avg_sq``, ``row_step``).
    """

    def __init__(
        self,
        module: nn.Module,
        optimizer: torch.optim.Optimizer | None,
        num_subcenters: int = 1,
        row_keys: tuple[str, ...] = ("weight",),
    ) -> None:
        self.module = module
        self.optimizer = optimizer
        self.num_subcenters = num_subcenters
        self.row_keys = row_keys

    @property
    def class_start(self) -> int:
        return int(self.module.class_start)  # type: ignore[arg-type]

    @property
    def num_local(self) -> int:
        return int(self.module.num_local)  # type: ignore[arg-type]

    def state_dict(self) -> dict[str, Any]:
        """This rank's rows and their optimizer state, tagged with the global range."""
        return shard_state(
            self.module,
            self.optimizer,
            self.class_start,
            self.num_local,
            self.num_subcenters,
            row_keys=self.row_keys,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a shard state of exactly this rank's range (merged by
        :func:`~trainer.checkpoint.resharding.reshard` if another world size saved it)."""
        mine = (self.class_start, self.num_local, self.num_subcenters)
        theirs = (state["class_start"], state["num_local"], state["num_subcenters"])
        if mine != theirs:
            raise ValueError(
                f"shard state for (class_start, num_local, K) {theirs} given to {mine}"
            )
        model_state, optim_state = split_shard(state)
        self.module.load_state_dict(model_state)
        if self.optimizer is not None and optim_state["param_groups"]:
            load_keeping_hyperparameters(self.optimizer, optim_state)


def _floating_tensors(obj: Any) -> list[torch.Tensor]:
    """The floating-point tensors anywhere inside nested dicts, lists and tuples."""
    if isinstance(obj, torch.Tensor):
        return [obj] if obj.is_floating_point() else []
    if isinstance(obj, dict):
        return [t for v in obj.values() for t in _floating_tensors(v)]
    if isinstance(obj, list | tuple):
        return [t for v in obj for t in _floating_tensors(v)]
    return []


def nonfinite_parts(states: dict[str, Any]) -> list[str]:
    """Names of the parts whose state holds a NaN or Inf (one read per part and device:
    call it where the host syncs anyway, at a save or a load)."""
    bad = []
    for name, state in states.items():
        by_device: dict[torch.device, list[torch.Tensor]] = {}
        for t in _floating_tensors(state):
            if t.numel():
                by_device.setdefault(t.device, []).append(torch.isfinite(t).all())
        if not all(bool(torch.stack(flags).all()) for flags in by_device.values()):
            bad.append(name)
    return bad
