"""Checkpoint storage: atomic, world-size-independent checkpoint directories.

This module knows files, not the trainer: :class:`CheckpointManager` writes the
states it is handed, finds complete checkpoints and reads them back, resharding
class-sharded states by global class. *What* goes into a checkpoint (the stateful
parts of a run) is :class:`trainer.checkpointer.Checkpointer`'s business.

Layout of ``<output>/checkpoints/step-00001234/``::

    meta.json            written last; lists every file with its size and SHA-256,
                         and the checkpoint's lineage
    trainer.pt           rank 0: the replicated parts by name (backbone, its optimizer,
                         schedulers, grad scaler, progress, loader position, history)
    head-00000.pt ...    one per saving rank: its head rows and the head optimizer's
                         row state, with the rank's global class range
    center-00000.pt ...  the same for other class-sharded modules (the center loss's
                         centres and their optimizer), when the trainer has them
    rank-00000.pt ...    one per saving rank: its private parts (RNG states)

Atomicity: every rank writes into ``.tmp-step-XXXXXXXX/``; after a barrier rank 0
writes ``meta.json`` (fsynced) and renames the directory to its final name, which is
atomic on POSIX file systems. A crash at any point leaves either no new directory or a
``.tmp-*`` one, which :meth:`CheckpointManager.latest` never picks (it also checks
that each file listed in ``meta.json`` exists with its recorded size). Old
checkpoints are first renamed to ``.trash-*`` and then deleted, so a crash while
pruning cannot leave a half-deleted directory that looks complete. (The files inside
the temporary directory need no atomic replace of their own: the directory rename
publishes them all at once.)

Checksums: every file's SHA-256 is computed while it is written (no second read) and
recorded in ``meta.json`` (``sha256``); :meth:`CheckpointManager.verify` recomputes it
before a file is trusted, so bytes changed after the save (a flipped bit, a file
truncated to its recorded size) are found before anything is loaded.

Lineages: every checkpoint records the lineage (``lineage``: an id; ``parent``: the
checkpoint its first run resumed from) of the run that wrote it. A run continues the
lineage of the checkpoint it resumed from when that is the newest of its lineage, and
starts a new one otherwise (a roll-back to an older step, a checkpoint of another
directory, a fresh start). Pruning (``keep_last``) only ever deletes checkpoints of the
run's own lineage, so a roll-back never deletes the checkpoint it resumed from, nor
the ones it writes, nor the abandoned lineage's; :meth:`CheckpointManager.latest` is
the newest checkpoint of the newest lineage (the one that wrote the most recent
checkpoint).

Resharding: head rows are stored with their global class offsets. On load each rank
computes its new class range and copies the overlapping rows out of every saved shard
(memory-mapped, so only the needed rows are read). Tensors of the head's state dict
and of the head optimizer's per-parameter state whose first dimension is the shard's
row count are re-sliced this way; other entries (step counters, hyper-parameters,
per-class margins, which every rank holds whole) are replicated and taken from shard 0.
Multi-node jobs need ``<output>`` on a shared file system.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from common.atomic import OutputWriteError
from common.dist import DistContext
from common.errors import UserError
from trainer.preflight import _size

#: ``meta.json``'s ``format``. 1: the first layout. 2: the same files and parts; the
#: backbone's ``state_dict`` uses arcface_torch's names (``conv1``, ``layer1.0.*``,
#: ``features``, ...; see :mod:`backbones.weights`). A format-1 checkpoint resumes: its
#: backbone names (``stem.*``, ``units.N.*``, ``head.*``) are translated on load, and a
#: network whose format-1 architecture differs (``mbf``'s depthwise stage 0, the ViT
#: layout) is compared as ``model.kwargs`` plus :func:`backbones.weights.v1_model_kwargs`.
FORMAT_VERSION = 2
_FINAL = re.compile(r"^step-(\d{8})$")
_CHUNK = 1 << 22  # bytes per read when hashing a file

log = logging.getLogger("trainer")


class CheckpointError(UserError, RuntimeError):
    """A checkpoint cannot be written or read; the message names the file."""


class DamagedCheckpointError(CheckpointError):
    """A complete-looking checkpoint whose bytes cannot be trusted (checksum mismatch,
    unreadable file, non-finite weights): ``checkpoint.resume=auto`` falls back past it."""


def new_lineage_id() -> str:
    """A fresh lineage id (unique per run that starts one)."""
    return uuid.uuid4().hex[:12]


class _HashingWriter:
    """A binary file wrapper that hashes what is written through it."""

    def __init__(self, fh: Any) -> None:
        self.fh = fh
        self.hash = hashlib.sha256()

    def write(self, data: Any) -> int:
        self.hash.update(data)
        return self.fh.write(data)

    def flush(self) -> None:
        self.fh.flush()


def file_digest(path: Path) -> str:
    """The SHA-256 of a file's bytes, as hex."""
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


