"""Checkpoint directories on a file system every rank shares (format 2).

Layout of ``<output>/checkpoints/step-00001234/``::

    meta.json            written last; lists every file with its size and SHA-256,
                         the class shards, the lineage and the run's recorded facts
    trainer.pt           rank 0: the replicated parts by name (backbone, its optimizer,
                         schedulers, grad scaler, progress, loader position, history)
    head-00000.pt ...    one per saving rank: its head rows and the head optimizer's
                         row state, with the rank's global class range
    center-00000.pt ...  the same for other class-sharded modules (the centre loss)
    rank-00000.pt ...    one per saving rank: its private parts (RNG states)

Atomicity: every rank writes into ``.tmp-step-XXXXXXXX/``; after every rank's files
are written rank 0 writes ``meta.json`` (fsynced) and renames the directory to its
final name, which is atomic on POSIX file systems. A crash leaves either no new
directory or a ``.tmp-*`` one, which is never listed. Checkpoints are deleted by
renaming them to ``.trash-*`` first, so a crash while deleting cannot leave a
half-deleted directory that looks complete.

Reading: :meth:`CheckpointStorage.open` reads a checkpoint's ``meta.json`` once and
checks the size of every file it lists once, giving a :class:`CheckpointDir`, a
picklable snapshot that everything else works from (rank 0 opens, the other ranks
receive the snapshot). :meth:`CheckpointStorage.verify` checks a file's bytes against
its recorded SHA-256 before it is trusted.

Every file-system access goes through the primitives :meth:`CheckpointStorage.read_meta`,
:meth:`~CheckpointStorage.file_size`, :meth:`~CheckpointStorage.read_file`,
:meth:`~CheckpointStorage.digest` and :meth:`~CheckpointStorage.write_file`: a test
passes the trainer a storage that overrides them (to count or to fail).
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.digest import sha256_file
from common.dist import DistContext
from trainer.checkpoint.errors import CheckpointError, DamagedCheckpointError
from trainer.checkpoint.files import (
    attempt,
    fsync_path,
    load_file,
    save_file,
    write_error,
)
from trainer.checkpoint.resharding import overlapping, reshard, split_shard

#: ``meta.json``'s ``format``: the files and parts above, the backbone's ``state_dict``
#: under arcface_torch's names (see :mod:`backbones.weights`), a SHA-256 for every file.
FORMAT_VERSION = 2

#: Final names of checkpoint directories; the number is the step.
STEP_DIR = re.compile(r"^step-(\d{8})$")

log = logging.getLogger("trainer")


def shards_key(name: str) -> str:
    """``meta.json``'s key listing the shards called ``name`` (``shards`` for the head)."""
    return "shards" if name == "head" else f"{name}_shards"


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


@dataclass(frozen=True)
class CheckpointDir:
    """One checkpoint directory as read once: its ``meta.json`` (empty if it has
    none) and why it is not complete (``None`` if every listed file is there at its
    recorded size). Plain data: rank 0 reads it, every rank uses the same view."""

    path: Path
    meta: dict[str, Any] = field(default_factory=dict)
    problem: str | None = None

    @property
    def complete(self) -> bool:
        return self.problem is None

    @property
    def step(self) -> int:
        """The step in the directory's name (``meta.json``'s for another name)."""
        match = STEP_DIR.match(self.path.name)
        return int(match.group(1)) if match else int(self.meta.get("step", -1))

    @property
    def lineage(self) -> str:
        """The lineage id of the run that wrote it (``""``: none recorded)."""
        return str(self.meta.get("lineage") or "")

    @property
    def written(self) -> float:
        """When it was written (seconds since the epoch; 0 if unrecorded)."""
        try:
            return float(self.meta.get("time", 0.0))
        except (TypeError, ValueError):
            return 0.0

    @property
    def files(self) -> dict[str, int]:
        """Every file of the checkpoint with its size in bytes."""
        files = self.meta.get("files")
        return files if isinstance(files, dict) else {}

    def format_problem(self) -> str | None:
        """Why this trainer does not resume from it by its ``format``, as a phrase
        after its path (``None``: it does). A format newer than :data:`FORMAT_VERSION`
        is not a problem here: the manager refuses it on its own (resume it with the
        version that wrote it)."""
        found = self.meta.get("format")
        if not isinstance(found, int) or isinstance(found, bool):
            return (
                f"records no checkpoint format in its meta.json (this trainer reads format "
                f"{FORMAT_VERSION}, with a SHA-256 for every file)"
            )
        if found < FORMAT_VERSION:
            return f"has checkpoint format {found}; this trainer reads format {FORMAT_VERSION} only"
        return None

    def shard_infos(self, name: str) -> list[dict[str, Any]]:
        """The ``meta.json`` entries of the shards called ``name`` (``file``,
        ``class_start``, ``num_local``, ``K``), in saving-rank order."""
        return list(self.meta.get(shards_key(name), []))

    def has_shards(self, name: str) -> bool:
        return shards_key(name) in self.meta

    def shard_files(self, name: str, class_start: int, num_local: int) -> list[str]:
        """The ``name`` shard files holding classes ``[class_start, class_start +
        num_local)`` (all of them for an empty range): the files a rank of that range
        reads."""
        return [
            info["file"] for info in overlapping(self.shard_infos(name), class_start, num_local)
        ]


