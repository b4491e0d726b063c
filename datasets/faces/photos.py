"""Reading ordinary photos (JPEG, PNG, WebP; BMP too) the way a viewer shows them,
at a bounded cost whatever the file.

**Bounded cost.** A photo comes from anywhere, so nothing about it is trusted before it
is checked:

* only a regular file is opened (a symlink to one is fine); a FIFO, a device (a symlink
  to ``/dev/zero``), a socket or a directory is refused as ``not_a_file`` without
  reading a byte (a FIFO is opened non-blocking, so it cannot hang the reader);
* at most ``max_bytes`` are read (default: 4 bytes per pixel of the pixel cap, at least
  16 MiB); a larger file is ``too_large``;
* the image's size is read from its header (PNG ``IHDR``, JPEG ``SOFn``, WebP ``VP8``/
  ``VP8L``/``VP8X``, BMP) **before** decoding, and an image of more than ``max_pixels``
  pixels (default :data:`DEFAULT_MAX_PIXELS`, 40 megapixels) is ``too_large``: a 2.6 MB
  PNG announcing 30000x30000 pixels costs a few kilobytes to refuse, not 5 GB to decode.
  A file whose header is not one of these formats is not decoded at all (``unreadable``).

So one photo costs a reader at most about ``max_bytes`` plus 12 bytes per pixel of the
cap (decoder buffers, the BGR image, its turned copy): about 640 MB above the process's
baseline at the default cap (docs/reliability.md has the measured figures).

**EXIF orientation.** Cameras store a portrait photo as landscape pixels plus an EXIF
``Orientation`` tag (TIFF tag 274, values 1..8) that says how to turn it.
:func:`read_photo` decodes with OpenCV, told to ignore the tag (whether OpenCV applies it
has changed across versions and formats), reads the tag itself from the JPEG ``APP1``
segment, the PNG ``eXIf`` chunk or the WebP ``EXIF`` chunk, and applies it. So the
pixels are the same whatever the OpenCV version.
"""

from __future__ import annotations

import os
import stat
import struct
from typing import Any

import cv2
import numpy as np

from common.errors import UserError
from datasets.faces.options import DEFAULT_MAX_PIXELS

#: Photo files by (lower-case) suffix.
PHOTO_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")

_MIN_MAX_BYTES = 16 << 20

_ORIENTATION_TAG = 0x0112
_EXIF_PREFIX = b"Exif\x00\x00"


class PhotoError(UserError, ValueError):
    """A photo that cannot be read: ``<path>: <detail>``.

    Attributes:
        reason: ``unreadable``, ``not_a_file`` or ``too_large`` (the rejection reason
            of ``datasets.prepare`` and ``eval.embed``).
        detail: the message without the path.
    """

    def __init__(self, where: str, detail: str, reason: str = "unreadable") -> None:
        super().__init__(f"{where}: {detail}")
        self.where = where
        self.detail = detail
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:  # crosses process boundaries with its fields
        return (type(self), (self.where, self.detail, self.reason))


def max_bytes_for(max_pixels: int) -> int:
    """The file-size cap that goes with a pixel cap: 4 bytes per pixel, at least 16 MiB."""
    return max(_MIN_MAX_BYTES, 4 * int(max_pixels))


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


