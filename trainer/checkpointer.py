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

The part names are the keys of the on-disk format (``FORMAT_VERSION`` 2): renaming
one would orphan the checkpoints already written.

Resuming (:meth:`Checkpointer.resume`) is one check, then the restore:

1. the bytes: every file a rank reads is checked against its SHA-256 in
   ``meta.json``; a damaged checkpoint is named and, under ``checkpoint.resume=auto``,
   skipped for the previous complete one (an explicitly named one is refused);
2. the configuration: the checkpoint's saved configuration (its ``config`` part) is
   compared with this run's, option by option (:func:`compare_configs`). Options in
   :data:`RESUME_MAY_CHANGE` may differ and take their new value (logged); any other
   difference (network, head kind and margins, classes, sub-centres, optimizer type,
   seed, data size or sampler) is refused with one :class:`ConfigError` naming every
   difference, before any state is loaded;
3. the values: the loaded weights and optimizer states must be finite;
4. the restore. Optimizer hyper-parameters (momentum, weight decay, betas, eps) and
   the learning rate's peak come from this run's configuration, not the checkpoint's.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch
from torch import nn

from common.rng import rng_state, set_rng_state
from configs import ConfigError
from trainer.checkpoint import (
    FORMAT_VERSION,
    CheckpointError,
    CheckpointManager,
    DamagedCheckpointError,
    head_shard_state,
    new_lineage_id,
    split_shard,
)
from trainer.optim import load_optimizer_state

log = logging.getLogger("trainer")

#: Options a resumed run may change; they take their new value (logged). A name ending
#: in ``.`` covers its whole section. Every other option must equal the checkpoint's.
RESUME_MAY_CHANGE: tuple[str, ...] = (
    "name",
    # the schedule and its length
    "optimizer.lr",
    "optimizer.momentum",
    "optimizer.weight_decay",
    "optimizer.betas",
    "optimizer.eps",
    "optimizer.head_state_dtype",
    "optimizer.backbone_lr_mult",
    "scheduler.",
    "train.epochs",
    "train.max_steps",
    # how the steps are computed, not what is learned
    "train.grad_accum",
    "train.clip_grad_norm",
    "train.amp",
    "train.max_bad_steps",
    "train.collective_timeout_s",
    "train.output",
    "train.overwrite",
    "data.root",
    "data.batch_size",
    "data.num_workers",
    "data.random_flip",
    "data.skip_corrupt",
    "data.max_skipped_fraction",
    "augment.",
    "head.sample_rate",
    "head.chunk_size",
    "head.matmul_dtype",
    "head.backend",
    "head.interclass_filtering_threshold",
    "head.interclass_filtering_mode",
    # fine-tuning: how a new run starts (a resume's checkpoint wins), BatchNorm updates
    "model.init_from",
    "head.init",
    "model.freeze_bn_stats",
    "aux.",
    "checkpoint.",
    "eval.",
    "log.",
)

#: Why an option may not change on resume (the refusal names the reason).
_FIXED_WHY = {
    "model.freeze_": "the backbone optimizer's parameters are the checkpoint's",
    "optimizer.weight_decay_exclude_norm_bias": "the backbone optimizer's parameter "
    "groups are the checkpoint's",
    "model.": "the network's parameters are the checkpoint's",
    "head.num_subcenters": "the head's rows are the checkpoint's",
    "head.": "the head kind and its margins are part of what was learned",
    "data.num_classes": "the head's rows are the checkpoint's",
    "data.num_images": "the sampler's position is an index into the checkpoint's data",
    "data.sampler": "the sampler's position is the checkpoint's sampler's",
    "data.pk_": "the sampler's position is the checkpoint's sampler's",
    "data.weights": "the epoch's sample order is drawn from them (the sampler's position "
    "indexes it)",
    "optimizer.name": "the optimizer state is the checkpoint's optimizer's",
    "train.seed": "the data order and sampling streams are seeded by it",
}


def _may_change(key: str) -> bool:
    return any(key == o or (o.endswith(".") and key.startswith(o)) for o in RESUME_MAY_CHANGE)


