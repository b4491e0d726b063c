"""Dataset classes: RecordIO (face or im2rec layout), Arrow shards, and an image folder.

All share one contract. ``dataset[i]`` or ``dataset[(i, aug_seed)]`` (what
:class:`datasets.sampler.DistributedFaceSampler` yields) returns ``(image, label)``:

* ``output="float"`` (default): ``image`` float32 tensor ``(3, 112, 112)`` RGB in ``[-1, 1]``;
* ``output="uint8"``: ``image`` uint8 tensor ``(112, 112, 3)`` in OpenCV's BGR order (turn
  batches into RGB floats with :func:`datasets.transforms.normalize_batch`; the loader does);
* ``label`` is an ``int`` in ``[0, num_classes)``.

With ``flip=True`` the image is mirrored left-right with probability 1/2, decided by
``aug_seed`` (deterministic) or, for a plain integer index, by a per-process RNG.

Errors name the file, key and byte offset. Undecodable images raise unless
``skip_corrupt=True``, in which case they are logged, counted in ``num_skipped`` (per
process) and replaced by the next sample. Labels outside ``[0, num_classes)`` always raise.
"""

from __future__ import annotations

import logging
import os
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.face_layout import image_label, inspect_layout, scan_num_classes
from datasets.recordio import MAGIC, IndexedRecordIO, RecordIOError, unpack
from datasets.transforms import (
    IMAGE_SIZE,
    ImageDecodeError,
    decode_bgr,
    flip_from_seed,
    to_float_chw,
    to_uint8_hwc,
)

log = logging.getLogger(__name__)

_FAST_HEAD = struct.Struct("<IIIf")  # record magic, lrec, IRHeader flag, IRHeader label
_LEN_MASK = (1 << 29) - 1

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


class LabelRangeError(ValueError):
    """A label outside ``[0, num_classes)``."""


class FaceDataset(Dataset):
    """Base class; subclasses implement ``__len__`` and ``_load(i) -> (bytes, label, where)``."""

    num_classes: int

    def __init__(
        self,
        flip: bool = True,
        output: str = "float",
        skip_corrupt: bool = False,
        image_size: int = IMAGE_SIZE,
    ) -> None:
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        self.flip = flip
        self.output = output
        self.skip_corrupt = skip_corrupt
        self.image_size = image_size
        self.num_skipped = 0
        self._rng = random.Random()

    def _load(self, index: int) -> tuple[bytes | memoryview, int, str | None]:
        """``(encoded image, label, description or None)`` of sample ``index``."""
        raise NotImplementedError

    def _where(self, index: int) -> str:
        """Where sample ``index`` lives (file, key, byte offset), for error messages."""
        return f"{type(self).__name__} sample {index}"

    def __len__(self) -> int:
        raise NotImplementedError

    def sample_key(self, index: int) -> int:
        """A stable key of sample ``index`` for logs (the index itself by default)."""
        return index

    def label_of(self, index: int) -> int:
        """The label of sample ``index`` (reads its record)."""
        return self._load(index)[1]

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        if isinstance(item, tuple):
            index, aug_seed = int(item[0]), int(item[1])
            flip = self.flip and flip_from_seed(aug_seed)
        else:
            index = int(item)
            flip = self.flip and self._rng.random() < 0.5
        n = len(self)
        for attempt in range(min(n, 64)):
            i = (index + attempt) % n
            payload, label, where = self._load(i)
            if not 0 <= label < self.num_classes:
                raise LabelRangeError(
                    f"{where or self._where(i)}: label {label} is outside "
                    f"[0, num_classes={self.num_classes})"
                )
            img = decode_bgr(payload, None)
            if img is None:
                exc = ImageDecodeError(
                    f"{where or self._where(i)}: OpenCV cannot decode {len(payload)} bytes as an "
                    "image"
                )
                if not self.skip_corrupt:
                    raise exc
                self.num_skipped += 1
                log.warning("skipping corrupt image (%d skipped so far): %s", self.num_skipped, exc)
                continue
            if self.output == "float":
                return to_float_chw(img, flip, self.image_size), label
            return to_uint8_hwc(img, flip, self.image_size), label
        raise ImageDecodeError(f"{len(self)} samples from index {index} on were all undecodable")

    def seed_worker(self, seed: int) -> None:
        """Reseed the per-process flip RNG (used only for plain integer indices)."""
        self._rng.seed(seed)


