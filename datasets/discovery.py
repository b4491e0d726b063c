"""Which training data is at a path, and opening it: :func:`open_dataset`.

A ``.rec`` file, a directory holding ``train.rec``/``train.idx``, a directory of
``*.arrow`` shards, or an image folder (``root/<identity>/<image>``), in that order of
precedence. Data that ``datasets.prepare`` is still writing, or stopped writing half-way,
is refused. Above both :mod:`datasets.dataset` and :mod:`datasets.arrow_io`, which
know one format each.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from common.outdir import check_complete, read_manifest
from datasets.arrow_io import ArrowDataset
from datasets.dataset import FaceDataset, ImageFolderDataset, RecordIODataset
from datasets.errors import DataError

__all__ = ["open_dataset"]


def _check_complete(path: Path) -> None:
    """Refuse data that a command (``datasets.prepare``) is still writing or stopped
    writing half-way: its ownership manifest says so (:func:`common.outdir.check_complete`);
    also for ``OUT/arrow``, which the manifest of ``OUT`` lists."""
    if not path.exists():
        return
    folder = path if path.is_dir() else path.parent
    check_complete(folder)
    try:
        parent = read_manifest(folder.parent) if folder.parent != folder else None
    except PermissionError:
        return
    if parent is not None and f"{folder.name}/" in parent.get("files", []):
        check_complete(folder.parent)


def open_dataset(path: str | os.PathLike, **kwargs: Any) -> FaceDataset:
    """Open training data by path, choosing the Dataset class from what is there.

    ``path`` may be a ``.rec`` file, a directory holding ``train.rec``/``train.idx``, a
    directory of ``*.arrow`` shards, or an image folder (``root/<identity>/<image>``).
    ``kwargs`` go to the Dataset (``flip``, ``output``, ``skip_corrupt``, ``num_classes``).
    """
    path = Path(path)
    _check_complete(path)
    if path.is_file() and path.suffix == ".rec":
        return RecordIODataset(path, **kwargs)
    if path.exists() and not path.is_dir():
        raise DataError(
            f"{path}: training data of no known kind: a .rec file, a directory holding "
            "train.rec, a directory of *.arrow shards or an image folder "
            "(<identity>/<image>) was expected",
            path=path,
        )
    if not path.is_dir():
        raise FileNotFoundError(f"training data {path} does not exist")
    if (path / "train.rec").is_file():
        return RecordIODataset(path / "train.rec", **kwargs)
    if any(path.glob("*.arrow")):
        return ArrowDataset(path, **kwargs)
    return ImageFolderDataset(path, **kwargs)