def _why_fixed(key: str) -> str:
    for prefix, why in _FIXED_WHY.items():
        if key == prefix or (prefix.endswith((".", "_")) and key.startswith(prefix)):
            return why
    return "a resumed run must keep it"


def _flatten(config: dict[str, Any]) -> dict[str, Any]:
    """``{"section.field": value}`` (one level: ``model.kwargs`` stays one value)."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            for field, v in value.items():
                out[f"{key}.{field}"] = v
        else:
            out[key] = value
    return out


def upgrade_v1_config(saved: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A format-1 checkpoint's configuration as this version builds it, and the keywords
    added: the network's ``model.kwargs`` gain those that rebuild its format-1
    architecture (:func:`backbones.weights.v1_model_kwargs`: ``mbf``'s depthwise stage
    0, the format-1 ViT layout), so the resumed run must pass them too."""
    from backbones.weights import v1_model_kwargs

    model = saved.get("model")
    if not isinstance(model, dict) or not isinstance(model.get("network"), str):
        return saved, {}
    kwargs = model.get("kwargs") if isinstance(model.get("kwargs"), dict) else {}
    extra = v1_model_kwargs(model["network"], kwargs)
    if not extra:
        return saved, {}
    return {**saved, "model": {**model, "kwargs": {**kwargs, **extra}}}, extra


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, float) and isinstance(b, float) and math.isnan(a) and math.isnan(b):
        return True
    return a == b


def compare_configs(
    saved: dict[str, Any],
    current: dict[str, Any],
    saved_world: int | None = None,
    world: int | None = None,
) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any, str]]]:
    """Compare a checkpoint's configuration with this run's (both as
    ``configs.config_to_dict`` gives them). Returns ``(changed, refused)``:
    ``(option, old, new)`` for each allowed change and ``(option, old, new, why)`` for
    each difference a resume cannot take. Options only one side knows (added or
    removed since the checkpoint was written) are not compared."""
    old, new = _flatten(saved), _flatten(current)
    changed: list[tuple[str, Any, Any]] = []
    refused: list[tuple[str, Any, Any, str]] = []
    for key in new:
        if key not in old or _same(old[key], new[key]):
            continue
        if _may_change(key):
            changed.append((key, old[key], new[key]))
        else:
            refused.append((key, old[key], new[key], _why_fixed(key)))
    # The P x K sampler's position counts identities per global batch: batch x ranks.
    if (
        new.get("data.sampler") == "pk"
        and old.get("data.sampler") == "pk"
        and saved_world is not None
        and world is not None
        and "data.batch_size" in old
    ):
        before, after = old["data.batch_size"] * saved_world, new["data.batch_size"] * world
        if before != after:
            refused.append(
                (
                    "data.batch_size x world size",
                    f"{old['data.batch_size']} x {saved_world} = {before}",
                    f"{new['data.batch_size']} x {world} = {after}",
                    "the P x K sampler's position counts identities per global batch",
                )
            )
    return changed, refused


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
            load_keeping_hyperparameters(self.optimizer, optim_state)


@dataclass(frozen=True)
class Fact:
    """A property of the run recorded in ``meta.json`` that a resumed run must share.

    ``describe`` formats the saved value for the error, e.g. ``"{} classes"``. ``check``,
    if given, replaces the equality test: ``check(saved, value)`` returns why the
    checkpoint cannot be resumed, or ``None``; ``saved`` is ``None`` for a checkpoint
    that does not record the fact (without ``check`` such a checkpoint passes)."""

    value: Any
    option: str
    describe: str
    check: Callable[[Any, Any], str | None] | None = None


class NonFiniteStateError(CheckpointError):
    """The state to be saved holds NaN or Inf values; nothing was written."""


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


