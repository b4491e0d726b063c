"""Reading ordinary photos (JPEG, PNG, WebP) the way a viewer shows them.

Cameras store a portrait photo as landscape pixels plus an EXIF ``Orientation`` tag
(TIFF tag 274, values 1..8) that says how to turn it. :func:`read_photo` decodes with
OpenCV, told to ignore the tag (whether OpenCV applies it has changed across versions
and formats), reads the tag itself from the JPEG ``APP1`` segment, the PNG ``eXIf``
chunk or the WebP ``EXIF`` chunk, and applies it. So the pixels are the same whatever
the OpenCV version.
"""

from __future__ import annotations

import os
import struct

import cv2
import numpy as np

#: Photo files by (lower-case) suffix.
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

_ORIENTATION_TAG = 0x0112
_EXIF_PREFIX = b"Exif\x00\x00"


class PhotoError(ValueError):
    """A photo that cannot be read: ``<path>: <why>``."""


def _tiff_orientation(tiff: bytes) -> int:
    """The Orientation value of IFD0 of a TIFF/EXIF block, 1 if absent or malformed."""
    if tiff.startswith(_EXIF_PREFIX):
        tiff = tiff[len(_EXIF_PREFIX) :]
    if len(tiff) < 8:
        return 1
    if tiff[:4] == b"II*\x00":
        end = "<"
    elif tiff[:4] == b"MM\x00*":
        end = ">"
    else:
        return 1
    (ifd,) = struct.unpack(end + "I", tiff[4:8])
    if ifd + 2 > len(tiff):
        return 1
    (count,) = struct.unpack(end + "H", tiff[ifd : ifd + 2])
    for i in range(count):
        at = ifd + 2 + 12 * i
        if at + 12 > len(tiff):
            return 1
        tag, kind, n = struct.unpack(end + "HHI", tiff[at : at + 8])
        if tag == _ORIENTATION_TAG:
            if kind != 3 or n != 1:  # SHORT, one value, stored in the entry itself
                return 1
            (value,) = struct.unpack(end + "H", tiff[at + 8 : at + 10])
            return value if 1 <= value <= 8 else 1
    return 1


def _jpeg_exif(data: bytes) -> bytes | None:
    at = 2  # after SOI
    while at + 4 <= len(data):
        if data[at] != 0xFF:
            return None
        marker = data[at + 1]
        if marker == 0xFF:  # fill byte
            at += 1
            continue
        if marker in (0xD9, 0xDA):  # end of image, start of scan: no more metadata
            return None
        if 0xD0 <= marker <= 0xD7 or marker == 0x01:  # markers without a length
            at += 2
            continue
        (length,) = struct.unpack(">H", data[at + 2 : at + 4])
        segment = data[at + 4 : at + 2 + length]
        if marker == 0xE1 and segment.startswith(_EXIF_PREFIX):
            return segment
        at += 2 + length
    return None


def _png_exif(data: bytes) -> bytes | None:
    at = 8  # after the signature
    while at + 8 <= len(data):
        length, kind = struct.unpack(">I4s", data[at : at + 8])
        if kind == b"eXIf":
            return data[at + 8 : at + 8 + length]
        if kind == b"IEND":
            return None
        at += 12 + length  # length, type, data, CRC
    return None


def _webp_exif(data: bytes) -> bytes | None:
    at = 12  # after "RIFF", size, "WEBP"
    while at + 8 <= len(data):
        kind, length = struct.unpack("<4sI", data[at : at + 8])
        if kind == b"EXIF":
            return data[at + 8 : at + 8 + length]
        at += 8 + length + (length & 1)  # chunks are padded to an even size
    return None


def exif_orientation(data: bytes) -> int:
    """EXIF Orientation (1..8) of an encoded JPEG, PNG or WebP; 1 when there is none."""
    try:
        if data[:2] == b"\xff\xd8":
            block = _jpeg_exif(data)
        elif data[:8] == b"\x89PNG\r\n\x1a\n":
            block = _png_exif(data)
        elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            block = _webp_exif(data)
        else:
            block = None
    except struct.error:
        return 1
    return _tiff_orientation(block) if block else 1


def apply_orientation(image: np.ndarray, orientation: int) -> np.ndarray:
    """Turn decoded pixels ``(H, W, ...)`` as EXIF ``orientation`` says (1 = as stored).

    2 mirror left-right, 3 rotate 180, 4 mirror top-bottom, 5 transpose (mirror along
    the main diagonal), 6 rotate 90 clockwise, 7 transverse (mirror along the other
    diagonal), 8 rotate 90 counter-clockwise.
    """
    t = (1, 0, *range(2, image.ndim))
    if orientation == 2:
        out = image[:, ::-1]
    elif orientation == 3:
        out = image[::-1, ::-1]
    elif orientation == 4:
        out = image[::-1]
    elif orientation == 5:
        out = image.transpose(t)
    elif orientation == 6:
        out = image.transpose(t)[:, ::-1]
    elif orientation == 7:
        out = image.transpose(t)[::-1, ::-1]
    elif orientation == 8:
        out = image.transpose(t)[::-1]
    else:
        return image
    return np.ascontiguousarray(out)


def decode_photo(data: bytes, where: str = "photo") -> np.ndarray:
    """Encoded JPEG/PNG/WebP bytes -> BGR uint8 ``(H, W, 3)``, EXIF orientation applied.

    Raises :class:`PhotoError` naming ``where`` if OpenCV cannot decode it.
    """
    arr = np.frombuffer(data, np.uint8)
    try:
        img = (
            cv2.imdecode(arr, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
            if arr.size
            else None
        )
    except cv2.error:  # e.g. a header announcing more pixels than OpenCV allows
        img = None
    if img is None:
        what = "an empty file" if not arr.size else f"{arr.size} bytes"
        raise PhotoError(f"{where}: OpenCV cannot decode {what} as an image")
    return apply_orientation(img, exif_orientation(data))


def read_photo(path: str | os.PathLike[str]) -> np.ndarray:
    """Read a photo file: BGR uint8 ``(H, W, 3)``, EXIF orientation applied.

    Raises :class:`PhotoError` (``<path>: <why>``) for a file that cannot be read or decoded.
    """
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as exc:
        raise PhotoError(f"{os.fspath(path)}: cannot read: {exc.strerror or exc}") from exc
    return decode_photo(data, os.fspath(path))
