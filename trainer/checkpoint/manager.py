"""The checkpoint manager: saves every stateful part of a run and resumes them.

:class:`CheckpointManager` holds the run's parts by name (the adapters of
:mod:`~trainer.checkpoint.states`) in three scopes, which decide the file they go to:

* **replicated** (identical on every rank, saved by rank 0 into ``trainer.pt`` under
  their name): backbone, backbone optimizer, LR schedulers, grad scaler, progress
  (step, epoch), loader position, verification history, configuration;
* **class-sharded** (:class:`~trainer.checkpoint.states.ShardedModule`, one
  ``<name>-RRRRR.pt`` per rank): the head with its row-indexed optimizer state (and
  its margins' buffers), the centre loss with its optimizer. They are merged by global
  class on load (:mod:`~trainer.checkpoint.resharding`), so a run resumes on any
  number of ranks;
* **per rank** (``rank-RRRRR.pt``, absent for ranks the saving job did not have): the
  RNG states.

The part names are the keys of the on-disk format (format 2): renaming one would
orphan the checkpoints already written. Where and how the files are written is the
:class:`~trainer.checkpoint.storage.CheckpointStorage`'s business.

Resuming (:meth:`CheckpointManager.resume`): rank 0 lists the checkpoint directory
once (each ``meta.json`` read once, each listed file's size checked once) and every
rank works from that listing. Then, per checkpoint tried:

1. the format: format 2 only (an older or unrecorded format is skipped by ``auto``,
   a newer one stops the run);
2. the bytes: every file a rank reads is checked against its SHA-256; a damaged
   checkpoint is named and, under ``checkpoint.resume=auto``, skipped for the
   previous complete one (an explicitly named one is refused);
3. the configuration (:mod:`~trainer.checkpoint.policy`): the recorded facts and the
   saved configuration against this run's, every refused difference named in one
   :class:`~configs.ConfigError` before any state is loaded (never skipped past);
4. the values: the loaded weights and optimizer states must be finite;
5. the restore.

Lineages: every checkpoint records the lineage (``lineage``: an id; ``parent``: the
checkpoint its first run resumed from) of the run that wrote it. A run continues the
lineage of the checkpoint it resumed from when that is the newest of its lineage in
this run's directory, and starts a new one otherwise (a roll-back, a checkpoint of
another directory, a fresh start). ``checkpoint.keep_last`` prunes only the run's
own lineage, so a roll-back never deletes the checkpoint it resumed from, nor an
abandoned lineage's.
"""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from configs import ConfigError
from trainer.checkpoint.errors import (
    CheckpointError,
    DamagedCheckpointError,
    NonFiniteStateError,
    UnusableCheckpointError,
)
from trainer.checkpoint.policy import Fact, compare_configs
from trainer.checkpoint.states import Attributes, Recorded, ShardedModule, Stateful, nonfinite_parts
from trainer.checkpoint.storage import (
    FORMAT_VERSION,
    CheckpointDir,
    CheckpointStorage,
    resume_order,
)

log = logging.getLogger("trainer")


def new_lineage_id() -> str:
    """A fresh lineage id (unique per run that starts one)."""
    return uuid.uuid4().hex[:12]


@dataclass
class RunState:
    """One rank's state of every part, as the files take it: ``shared`` (rank 0's
    ``trainer.pt``; empty on the other ranks), ``shards`` (this rank's shard states by
    name), ``per_rank`` (``rank-RRRRR.pt``)."""

    step: int
    epoch: int
    shared: dict[str, Any]
    shards: dict[str, dict[str, Any]]
    per_rank: dict[str, Any]