#: Free space under which a write error that names no cause is taken for a full disk.
LOW_SPACE_BYTES = 16 << 20


def _os_error_in(exc: BaseException) -> OSError | None:
    """The first :class:`OSError` in ``exc``'s chain (itself, its cause or context):
    torch's zip writer turns the ``OSError`` of a failed ``write`` into a
    ``RuntimeError`` (``[enforce fail at inline_container.cc:...] unexpected pos``)
    raised during its handling."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        if isinstance(current, OSError):
            return current
        seen.add(id(current))
        current = current.__cause__ or current.__context__
    return None


def _free_bytes(path: Path) -> int | None:
    """Free bytes on the file system of ``path`` (its nearest existing parent)."""
    for where in (path, *path.parents):
        try:
            return shutil.disk_usage(where).free
        except OSError:
            continue
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def write_error(path: str | os.PathLike[str], exc: BaseException) -> OutputWriteError:
    """A failed write of ``path`` as one line, ``cannot write <path>: <cause>``.

    ``exc`` is the :class:`OSError` of the write or the ``RuntimeError`` torch's writer
    raised for one. The cause is the ``OSError``'s in ``exc``'s chain (``No space left
    on device``, with the free space); without one, a file system with less than
    :data:`LOW_SPACE_BYTES` free is taken for a full disk; otherwise it is the writer's
    first line. An :class:`OutputWriteError` passes unchanged."""

    if isinstance(exc, OutputWriteError):
        return exc
    path = Path(path)
    os_error = _os_error_in(exc)
    code = os_error.errno if os_error is not None else None
    if code is not None:
        reason = os.strerror(code)
    elif os_error is not None:
        reason = os_error.strerror or _first_line(os_error)
    else:
        free = _free_bytes(path)
        if free is not None and free < LOW_SPACE_BYTES:
            code, reason = errno.ENOSPC, os.strerror(errno.ENOSPC)
        else:
            reason = f"{type(exc).__name__}: {_first_line(exc)}"
    if code in (errno.ENOSPC, errno.EDQUOT):
        free = _free_bytes(path)
        if free is not None:
            reason = f"{reason} ({_size(free)} free there)"
    return OutputWriteError(code, reason, str(path))


def _attempt(fn: Any, *args: Any) -> str | None:
    """Run ``fn(*args)``; return ``None``, or the failure (an ``OSError``, or the
    ``RuntimeError`` of torch's writer) as one line naming the file."""
    try:
        fn(*args)
    except (OSError, RuntimeError) as exc:
        if isinstance(exc, OSError) and exc.filename is not None:
            return str(write_error(exc.filename, exc))
        return " ".join(str(exc).split()) or type(exc).__name__
    return None


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_file(obj: Any, path: Path) -> str:
    """``torch.save`` then fsync, so the bytes are durable before the rename; returns
    the SHA-256 of the bytes written (hashed on the way, not read back)."""
    with open(path, "wb") as fh:
        writer = _HashingWriter(fh)
        torch.save(obj, writer)
        fh.flush()
        os.fsync(fh.fileno())
    return writer.hash.hexdigest()


def load_file(path: Path, map_location: torch.device | str = "cpu", mmap: bool = False) -> Any:
    """``torch.load(weights_only=True)``: tensors and plain containers only, nothing in
    the file is executed. A file that is not ours, truncated or corrupt raises
    :class:`CheckpointError` naming it."""
    try:
        return torch.load(path, map_location=map_location, weights_only=True, mmap=mmap)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} is missing") from None
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{path} is not a readable checkpoint file of this trainer "
            f"(truncated, corrupt, or holding objects other than tensors): {first}"
        ) from None