class Checkpointer:
    """Saves and restores every stateful part of a run (see the module docstring).

    Args:
        storage: where checkpoints live (atomic directories, ``keep_last`` pruning).
        progress: the replicated part named ``progress``; its ``step`` names the
            checkpoint and its ``epoch`` is recorded in ``meta.json``.
        replicated: the other replicated parts, by name. Their ``state_dict`` is
            called on rank 0 only (it must not be a collective). A :class:`Recorded`
            part named ``config`` (the configuration as JSON) is what a checkpoint's
            configuration is compared with on resume.
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
        self.resumed_config: dict[str, Any] | None = None
        """The configuration the resumed checkpoint was trained with (None: fresh)."""

    # ------------------------------------------------------------------ saving
    def save(self) -> Path:
        """Write a checkpoint of every part (collective: all ranks call it); return
        the checkpoint directory. Raises :class:`NonFiniteStateError` on every rank,
        writing nothing, if any rank's state holds a NaN or Inf."""
        progress = self.progress.state_dict()
        ctx = self.storage.ctx
        shared = (
            {name: part.state_dict() for name, part in self.replicated.items()}
            if ctx.is_main
            else {}
        )
        shards = {name: part.state_dict() for name, part in self.sharded.items()}
        bad = ctx.all_gather_object(nonfinite_parts({**shared, **shards}))
        named = sorted({f"{name} (rank {r})" for r, names in enumerate(bad) for name in names})
        if named:
            raise NonFiniteStateError(
                f"the state of step {progress['step']} holds NaN/Inf values in "
                f"{', '.join(named)}; no checkpoint written"
            )
        return self.storage.save(
            progress["step"],
            shared,
            shards,
            {name: part.state_dict() for name, part in self.per_rank.items()},
            extra_meta={
                **{key: fact.value for key, fact in self.facts.items()},
                "epoch": progress["epoch"],
            },
        )

    # ----------------------------------------------------------------- finding
    def latest(self) -> Path | None:
        """The newest complete checkpoint of the newest lineage, or ``None``."""
        return self.storage.latest()

    def resolve(self, spec: str) -> Path | None:
        """The checkpoint ``checkpoint.resume=spec`` names: ``none`` none, ``auto`` the
        latest complete one (if any), otherwise a complete checkpoint directory."""
        if spec == "none":
            return None
        if spec == "auto":
            return self.latest()
        path = Path(spec)
        why = CheckpointManager.why_incomplete(path)
        if why is not None:
            raise ConfigError(
                f"checkpoint.resume: {spec!r} is not a complete checkpoint directory: {why}"
            )
        return path

    # ----------------------------------------------------------------- resuming
    def resume(self, spec: str) -> tuple[Path, dict[str, Any]] | None:
        """Resume from what ``checkpoint.resume=spec`` names (collective); return the
        checkpoint and its ``meta.json``, or ``None`` for a fresh start.

        ``auto`` tries :meth:`CheckpointManager.candidates` in turn: a directory that
        is not complete is skipped with a warning naming it and why, and so is a
        damaged one (checksum, unreadable file, non-finite values), falling back to the
        previous complete checkpoint; if none is intact the run stops. A named
        checkpoint that is damaged is refused (naming the previous complete one).
        A configuration difference (:func:`compare_configs`) is never skipped past."""
        ctx = self.storage.ctx
        if spec == "none":
            self._start_lineage(None)
            return None
        if spec != "auto":
            path = self.resolve(spec)
            assert path is not None
            try:
                meta = self.load(path)
            except DamagedCheckpointError as exc:
                previous = [
                    p
                    for p in CheckpointManager(path.parent, ctx, 1).candidates()
                    if p.resolve() != path.resolve()
                    and CheckpointManager.step_of(p)
                    < int(CheckpointManager.read_meta(path)["step"])
                ]
                raise DamagedCheckpointError(
                    f"checkpoint.resume={spec}: {exc}. The previous complete checkpoint is "
                    f"{previous[0] if previous else 'none'}"
                    + (f": resume from it with checkpoint.resume={previous[0]}" if previous else "")
                ) from None
            self._follow_lineage(path, meta)
            return path, meta
        # rank 0 decides what there is, so every rank tries the same checkpoints
        found = ctx.broadcast_object(
            (self.storage.candidates(), self.storage.incomplete()) if ctx.is_main else None
        )
        candidates, incomplete = found
        chosen_step = CheckpointManager.step_of(candidates[0]) if candidates else -1
        if ctx.is_main:
            for path, why in incomplete:
                if CheckpointManager.step_of(path) > chosen_step:
                    log.warning(
                        "checkpoint.resume=auto: skipping %s, not a complete checkpoint: %s",
                        path,
                        why,
                    )
        failures = []
        for i, path in enumerate(candidates):
            try:
                meta = self.load(path)
            except DamagedCheckpointError as exc:
                following = candidates[i + 1] if i + 1 < len(candidates) else None
                failures.append(str(exc))
                if ctx.is_main:
                    log.error(
                        "checkpoint.resume=auto: checkpoint %s is damaged: %s; falling back to %s",
                        path,
                        exc,
                        following or "nothing (no intact checkpoint left)",
                    )
                continue
            self._follow_lineage(path, meta)
            return path, meta
        if failures:
            raise DamagedCheckpointError(
                f"no intact checkpoint in {self.storage.directory}: {'; '.join(failures)}. "
                f"Start afresh with checkpoint.resume=none (or another train.output)"
            )
        self._start_lineage(None)
        return None

    def _start_lineage(self, parent: Path | None) -> None:
        self.storage.lineage = new_lineage_id()
        self.storage.parent = str(parent) if parent is not None else None

    def _follow_lineage(self, path: Path, meta: dict[str, Any]) -> None:
        """Continue ``path``'s lineage if it is the newest checkpoint of it in this
        run's directory; otherwise (a roll-back, another directory) start a new one."""
        storage = self.storage
        lineage = str(meta.get("lineage") or "")
        same_dir = path.parent.resolve() == storage.directory.resolve()
        newer = [
            p
            for p in storage.complete()
            if storage.lineage_of(p) == lineage and CheckpointManager.step_of(p) > int(meta["step"])
        ]
        if same_dir and not newer:
            storage.lineage = lineage
            storage.parent = meta.get("parent")
            return
        self._start_lineage(path)
        if storage.ctx.is_main:
            log.warning(
                "resumed from %s, %s: this run starts a new checkpoint lineage (%s); it "
                "keeps %s and never deletes checkpoints of other lineages",
                path,
                f"an older checkpoint than {newer[-1].name} of its lineage"
                if newer
                else f"outside {storage.directory}",
                storage.lineage,
                path.name,
            )

    # ----------------------------------------------------------------- loading
    def _saved_config(self, shared: dict[str, Any]) -> dict[str, Any] | None:
        raw = shared.get("config")
        if not isinstance(raw, str):
            return None
        try:
            value = json.loads(raw)
        except ValueError:
            return None
        return value if isinstance(value, dict) else None

    def check_compatible(self, path: Path, meta: dict[str, Any], shared: dict[str, Any]) -> None:
        """Compare what ``path`` was trained with (its facts, its saved configuration)
        with this run; raise one :class:`ConfigError` naming every difference a resume
        cannot take; log the allowed ones, which this run applies."""
        problems = []
        named = set()  # options whose fact differs: not repeated from the config below
        for key, fact in self.facts.items():
            if fact.check is not None:
                why = fact.check(meta.get(key), fact.value)
                if why is not None:
                    problems.append(f"{fact.option}: {why}")
                    named.add(fact.option)
                continue
            saved = meta.get(key, fact.value)  # older checkpoints may lack a fact
            if saved != fact.value:
                problems.append(
                    f"{fact.option}={fact.value} but the checkpoint has "
                    f"{fact.describe.format(saved)}"
                )
                named.add(fact.option)
        saved_cfg = self._saved_config(shared)
        legacy_kwargs: dict[str, Any] = {}
        if saved_cfg is not None and int(meta.get("format", 1)) < 2:
            saved_cfg, legacy_kwargs = upgrade_v1_config(saved_cfg)
        self.resumed_config = saved_cfg  # for the resume's batch-layout warning
        mine = self.replicated.get("config")
        current = self._saved_config({"config": mine.value}) if isinstance(mine, Recorded) else None
        changed: list[tuple[str, Any, Any]] = []
        if saved_cfg is not None and current is not None:
            changed, refused = compare_configs(
                saved_cfg, current, meta.get("world_size"), self.storage.ctx.world_size
            )
            problems += [
                f"{key}: checkpoint {old!r}, now {new!r} ({why})"
                for key, old, new, why in refused
                if key not in named
            ]
            if legacy_kwargs and any(key == "model.kwargs" for key, *_ in refused):
                problems.append(
                    "(a format-1 checkpoint: its network is this version's with "
                    + ", ".join(f"model.kwargs.{k}={v!r}" for k, v in legacy_kwargs.items())
                    + ", see docs/backbones.md)"
                )
        if problems:
            raise ConfigError(
                f"checkpoint {path} cannot be resumed with this configuration:\n  "
                + "\n  ".join(problems)
                + "\nKeep these options as they were to resume, or start a fresh run with the "
                "new ones: train.output=<a new directory> (or checkpoint.resume=none, which "
                "keeps the existing checkpoints)"
            )
        if changed and self.storage.ctx.is_main:
            log.warning(
                "resuming %s with changed options (applied from this step on): %s",
                path,
                "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed),
            )

    def _files_to_read(self, path: Path, meta: dict[str, Any]) -> list[str]:
        """The files of ``path`` this rank reads on load."""
        ctx = self.storage.ctx
        names = ["trainer.pt"]
        if f"rank-{ctx.rank:05d}.pt" in meta.get("files", {}):
            names.append(f"rank-{ctx.rank:05d}.pt")
        for name, part in self.sharded.items():
            names += CheckpointManager.shard_files(
                path, name, part.class_start, part.num_local, part.num_subcenters
            )
        return names

    def _agree(self, error: str | None) -> None:
        """Raise :class:`DamagedCheckpointError` on every rank if any rank failed."""
        errors = self.storage.ctx.all_gather_object(error)
        failed = [f"rank {r}: {e}" if len(errors) > 1 else e for r, e in enumerate(errors) if e]
        if failed:
            raise DamagedCheckpointError("; ".join(failed))

    def load(self, path: Path) -> dict[str, Any]:
        """Restore every part from ``path``, whatever world size saved it; return its
        ``meta.json`` (collective). Before anything is restored: the files' checksums
        (:class:`DamagedCheckpointError`), the configuration (:meth:`check_compatible`:
        :class:`ConfigError`) and the loaded values' finiteness are checked."""
        meta = CheckpointManager.read_meta(path)
        ctx = self.storage.ctx
        if int(meta.get("format", 1)) > FORMAT_VERSION:
            raise CheckpointError(
                f"{path} has checkpoint format {meta['format']}, newer than this trainer's "
                f"{FORMAT_VERSION}: resume it with the version that wrote it"
            )
        # 1. bytes: every rank checks the files it reads
        error = None
        try:
            CheckpointManager.verify(path, self._files_to_read(path, meta))
            shared = CheckpointManager.load_shared(path, ctx.device)
        except CheckpointError as exc:
            error = str(exc)
        self._agree(error)
        # 2. configuration: every difference at once, before any state is loaded
        self.check_compatible(path, meta, shared)
        missing = sorted(set(self.replicated) - set(shared))
        if missing:
            raise CheckpointError(f"{path / 'trainer.pt'} lacks {', '.join(missing)}")
        # 3. values: read every state, check it is finite
        shards: dict[str, dict[str, Any]] = {}
        error = None
        try:
            for name, part in self.sharded.items():
                if name != "head" and not CheckpointManager.has_shards(path, name):
                    continue
                shards[name] = CheckpointManager.load_shard(
                    path, name, part.class_start, part.num_local, part.num_subcenters
                )
            rank_state = CheckpointManager.load_rank_state(path, ctx.rank)
            bad = nonfinite_parts({**shared, **{n: s["model"] for n, s in shards.items()}})
            bad += [
                f"{n} optimizer"
                for n in nonfinite_parts({n: s["optim_state"] for n, s in shards.items()})
            ]
            if bad:
                error = (
                    f"{path} holds NaN/Inf values in {', '.join(bad)} (saved during a "
                    f"divergence by an earlier version of the trainer?)"
                )
        except CheckpointError as exc:
            error = str(exc)
        self._agree(error)
        # 4. restore
        for name, part in self.replicated.items():
            part.load_state_dict(shared[name])
        for name, part in self.sharded.items():
            if name not in shards:
                if ctx.is_main:
                    log.warning("checkpoint %s has no %s shards: they start afresh", path, name)
                continue
            part.load_state_dict(shards[name])
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