class CheckpointManager:
    """Saves and restores every stateful part of a run (see the module docstring).

    Args:
        storage: where the checkpoints live (its ``ctx`` is the rank layout).
        progress: the replicated part named ``progress``; its ``step`` names the
            checkpoint and its ``epoch`` is recorded in ``meta.json``.
        replicated: the other replicated parts, by name. Their ``state_dict`` is
            called on rank 0 only (it must not be a collective). A :class:`Recorded`
            part named ``config`` (the configuration as JSON) is what a checkpoint's
            configuration is compared with on resume.
        sharded: the class-sharded parts, by name (``head`` is required in a
            checkpoint; the others may be missing from one written without them).
        per_rank: this rank's private parts, by name.
        facts: ``meta.json`` keys that a checkpoint must record and match to be resumed.
        keep_last: checkpoints of this run's lineage kept after each save.
    """

    def __init__(
        self,
        storage: CheckpointStorage,
        progress: Attributes,
        replicated: dict[str, Stateful],
        sharded: dict[str, ShardedModule],
        per_rank: dict[str, Stateful],
        facts: dict[str, Fact] | None = None,
        keep_last: int = 2,
    ) -> None:
        self.storage = storage
        self.ctx = storage.ctx
        self.progress = progress
        self.replicated: dict[str, Stateful] = {"progress": progress, **replicated}
        self.sharded = sharded
        self.per_rank = per_rank
        self.facts = facts or {}
        self.keep_last = keep_last
        self.lineage = new_lineage_id()
        """The lineage this run's checkpoints belong to (the only ones it prunes)."""
        self.parent: str | None = None
        """The checkpoint this lineage started from (``None``: a fresh start)."""
        self.resumed_config: dict[str, Any] | None = None
        """The configuration the resumed checkpoint was trained with (None: fresh)."""

    # ------------------------------------------------------------------ saving
    def collect(self) -> RunState:
        """Every part's state on this rank (replicated parts on rank 0 only)."""
        progress = self.progress.state_dict()
        shared = (
            {name: part.state_dict() for name, part in self.replicated.items()}
            if self.ctx.is_main
            else {}
        )
        return RunState(
            progress["step"],
            progress["epoch"],
            shared,
            {name: part.state_dict() for name, part in self.sharded.items()},
            {name: part.state_dict() for name, part in self.per_rank.items()},
        )

    def save(self) -> Path:
        """Write a checkpoint of every part (collective: all ranks call it); return
        the checkpoint directory. Raises :class:`NonFiniteStateError` on every rank,
        writing nothing, if any rank's state holds a NaN or Inf."""
        state = self.collect()
        bad = self.ctx.all_gather_object(nonfinite_parts({**state.shared, **state.shards}))
        named = sorted({f"{name} (rank {r})" for r, names in enumerate(bad) for name in names})
        if named:
            raise NonFiniteStateError(
                f"the state of step {state.step} holds NaN/Inf values in "
                f"{', '.join(named)}; no checkpoint written"
            )
        return self.write(state)

    def write(self, state: RunState) -> Path:
        """Write ``state`` as the checkpoint of its step with this run's facts and
        lineage (collective), then prune this lineage to ``keep_last``; no check of
        the values (:meth:`save` checks them)."""
        path = self.storage.save(
            state.step,
            state.shared,
            state.shards,
            state.per_rank,
            meta={
                "lineage": self.lineage,
                "parent": self.parent,
                **{key: fact.value for key, fact in self.facts.items()},
                "epoch": state.epoch,
            },
        )
        if self.ctx.is_main:
            self._prune()
        return path

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints of this run's lineage; other
        lineages' checkpoints (the one a roll-back resumed from, an abandoned run's)
        are never deleted here. A failed deletion is logged: the new checkpoint is
        written, and only rank 0 prunes."""
        own = [d for d in self.storage.scan() if d.complete and d.lineage == self.lineage]
        for ckpt in own[: max(len(own) - self.keep_last, 0)]:
            try:
                self.storage.discard(ckpt.path)
            except OSError as exc:
                log.warning("could not delete the old checkpoint %s: %s", ckpt.path, exc)

    # ----------------------------------------------------------------- finding
    def latest(self) -> Path | None:
        """The newest complete checkpoint of the newest lineage, or ``None``."""
        return self.storage.latest()

    def _look(self, spec: str) -> tuple[list[CheckpointDir], CheckpointDir | None]:
        """Rank 0: the run's checkpoint directory listed once, and the checkpoint
        ``spec`` names (``None`` for ``auto``)."""
        listing = self.storage.scan()
        if spec == "auto":
            return listing, None
        path = Path(spec)
        named = None
        if path.parent.resolve() == self.storage.directory.resolve():
            named = next((d for d in listing if d.path.name == path.name), None)
        if named is None:
            return listing, self.storage.open(path)
        return listing, replace(named, path=path)  # as the option spells it

    def _previous(self, named: CheckpointDir, listing: list[CheckpointDir]) -> Path | None:
        """Rank 0: the newest complete checkpoint before ``named`` in its directory."""
        same_dir = named.path.parent.resolve() == self.storage.directory.resolve()
        around = listing if same_dir else self.storage.scan(named.path.parent)
        earlier = [d for d in resume_order(around) if d.step < named.step]
        return earlier[0].path if earlier else None

    # ----------------------------------------------------------------- resuming
    def resume(self, spec: str) -> tuple[Path, dict[str, Any]] | None:
        """Resume from what ``checkpoint.resume=spec`` names (collective): ``none``
        nothing, ``auto`` the newest checkpoint that can be resumed, otherwise the
        checkpoint directory ``spec``. Returns the checkpoint and its ``meta.json``,
        or ``None`` for a fresh start.

        ``auto`` tries the checkpoints in :func:`~trainer.checkpoint.storage.
        resume_order`: an incomplete directory is skipped with a warning naming it
        and why, an unusable one (an older format, a missing or failed checksum,
        non-finite values) with an error naming why, falling back to the previous
        complete checkpoint; if none can be resumed the run stops. A named checkpoint
        that cannot be resumed is refused, naming the previous complete one. A
        configuration difference is never skipped past."""
        if spec == "none":  # the new lineage without a parent that __init__ started
            return None
        found = self.ctx.broadcast_object(self._look(spec) if self.ctx.is_main else None)
        listing, named = found
        if named is not None:
            return self._resume_named(spec, named, listing)
        return self._resume_auto(listing)

    def _resume_named(
        self, spec: str, named: CheckpointDir, listing: list[CheckpointDir]
    ) -> tuple[Path, dict[str, Any]]:
        if named.problem is not None:
            raise ConfigError(
                f"checkpoint.resume: {spec!r} is not a complete checkpoint directory: "
                f"{named.problem}"
            )
        try:
            meta = self.load(named)
        except UnusableCheckpointError as exc:
            previous = self.ctx.broadcast_object(
                self._previous(named, listing) if self.ctx.is_main else None
            )
            hint = f": resume from it with checkpoint.resume={previous}" if previous else ""
            raise type(exc)(
                f"checkpoint.resume={spec}: {exc}. The previous complete checkpoint is "
                f"{previous or 'none'}{hint}"
            ) from None
        self._follow_lineage(named, listing)
        return named.path, meta

    def _resume_auto(self, listing: list[CheckpointDir]) -> tuple[Path, dict[str, Any]] | None:
        candidates = resume_order(listing)
        chosen_step = candidates[0].step if candidates else -1
        if self.ctx.is_main:
            for ckpt in listing:
                if ckpt.problem is not None and ckpt.step > chosen_step:
                    log.warning(
                        "checkpoint.resume=auto: skipping %s, not a complete checkpoint: %s",
                        ckpt.path,
                        ckpt.problem,
                    )
        failures = []
        for i, ckpt in enumerate(candidates):
            try:
                meta = self.load(ckpt)
            except UnusableCheckpointError as exc:
                failures.append(str(exc))
                if self.ctx.is_main:
                    following = candidates[i + 1].path if i + 1 < len(candidates) else None
                    log.error(
                        "checkpoint.resume=auto: checkpoint %s %s: %s; falling back to %s",
                        ckpt.path,
                        "is damaged"
                        if isinstance(exc, DamagedCheckpointError)
                        else "cannot be resumed",
                        exc,
                        following or "nothing (no usable checkpoint left)",
                    )
                continue
            self._follow_lineage(ckpt, listing)
            return ckpt.path, meta
        if failures:
            raise UnusableCheckpointError(
                f"no checkpoint in {self.storage.directory} can be resumed: "
                f"{'; '.join(failures)}. Start afresh with checkpoint.resume=none (or "
                f"another train.output)"
            )
        return None  # a fresh start: the new lineage __init__ started

    def _start_lineage(self, parent: Path | None) -> None:
        self.lineage = new_lineage_id()
        self.parent = str(parent) if parent is not None else None

    def _follow_lineage(self, ckpt: CheckpointDir, listing: list[CheckpointDir]) -> None:
        """Continue ``ckpt``'s lineage if it is the newest checkpoint of it in this
        run's directory; otherwise (a roll-back, another directory) start a new one."""
        same_dir = ckpt.path.parent.resolve() == self.storage.directory.resolve()
        newer = [
            d for d in listing if d.complete and d.lineage == ckpt.lineage and d.step > ckpt.step
        ]
        if same_dir and not newer:
            self.lineage = ckpt.lineage
            self.parent = ckpt.meta.get("parent")
            return
        self._start_lineage(ckpt.path)
        if self.ctx.is_main:
            log.warning(
                "resumed from %s, %s: this run starts a new checkpoint lineage (%s); it "
                "keeps %s and never deletes checkpoints of other lineages",
                ckpt.path,
                f"an older checkpoint than {newer[-1].path.name} of its lineage"
                if newer
                else f"outside {self.storage.directory}",
                self.lineage,
                ckpt.path.name,
            )

    # ----------------------------------------------------------------- loading
    @staticmethod
    def _config_of(raw: Any, source: str) -> dict[str, Any] | None:
        """The configuration saved as JSON text in ``source``; ``None`` if none was
        saved. Anything else is refused (:class:`UnusableCheckpointError` naming
        ``source``): a configuration that cannot be read cannot be compared, and a resume
        without the comparison could silently change the run."""
        if raw is None:
            return None
        try:
            value = json.loads(raw) if isinstance(raw, str) else None
        except ValueError:
            value = None
        if not isinstance(value, dict):
            raise UnusableCheckpointError(
                f"{source} holds a config that is not a JSON object "
                f"({type(raw).__name__} {str(raw)[:40]!r}): it cannot be compared with this run's"
            )
        return value

    def check_compatible(self, ckpt: CheckpointDir, shared: dict[str, Any]) -> None:
        """Compare what ``ckpt`` was trained with (its facts, its saved configuration
        in ``shared``) with this run; raise one :class:`ConfigError` naming every
        difference a resume cannot take; log the allowed ones, which this run applies.
        A saved configuration that cannot be read raises :class:`UnusableCheckpointError`."""
        problems = []
        named = set()  # options whose fact differs: not repeated from the config below
        for key, fact in self.facts.items():
            why = fact.problem(ckpt.meta, key)
            if why is not None:
                problems.append(why)
                named.add(fact.option)
        saved_cfg = self._config_of(shared.get("config"), str(ckpt.path / "trainer.pt"))
        self.resumed_config = saved_cfg  # for the resume's batch-layout warning
        mine = self.replicated.get("config")
        current = self._config_of(mine.value, "this run") if isinstance(mine, Recorded) else None
        changed: list[tuple[str, Any, Any]] = []
        if saved_cfg is not None and current is not None:
            changed, refused = compare_configs(
                saved_cfg, current, ckpt.meta.get("world_size"), self.ctx.world_size
            )
            problems += [
                f"{key}: checkpoint {old!r}, now {new!r} ({why})"
                for key, old, new, why in refused
                if key not in named
            ]
        if problems:
            raise ConfigError(
                f"checkpoint {ckpt.path} cannot be resumed with this configuration:\n  "
                + "\n  ".join(problems)
                + "\nKeep these options as they were to resume, or start a fresh run with the "
                "new ones: train.output=<a new directory> (or checkpoint.resume=none, which "
                "keeps the existing checkpoints)"
            )
        if changed and self.ctx.is_main:
            log.warning(
                "resuming %s with changed options (applied from this step on): %s",
                ckpt.path,
                "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in changed),
            )

    def _files_to_read(self, ckpt: CheckpointDir) -> list[str]:
        """The files of ``ckpt`` this rank reads on load."""
        names = ["trainer.pt"]
        rank_file = f"rank-{self.ctx.rank:05d}.pt"
        if rank_file in ckpt.files:
            names.append(rank_file)
        for name, part in self.sharded.items():
            names += ckpt.shard_files(name, part.class_start, part.num_local)
        return names

    def _agree(self, error: CheckpointError | None) -> None:
        """Raise on every rank if any rank failed: :class:`DamagedCheckpointError`
        naming each failure, or :class:`UnusableCheckpointError` when none of them is
        about damaged bytes."""
        reports = self.ctx.all_gather_object(
            None
            if error is None
            else (
                type(error) is UnusableCheckpointError,
                str(error),
            )
        )
        failed = [(r, report) for r, report in enumerate(reports) if report is not None]
        if not failed:
            return
        message = "; ".join(
            f"rank {r}: {text}" if len(reports) > 1 else text for r, (_, text) in failed
        )
        if all(unusable for _, (unusable, _) in failed):
            raise UnusableCheckpointError(message)
        raise DamagedCheckpointError(message)

    def open(self, path: Path) -> CheckpointDir:
        """The checkpoint at ``path`` as rank 0 reads it (collective)."""
        return self.ctx.broadcast_object(self.storage.open(path) if self.ctx.is_main else None)

    def load(self, checkpoint: CheckpointDir | Path) -> dict[str, Any]:
        """Restore every part from ``checkpoint``, whatever world size saved it; return
        its ``meta.json`` (collective). Before anything is restored: its format
        (:class:`UnusableCheckpointError`), the files' checksums
        (:class:`DamagedCheckpointError`), the configuration (:meth:`check_compatible`:
        :class:`ConfigError`) and the loaded values' finiteness are checked."""
        ckpt = checkpoint if isinstance(checkpoint, CheckpointDir) else self.open(checkpoint)
        storage, ctx = self.storage, self.ctx
        if ckpt.problem is not None:
            raise CheckpointError(f"{ckpt.path} is not a complete checkpoint: {ckpt.problem}")
        found = ckpt.meta.get("format")
        if isinstance(found, int) and found > FORMAT_VERSION:
            raise CheckpointError(
                f"{ckpt.path} has checkpoint format {found}, newer than this trainer's "
                f"{FORMAT_VERSION}: resume it with the version that wrote it"
            )
        why = ckpt.format_problem()
        if why is not None:
            raise UnusableCheckpointError(f"{ckpt.path} {why}")
        # 1. bytes: every rank checks the files it reads
        error: CheckpointError | None = None
        shared: dict[str, Any] = {}
        try:
            storage.verify(ckpt, self._files_to_read(ckpt))
            shared = storage.read(ckpt, "trainer.pt", map_location=ctx.device)
        except CheckpointError as exc:
            error = exc
        self._agree(error)
        # 2. configuration: every difference at once, before any state is loaded
        self.check_compatible(ckpt, shared)
        missing = sorted(
            n for n, part in self.replicated.items()
            if n not in shared and not getattr(part, "optional", False)
        )  # fmt: skip
        if missing:
            raise CheckpointError(f"{ckpt.path / 'trainer.pt'} lacks {', '.join(missing)}")
        # 3. values: read every state, check it is finite
        shards: dict[str, dict[str, Any]] = {}
        rank_state = None
        error = None
        try:
            for name, part in self.sharded.items():
                if name != "head" and not ckpt.has_shards(name):
                    continue
                shards[name] = storage.load_shard(
                    ckpt, name, part.class_start, part.num_local, part.num_subcenters
                )
            rank_file = f"rank-{ctx.rank:05d}.pt"
            if rank_file in ckpt.files:
                rank_state = storage.read(ckpt, rank_file)
            bad = nonfinite_parts({**shared, **{n: s["model"] for n, s in shards.items()}})
            bad += [
                f"{n} optimizer"
                for n in nonfinite_parts({n: s["optim_state"] for n, s in shards.items()})
            ]
            if bad:
                error = DamagedCheckpointError(
                    f"{ckpt.path} holds NaN/Inf values in {', '.join(bad)} (saved during a "
                    f"divergence by an earlier version of the trainer?)"
                )
        except CheckpointError as exc:
            error = exc
        self._agree(error)
        # 4. restore
        for name, part in self.replicated.items():
            if name in shared:  # (an optional part may be absent: see ``missing``)
                part.load_state_dict(shared[name])
        for name, part in self.sharded.items():
            if name not in shards:
                if ctx.is_main:
                    log.warning(
                        "checkpoint %s has no %s shards: they start afresh", ckpt.path, name
                    )
                continue
            part.load_state_dict(shards[name])
        if rank_state is not None:  # a rank the saving job did not have keeps its seeds
            for name, part in self.per_rank.items():
                if name in rank_state:
                    part.load_state_dict(rank_state[name])
        progress = self.progress.state_dict()
        log.info(
            "resumed from %s (step %d, epoch %d, saved on %d ranks, now %d)",
            ckpt.path,
            progress["step"],
            progress["epoch"],
            ckpt.meta["world_size"],
            ctx.world_size,
        )
        return ckpt.meta
