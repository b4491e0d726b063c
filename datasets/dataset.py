"""Dataset classes: RecordIO (face or im2rec layout), Arrow shards, and an image folder.

All share one contract. ``dataset[i]`` or ``dataset[(i, aug_seed)]`` (what
:class:`datasets.sampler.DistributedFaceSampler` yields) returns ``(image, label)``:

* ``output="float"`` (default): ``image`` float32 tensor ``(3, 112, 112)`` RGB in ``[-1, 1]``;
* ``output="uint8"``: ``image`` uint8 tensor ``(112, 112, 3)`` in OpenCV's BGR order (turn
  batches into RGB floats with :func:`datasets.transforms.normalize_batch`; the loader does);
* ``label`` is an ``int`` in ``[0, num_classes)``.

With ``flip=True`` the image is mirrored left-right with probability 1/2, decided by
``aug_seed`` (deterministic) or, for a plain integer index, by a per-process RNG.

Every problem with the data raises :class:`datasets.errors.DataError` (one line naming the
file, key and byte offset). Corrupt samples — an undecodable image, a malformed record, an
``.idx`` offset that does not point at a record — raise unless ``skip_corrupt=True``: then
they are logged, counted in ``num_skipped`` (per process) and replaced by the next sample,
until more distinct samples than ``max_skipped_fraction`` of the dataset have been skipped
(counted per process, or per loader: :class:`datasets.loader.FaceLoader` shares the count
among its workers), when a :class:`DataError` stops the run. Labels outside ``[0, num_classes)`` or
not integers (NaN) always raise (``LabelRangeError``): they mean the data set or
``num_classes`` is wrong, which skipping would hide.
"""

from __future__ import annotations

import logging
import math
import os
import random
import struct
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from datasets.errors import DataError, LabelRangeError
from datasets.face_layout import EXACT_FLOAT, image_label, inspect_layout, scan_num_classes
from datasets.recordio import MAGIC, IndexedRecordIO, RecordIOError, unpack
from datasets.transforms import (
    IMAGE_SIZE,
    ImageDecodeError,
    decode_bgr,
    flip_from_seed,
    to_float_chw,
    to_uint8_hwc,
)

__all__ = [
    "DataError",
    "FaceDataset",
    "ImageFolderDataset",
    "LabelRangeError",
    "RecordIODataset",
]

log = logging.getLogger(__name__)

_FAST_HEAD = struct.Struct("<IIIf")  # record magic, lrec, IRHeader flag, IRHeader label
_LEN_MASK = (1 << 29) - 1
#: Records whose headers :meth:`RecordIODataset.labels` reads in one vectorised step.
_HEADER_CHUNK = 1 << 20

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp")

#: Consecutive corrupt samples after which even ``skip_corrupt`` gives up.
MAX_CONSECUTIVE_CORRUPT = 64


