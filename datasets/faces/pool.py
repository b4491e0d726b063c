"""The face finder over many photos: worker processes, each with its own detector.

:func:`iter_faces` gives the :class:`~datasets.faces.finder.FaceResult` of every photo
of a list, in order (``eval.embed`` runs it over a folder). A pool that does more per
photo (``datasets.prepare`` also encodes and hashes the crops) starts its workers with
:func:`start_worker`, asks :func:`worker_finder` for each worker's finder, and takes
its processes from :func:`pool_context`.
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Iterator, Sequence
from typing import Any

import cv2

from datasets.faces.finder import FaceFinder, FaceResult
from datasets.faces.options import FaceOptions

_worker: dict[str, Any] = {}


def pool_context() -> multiprocessing.context.BaseContext:
    """``forkserver`` (``spawn`` where there is none), never ``fork``.

    Forking copies a process whose other threads (NumPy's and OpenCV's pools start at
    import; onnxruntime's and torch's with a model loaded) may hold a lock at that moment,
    and the lock stays held forever in the child: an intermittent hang, seen with an
    embedding model loaded. The fork server is a fresh process; workers fork from it and
    build their own detector.
    """
    methods = multiprocessing.get_all_start_methods()
    return multiprocessing.get_context("forkserver" if "forkserver" in methods else "spawn")


def start_worker(options: FaceOptions) -> None:
    """Pool initialiser: this process's :class:`FaceFinder`, on one core (the pool is the
    parallelism). A detector that fails to open is kept and raised by the first
    :func:`worker_finder` call, in a task: a pool initialiser that raises is restarted
    forever, while a task's exception reaches the main process."""
    cv2.setNumThreads(1)
    _worker.clear()
    try:
        _worker["finder"] = FaceFinder(options, threads=1)
    except Exception as exc:
        _worker["error"] = exc


def worker_finder() -> FaceFinder:
    """The finder :func:`start_worker` made in this process (or the error it met)."""
    if "error" in _worker:
        raise _worker["error"]
    return _worker["finder"]


def stop_worker() -> None:
    """Drop this process's finder (after :func:`start_worker` ran in the main process)."""
    _worker.clear()


def _find_one(path: str) -> FaceResult:
    return worker_finder().find_file(path)


def iter_faces(
    paths: Sequence[str | os.PathLike[str]], options: FaceOptions, workers: int = 1
) -> Iterator[FaceResult]:
    """:class:`FaceResult` of each photo file, in order, found by ``workers`` processes
    (<= 1, or a single photo: in this process)."""
    if workers <= 1 or len(paths) < 2:
        finder = FaceFinder(options)
        for p in paths:
            yield finder.find_file(p)
        return
    ctx = pool_context()
    with ctx.Pool(min(workers, len(paths)), start_worker, (options,)) as pool:
        yield from pool.imap(_find_one, [os.fspath(p) for p in paths], chunksize=4)