# ------------------------------------------------------------------ image headers

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
#: JPEG start-of-frame markers (baseline, extended, progressive, lossless; Huffman and
#: arithmetic): not C4 (DHT), C8 (JPG) or CC (DAC)
_JPEG_SOF = frozenset(
    {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
)


class _HeaderError(ValueError):
    """The header of a recognised format is malformed (the message says how)."""


def _jpeg_size(data: bytes) -> tuple[int, int]:
    at = 2  # after SOI
    n = len(data)
    while at < n:
        if data[at] != 0xFF:  # stray bytes between segments: decoders skip them too
            at += 1
            continue
        while at < n and data[at] == 0xFF:  # fill bytes
            at += 1
        if at >= n:
            break
        marker = data[at]
        at += 1
        if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7 or marker == 0x00:
            continue  # markers without a segment
        if marker in (0xD9, 0xDA):
            raise _HeaderError("no JPEG frame header (SOF) before the image data")
        if at + 2 > n:
            break
        (length,) = struct.unpack(">H", data[at : at + 2])
        if marker in _JPEG_SOF:
            if length < 8 or at + 7 > n:
                break
            height, width = struct.unpack(">HH", data[at + 3 : at + 7])
            if height == 0 or width == 0:
                raise _HeaderError(
                    f"the JPEG frame header gives {width}x{height} pixels (a height "
                    "defined later, by a DNL marker, is not supported)"
                )
            return width, height
        if length < 2:
            raise _HeaderError(f"JPEG segment 0x{marker:02X} has a length of {length}")
        at += length
    raise _HeaderError("no JPEG frame header (SOF): the file is truncated or not a JPEG")


def _png_size(data: bytes) -> tuple[int, int]:
    if len(data) < 24 or data[12:16] != b"IHDR":
        raise _HeaderError("a PNG whose first chunk is not IHDR")
    width, height = struct.unpack(">II", data[16:24])
    if width == 0 or height == 0:
        raise _HeaderError(f"the PNG header gives {width}x{height} pixels")
    return width, height


def _webp_size(data: bytes) -> tuple[int, int]:
    """The largest of the canvas (``VP8X``) and every frame's size (``VP8``, ``VP8L``,
    ``ANMF``): what a decoder might allocate."""
    sizes = []
    at = 12
    while at + 8 <= len(data):
        kind, length = struct.unpack("<4sI", data[at : at + 8])
        body = data[at + 8 : at + 8 + min(length, 32)]
        if kind == b"VP8X" and len(body) >= 10:
            w = int.from_bytes(body[4:7], "little") + 1
            h = int.from_bytes(body[7:10], "little") + 1
            sizes.append((w, h))
        elif kind == b"ANMF" and len(body) >= 12:
            w = int.from_bytes(body[6:9], "little") + 1
            h = int.from_bytes(body[9:12], "little") + 1
            sizes.append((w, h))
        elif kind == b"VP8 " and len(body) >= 10:
            if body[3:6] != b"\x9d\x01\x2a":
                raise _HeaderError("a WebP VP8 chunk without its start code")
            w, h = struct.unpack("<HH", body[6:10])
            sizes.append((w & 0x3FFF, h & 0x3FFF))
        elif kind == b"VP8L" and len(body) >= 5:
            if body[0] != 0x2F:
                raise _HeaderError("a WebP VP8L chunk without its signature")
            bits = int.from_bytes(body[1:5], "little")
            sizes.append(((bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1))
        at += 8 + length + (length & 1)
    if not sizes:
        raise _HeaderError("a WebP file without an image chunk (VP8, VP8L or VP8X)")
    if any(w == 0 or h == 0 for w, h in sizes):
        raise _HeaderError("a WebP image of zero pixels")
    return max(sizes, key=lambda wh: wh[0] * wh[1])


def _bmp_size(data: bytes) -> tuple[int, int]:
    if len(data) < 26:
        raise _HeaderError("a truncated BMP header")
    (dib,) = struct.unpack("<I", data[14:18])
    if dib == 12:  # OS/2 BITMAPCOREHEADER: 16-bit sizes
        width, height = struct.unpack("<HH", data[18:22])
    else:
        width, height = struct.unpack("<ii", data[18:26])
    width, height = abs(width), abs(height)  # a negative height means top-down rows
    if width == 0 or height == 0:
        raise _HeaderError(f"the BMP header gives {width}x{height} pixels")
    return width, height


def image_size(data: bytes) -> tuple[str, int, int]:
    """``(format, width, height)`` of an encoded image, read from its header only.

    Formats: ``jpeg``, ``png``, ``webp``, ``bmp`` (what :func:`decode_photo` decodes).

    Raises:
        ValueError: not one of these formats, or a malformed header (the message says
            which).
    """
    try:
        if data[:3] == b"\xff\xd8\xff":
            return ("jpeg", *_jpeg_size(data))
        if data[:8] == _PNG_SIGNATURE:
            return ("png", *_png_size(data))
        if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
            return ("webp", *_webp_size(data))
        if data[:2] == b"BM":
            return ("bmp", *_bmp_size(data))
    except struct.error:
        raise _HeaderError("a truncated image header") from None
    raise _HeaderError("not a JPEG, PNG, WebP or BMP file")


# ---------------------------------------------------------------------- reading


def decode_photo(
    data: bytes, where: str = "photo", max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """Encoded JPEG/PNG/WebP/BMP bytes -> BGR uint8 ``(H, W, 3)``, EXIF orientation applied.

    The header is read first: an image of more than ``max_pixels`` pixels is refused
    before anything is allocated for it.

    Raises:
        PhotoError: naming ``where``; ``reason`` ``too_large`` (over the pixel cap) or
            ``unreadable`` (empty, an unknown format, a malformed header, a decoding error).
    """
    if not data:
        raise PhotoError(where, "cannot decode an empty file as an image")
    try:
        _, width, height = image_size(data)
    except ValueError as exc:
        raise PhotoError(where, f"cannot decode {len(data)} bytes as an image: {exc}") from None
    if width * height > max_pixels:
        raise PhotoError(
            where,
            f"{width}x{height} pixels ({width * height / 1e6:.1f} MP) is over the "
            f"--max-pixels cap of {max_pixels} ({max_pixels / 1e6:g} MP); not decoded",
            "too_large",
        )
    arr = np.frombuffer(data, np.uint8)
    try:
        img = cv2.imdecode(arr, cv2.IMREAD_COLOR | cv2.IMREAD_IGNORE_ORIENTATION)
    except cv2.error:  # e.g. a header announcing more pixels than OpenCV allows
        img = None
    if img is None:
        raise PhotoError(where, f"OpenCV cannot decode {arr.size} bytes as an image")
    if img.shape[0] * img.shape[1] > max_pixels:  # a header that lied (caught after the fact)
        raise PhotoError(
            where,
            f"decoded to {img.shape[1]}x{img.shape[0]} pixels, over the --max-pixels cap "
            f"of {max_pixels}, while its header said {width}x{height}",
            "too_large",
        )
    return apply_orientation(img, exif_orientation(data))


_KINDS = (
    (stat.S_ISDIR, "a directory"),
    (stat.S_ISFIFO, "a FIFO (named pipe)"),
    (stat.S_ISCHR, "a character device"),
    (stat.S_ISBLK, "a block device"),
    (stat.S_ISSOCK, "a socket"),
)


def _not_a_file(where: str, mode: int) -> PhotoError:
    kind = next((name for test, name in _KINDS if test(mode)), "not a regular file")
    return PhotoError(where, f"{kind}, not a regular file: not read", "not_a_file")


def read_photo_bytes(path: str | os.PathLike[str], max_bytes: int | None = None) -> bytes:
    """The bytes of a photo file, read safely (see the module docstring).

    Only a regular file is opened (following symlinks); at most ``max_bytes`` (default
    :func:`max_bytes_for` the default pixel cap) are read.

    Raises:
        PhotoError: ``<path>: <why>``; ``reason`` ``not_a_file`` (a FIFO, device,
            socket, directory), ``too_large`` (over ``max_bytes``) or ``unreadable``.
    """
    where = os.fspath(path)
    if isinstance(where, bytes):
        where = os.fsdecode(where)
    cap = max_bytes_for(DEFAULT_MAX_PIXELS) if max_bytes is None else int(max_bytes)
    try:
        st = os.stat(path)  # before opening: opening a device can have effects of its own
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_file(where, st.st_mode)
        # non-blocking: a FIFO swapped in after the check cannot hang the open
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise PhotoError(where, f"cannot read: {exc.strerror or exc}") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_file(where, st.st_mode)
        if st.st_size > cap:
            raise PhotoError(
                where, f"{st.st_size} bytes is over the {cap}-byte cap for a photo", "too_large"
            )
        os.set_blocking(fd, True)
        parts, size = [], 0
        while size <= cap:
            part = os.read(fd, min(cap + 1 - size, 1 << 20))
            if not part:
                break
            parts.append(part)
            size += len(part)
        if size > cap:  # grew while being read
            raise PhotoError(where, f"more than the {cap}-byte cap for a photo", "too_large")
        return b"".join(parts)
    except OSError as exc:
        raise PhotoError(where, f"cannot read: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def read_photo(path: str | os.PathLike[str], max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray:
    """Read a photo file: BGR uint8 ``(H, W, 3)``, EXIF orientation applied.

    Raises :class:`PhotoError` (``<path>: <why>``, with its ``reason``) for a file that
    is not a regular file, is over the caps, or cannot be read or decoded.
    """
    data = read_photo_bytes(path, max_bytes_for(max_pixels))
    where = os.fspath(path)
    return decode_photo(data, os.fsdecode(where) if isinstance(where, bytes) else where, max_pixels)
