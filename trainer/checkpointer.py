"""What a checkpoint holds: a mapping of stateful parts, each saving and restoring itself.

The torchtitan checkpointer pattern: :class:`Checkpointer` holds named parts that
each own a ``state_dict()`` / ``load_state_dict(state)`` pair (:class:`Stateful`), and
saves or restores them all in one call; :class:`trainer.checkpoint.CheckpointManager`
stores what it is handed (atomic directories, pruning, finding the latest). Parts
come in three scopes, which decide the file they go to:

* **replicated** (identical on every rank, saved by rank 0 into ``trainer.pt`` under
  their name): backbone, backbone optimizer, LR schedulers, grad scaler, progress
  (step, epoch), loader position, verification history, configuration;
* **class-sharded** (:class:`ShardedModule`, one ``<name>-RRRRR.pt`` per rank): the
  head with its row-indexed optimizer state (and its margins' buffers, which live in
  the head's ``state_dict``), the centre loss with its optimizer. On load they are
  resharded by global class (:meth:`CheckpointManager.load_shard`), so a run resumes
  on any number of ranks;
* **per rank** (``rank-RRRRR.pt``, absent for ranks the saving job did not have): the
  RNG states.

The part names are the keys of the on-disk format (``FORMAT_VERSION`` 1): renaming
one would orphan the checkpoints already written.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from configs import ConfigError
from trainer.checkpoint import CheckpointError, CheckpointManager, head_shard_state, split_shard
from trainer.optim import load_optimizer_state
from trainer.rng import rng_state, set_rng_state

log = logging.getLogger("trainer")


@runtime_checkable
class Stateful(Protocol):
    """A part of a run that saves and restores itself (``torch.distributed.checkpoint``'s
    protocol). ``state_dict()`` returns tensors and plain containers only, as
    ``torch.load(weights_only=True)`` reads them back."""

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


class OptimizerState:
    """An optimizer's state; restored with :func:`~trainer.optim.load_optimizer_state`
    (the saved hyper-parameters, this build's ``fused``/``foreach`` flags)."""

    def __init__(self, optimizer: torch.optim.Optimizer) -> None:
        self.optimizer = optimizer

    def state_dict(self) -> dict[str, Any]:
        return self.optimizer.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        load_optimizer_state(self.optimizer, state)


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
            scheduler.load_state_dict(state[i] if i < len(state) else state[0])
            # A scheduler's state does not reach its optimizer; an optimizer whose own
            # state was in the checkpoint has this LR already, one that was not (centres
            # added on resume) gets the resumed step's LR here.
            for group, lr in zip(
                scheduler.optimizer.param_groups, scheduler.get_last_lr(), strict=True
            ):
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
    parameter (``None`` if nothing in it learns).

    The module has ``class_start`` and ``num_local`` (this rank's classes) and
    ``num_subcenters`` rows per class; ``row_keys`` name its state entries indexed by
    row (the rest, e.g. margins and step counters, are replicated). The optimizer's
    per-parameter tensors whose first dimension is the row count are row-indexed too
    (:mod:`partial_fc.optim`'s ``momentum_buffer``, ``exp_avg``, ``exp_avg_sq``,
    ``row_step``).
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
        return head_shard_state(
            self.module,
            self.optimizer,
            self.class_start,
            self.num_local,
            self.num_subcenters,
            row_keys=self.row_keys,
        )

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore from a state of exactly this rank's range (resharded by
        :meth:`CheckpointManager.load_shard` if another world size saved it)."""
        mine = (self.class_start, self.num_local, self.num_subcenters)
        theirs = (state["class_start"], state["num_local"], state["num_subcenters"])
        if mine != theirs:
            raise ValueError(
                f"shard state for (class_start, num_local, K) {theirs} given to {mine}"
            )
        model_state, optim_state = split_shard(state)
        self.module.load_state_dict(model_state)
        if self.optimizer is not None and optim_state["param_groups"]:
            load_optimizer_state(self.optimizer, optim_state)


@dataclass(frozen=True)
class Fact:
    """A property of the run recorded in ``meta.json`` that a resumed run must share.

    ``describe`` formats the saved value for the error, e.g. ``"{} classes"``."""

    value: Any
    option: str
    describe: str


class Checkpointer:
    """Saves and restores every stateful part of a run (see the module docstring).

    Args:
        storage: where checkpoints live (atomic directories, ``keep_last`` pruning).
        progress: the replicated part named ``progress``; its ``step`` names the
            checkpoint and its ``epoch`` is recorded in ``meta.json``.
        replicated: the other replicated parts, by name. Their ``state_dict`` is
            called on rank 0 only (it must not be a collective).
        sharded: the class-sharded parts, by name (``head`` is required in a
            checkpoint; the others may be missing from one written without them).
        per_rank: this rank's private parts, by name.
        facts: ``meta.json`` keys that a checkpoint must match to be resumed.
    """

    def __init__(
        self,
        storage: CheckpointManager,
        progress: Attributes,
        replicated: dict[str, Stateful],
        sharded: dict[str, ShardedModule],
        per_rank: dict[str, Stateful],
        facts: dict[str, Fact] | None = None,
    ) -> None:
        self.storage = storage
        self.progress = progress
        self.replicated: dict[str, Stateful] = {"progress": progress, **replicated}
        self.sharded = sharded
        self.per_rank = per_rank
        self.facts = facts or {}

    # ------------------------------------------------------------------ saving
    def save(self) -> Path:
        """Write a checkpoint of every part (collective: all ranks call it); return
        the checkpoint directory."""
        progress = self.progress.state_dict()
        ctx = self.storage.ctx
        shared = (
            {name: part.state_dict() for name, part in self.replicated.items()}
            if ctx.is_main
            else {}
        )
        return self.storage.save(
            progress["step"],
            shared,
            {name: part.state_dict() for name, part in self.sharded.items()},
            {name: part.state_dict() for name, part in self.per_rank.items()},
            extra_meta={
                **{key: fact.value for key, fact in self.facts.items()},
                "epoch": progress["epoch"],
            },
        )

    # ----------------------------------------------------------------- finding
    def latest(self) -> Path | None:
        """The newest complete checkpoint, or ``None``."""
        return self.storage.latest()

    def resolve(self, spec: str) -> Path | None:
        """The checkpoint ``checkpoint.resume=spec`` names: ``none`` none, ``auto`` the
        latest complete one (if any), otherwise a complete checkpoint directory."""
        if spec == "none":
            return None
        if spec == "auto":
            return self.latest()
        path = Path(spec)
        if not CheckpointManager.is_complete(path):
            raise ConfigError(f"checkpoint.resume: {spec!r} is not a complete checkpoint directory")
        return path

    # ----------------------------------------------------------------- loading
    def load(self, path: Path) -> dict[str, Any]:
        """Restore every part from ``path``, whatever world size saved it; return its
        ``meta.json``. Raises :class:`ConfigError` if a :class:`Fact` differs."""
        meta = CheckpointManager.read_meta(path)
        for key, fact in self.facts.items():
            saved = meta.get(key, fact.value)  # older checkpoints may lack a fact
            if saved != fact.value:
                raise ConfigError(
                    f"{fact.option}={fact.value} but checkpoint {path} has "
                    f"{fact.describe.format(saved)}"
                )
        ctx = self.storage.ctx
        shared = CheckpointManager.load_shared(path, ctx.device)
        missing = sorted(set(self.replicated) - set(shared))
        if missing:
            raise CheckpointError(f"{path / 'trainer.pt'} lacks {', '.join(missing)}")
        for name, part in self.replicated.items():
            part.load_state_dict(shared[name])
        for name, part in self.sharded.items():
            if name != "head" and not CheckpointManager.has_shards(path, name):
                if ctx.is_main:
                    log.warning("checkpoint %s has no %s shards: they start afresh", path, name)
                continue
            part.load_state_dict(
                CheckpointManager.load_shard(
                    path, name, part.class_start, part.num_local, part.num_subcenters
                )
            )
        rank_state = CheckpointManager.load_rank_state(path, ctx.rank)
        if rank_state is not None:  # a rank the saving job did not have keeps its seeds
            for name, part in self.per_rank.items():
                if name in rank_state:
                    part.load_state_dict(rank_state[name])
        progress = self.progress.state_dict()
        log.info(
            "resumed from %s (step %d, epoch %d, saved on %d ranks, now %d)",
            path,
            progress["step"],
            progress["epoch"],
            meta["world_size"],
            ctx.world_size,
        )
        return meta