def check_skipped_fraction(value: float, option: str = "max_skipped_fraction") -> None:
    """Raise ``ValueError`` naming ``option`` unless ``value`` is a fraction in ``[0, 1)``."""
    if not (isinstance(value, int | float) and math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(
            f"{option}: must be a fraction in [0, 1) of the training images that may be "
            f"skipped as corrupt (got {value!r})"
        )


class FaceDataset(Dataset):
    """Base class; subclasses implement ``__len__`` and ``_load(i) -> (bytes, label, where)``.

    Args:
        flip: random horizontal flips.
        output: ``"float"`` or ``"uint8"`` (see the module docstring).
        skip_corrupt: skip (log, count) corrupt samples instead of raising.
        image_size: side of the returned images.
        max_skipped_fraction: with ``skip_corrupt``, the fraction of ``len(self)`` that
            may be skipped (distinct samples) before a :class:`DataError` stops the run.
    """

    num_classes: int

    def __init__(
        self,
        flip: bool = True,
        output: str = "float",
        skip_corrupt: bool = False,
        image_size: int = IMAGE_SIZE,
        max_skipped_fraction: float = 0.001,
    ) -> None:
        if output not in ("float", "uint8"):
            raise ValueError(f"output must be 'float' or 'uint8', got {output!r}")
        check_skipped_fraction(max_skipped_fraction)
        self.flip = flip
        self.output = output
        self.skip_corrupt = skip_corrupt
        self.max_skipped_fraction = max_skipped_fraction
        self.image_size = image_size
        self.num_skipped = 0
        self._skipped: set[int] = set()
        self._marks: torch.Tensor | None = None  # see share_skip_marks
        self._rng = random.Random()

    def _load(self, index: int) -> tuple[bytes | memoryview, int, str | None]:
        """``(encoded image, label, description or None)`` of sample ``index``."""
        raise NotImplementedError

    def _where(self, index: int) -> str:
        """Where sample ``index`` lives (file, key, byte offset), for error messages."""
        return f"{type(self).__name__} sample {index}"

    def _location(self, index: int) -> dict[str, Any]:
        """``path``/``key``/``offset`` of sample ``index`` for :class:`DataError`."""
        return {"key": self.sample_key(index)}

    def __len__(self) -> int:
        raise NotImplementedError

    def sample_key(self, index: int) -> int:
        """A stable key of sample ``index`` for logs (the index itself by default)."""
        return index

    def label_of(self, index: int) -> int:
        """The label of sample ``index`` (reads its record)."""
        return self._load(index)[1]

    def labels(self) -> np.ndarray:
        """Every sample's label, int64 ``(N,)`` in sample order, without decoding any image
        (what the ``P x K`` sampler and sub-center cleaning group by). This default reads
        each sample's record; the datasets here override it with a faster source."""
        return np.fromiter((self.label_of(i) for i in range(len(self))), np.int64, len(self))

    def __getitem__(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int]:
        image, label, _ = self.fetch(item)
        return image, label

    def fetch(self, item: int | tuple[int, int]) -> tuple[torch.Tensor, int, int]:
        """``(image, label, index)``: ``self[item]`` and the index of the sample it
        decoded, which differs from ``item``'s when ``skip_corrupt`` replaced a corrupt
        sample by the next sound one (what per-sample side data, e.g. a teacher's cached
        embedding, must be looked up by)."""
        if isinstance(item, tuple):
            index, aug_seed = int(item[0]), int(item[1])
            flip = self.flip and flip_from_seed(aug_seed)
        else:
            index = int(item)
            flip = self.flip and self._rng.random() < 0.5
        n = len(self)
        attempts = min(n, MAX_CONSECUTIVE_CORRUPT)
        for attempt in range(attempts):
            i = (index + attempt) % n
            try:
                return (*self._sample(i, flip), i)
            except LabelRangeError:
                raise  # never skipped: the data set or num_classes is wrong
            except DataError as exc:
                if not self.skip_corrupt:
                    raise
                self._skip(i, exc)
        raise DataError(
            f"{self._where(index)}: this sample and the next {attempts - 1} are all corrupt "
            "(skip_corrupt gives up)",
            **self._location(index),
        )

    def _sample(self, i: int, flip: bool) -> tuple[torch.Tensor, int]:
        """Sample ``i`` decoded; raises :class:`DataError` naming where it lives."""
        try:
            payload, label, where = self._load(i)
        except DataError as exc:
            if exc.key is None:  # add the location the lower layer did not know
                loc = self._location(i)
                raise type(exc)(f"{self._where(i)}: {exc}", **loc) from None
            raise
        if not 0 <= label < self.num_classes:
            raise LabelRangeError(
                f"{where or self._where(i)}: label {label} is outside "
                f"[0, num_classes={self.num_classes})",
                **self._location(i),
            )
        img = decode_bgr(payload, None)
        if img is None:
            raise ImageDecodeError(
                f"{where or self._where(i)}: OpenCV cannot decode {len(payload)} bytes as an image",
                **self._location(i),
            )
        if self.output == "float":
            return to_float_chw(img, flip, self.image_size), label
        return to_uint8_hwc(img, flip, self.image_size), label

    def share_skip_marks(self) -> None:
        """Count skipped samples in shared memory, so that every DataLoader worker of
        this process (forked or spawned after this call) adds to one count."""
        if self._marks is None:
            self._marks = torch.zeros(len(self), dtype=torch.uint8).share_memory_()

    def _distinct_skipped(self, i: int) -> int:
        if self._marks is None:
            self._skipped.add(i)
            return len(self._skipped)
        self._marks[i] = 1  # one byte per sample: workers never write the same byte apart
        return int(self._marks.sum())

    def _skip(self, i: int, exc: DataError) -> None:
        """Count and log a skipped corrupt sample; raise once past the cap."""
        self.num_skipped += 1
        distinct = self._distinct_skipped(i)
        allowed = self.max_skipped_fraction * len(self)
        if distinct > allowed:
            raise DataError(
                f"{exc} -- {distinct} distinct corrupt samples skipped by this "
                f"loader, more than max_skipped_fraction={self.max_skipped_fraction:g} of "
                f"the {len(self)} images allows ({allowed:g}); stopping",
                path=exc.path,
                key=exc.key,
                offset=exc.offset,
            )
        log.warning("skipping corrupt sample (%d skipped so far): %s", self.num_skipped, exc)

    def seed_worker(self, seed: int) -> None:
        """Reseed the per-process flip RNG (used only for plain integer indices)."""
        self._rng.seed(seed)


def check_offsets(reader: IndexedRecordIO) -> None:
    """Every ``.idx`` offset must point into the ``.rec`` (vectorised, at start-up):
    a bad index fails when the data is opened, not hours into training. Negative
    offsets are refused by :func:`datasets.recordio.read_idx_file` already."""
    size = reader.uri.stat().st_size
    offsets = np.fromiter(reader.idx.values(), np.int64, len(reader.idx))
    bad = np.flatnonzero(offsets >= size)
    if len(bad):
        key = list(reader.idx)[int(bad[0])]
        raise RecordIOError(
            f"{reader.idx_path}: key {key} at byte offset {reader.idx[key]} points at or past "
            f"the end of {reader.uri} ({size} bytes); {len(bad)} such keys",
            path=reader.idx_path,
            key=key,
            offset=reader.idx[key],
        )


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
        check_offsets(self.reader)
        self._offsets: np.ndarray | None = None
        layout = inspect_layout(self.reader)
        self.image_keys = layout.image_keys
        self.face_layout = layout.face_layout
        if len(self.image_keys) == 0:
            raise RecordIOError(f"{rec_path} holds no image records", path=rec_path)
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

    def _location(self, index: int) -> dict[str, Any]:
        key = int(self.image_keys[index])
        return {"path": self.reader.uri, "key": key, "offset": self.reader.idx[key]}

    def _load(self, index: int) -> tuple[bytes | memoryview, int, str | None]:
        if self._offsets is None:
            idx = self.reader.idx
            self._offsets = np.fromiter((idx[int(k)] for k in self.image_keys), np.int64)
        off = int(self._offsets[index])
        buf = self.reader._buffer()
        # fast path: a single-part record whose header carries an integral scalar label
        if 0 <= off and off + 32 <= len(buf):
            magic, lrec, flag, label = _FAST_HEAD.unpack_from(buf, off)
            end = off + 8 + (lrec & _LEN_MASK)
            if magic == MAGIC and lrec >> 29 == 0 and flag == 0 and end <= len(buf):
                if label.is_integer():  # NaN, inf, 2.5: the checked path below
                    return memoryview(buf)[off + 32 : end], int(label), None
        key = int(self.image_keys[index])
        raw = self.reader.read_idx(key)  # a RecordIOError names file, key and offset
        try:
            header, payload = unpack(raw)
        except RecordIOError as exc:
            raise RecordIOError(f"{self._where(index)}: {exc}", **self._location(index)) from None
        return payload, image_label(header, self._where(index)), None

    def labels(self) -> np.ndarray:
        """Every image's label (see :meth:`FaceDataset.labels`): from the identity records
        (one per class) of a face-layout file when their key ranges are exact (below
        2**24), else from the image records' headers, read vectorised straight from the
        memory map (a record whose header needs the slow path is unpacked on its own)."""
        labels = self._identity_record_labels() if self.face_layout else None
        return labels if labels is not None else self._header_labels()

    def _identity_record_labels(self) -> np.ndarray | None:
        """Labels from the identity records ``[first_key, end_key)``; None if they are
        inexact (float32 above 2**24) or do not tile the image keys exactly."""
        reader = self.reader
        keys = np.asarray(self.image_keys, np.int64)
        identity_keys = inspect_layout(reader).identity_keys
        labels = np.full(len(keys), -1, np.int64)
        for c, ident_key in enumerate(identity_keys):
            header, _ = unpack(reader.read_idx(int(ident_key)))
            first, end = float(header.label[0]), float(header.label[1])
            if end >= EXACT_FLOAT:
                return None
            lo, hi = np.searchsorted(keys, [int(first), int(end)])
            if hi - lo != int(end) - int(first) or (labels[lo:hi] != -1).any():
                return None
            labels[lo:hi] = c
        return None if (labels < 0).any() else labels

    def _header_labels(self) -> np.ndarray:
        """Labels from the image records' headers, vectorised over the memory map."""
        reader = self.reader
        keys = np.asarray(self.image_keys, np.int64)
        offsets = np.fromiter((reader.idx[int(k)] for k in keys), np.int64, len(keys))
        buf = np.frombuffer(reader._buffer(), dtype=np.uint8)
        labels = np.empty(len(keys), np.int64)
        for s in range(0, len(keys), _HEADER_CHUNK):
            off = offsets[s : s + _HEADER_CHUNK]
            ok = off + 16 <= len(buf)
            raw = buf[np.where(ok, off, 0)[:, None] + np.arange(16)]
            words = raw.view("<u4")  # magic, lrec, IRHeader flag, IRHeader label
            fast = ok & (words[:, 0] == MAGIC) & (words[:, 1] >> 29 == 0) & (words[:, 2] == 0)
            values = raw[:, 12:16].copy().view("<f4")[:, 0]
            fast &= np.floor(values) == values  # NaN, inf and 2.5 take the checked path
            labels[s : s + len(off)] = np.where(fast, values, 0)
            for i in np.flatnonzero(~fast):
                key = int(keys[s + i])
                where = f"{reader.uri} key {key} at byte offset {reader.idx[key]}"
                labels[s + i] = image_label(unpack(reader.read_idx(key))[0], where)
        return labels


class ImageFolderDataset(FaceDataset):
    """``root/<identity>/<image>`` folders; identities are labelled in sorted name order."""

    def __init__(
        self, root: str | os.PathLike, num_classes: int | None = None, **kwargs: Any
    ) -> None:
        super().__init__(**kwargs)
        self.root = Path(root)
        self.files, labels, self.classes = list_image_folder(self.root)
        #: the label of each of ``self.files``
        self.file_labels = np.asarray(labels, dtype=np.int64)
        self.num_classes = len(self.classes)
        if num_classes is not None and num_classes != self.num_classes:
            raise ValueError(
                f"num_classes={num_classes} was given, {self.root} holds {self.num_classes}"
            )

    def __len__(self) -> int:
        return len(self.files)

    def _location(self, index: int) -> dict[str, Any]:
        return {"path": self.files[index], "key": index}

    def _where(self, index: int) -> str:
        return str(self.files[index])

    def _load(self, index: int) -> tuple[bytes, int, str]:
        path = self.files[index]
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise DataError(
                f"{path}: cannot be read ({exc.strerror or exc})", **self._location(index)
            ) from None
        return data, int(self.file_labels[index]), str(path)

    def labels(self) -> np.ndarray:
        """Every image's label (see :meth:`FaceDataset.labels`), from the folder names."""
        return self.file_labels.copy()


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