def _row_keys(tensors: dict[str, Any], rows: int) -> list[str]:
    return [
        k
        for k, v in tensors.items()
        if isinstance(v, torch.Tensor) and v.dim() >= 1 and v.shape[0] == rows
    ]


def _shards_key(name: str) -> str:
    """``meta.json`` key listing the shards called ``name`` (``shards`` for the head)."""
    return "shards" if name == "head" else f"{name}_shards"


def head_shard_state(
    head: torch.nn.Module,
    head_optimizer: torch.optim.Optimizer | None,
    class_start: int,
    num_local: int,
    num_subcenters: int,
    row_keys: tuple[str, ...] = ("weight",),
) -> dict[str, Any]:
    """This rank's head and head-optimizer state, tagged with its global row range.

    Any module sharded by class the same way fits (e.g. the center loss, with
    ``row_keys=("centers",)``); ``head_optimizer`` may be ``None`` (nothing learnable)."""
    rows = num_local * num_subcenters
    model_state = {
        k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
        for k, v in head.state_dict().items()
    }
    optim = (
        head_optimizer.state_dict()
        if head_optimizer is not None
        else {"state": {}, "param_groups": []}
    )
    if len(optim["state"]) > 1 or len(optim["param_groups"]) > 1:
        raise ValueError("a sharded module's optimizer must hold exactly one parameter")
    param_state = {
        k: (v.detach().cpu() if isinstance(v, torch.Tensor) else v)
        for k, v in next(iter(optim["state"].values()), {}).items()
    }
    return {
        "class_start": class_start,
        "num_local": num_local,
        "num_subcenters": num_subcenters,
        "row_start": class_start * num_subcenters,
        "rows": rows,
        "model": model_state,
        # Only the centres are sharded; margins and counters are replicated.
        "model_row_keys": list(row_keys),
        "optim_state": param_state,
        "optim_row_keys": _row_keys(param_state, rows),
        "param_groups": optim["param_groups"],
    }