class RecordIODataset(FaceDataset):
    """Images of a ``.rec``/``.idx`` pair, face layout or im2rec layout.

    Args:
        rec_path: the ``.rec`` file; ``idx_path`` defaults to the same name with ``.idx``.
        num_classes: required for im2rec files without a ``property`` file (else scanned);
            checked against the data for face-layout files.

    The file is memory-mapped lazily in each worker process.
    """

    def __init__(
        self,
        rec_path: str | os.PathLike,
        idx_path: str | os.PathLike | None = None,
        num_classes: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        rec_path = Path(rec_path)
        idx_path = Path(idx_path) if idx_path is not None else rec_path.with_suffix(".idx")
        self.reader = IndexedRecordIO(idx_path, rec_path, "r")
        self._offsets: np.ndarray | None = None
        layout = inspect_layout(self.reader)
        self.image_keys = layout.image_keys
        self.face_layout = layout.face_layout
        if len(self.image_keys) == 0:
            raise RecordIOError(f"{rec_path} holds no image records")
        found = layout.num_classes
        if found is None:
            found = (
                num_classes
                if num_classes is not None
                else scan_num_classes(self.reader, self.image_keys)
            )
        if num_classes is not None and num_classes != found:
            raise ValueError(f"num_classes={num_classes} was given, but {rec_path} holds {found}")
        self.num_classes = int(found)

    def __len__(self) -> int:
        return len(self.image_keys)

    def sample_key(self, index: int) -> int:
        """The sample's RecordIO key (what ``.idx`` and error messages use)."""
        return int(self.image_keys[index])

    def _where(self, index: int) -> str:
        key = int(self.image_keys[index])
        return f"{self.reader.uri} key {key} at byte offset {self.reader.idx[key]}"

    def _load(self, index: int) -> tuple[bytes | memoryview, int, str | None]:
        if self._offsets is None:
            idx = self.reader.idx
            self._offsets = np.fromiter((idx[int(k)] for k in self.image_keys), np.int64)
        off = int(self._offsets[index])
        buf = self.reader._buffer()
        # fast path: a single-part record whose header carries a scalar label
        if off + 32 <= len(buf):
            magic, lrec, flag, label = _FAST_HEAD.unpack_from(buf, off)
            end = off + 8 + (lrec & _LEN_MASK)
            if magic == MAGIC and lrec >> 29 == 0 and flag == 0 and end <= len(buf):
                return memoryview(buf)[off + 32 : end], round(label), None
        key = int(self.image_keys[index])
        raw = self.reader.read_idx(key)
        try:
            header, payload = unpack(raw)
        except RecordIOError as exc:
            raise RecordIOError(f"{self._where(index)}: {exc}") from None
        return payload, image_label(header), None


class ImageFolderDataset(FaceDataset):
    """``root/<identity>/<image>`` folders; identities are labelled in sorted name order."""

    def __init__(
        self, root: str | os.PathLike, num_classes: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.files, labels, self.classes = list_image_folder(self.root)
        self.labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.classes)
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"num_classes={num_classes} was given, {self.root} holds {self.num_classes}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def _load(self, index: int) -> tuple[bytes, int, str]:
        path = self.files[index]
        return path.read_bytes(), int(self.labels[index]), str(path)


def list_image_folder(root: Path) -> tuple[list[Path], list[int], list[str]]:
    """``(files, labels, class names)`` of an identity-per-folder tree, in sorted order."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir())
    files: list[Path] = []
    labels: list[int] = []
    for label, name in enumerate(classes):
        for f in sorted((root / name).iterdir()):
            if f.suffix.lower() in IMAGE_EXTENSIONS:
                files.append(f)
                labels.append(label)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) under {root}/*/")
    return files, labels, classes


def open_dataset(path: str | os.PathLike, **kwargs: Any) -> FaceDataset:
    """Open training data by path, choosing the Dataset class from what is there.

    ``path`` may be a ``.rec`` file, a directory holding ``train.rec``/``train.idx``, a
    directory of ``*.arrow`` shards, or an image folder (``root/<identity>/<image>``).
    ``kwargs`` go to the Dataset (``flip``, ``output``, ``skip_corrupt``, ``num_classes``).
    """
    path = Path(path)
    if path.is_file() and path.suffix == ".rec":
        return RecordIODataset(path, **kwargs)
    if not path.is_dir():
        raise FileNotFoundError(f"training data {path} does not exist")
    if (path / "train.rec").is_file():
        return RecordIODataset(path / "train.rec", **kwargs)
    if any(path.glob("*.arrow")):
        from datasets.arrow_shards import ArrowDataset

        return ArrowDataset(path, **kwargs)
    return ImageFolderDataset(path, **kwargs)
