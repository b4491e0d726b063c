"""The face-dataset layout of MS1M / Glint360K / WebFace RecordIO files, and the im2rec layout.

Face layout (insightface releases): images at keys ``1..N`` with the class id as label
(scalar, or an array whose first element is the class); key 0 holds ``label = [N+1, N+1+C]``
(``flag > 0``, empty payload); keys ``N+1..N+C`` hold each identity's ``[first_key, end_key)``.
im2rec layout: every key is an image with a scalar label, no header record.

float32 labels are exact only up to 2**24, so image keys are derived from the ``.idx``, never
from header arithmetic alone: the boundary between images and identity records is located
by reading the few records near the (possibly inexact) header value.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.atomic import write_text
from common.face_input import ARCFACE_INPUT
from datasets.errors import LabelRangeError
from datasets.recordio import IndexedRecordIO, IRHeader, RecordIOError, pack, unpack

#: float32 labels (the key ranges of identity records) are exact below this.
EXACT_FLOAT = 1 << 24


@dataclass
class RecordLayout:
    """What a ``.rec``/``.idx`` pair holds.

    Attributes:
        image_keys: int64 array ``(N,)`` of image keys, ascending.
        num_classes: number of identities, or ``None`` if unknown (im2rec without property).
        face_layout: True for the face-dataset layout (header record 0 present).
        identity_keys: int64 array ``(C,)`` of identity-record keys (empty for im2rec).
    """

    image_keys: np.ndarray
    num_classes: int | None
    face_layout: bool
    identity_keys: np.ndarray


def read_property(directory: str | os.PathLike) -> tuple[int, int, int] | None:
    """Parse ``directory/property`` (``num_classes,112,112``); ``None`` if absent.

    Raises :class:`RecordIOError` naming the file for anything else (binary garbage,
    other fields, a class count or image size that is not a positive integer).
    """
    path = Path(directory) / "property"
    if not path.is_file():
        return None
    raw = path.read_bytes()[:4096]
    try:
        text = raw.decode("ascii").strip()
    except UnicodeDecodeError:
        raise RecordIOError(
            f"{path}: not a text file (expected 'num_classes,height,width', got {raw[:40]!r})",
            path=path,
        ) from None
    try:
        c, h, w = (int(v) for v in text.split(","))
    except ValueError:
        raise RecordIOError(
            f"{path}: expected 'num_classes,height,width', got {text[:80]!r}", path=path
        ) from None
    if c <= 0 or h <= 0 or w <= 0:
        raise RecordIOError(
            f"{path}: num_classes, height and width must be positive, got {text[:80]!r}",
            path=path,
        )
    return c, h, w


def write_property(
    directory: str | os.PathLike,
    num_classes: int,
    image_size: tuple[int, int] = (ARCFACE_INPUT.size, ARCFACE_INPUT.size),
) -> Path:
    """Write ``directory/property`` (``num_classes,height,width``) atomically; the one
    writer of the file :func:`read_property` reads. Returns its path."""
    path = Path(directory) / "property"
    h, w = image_size
    write_text(path, f"{int(num_classes)},{int(h)},{int(w)}\n")
    return path


def _is_identity_record(reader: IndexedRecordIO, key: int) -> bool:
    header, payload = unpack(reader.read_idx(key))
    return header.flag == 2 and len(payload) == 0


def inspect_layout(reader: IndexedRecordIO) -> RecordLayout:
    """Work out which keys are images and how many classes a RecordIO file holds."""
    keys = np.asarray(sorted(reader.keys), dtype=np.int64)
    prop = read_property(reader.uri.parent)
    if 0 in reader.idx:
        header, payload = unpack(reader.read_idx(0))
        if header.flag > 0 and len(payload) == 0 and len(header.label) >= 2:
            lo, hi = float(header.label[0]), float(header.label[1])
            if lo < EXACT_FLOAT:
                boundary = int(lo)
            else:  # inexact float32: probe the records around the announced boundary
                near = keys[(keys >= lo - 16) & (keys <= lo + 16)]
                ident = [int(k) for k in near if _is_identity_record(reader, int(k))]
                if not ident:
                    raise RecordIOError(
                        f"{reader.uri} key 0: header announces identity records from about "
                        f"{lo:.0f}, but none were found near that key"
                    )
                boundary = min(ident)
            image_keys = keys[(keys > 0) & (keys < boundary)]
            identity_keys = keys[keys >= boundary]
            num_classes = len(identity_keys)
            if hi < EXACT_FLOAT and int(hi) - boundary != num_classes:
                raise RecordIOError(
                    f"{reader.uri} key 0: header announces {int(hi) - boundary} identities, "
                    f"{reader.idx_path} holds {num_classes} keys from {boundary} on"
                )
            if prop is not None and prop[0] != num_classes:
                raise RecordIOError(
                    f"{reader.uri.parent / 'property'} says {prop[0]} classes, "
                    f"{reader.uri} holds {num_classes} identity records"
                )
            return RecordLayout(image_keys, num_classes, True, identity_keys)
    return RecordLayout(keys, prop[0] if prop else None, False, np.zeros(0, np.int64))


def image_label(header: IRHeader, where: str = "record") -> int:
    """The class id of an image record: the scalar label or the first array element.

    Raises :class:`LabelRangeError` naming ``where`` if the label is not an integer
    (NaN, infinite, 2.5): rounding it would train on a class nobody wrote.
    """
    label = header.label
    if header.flag > 0:
        if len(label) == 0:
            raise LabelRangeError(f"{where}: the record's label array is empty")
        label = label[0]
    value = float(label)
    if not math.isfinite(value) or value != math.floor(value):
        raise LabelRangeError(f"{where}: label {value!r} is not an integer class id")
    return int(value)


def scan_num_classes(reader: IndexedRecordIO, image_keys: np.ndarray) -> int:
    """``max(label) + 1`` over all images (reads every header; for small im2rec files)."""
    top = -1
    for k in image_keys:
        where = f"{reader.uri} key {int(k)} at byte offset {reader.idx[int(k)]}"
        top = max(top, image_label(unpack(reader.read_idx(int(k)))[0], where))
    return top + 1


class FaceRecWriter:
    """The one writer of the face layout: ``train.rec``/``train.idx`` + ``property``, as
    insightface writes them.

    Args:
        out_dir: output directory (created if needed).
        prefix: file stem (``train`` gives ``train.rec``/``train.idx``).
        num_classes: identity count to record; classes after the last label written
            get empty identity records. ``None``: last label + 1.
        image_size: ``(height, width)`` written to ``property``.

    Call :meth:`add` for every image in class order (labels non-decreasing, each
    class contiguous), then :meth:`close`, which appends header record 0
    (``label = [N+1, N+1+C]``, ``id2 = 1``) and one identity record per class
    (``label = [first_key, end_key)``; a class without images gets ``[k, k)`` at the
    key where its images would have been). Image ``i`` (1-based) is stored at key
    ``i`` with ``IRHeader(0, label, i, 0)``. Files appear atomically at close.
    """

    def __init__(
        self,
        out_dir: str | os.PathLike,
        prefix: str = "train",
        num_classes: int | None = None,
        image_size: tuple[int, int] = (ARCFACE_INPUT.size, ARCFACE_INPUT.size),
    ) -> None:
        self.out_dir = Path(out_dir)
        self.num_classes = num_classes
        self.image_size = image_size
        self._w = IndexedRecordIO(
            self.out_dir / f"{prefix}.idx", self.out_dir / f"{prefix}.rec", "w"
        )
        self._next_key = 1
        self._ranges: list[list[int]] = []  # [first_key, end_key) per class so far

    def add(self, label: int, encoded_image: bytes) -> int:
        """Append one encoded image of class ``label``; returns its key."""
        label = int(label)
        last = len(self._ranges) - 1
        if label < last or label < 0:
            raise ValueError(
                f"{self._w.uri}: face-layout writer needs labels in non-decreasing order "
                f"(each class contiguous): got {label} after {last}"
            )
        if self.num_classes is not None and label >= self.num_classes:
            raise ValueError(
                f"{self._w.uri}: label {label} is outside [0, num_classes={self.num_classes})"
            )
        key = self._next_key
        while len(self._ranges) <= label:  # skipped classes stay empty: [key, key)
            self._ranges.append([key, key])
        self._ranges[label][1] = key + 1
        self._w.write_idx(key, pack(IRHeader(0, float(label), key, 0), encoded_image))
        self._next_key += 1
        return key

    def close(self) -> tuple[int, int]:
        """Write header and identity records and the property file; ``(N images, C classes)``."""
        n = self._next_key - 1
        c = len(self._ranges) if self.num_classes is None else self.num_classes
        ranges = self._ranges + [[n + 1, n + 1]] * (c - len(self._ranges))
        self._w.write_idx(0, pack(IRHeader(0, [n + 1, n + 1 + c], 0, 1), b""))
        for i, (first, end) in enumerate(ranges):
            self._w.write_idx(n + 1 + i, pack(IRHeader(0, [first, end], n + 1 + i, 0), b""))
        self._w.close()
        write_property(self.out_dir, c, self.image_size)
        return n, c

    def abort(self) -> None:
        """Discard everything written so far (no file appears)."""
        self._w.abort()