def resume_order(dirs: list[CheckpointDir]) -> list[CheckpointDir]:
    """The complete checkpoints of ``dirs`` in the order ``checkpoint.resume=auto``
    tries them: the newest lineage's (the lineage of the most recently written
    checkpoint), newest step first, then the other lineages' checkpoints, most recently
    written first."""
    done = [d for d in dirs if d.complete]
    if not done:
        return []
    lineage = max(done, key=lambda d: (d.written, d.step)).lineage
    own = sorted((d for d in done if d.lineage == lineage), key=lambda d: d.step, reverse=True)
    rest = sorted(
        (d for d in done if d.lineage != lineage), key=lambda d: (d.written, d.step), reverse=True
    )
    return own + rest


class CheckpointStorage:
    """The checkpoints under ``directory``: writing them atomically, listing them,
    reading and checking their files.

    Args:
        directory: ``<output>/checkpoints``, shared by all ranks.
        ctx: the rank layout; :meth:`save` is collective over it (reading is not).
    """

    def __init__(self, directory: str | os.PathLike[str], ctx: DistContext | None = None) -> None:
        self.directory = Path(directory)
        self.ctx = ctx if ctx is not None else DistContext()

    # ------------------------------------------------------------- primitives
    def read_meta(self, checkpoint: Path) -> dict[str, Any]:
        """``checkpoint/meta.json`` parsed. Raises ``OSError`` (``FileNotFoundError``
        when absent) or ``ValueError``."""
        meta = json.loads((checkpoint / "meta.json").read_text())
        if not isinstance(meta, dict):
            raise ValueError(f"a JSON {type(meta).__name__}, not an object")
        return meta

    def file_size(self, path: Path) -> int | None:
        """The size of ``path`` in bytes, ``None`` if there is no such file."""
        try:
            return path.stat().st_size
        except FileNotFoundError:
            return None

    def read_file(
        self, path: Path, map_location: torch.device | str = "cpu", mmap: bool = False
    ) -> Any:
        """One checkpoint file, read with ``weights_only=True`` (:func:`files.load_file`)."""
        return load_file(path, map_location=map_location, mmap=mmap)

    def digest(self, path: Path) -> str:
        """The SHA-256 of ``path``'s bytes."""
        return sha256_file(path)

    def write_file(self, obj: Any, path: Path) -> str:
        """Write ``obj`` durably to ``path`` (:func:`files.save_file`); return the
        SHA-256 of the bytes written."""
        return save_file(obj, path)

    # ---------------------------------------------------------------- finding
    def open(self, path: str | os.PathLike[str]) -> CheckpointDir:
        """Read the checkpoint at ``path``: ``meta.json`` once, the size of every file
        it lists once."""
        path = Path(path)
        try:
            meta = self.read_meta(path)
        except FileNotFoundError:
            return CheckpointDir(path, {}, "it has no meta.json (a save that did not finish)")
        except (OSError, ValueError) as exc:
            return CheckpointDir(path, {}, f"its meta.json is unreadable ({exc})")
        files = meta.get("files")
        if not isinstance(files, dict):
            return CheckpointDir(path, meta, "its meta.json does not list its files")
        for name, size in files.items():
            try:
                actual = self.file_size(path / name)
            except OSError as exc:
                return CheckpointDir(path, meta, f"{name} cannot be read ({exc})")
            if actual is None:
                return CheckpointDir(path, meta, f"{name} is missing")
            if actual != size:
                return CheckpointDir(
                    path, meta, f"{name} has {actual} bytes, meta.json records {size} (truncated?)"
                )
        return CheckpointDir(path, meta, None)

    def scan(self, directory: Path | None = None) -> list[CheckpointDir]:
        """Every ``step-*`` directory under ``directory`` (default: this storage's),
        complete or not, oldest step first; temporary and trash directories excluded."""
        directory = self.directory if directory is None else directory
        if not directory.is_dir():
            return []
        found = [self.open(p) for p in directory.iterdir() if STEP_DIR.match(p.name)]
        return sorted(found, key=lambda d: d.step)

    def complete(self) -> list[Path]:
        """The complete checkpoints, oldest step first."""
        return [d.path for d in self.scan() if d.complete]

    def latest(self) -> Path | None:
        """The newest complete checkpoint of the newest lineage, or ``None``."""
        found = resume_order(self.scan())
        return found[0].path if found else None

    # ---------------------------------------------------------------- reading
    def verify(self, checkpoint: CheckpointDir, names: list[str]) -> None:
        """Check the files ``names`` of ``checkpoint`` against the SHA-256 its
        ``meta.json`` records; raise :class:`DamagedCheckpointError` naming the first
        that differs, cannot be read or has no recorded checksum (format 2 records one
        for every file)."""
        sums = checkpoint.meta.get("sha256")
        sums = sums if isinstance(sums, dict) else {}
        for name in names:
            path = checkpoint.path / name
            expected = sums.get(name)
            if not isinstance(expected, str):
                raise DamagedCheckpointError(
                    f"{path} has no SHA-256 in meta.json (format {FORMAT_VERSION} records one "
                    f"for every file): its bytes cannot be checked"
                )
            try:
                actual = self.digest(path)
            except OSError as exc:
                raise DamagedCheckpointError(f"{path} cannot be read: {exc}") from None
            if actual != expected:
                raise DamagedCheckpointError(
                    f"{path} fails its checksum: sha256 {actual[:16]}... but meta.json "
                    f"records {expected[:16]}... (its bytes changed after the save)"
                )

    def read(
        self,
        checkpoint: CheckpointDir,
        name: str,
        map_location: torch.device | str = "cpu",
        mmap: bool = False,
    ) -> Any:
        """The file ``name`` of ``checkpoint`` (see :meth:`read_file`)."""
        return self.read_file(checkpoint.path / name, map_location=map_location, mmap=mmap)

    def load_shard(
        self,
        checkpoint: CheckpointDir,
        name: str,
        class_start: int,
        num_local: int,
        num_subcenters: int,
    ) -> dict[str, Any]:
        """The ``name`` shards of ``checkpoint`` merged for classes ``[class_start,
        class_start + num_local)`` (:func:`resharding.reshard`), whatever world size
        wrote them; only the shard files holding rows of that range are read
        (memory-mapped). Raises :class:`CheckpointError` if it holds no such shards,
        ``ValueError`` for another ``num_subcenters`` or ``num_classes``."""
        infos = checkpoint.shard_infos(name)
        if not checkpoint.has_shards(name) or not infos:
            raise CheckpointError(f"checkpoint {checkpoint.path} holds no {name} shards")
        for info in infos:
            if info["K"] != num_subcenters:
                raise ValueError(
                    f"checkpoint {checkpoint.path} has {info['K']} sub-centres per class, "
                    f"the head has {num_subcenters}"
                )
        shards = [
            self.read(checkpoint, info["file"], mmap=True)
            for info in overlapping(infos, class_start, num_local)
        ]
        return reshard(shards, class_start, num_local, num_subcenters, str(checkpoint.path))

    def load_head_shard(
        self,
        checkpoint: CheckpointDir,
        class_start: int,
        num_local: int,
        num_subcenters: int,
        name: str = "head",
    ) -> tuple[dict[str, Any], dict[str, Any]]:
        """:meth:`load_shard` as ``(module_state_dict, optimizer_state_dict)``: the head
        rows ``(num_local * num_subcenters, D)`` under ``weight``, ready for
        ``load_state_dict``."""
        return split_shard(
            self.load_shard(checkpoint, name, class_start, num_local, num_subcenters)
        )

    # ---------------------------------------------------------------- writing
    def save(
        self,
        step: int,
        shared: dict[str, Any],
        shards: dict[str, dict[str, Any]],
        rank_state: dict[str, Any],
        meta: dict[str, Any] | None = None,
    ) -> Path:
        """Write the checkpoint of ``step`` from every rank (a collective call).

        Args:
            step: optimizer steps done; names the directory.
            shared: replicated state, written by rank 0 only (``trainer.pt``).
            shards: this rank's class-sharded states by name (shard states of
                :mod:`~trainer.checkpoint.resharding`), written as ``<name>-<rank>.pt``
                and listed in ``meta.json`` under ``shards`` (``head``) or
                ``<name>_shards``.
            rank_state: this rank's private state (``rank-<rank>.pt``).
            meta: JSON-able facts recorded in ``meta.json`` (the lineage, the run's
                facts).
        Returns:
            the final checkpoint directory.
        Raises:
            CheckpointError: on every rank, if any rank's write failed; the temporary
                directory is removed and the previous checkpoints are untouched.
        """
        ctx = self.ctx
        final = self.directory / step_dir_name(step)
        tmp = self.directory / f".tmp-{step_dir_name(step)}"
        error = attempt(self._make_tmp, tmp) if ctx.is_main else None
        self._raise_if(ctx.broadcast_object(error), step, tmp)
        # Every rank writes its files; a failure (ENOSPC, EIO, ...) is reported to all
        # ranks, so none waits in a collective for a rank that gave up.
        digests: dict[str, str] = {}
        error = attempt(self._write_rank_files, tmp, shards, rank_state, shared, digests)
        ranges = {
            name: (s["class_start"], s["num_local"], s["num_subcenters"])
            for name, s in shards.items()
        }
        reports = ctx.all_gather_object((error, ranges, digests))
        errors = [
            f"rank {r}: {e}" if len(reports) > 1 else e
            for r, (e, _, _) in enumerate(reports)
            if e is not None
        ]
        if errors:
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self._raise_if("; ".join(errors), step, tmp)
        error = None
        if ctx.is_main:
            all_ranges = [r for _, r, _ in reports]
            checksums = {name: digest for _, _, d in reports for name, digest in d.items()}
            error = attempt(self._publish, step, tmp, final, all_ranges, checksums, meta or {})
            if error is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        self._raise_if(ctx.broadcast_object(error), step, tmp)
        return final

    def _raise_if(self, error: str | None, step: int, tmp: Path) -> None:
        if error is not None:
            raise CheckpointError(
                f"checkpoint of step {step} could not be written to {tmp} (removed): {error}; "
                f"the previous checkpoint is intact: {self.latest() or 'none yet'}"
            )

    def _make_tmp(self, tmp: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a crashed save of the same step
            shutil.rmtree(tmp)
        tmp.mkdir()

    def _write_rank_files(
        self,
        tmp: Path,
        shards: dict[str, dict[str, Any]],
        rank_state: dict[str, Any],
        shared: dict[str, Any],
        digests: dict[str, str],
    ) -> None:
        """Write this rank's files into ``tmp``; record each file's SHA-256 in ``digests``."""
        rank = self.ctx.rank
        files: list[tuple[Any, str]] = [
            (shard, f"{name}-{rank:05d}.pt") for name, shard in shards.items()
        ]
        files.append((rank_state, f"rank-{rank:05d}.pt"))
        if self.ctx.is_main:
            files.append((shared, "trainer.pt"))
        for obj, name in files:
            path = tmp / name
            try:
                digests[name] = self.write_file(obj, path)
            except (OSError, RuntimeError) as exc:  # torch's writer raises RuntimeError
                raise write_error(path, exc) from None

    def _publish(
        self,
        step: int,
        tmp: Path,
        final: Path,
        ranges: list[dict[str, tuple[int, int, int]]],
        checksums: dict[str, str],
        extra: dict[str, Any],
    ) -> None:
        """Rank 0, once every rank's files are written: ``meta.json``, then the rename
        that publishes the checkpoint, then the removal of leftovers."""
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        shard_lists: dict[str, list[dict[str, Any]]] = {}
        for r, rank_ranges in enumerate(ranges):
            for name, (class_start, num_local, k) in rank_ranges.items():
                shard_lists.setdefault(shards_key(name), []).append(
                    {
                        "file": f"{name}-{r:05d}.pt",
                        "class_start": class_start,
                        "num_local": num_local,
                        "K": k,
                    }
                )
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": self.ctx.world_size,
            "time": time.time(),
            **shard_lists,
            "files": files,
            "sha256": {name: checksums[name] for name in files if name in checksums},
            **extra,
        }
        with open(tmp / "meta.json", "w") as fh:
            json.dump(meta, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # re-saving a step (e.g. a resumed run): replace it
            replaced = self.open(final).lineage
            if replaced != meta.get("lineage"):
                log.warning(
                    "replacing %s of another lineage (%s, an abandoned or earlier run) with "
                    "this run's checkpoint of the same step (lineage %s)",
                    final,
                    replaced or "unrecorded",
                    meta.get("lineage"),
                )
            self.discard(final)
        fsync_path(tmp)  # the files' directory entries, before the rename publishes them
        os.rename(tmp, final)
        fsync_path(self.directory)
        self.remove_leftovers()

    def discard(self, path: Path) -> None:
        """Delete a checkpoint directory: renamed to ``.trash-*`` first, so that a crash
        half-way never leaves a directory that looks complete."""
        trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def remove_leftovers(self) -> list[Path]:
        """Remove what interrupted saves and deletions left (``.tmp-step-*``,
        ``.trash-*``: names only this class writes), so that a rerun needs no manual
        clean-up and counts their space as free. Call it only while no save is in
        flight (rank 0: at start-up holding the run lock, or after a save); returns
        what was removed."""
        removed: list[Path] = []
        for pattern in (".tmp-step-*", ".trash-*"):
            for stale in sorted(self.directory.glob(pattern)):
                if stale.is_symlink() or not stale.is_dir():
                    continue  # not a directory this class made
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
        return removed