class CheckpointManager:
    """Save, find and load checkpoints under ``directory`` (shared by all ranks)."""

    def __init__(
        self,
        directory: str | os.PathLike[str],
        ctx: DistContext,
        keep_last: int,
        lineage: str | None = None,
    ) -> None:
        self.directory = Path(directory)
        self.ctx = ctx
        self.keep_last = keep_last
        self.lineage = lineage if lineage is not None else new_lineage_id()
        """The lineage this run's checkpoints belong to (the only ones it prunes)."""
        self.parent: str | None = None
        """The checkpoint this lineage started from (``None``: a fresh start)."""

    # ------------------------------------------------------------------ saving
    def save(
        self,
        step: int,
        shared: dict[str, Any],
        shards: dict[str, dict[str, Any]],
        rank_state: dict[str, Any],
        extra_meta: dict[str, Any] | None = None,
    ) -> Path:
        """Write a checkpoint for ``step`` from every rank (a collective call).

        Args:
            step: optimizer steps done.
            shared: replicated state, written by rank 0 only (``trainer.pt``).
            shards: this rank's class-sharded states (:func:`head_shard_state`) by
                name, written as ``<name>-<rank>.pt`` and listed in ``meta.json``
                under ``shards`` (``head``) or ``<name>_shards``; read back with
                :meth:`load_shard`.
            rank_state: this rank's private state (``rank-<rank>.pt``).
            extra_meta: JSON-able facts recorded in ``meta.json``.
        Returns:
            the final checkpoint directory.
        """
        ctx = self.ctx
        final = self.directory / f"step-{step:08d}"
        tmp = self.directory / f".tmp-step-{step:08d}"
        error = None
        if ctx.is_main:
            error = _attempt(self._make_tmp, tmp)
        error = ctx.broadcast_object(error)
        self._raise_if(error, step, tmp)
        rank = ctx.rank
        # Every rank writes its files; a failure (ENOSPC, EIO, ...) is reported to all
        # ranks, so none waits in a collective for a rank that gave up.
        digests: dict[str, str] = {}
        error = _attempt(self._write_rank_files, tmp, rank, shards, rank_state, shared, digests)
        reports = ctx.all_gather_object(
            (
                error,
                {
                    name: (s["class_start"], s["num_local"], s["num_subcenters"])
                    for name, s in shards.items()
                },
                digests,
            )
        )
        errors = [
            f"rank {r}: {e}" if len(reports) > 1 else e
            for r, (e, _, _) in enumerate(reports)
            if e is not None
        ]
        if errors:
            if ctx.is_main:
                shutil.rmtree(tmp, ignore_errors=True)
            self._raise_if("; ".join(errors), step, tmp)
        ranges = [rng for _, rng, _ in reports]
        checksums = {name: digest for _, _, d in reports for name, digest in d.items()}
        error = None
        if ctx.is_main:
            error = _attempt(self._finalize, step, tmp, final, ranges, extra_meta, checksums)
            if error is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        error = ctx.broadcast_object(error)
        self._raise_if(error, step, tmp)
        return final

    def _raise_if(self, error: str | None, step: int, tmp: Path) -> None:
        if error is not None:
            previous = self.latest()
            raise CheckpointError(
                f"checkpoint of step {step} could not be written to {tmp} (removed): {error}; "
                f"the previous checkpoint is intact: {previous or 'none yet'}"
            )

    def remove_leftovers(self) -> list[Path]:
        """Remove what interrupted saves and deletions of this directory left
        (``.tmp-step-*``, ``.trash-*``: names only this class writes), so that a rerun
        needs no manual clean-up and counts their space as free. Call it only while no
        save is in flight (rank 0, at start-up, holding the run lock); returns what was
        removed."""
        removed = []
        if not self.directory.is_dir():
            return removed
        for pattern in (".tmp-step-*", ".trash-*"):
            for stale in sorted(self.directory.glob(pattern)):
                if stale.is_symlink() or not stale.is_dir():
                    continue  # not a directory this class made
                shutil.rmtree(stale, ignore_errors=True)
                removed.append(stale)
        return removed

    def _make_tmp(self, tmp: Path) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        if tmp.exists():  # left over by a crashed save of the same step
            shutil.rmtree(tmp)
        tmp.mkdir()

    @staticmethod
    def _write_rank_files(
        tmp: Path,
        rank: int,
        shards: dict[str, dict[str, Any]],
        rank_state: dict[str, Any],
        shared: Any,
        digests: dict[str, str],
    ) -> None:
        """Write this rank's files into ``tmp``; record each file's SHA-256 in ``digests``."""
        for obj, name in (
            *((shard, f"{kind}-{rank:05d}.pt") for kind, shard in shards.items()),
            (rank_state, f"rank-{rank:05d}.pt"),
            (shared if rank == 0 else None, "trainer.pt"),
        ):
            if obj is None:
                continue
            path = tmp / name
            try:
                # (a replacement save_file that returns nothing: hash the file it wrote)
                digests[name] = save_file(obj, path) or file_digest(path)
            except (OSError, RuntimeError) as exc:  # torch's writer raises RuntimeError
                raise write_error(path, exc) from None

    def _finalize(
        self,
        step: int,
        tmp: Path,
        final: Path,
        ranges: list[dict[str, tuple[int, int, int]]],
        extra_meta: dict[str, Any] | None,
        checksums: dict[str, str],
    ) -> None:
        """Rank 0, after every rank's files are written: ``meta.json``, rename, prune."""
        files = {p.name: p.stat().st_size for p in sorted(tmp.iterdir())}
        shard_lists: dict[str, list[dict[str, Any]]] = {}
        for r, rank_ranges in enumerate(ranges):
            for kind, (cs, nl, k) in rank_ranges.items():
                shard_lists.setdefault(_shards_key(kind), []).append(
                    {"file": f"{kind}-{r:05d}.pt", "class_start": cs, "num_local": nl, "K": k}
                )
        meta = {
            "format": FORMAT_VERSION,
            "step": step,
            "world_size": self.ctx.world_size,
            "time": time.time(),
            **shard_lists,
            "files": files,
            "sha256": {name: checksums[name] for name in files if name in checksums},
            "lineage": self.lineage,
            "parent": self.parent,
            **(extra_meta or {}),
        }
        meta_path = tmp / "meta.json"
        with open(meta_path, "w") as fh:
            json.dump(meta, fh, indent=2)
            fh.flush()
            os.fsync(fh.fileno())
        if final.exists():  # re-saving a step (e.g. a resumed run): replace it
            other = self.lineage_of(final)
            if other != self.lineage:
                log.warning(
                    "replacing %s of another lineage (%s, an abandoned or earlier run) with "
                    "this run's checkpoint of the same step (lineage %s)",
                    final,
                    other or "unrecorded",
                    self.lineage,
                )
            self._discard(final)
        os.rename(tmp, final)
        _fsync_path(self.directory)
        self._prune()

    def _discard(self, path: Path) -> None:
        trash = path.with_name(f".trash-{path.name}-{os.getpid()}")
        os.rename(path, trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _prune(self) -> None:
        """Keep the newest ``keep_last`` checkpoints of this run's lineage; other
        lineages' checkpoints (the one a roll-back resumed from, an abandoned run's)
        are never deleted here."""
        done = [p for p in self.complete() if self.lineage_of(p) == self.lineage]
        for path in done[: max(len(done) - self.keep_last, 0)]:
            self._discard(path)
        # Called after the rename, when no save of this job is in flight: leftovers of
        # crashed saves (any step) and of interrupted deletions go.
        for pattern in (".trash-*", ".tmp-step-*"):
            for stale in self.directory.glob(pattern):
                shutil.rmtree(stale, ignore_errors=True)

    # ----------------------------------------------------------------- finding
    @staticmethod
    def is_complete(path: Path) -> bool:
        """True if ``path`` has a readable ``meta.json`` and every listed file at its size."""
        return CheckpointManager.why_incomplete(path) is None

    @staticmethod
    def why_incomplete(path: Path) -> str | None:
        """Why ``path`` is not a complete checkpoint (``None`` if it is)."""
        try:
            meta = json.loads((path / "meta.json").read_text())
        except FileNotFoundError:
            return "it has no meta.json (a save that did not finish)"
        except (OSError, ValueError) as exc:
            return f"its meta.json is unreadable ({exc})"
        try:
            for name, size in meta["files"].items():
                file = path / name
                if not file.exists():
                    return f"{name} is missing"
                actual = file.stat().st_size
                if actual != size:
                    return f"{name} has {actual} bytes, meta.json records {size} (truncated?)"
        except (OSError, KeyError, TypeError, AttributeError) as exc:
            return f"its meta.json does not list its files ({exc!r})"
        return None

    @staticmethod
    def lineage_of(path: Path) -> str:
        """The lineage id recorded in ``path``'s ``meta.json`` (``""``: written before
        lineages were recorded, or unreadable)."""
        try:
            return str(json.loads((path / "meta.json").read_text()).get("lineage") or "")
        except (OSError, ValueError, AttributeError):
            return ""

    @staticmethod
    def step_of(path: Path) -> int:
        """The step in a checkpoint directory's name."""
        return int(_FINAL.match(path.name).group(1))  # type: ignore[union-attr]

    def complete(self) -> list[Path]:
        """Complete checkpoints, oldest first (temporary and trash directories excluded)."""
        if not self.directory.is_dir():
            return []
        found = [
            p for p in self.directory.iterdir() if _FINAL.match(p.name) and self.is_complete(p)
        ]
        return sorted(found, key=lambda p: int(_FINAL.match(p.name).group(1)))  # type: ignore[union-attr]

    def candidates(self) -> list[Path]:
        """Complete checkpoints in the order ``checkpoint.resume=auto`` tries them: the
        newest lineage's (the lineage of the most recently written checkpoint), newest
        step first, then the other lineages' checkpoints, most recently written first."""
        done = self.complete()
        if not done:
            return []
        info = {}
        for p in done:
            try:
                meta = json.loads((p / "meta.json").read_text())
            except (OSError, ValueError):
                meta = {}
            info[p] = (str(meta.get("lineage") or ""), float(meta.get("time", 0.0)))
        newest = max(done, key=lambda p: (info[p][1], self.step_of(p)))
        lineage = info[newest][0]
        own = sorted((p for p in done if info[p][0] == lineage), key=self.step_of, reverse=True)
        rest = sorted(
            (p for p in done if info[p][0] != lineage),
            key=lambda p: (info[p][1], self.step_of(p)),
            reverse=True,
        )
        return own + rest

    def latest(self) -> Path | None:
        """The newest complete checkpoint of the newest lineage, or ``None``."""
        found = self.candidates()
        return found[0] if found else None

    def incomplete(self) -> list[tuple[Path, str]]:
        """Checkpoint directories (final names only) that are not complete, with why."""
        if not self.directory.is_dir():
            return []
        out = []
        for p in sorted(self.directory.iterdir()):
            if _FINAL.match(p.name):
                why = self.why_incomplete(p)
                if why is not None:
                    out.append((p, why))
        return out

    # ----------------------------------------------------------------- loading
    @staticmethod
    def read_meta(path: Path) -> dict[str, Any]:
        """Parse ``meta.json`` of a complete checkpoint (raise if incomplete)."""
        if not CheckpointManager.is_complete(path):
            raise FileNotFoundError(
                f"{path} is not a complete checkpoint (missing meta.json/files)"
            )
        return json.loads((path / "meta.json").read_text())

    @staticmethod
    def verify(path: Path, names: list[str]) -> None:
        """Check the listed files of ``path`` against the SHA-256 recorded in its
        ``meta.json``; raise :class:`DamagedCheckpointError` naming the first that
        differs. Checkpoints written before checksums were recorded pass unchecked."""
        sums = CheckpointManager.read_meta(path).get("sha256") or {}
        for name in names:
            expected = sums.get(name)
            if expected is None:
                continue
            try:
                actual = file_digest(path / name)
            except OSError as exc:
                raise DamagedCheckpointError(f"{path / name} cannot be read: {exc}") from None
            if actual != expected:
                raise DamagedCheckpointError(
                    f"{path / name} fails its checksum: sha256 {actual[:16]}... but meta.json "
                    f"records {expected[:16]}... (its bytes changed after the save)"
                )

    @staticmethod
    def shard_files(
        path: Path, name: str, class_start: int, num_local: int, num_subcenters: int
    ) -> list[str]:
        """The ``name`` shard files of ``path`` that hold rows of classes ``[class_start,
        class_start + num_local)`` (all of them for an empty range: the replicated
        entries come from them), the files :meth:`load_shard` reads."""
        meta = CheckpointManager.read_meta(path)
        infos = meta.get(_shards_key(name), [])
        return [
            info["file"] for info in _overlapping(infos, class_start, num_local, num_subcenters)
        ]

    @staticmethod
    def load_shared(path: Path, device: torch.device | str = "cpu") -> dict[str, Any]:
        """The replicated state written by rank 0."""
        return load_file(path / "trainer.pt", map_location=device)

    @staticmethod
    def load_rank_state(path: Path, rank: int) -> dict[str, Any] | None:
        """The private state saved by ``rank``, or ``None`` if that rank did not exist."""
        file = path / f"rank-{rank:05d}.pt"
        if not file.exists():
            return None
        return load_file(file)

    @staticmethod
    def has_shards(path: Path, name: str) -> bool:
        """True if the checkpoint at ``path`` holds class shards called ``name``."""
        return _shards_key(name) in CheckpointManager.read_meta(path)

    @staticmethod
    def load_shard(
        path: Path, name: str, class_start: int, num_local: int, num_subcenters: int
    ) -> dict[str, Any]:
        """The ``name`` shards of ``path`` resharded to classes ``[class_start,
        class_start + num_local)``, whatever world size wrote them.

        Returns a state in :func:`head_shard_state`'s format for that range, as if
        saved by a rank that owned it (so ``part.load_state_dict(state)`` works alike
        for a same-size resume and a resharded one).
        """
        meta = CheckpointManager.read_meta(path)
        key = _shards_key(name)
        if key not in meta:
            raise CheckpointError(f"checkpoint {path} holds no {name} shards")
        K = num_subcenters
        lo, hi = class_start * K, (class_start + num_local) * K
        shards = []
        for info in meta[key]:
            if info["K"] != K:
                raise ValueError(
                    f"checkpoint {path} has {info['K']} sub-centres per class, the head has {K}"
                )
        # only the shards holding some of the rows are read (all for an empty range)
        for info in _overlapping(meta[key], class_start, num_local, K):
            shards.append(load_file(path / info["file"], mmap=True))
        first = shards[0]
        model_rows = sorted({k for s in shards for k in s["model_row_keys"]})
        optim_rows = sorted({k for s in shards for k in s["optim_row_keys"]})
        model_state = {
            k: (v.clone() if isinstance(v, torch.Tensor) else v)
            for k, v in first["model"].items()
            if k not in model_rows
        }
        optim_state = {k: v for k, v in first["optim_state"].items() if k not in optim_rows}
        templates = {}
        for s in shards:  # a shard with rows tells the trailing shape and dtype
            for k in model_rows:
                templates.setdefault(("m", k), s["model"].get(k))
            for k in optim_rows:
                if k in s["optim_state"]:
                    templates.setdefault(("o", k), s["optim_state"][k])
        out: dict[tuple[str, str], torch.Tensor] = {}
        for (kind, k), tmpl in templates.items():
            if tmpl is None:
                continue
            out[(kind, k)] = torch.zeros((hi - lo, *tmpl.shape[1:]), dtype=tmpl.dtype)
        covered = 0
        for s in shards:
            s_lo, s_hi = s["row_start"], s["row_start"] + s["rows"]
            a, b = max(lo, s_lo), min(hi, s_hi)
            if a >= b:
                continue
            covered += b - a
            for (kind, k), dst in out.items():
                src = (s["model"] if kind == "m" else s["optim_state"]).get(k)
                if src is None:
                    raise ValueError(f"{path}: shard at row {s_lo} lacks '{k}'")
                dst[a - lo : b - lo].copy_(src[a - s_lo : b - s_lo])
        if covered != hi - lo:
            raise ValueError(
                f"{path} covers {covered} of rows [{lo}, {hi}): saved for another num_classes?"
            )
        for (kind, k), t in out.items():
            (model_state if kind == "m" else optim_state)[k] = t
        return {
            "class_start": class_start,
            "num_local": num_local,
            "num_subcenters": K,
            "row_start": lo,
            "rows": hi - lo,
            "model": model_state,
            "model_row_keys": model_rows,
            "optim_state": optim_state,
            "optim_row_keys": [k for (kind, k) in out if kind == "o"],
            "param_groups": first["param_groups"],
        }

    @staticmethod
    def load_head_shard(
        path: Path, class_start: int, num_local: int, num_subcenters: int, name: str = "head"
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Assemble the head state for classes ``[class_start, class_start + num_local)``.

        Returns ``(head_state_dict, head_optimizer_state_dict)`` ready for
        ``load_state_dict``, whatever world size wrote the checkpoint (see
        :meth:`load_shard`). ``name`` selects other class shards (e.g. ``"center"``).
        """
        return split_shard(
            CheckpointManager.load_shard(path, name, class_start, num_local, num_subcenters)
        )


def _overlapping(
    infos: list[dict[str, Any]], class_start: int, num_local: int, num_subcenters: int
) -> list[dict[str, Any]]:
    """The shard entries of ``meta.json`` with rows of the given class range (all of
    them if none has: an empty range still needs the replicated entries)."""
    lo, hi = class_start, class_start + num_local
    hit = [
        info
        for info in infos
        if max(lo, info["class_start"]) < min(hi, info["class_start"] + info["num_local"])
    ]
    return hit or list(infos)


def split_shard(shard: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """A :func:`head_shard_state` as ``(module_state_dict, optimizer_state_dict)``: the
    optimizer's one parameter has index 0 (no state at all if it never stepped)."""
    optim_state = shard["optim_state"]
    optim = {
        "state": {0: dict(optim_state)} if optim_state else {},
        "param_groups": shard["param_groups"],
    }
    return dict(shard["model"]), optim
