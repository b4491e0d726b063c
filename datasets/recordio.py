"""MXNet RecordIO without MXNet: reader and writer, byte-compatible with MXNet 1.9.1.

The names follow ``mxnet.recordio`` so MXNet users find what they know::

    r = IndexedRecordIO("train.idx", "train.rec", "r")
    raw = r.read_idx(1)                       # bytes, multi-part records re-joined
    header, jpeg = unpack(raw)                # IRHeader(flag, label, id, id2), payload bytes
    header, bgr = unpack_img(raw)             # BGR uint8 (H, W, 3), as MXNet's unpack_img

    w = IndexedRecordIO("out.idx", "out.rec", "w")
    w.write_idx(1, pack(IRHeader(0, 3.0, 1, 0), jpeg))
    w.close()

Format (little endian): each record is ``u32 magic 0xCED7230A``, ``u32 lrec`` with the
continuation flag in the top 3 bits and the length in the low 29, the payload, then zero
padding to a multiple of 4. A payload holding the magic word at a 4-byte-aligned offset is
written as several parts (cflag 1 first, 2 middle, 3 last) with the magic word dropped; the
reader re-inserts it. The ``.idx`` file holds text lines ``key\\toffset`` in write order.

Reading goes through a read-only memory map that is (re)opened lazily in each process, so
one reader object can be handed to forked or spawned DataLoader workers.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Iterator
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from common.atomic import AtomicFile, write_text
from datasets.errors import DataError

MAGIC = 0xCED7230A
_MAGIC_BYTES = struct.pack("<I", MAGIC)
_LEN_BITS = 29
_LEN_MASK = (1 << _LEN_BITS) - 1
MAX_RECORD_BYTES = 1 << _LEN_BITS  # payloads must be strictly smaller than this

_IR_FORMAT = "<IfQQ"
IR_SIZE = struct.calcsize(_IR_FORMAT)  # 24 bytes


class RecordIOError(DataError):
    """Malformed RecordIO input; the message names the file, key and byte offset."""


class IRHeader(NamedTuple):
    """Image record header (``<IfQQ``, 24 bytes).

    ``flag`` 0 means a scalar ``label``; ``flag > 0`` means a float32 label array of that
    length precedes the payload (``label`` is then a ``np.ndarray`` after :func:`unpack`).
    """

    flag: int
    label: Any
    id: int
    id2: int


# ----------------------------------------------------------------------------- packing


def pack(header: IRHeader | tuple, payload: bytes) -> bytes:
    """Pack a header and payload into one record body, exactly as ``mxnet.recordio.pack``.

    A scalar label is stored in the header (flag forced to 0). An array label is stored as
    float32 values ahead of the payload, with ``flag = len(label)`` and header label 0.
    """
    header = IRHeader(*header)
    if isinstance(header.label, (int, float, np.integer, np.floating)):
        header = header._replace(flag=0)
        prefix = b""
    else:
        label = np.asarray(header.label, dtype=np.float32).ravel()
        header = header._replace(flag=int(label.size), label=0.0)
        prefix = label.tobytes()
    head = struct.pack(_IR_FORMAT, header.flag, float(header.label), header.id, header.id2)
    return head + prefix + bytes(payload)


def unpack(raw: bytes | memoryview) -> tuple[IRHeader, bytes]:
    """Split a record body into ``(IRHeader, payload)``; inverse of :func:`pack`.

    With ``flag > 0`` the header's label becomes a float32 array of ``flag`` values.
    Raises :class:`RecordIOError` if the body is shorter than its header says.
    """
    if len(raw) < IR_SIZE:
        raise RecordIOError(f"record of {len(raw)} bytes is shorter than the {IR_SIZE}-byte header")
    flag, label, id_, id2 = struct.unpack_from(_IR_FORMAT, raw, 0)
    header = IRHeader(flag, label, id_, id2)
    body = raw[IR_SIZE:]
    if flag > 0:
        if len(body) < 4 * flag:
            raise RecordIOError(
                f"record header announces {flag} float32 labels but only {len(body)} bytes follow"
            )
        header = header._replace(label=np.frombuffer(bytes(body[: 4 * flag]), np.float32))
        body = body[4 * flag :]
    return header, bytes(body)


def pack_img(
    header: IRHeader | tuple, img: np.ndarray, quality: int = 95, img_fmt: str = ".jpg"
) -> bytes:
    """Encode a BGR uint8 image ``(H, W, 3)`` with OpenCV and :func:`pack` it (as MXNet)."""
    import cv2

    fmt = img_fmt.upper()
    params: list[int] = []
    if fmt in (".JPG", ".JPEG"):
        params = [cv2.IMWRITE_JPEG_QUALITY, int(quality)]
    elif fmt == ".PNG":
        params = [cv2.IMWRITE_PNG_COMPRESSION, int(quality)]
    ok, buf = cv2.imencode(img_fmt, img, params)
    if not ok:
        raise RecordIOError(f"OpenCV failed to encode an image of shape {img.shape} as {img_fmt}")
    return pack(header, buf.tobytes())


def unpack_img(raw: bytes, iscolor: int = -1) -> tuple[IRHeader, np.ndarray]:
    """Unpack a record and decode its image with OpenCV: ``(IRHeader, BGR uint8 array)``."""
    import cv2

    header, payload = unpack(raw)
    img = cv2.imdecode(np.frombuffer(payload, np.uint8), iscolor)
    if img is None:
        raise RecordIOError(f"undecodable image payload of {len(payload)} bytes")
    return header, img


# ----------------------------------------------------------------------------- framing


def encode_record(payload: bytes) -> bytes:
    """Frame one payload as MXNet's writer does (parts split at aligned magic words, padding).

    Returns the bytes to append to a ``.rec`` file; their length is a multiple of 4.
    """
    n = len(payload)
    if n >= MAX_RECORD_BYTES:
        raise RecordIOError(f"payload of {n} bytes exceeds the RecordIO limit of 2**29 - 1 bytes")
    out = bytearray()
    start = 0
    aligned_end = n & ~3
    pos = payload.find(_MAGIC_BYTES, 0, aligned_end)
    while pos != -1:
        if pos % 4 == 0:
            cflag = 1 if start == 0 else 2
            out += _MAGIC_BYTES + struct.pack("<I", (cflag << _LEN_BITS) | (pos - start))
            out += payload[start:pos]
            start = pos + 4
            pos = payload.find(_MAGIC_BYTES, start, aligned_end)
        else:
            pos = payload.find(_MAGIC_BYTES, pos + 1, aligned_end)
    cflag = 3 if start > 0 else 0
    out += _MAGIC_BYTES + struct.pack("<I", (cflag << _LEN_BITS) | (n - start))
    out += payload[start:]
    out += b"\0" * (-n % 4)
    return bytes(out)


def decode_record(
    buf: bytes | mmap.mmap | memoryview, offset: int, where: str
) -> tuple[bytes, int]:
    """Read the record starting at ``offset`` in ``buf``: ``(payload, offset_of_next_record)``.

    ``where`` (e.g. ``"train.rec key 17"``) is put into error messages.
    """
    size = len(buf)
    parts: list[bytes] = []
    pos = offset
    expect_more = False
    while True:
        if pos + 8 > size:
            raise RecordIOError(
                f"{where}: truncated record at byte offset {pos} (file has {size} bytes, "
                "need 8 for the record head)"
            )
        magic, lrec = struct.unpack_from("<II", buf, pos)
        if magic != MAGIC:
            raise RecordIOError(
                f"{where}: bad magic word 0x{magic:08X} at byte offset {pos} "
                f"(expected 0x{MAGIC:08X})"
            )
        cflag = lrec >> _LEN_BITS
        length = lrec & _LEN_MASK
        if expect_more and cflag not in (2, 3):
            raise RecordIOError(
                f"{where}: continuation flag {cflag} at byte offset {pos} inside a multi-part "
                "record (expected 2 or 3)"
            )
        if not expect_more and cflag not in (0, 1):
            raise RecordIOError(
                f"{where}: record starts with continuation flag {cflag} at byte offset {pos} "
                "(expected 0 or 1)"
            )
        body = pos + 8
        if body + length > size:
            raise RecordIOError(
                f"{where}: truncated record at byte offset {pos}: {length} payload bytes "
                f"announced, {size - body} left in the file"
            )
        if expect_more:
            parts.append(_MAGIC_BYTES)
        parts.append(bytes(buf[body : body + length]))
        pos = body + ((length + 3) & ~3)
        if cflag in (0, 3):
            break
        expect_more = True
    payload = parts[0] if len(parts) == 1 else b"".join(parts)
    return payload, min(pos, size)


# ----------------------------------------------------------------------------- files


def read_idx_file(
    idx_path: str | os.PathLike, rec_size: int | None = None
) -> tuple[list[int], dict[int, int]]:
    """Parse a ``.idx`` file: ``(keys in file order, {key: byte offset})``.

    Raises :class:`RecordIOError` naming the line, key and offset for a malformed line,
    a negative offset or (given ``rec_size``, the ``.rec`` file's size) an offset at or
    past the end of the ``.rec`` file: a bad index fails when it is opened, not when the
    record is first read hours into training (:class:`datasets.dataset.RecordIODataset`
    passes the size; :class:`IndexedRecordIO` checks such offsets when it reads them).
    """
    idx_path = Path(idx_path)
    if not idx_path.is_file():
        raise FileNotFoundError(f"RecordIO index {idx_path} does not exist")
    keys: list[int] = []
    offsets: dict[int, int] = {}
    with open(idx_path, encoding="ascii", errors="replace") as f:
        for lineno, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            fields = line.split("\t")
            try:
                key, off = int(fields[0]), int(fields[1])
            except (ValueError, IndexError):
                raise RecordIOError(
                    f"{idx_path} line {lineno}: expected 'key<TAB>offset', got {line[:80]!r}",
                    path=idx_path,
                ) from None
            if off < 0 or (rec_size is not None and off >= rec_size):
                where = (
                    "negative" if off < 0 else f"at or past the end of the .rec ({rec_size} bytes)"
                )
                raise RecordIOError(
                    f"{idx_path} line {lineno}: key {key} at byte offset {off}: the offset is "
                    f"{where}",
                    path=idx_path,
                    key=key,
                    offset=off,
                )
            if key not in offsets:
                keys.append(key)
            offsets[key] = off
    return keys, offsets


class MXRecordIO:
    """Sequential RecordIO file, mode ``"r"`` or ``"w"`` (as ``mxnet.recordio.MXRecordIO``).

    ``read()`` returns the next record's bytes or ``None`` at the end of file;
    ``write(buf)`` appends one record. Writers write to a temporary sibling
    (:class:`common.atomic.AtomicFile`) moved into place on :meth:`close`, so a
    crashed write never leaves a half file under the real name.
    """

    def __init__(self, uri: str | os.PathLike, flag: str) -> None:
        if flag not in ("r", "w"):
            raise ValueError(f"flag must be 'r' or 'w', got {flag!r}")
        self.uri = Path(uri)
        self.flag = flag
        self._pid: int | None = None
        self._file: Any = None
        self._map: mmap.mmap | bytes | None = None
        self._pos = 0
        self._out: AtomicFile | None = None
        if flag == "r":
            if not self.uri.is_file():
                raise FileNotFoundError(f"RecordIO file {self.uri} does not exist")
        else:
            self._out = AtomicFile(self.uri, "wb")
            self._file = self._out.file
            self._pid = os.getpid()

    # Reading ---------------------------------------------------------------
    def _buffer(self) -> mmap.mmap | bytes:
        """The memory map of the file, reopened after a fork (each process its own)."""
        if self._map is None or self._pid != os.getpid():
            with open(self.uri, "rb") as f:
                size = os.fstat(f.fileno()).st_size
                self._map = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if size else b""
            self._pid = os.getpid()
        return self._map

    def __getstate__(self) -> dict:
        if self.flag != "r":
            raise TypeError("a RecordIO writer cannot be pickled")
        state = self.__dict__.copy()
        state["_map"] = None
        state["_file"] = None
        state["_pid"] = None
        return state

    @property
    def file_size(self) -> int:
        return len(self._buffer())

    def read_at(self, offset: int, key: int | None = None) -> bytes:
        """Read the record starting at byte ``offset``."""
        buf = self._buffer()
        where = f"{self.uri}" + (f" key {key}" if key is not None else "")
        if offset < 0:
            raise RecordIOError(
                f"{where}: byte offset {offset} is negative", path=self.uri, key=key, offset=offset
            )
        if offset >= len(buf):
            raise RecordIOError(
                f"{where}: byte offset {offset} is beyond the end of the file ({len(buf)} bytes)",
                path=self.uri,
                key=key,
                offset=offset,
            )
        try:
            payload, self._pos = decode_record(buf, offset, where)
        except RecordIOError as exc:
            exc.path, exc.key, exc.offset = str(self.uri), key, offset
            raise
        return payload

    def read(self) -> bytes | None:
        """Read the next record, or ``None`` at the end of the file."""
        if self._pos >= len(self._buffer()):
            return None
        return self.read_at(self._pos)

    def reset(self) -> None:
        self._pos = 0

    def __iter__(self) -> Iterator[bytes]:
        self.reset()
        while (rec := self.read()) is not None:
            yield rec

    # Writing ---------------------------------------------------------------
    def tell(self) -> int:
        if self.flag != "w":
            return self._pos
        return self._file.tell()

    def write(self, buf: bytes) -> None:
        """Append one record."""
        if self.flag != "w" or self._file is None:
            raise ValueError(f"{self.uri} is not open for writing")
        self._file.write(encode_record(bytes(buf)))

    def close(self) -> None:
        """Close; for writers, flush, fsync and atomically move the file into place."""
        if self.flag == "w" and self._file is not None:
            self._file = None
            self._out.commit()
        if isinstance(self._map, mmap.mmap) and self._pid == os.getpid():
            try:
                self._map.close()
            except BufferError:  # zero-copy views of records are still alive
                pass
        self._map = None

    def abort(self) -> None:
        """Discard a writer's output (the temporary file) without touching ``uri``."""
        if self.flag == "w" and self._file is not None:
            self._file = None
            self._out.discard()

    def __enter__(self) -> MXRecordIO:
        return self

    def __exit__(self, exc_type: Any, *exc: Any) -> None:
        if exc_type is not None and self.flag == "w":
            self.abort()
        else:
            self.close()

    def __del__(self) -> None:
        try:
            if self.flag == "w" and self._file is not None:
                self.abort()
        except Exception:
            pass


class IndexedRecordIO(MXRecordIO):
    """RecordIO with a ``.idx`` file for random access (``mxnet.recordio.MXIndexedRecordIO``).

    Args:
        idx_path: the ``.idx`` file (text ``key\\toffset`` lines).
        uri: the ``.rec`` file.
        flag: ``"r"`` to read, ``"w"`` to write (both files are written atomically on close).

    ``keys`` lists the keys in ``.idx`` order; ``idx`` maps key to byte offset.
    """

    def __init__(self, idx_path: str | os.PathLike, uri: str | os.PathLike, flag: str) -> None:
        self.idx_path = Path(idx_path)
        self.keys: list[int] = []
        self.idx: dict[int, int] = {}
        if flag == "r":
            if not Path(uri).is_file():
                raise FileNotFoundError(f"RecordIO file {uri} does not exist")
            if not self.idx_path.is_file():
                raise FileNotFoundError(
                    f"RecordIO index {self.idx_path} for {uri} does not exist (random access "
                    "needs the .idx file written with the .rec)"
                )
            self.keys, self.idx = read_idx_file(self.idx_path)
        super().__init__(uri, flag)

    def read_idx(self, key: int) -> bytes:
        """Return the record stored under ``key`` (raises ``KeyError`` naming the file)."""
        try:
            offset = self.idx[key]
        except KeyError:
            raise KeyError(f"key {key} is not in {self.idx_path}") from None
        return self.read_at(offset, key)

    def seek(self, key: int) -> None:
        self._pos = self.idx[key]

    def write_idx(self, key: int, buf: bytes) -> None:
        """Append a record under ``key`` and remember its offset for the ``.idx``."""
        if key in self.idx:
            raise KeyError(f"key {key} written twice to {self.uri}")
        offset = self.tell()
        self.write(buf)
        self.idx[key] = offset
        self.keys.append(key)

    def close(self) -> None:
        if self.flag == "w" and self._file is not None:
            text = "".join(f"{k}\t{self.idx[k]}\n" for k in self.keys)
            write_text(self.idx_path, text)
        super().close()
