"""Reading verification ``.bin`` pair files (LFW, CFP-FP, AgeDB-30, CALFW, CPLFW).

A ``.bin`` file is a pickle of ``(bins, issame_list)``: ``bins`` holds ``2P``
encoded images (pair ``i`` is items ``2i`` and ``2i+1``) and ``issame_list``
``P`` booleans. Old files are Python 2 pickles of ``str`` (read here with
``encoding='bytes'``); newer ones may hold the encoded bytes as 1-D ``uint8``
numpy arrays and the labels as numpy booleans.

These files come from the internet, so they are read with
:class:`RestrictedUnpickler`, which resolves only the handful of globals such
files need (numpy array / scalar reconstruction, ``bytearray``, latin-1
``bytes`` from protocol-2 pickles). Anything else, e.g. ``os.system`` or
``builtins.open``, raises :class:`pickle.UnpicklingError` before it is called.

Reading is also bounded in memory (:class:`BinLimits`), so a small file cannot make the
reader allocate gigabytes: the file size is capped; the pickle's opcodes are scanned
before unpickling (a length, frame or memo index that the file cannot back is refused
before Python allocates it); numpy arrays and ``bytearray`` may declare at most as many
bytes as the file holds and no object dtype; the image count and the decoded output are
capped (the output at a multiple of the file size); and every image's width and height
are read from its JPEG/PNG/BMP header and capped before it is decoded. Every refusal is a
:class:`BinFileError` (a ``ValueError``) naming the file and saying why; a refused global
is a :class:`BinPickleError` (also a :class:`pickle.UnpicklingError`).

The labels are validated too: each is a boolean or exactly ``0``/``1`` (``2``, ``-1``
or ``"yes"`` are refused with their index).
"""

from __future__ import annotations

import io
import math
import os
import pickle
import pickletools
import stat
import struct
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch

from common.errors import UserError
from common.face_input import ARCFACE_INPUT


class BinFileError(UserError, ValueError):
    """A ``.bin`` file that is malformed or exceeds :class:`BinLimits`; names the file."""


class BinPickleError(BinFileError, pickle.UnpicklingError):
    """A ``.bin`` pickle that needs a global or an object that is not allowed (refused
    before anything is called); names the file."""


@dataclass(frozen=True)
class BinLimits:
    """Bounds on what reading one ``.bin`` file may allocate (see the module docstring).

    The defaults are far above the published targets (LFW, CFP-FP, AgeDB-30, CALFW,
    CPLFW: 12,000-14,000 images of 112x112, 50-100 MB files).
    """

    max_file_bytes: int = 4 << 30
    """Largest file read."""
    max_images: int = 200_000
    """Largest number of images (``2P``)."""
    max_image_pixels: int = 4096 * 4096
    """Largest width x height an image's header may declare (checked before decoding)."""
    max_opcodes_per_image: int = 64
    """Pickle opcodes allowed per image (plus 4096): bounds the Python objects built."""
    output_bytes_per_file_byte: int = 64
    """The decoded images may take at most this many bytes per file byte (or 256 MiB)."""
    min_output_budget: int = 256 << 20
    """Decoded output always allowed, whatever the file size."""


DEFAULT_LIMITS = BinLimits()


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` that only does what protocol-2 ``bytes`` need."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise BinPickleError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin-1", errors="strict")


def _allowed_globals(source: str, max_bytes: int) -> dict[tuple[str, str], Any]:
    """The allowed globals, wrapped so that none allocates more than ``max_bytes``."""
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy(._core).multiarray._reconstruct
    scalar = np.bool_(True).__reduce__()[0]  # numpy(._core).multiarray.scalar
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy(._core).numeric._frombuffer

    def refuse(what: str) -> pickle.UnpicklingError:
        return BinPickleError(f"{source}: {what} (refusing to load it)")

    def checked_dtype(spec: Any) -> np.dtype:
        if isinstance(spec, np.dtype):
            dt = spec
        elif isinstance(spec, str | bytes):
            dt = np.dtype(spec.decode("latin-1") if isinstance(spec, bytes) else spec)
        else:
            raise refuse(f"dtype {spec!r:.60} is not a plain type code")
        if dt.hasobject:
            raise refuse("arrays of Python objects are not allowed in a verification pair file")
        if dt.itemsize > max_bytes:
            raise refuse(f"dtype {dt} declares {dt.itemsize} bytes per item")
        return dt

    def checked_shape(shape: Any, dt: np.dtype) -> tuple[int, ...]:
        dims = (shape,) if isinstance(shape, int) else tuple(shape)
        if len(dims) > 32 or not all(isinstance(d, int) and d >= 0 for d in dims):
            raise refuse(f"array shape {shape!r:.60} is not a list of sizes")
        if math.prod(dims) * max(dt.itemsize, 1) > max_bytes:
            raise refuse(
                f"an array of shape {dims} {dt} declares more bytes than the file holds "
                f"({max_bytes})"
            )
        return dims

    def make_dtype(spec: Any, align: bool = False, copy: bool = False) -> np.dtype:
        return checked_dtype(spec)

    def make_ndarray(shape: Any = (0,), dtype: Any = float, *args: Any) -> np.ndarray:
        if args:
            raise refuse("numpy.ndarray over a buffer is not allowed")
        dt = checked_dtype(dtype if isinstance(dtype, np.dtype | str | bytes) else "f8")
        return np.ndarray(checked_shape(shape, dt), dt)

    def make_reconstruct(subtype: Any, shape: Any, dtype: Any) -> np.ndarray:
        if subtype is not np.ndarray and subtype is not make_ndarray:
            raise refuse("only plain numpy arrays are allowed")
        dt = checked_dtype(dtype)
        return reconstruct(np.ndarray, checked_shape(shape, dt), dt)

    def make_scalar(dtype: Any, *args: Any) -> Any:
        return scalar(checked_dtype(dtype), *args)

    def make_frombuffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
        dt = checked_dtype(dtype)
        return frombuffer(buf, dt, checked_shape(shape, dt), order)

    def make_bytearray(value: Any = b"", *args: Any) -> bytearray:
        if not isinstance(value, bytes | bytearray | str):
            raise refuse(f"bytearray({type(value).__name__}) is not allowed")
        return bytearray(value, *args)

    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): make_ndarray,
        ("numpy", "dtype"): make_dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytearray"): make_bytearray,
        ("__builtin__", "bytearray"): make_bytearray,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = make_reconstruct
        allowed[(module, "scalar")] = make_scalar
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = make_frombuffer
    return allowed


_PUT_OPS = {"PUT", "BINPUT", "LONG_BINPUT"}


def scan_pickle(data: bytes, source: str, max_opcodes: int) -> int:
    """Walk the opcodes of ``data`` without building anything; returns their count.

    Refuses (:class:`BinFileError`) a length that runs past the end of the data, a frame
    longer than what is left, a memo index beyond the opcodes seen (CPython sizes the memo
    to the largest index) and more than ``max_opcodes`` opcodes: all of which would make
    the unpickler allocate memory the file does not back.
    """
    count = 0
    try:
        for opcode, arg, pos in pickletools.genops(io.BytesIO(data)):
            count += 1
            if count > max_opcodes:
                raise BinFileError(
                    f"{source}: more than {max_opcodes} pickle opcodes for the images it can "
                    "hold (refusing to build that many objects)"
                )
            if opcode.name == "FRAME" and arg > len(data) - (pos or 0):
                raise BinFileError(
                    f"{source}: pickle frame of {arg} bytes at byte {pos}, but only "
                    f"{len(data) - (pos or 0)} bytes are left"
                )
            if opcode.name in _PUT_OPS and isinstance(arg, int) and arg > count:
                raise BinFileError(
                    f"{source}: pickle memo index {arg} at byte {pos} (only {count} opcodes so far)"
                )
    except BinFileError:
        raise
    except (ValueError, EOFError, struct.error) as exc:  # pickletools: truncated arguments
        raise BinFileError(f"{source}: not a valid pickle ({exc})") from None
    return count


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals ``.bin`` files contain.

    ``find_class`` is the only way a pickle can reach a callable, so refusing
    everything outside an explicit allow-list means a crafted file raises
    :class:`pickle.UnpicklingError` and runs nothing. The allowed numpy and
    ``bytearray`` constructors refuse to allocate more than ``max_bytes`` (default: the
    size of the input), and object arrays.
    """

    def __init__(
        self, file: io.BufferedIOBase, *, source: str = "<stream>", max_bytes: int | None = None
    ) -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        if max_bytes is None:
            try:
                max_bytes = os.fstat(file.fileno()).st_size  # type: ignore[attr-defined]
            except (AttributeError, OSError, io.UnsupportedOperation):
                max_bytes = len(file.getbuffer()) if isinstance(file, io.BytesIO) else 1 << 30
        self._allowed = _allowed_globals(source, max_bytes)

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise BinPickleError(
                f"{self._source}: global {module}.{name} is not allowed in a verification "
                "pair file (refusing to load it)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise BinPickleError(f"{self._source}: persistent ids are not allowed")


def restricted_loads(
    data: bytes, *, source: str = "<bytes>", limits: BinLimits = DEFAULT_LIMITS
) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`, after :func:`scan_pickle`.

    Raises:
        BinPickleError: a global or object that is not allowed.
        BinFileError: anything else that stops the unpickling (a truncated or malformed
            pickle, wrong arguments to an allowed constructor): the file is untrusted
            input, so every failure of reading it is its own.
    """
    scan_pickle(data, source, 4096 + limits.max_opcodes_per_image * limits.max_images)
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source, max_bytes=len(data)).load()
    except BinFileError:
        raise
    except Exception as exc:  # untrusted bytes: any failure to unpickle is the file's
        text = " ".join(str(exc).split()) or type(exc).__name__
        raise BinFileError(
            f"{source}: not a valid verification pair file ({type(exc).__name__}: {text})"
        ) from None


@dataclass
class PairSet:
    """One verification target held in memory.

    Attributes:
        name: target name (file stem, e.g. ``"lfw"``).
        images: ``(2P, 3, H, W)`` uint8 RGB; pair ``i`` is rows ``2i``, ``2i+1``.
        issame: ``(P,)`` bool.
        path: the file it was read from ("" when built in memory).
    """

    name: str
    images: torch.Tensor
    issame: np.ndarray
    path: str = ""

    @property
    def source(self) -> str:
        """Its name in messages: the file, else the target name."""
        return self.path or self.name

    def __len__(self) -> int:
        return int(self.issame.size)


def _is_label(value: Any) -> bool:
    """A boolean, or an integer that is exactly 0 or 1."""
    if isinstance(value, (bool, np.bool_)):
        return True
    return isinstance(value, (int, np.integer)) and int(value) in (0, 1)


def read_labels(raw: Any, path: str) -> np.ndarray:
    """``issame_list`` as ``(P,)`` bool: booleans or exactly 0/1, nothing else.

    Raises:
        BinFileError: not a sequence, or an item that is not a label (names its index).
    """
    if isinstance(raw, np.ndarray):
        if raw.dtype == np.bool_:
            return raw.reshape(-1).copy()
        items = raw.reshape(-1).tolist()
    elif isinstance(raw, (list, tuple)):
        items = list(raw)
    else:
        raise BinFileError(
            f"{path}: issame_list is {type(raw).__name__}, expected a list of booleans"
        )
    for i, value in enumerate(items):
        if not _is_label(value):
            raise BinFileError(
                f"{path}: issame_list[{i}] is {value!r:.40}; labels must be booleans or exactly 0/1"
            )
    return np.array([bool(v) for v in items], dtype=bool)


def _as_encoded_bytes(item: Any, path: str, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    if isinstance(item, str):  # a Python 2 str unpickled as text: its code points are bytes
        return item.encode("latin-1")
    raise BinFileError(
        f"{path}: bins[{index}] is {type(item).__name__}"
        f"{'' if not isinstance(item, np.ndarray) else f' {item.dtype}{item.shape}'}, "
        "expected encoded image bytes"
    )


_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0 + i for i in range(16)} - {0xC4, 0xC8, 0xCC}


def image_dimensions(data: bytes) -> tuple[int, int] | None:
    """``(height, width)`` declared by a JPEG, PNG or BMP header; ``None`` if unknown."""
    if data[:8] == _PNG and len(data) >= 24 and data[12:16] == b"IHDR":
        w, h = struct.unpack(">II", data[16:24])
        return h, w
    if data[:2] == b"BM" and len(data) >= 26:
        if struct.unpack("<I", data[14:18])[0] == 12:  # BITMAPCOREHEADER
            w, h = struct.unpack("<HH", data[18:22])
        else:
            w, h = struct.unpack("<ii", data[18:26])
        return abs(h), abs(w)
    if data[:2] == b"\xff\xd8":
        i = 2
        while i + 4 <= len(data):
            if data[i] != 0xFF:
                return None
            marker = data[i + 1]
            if marker == 0xFF:  # fill byte
                i += 1
                continue
            if marker in (0xD8, 0x01) or 0xD0 <= marker <= 0xD7:
                i += 2
                continue
            length = (data[i + 2] << 8) | data[i + 3]
            if marker in _JPEG_SOF:
                if i + 9 > len(data):
                    return None
                h, w = struct.unpack(">HH", data[i + 5 : i + 9])
                return h, w
            if marker in (0xD9, 0xDA):  # end of image, start of scan before any frame
                return None
            i += 2 + length
    return None


def decode_image(
    data: bytes,
    image_size: tuple[int, int],
    *,
    source: str = "",
    max_pixels: int = DEFAULT_LIMITS.max_image_pixels,
) -> np.ndarray:
    """Decode JPEG/PNG/BMP bytes to ``(H, W, 3)`` uint8 RGB, resized to ``image_size`` ``(H, W)``.

    The header's width and height are checked against ``max_pixels`` before decoding.
    """
    dims = image_dimensions(data)
    if dims is None:
        raise BinFileError(
            f"{source}: not a JPEG, PNG or BMP image with a readable size ({len(data)} bytes)"
        )
    if dims[0] * dims[1] > max_pixels or 0 in dims:
        raise BinFileError(
            f"{source}: the image header declares {dims[1]}x{dims[0]} pixels (allowed: 1 to "
            f"{max_pixels} pixels; refusing to decode it)"
        )
    buf = np.frombuffer(data, dtype=np.uint8)
    try:
        img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    except cv2.error:
        img = None
    if img is None:
        raise BinFileError(f"{source}: could not decode image ({len(data)} bytes)")
    h, w = image_size
    if img.shape[0] != h or img.shape[1] != w:
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_bin(
    path: str | os.PathLike[str],
    image_size: tuple[int, int] = (ARCFACE_INPUT.size, ARCFACE_INPUT.size),
    *,
    num_threads: int = 4,
    limits: BinLimits = DEFAULT_LIMITS,
) -> PairSet:
    """Load a verification ``.bin`` file safely and within :class:`BinLimits`.

    Args:
        path: the ``.bin`` file.
        image_size: ``(H, W)`` of the returned images; others are resized.
        num_threads: JPEG decoding threads.
        limits: memory bounds (see :class:`BinLimits`).
    Returns:
        A :class:`PairSet` with ``images (2P, 3, H, W)`` uint8 RGB and
        ``issame (P,)`` bool.
    Raises:
        BinPickleError (a pickle.UnpicklingError and a BinFileError): the file references
            a global that is not allowed.
        BinFileError (a ValueError): the structure is not ``(bins, issame_list)`` with
            ``len(bins) == 2P``, a label is not a boolean or 0/1, an image does not
            decode, or a limit is exceeded.
    """
    path = os.fspath(path)
    st = os.stat(path)
    if not stat.S_ISREG(st.st_mode):
        raise BinFileError(f"{path}: not a regular file (refusing to read it)")
    size = st.st_size
    if size > limits.max_file_bytes:
        raise BinFileError(
            f"{path}: {size} bytes, more than the {limits.max_file_bytes} a verification pair "
            "file may have"
        )
    with open(path, "rb") as f:
        data = f.read(limits.max_file_bytes + 1)
    obj = restricted_loads(data, source=path, limits=limits)
    del data
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise BinFileError(f"{path}: expected a pickled (bins, issame_list) pair")
    bins, issame_raw = obj
    if not isinstance(bins, (list, tuple, np.ndarray)):
        raise BinFileError(f"{path}: bins is {type(bins).__name__}, expected a list")
    if len(bins) > limits.max_images:
        raise BinFileError(
            f"{path}: {len(bins)} images, more than the {limits.max_images} a verification "
            "pair file may hold"
        )
    issame = read_labels(issame_raw, path)
    if len(bins) != 2 * issame.size:
        raise BinFileError(
            f"{path}: {len(bins)} images for {issame.size} pairs (expected {2 * issame.size})"
        )
    encoded = [_as_encoded_bytes(b, path, i) for i, b in enumerate(bins)]
    h, w = image_size
    out_bytes = len(encoded) * 3 * h * w
    budget = max(limits.min_output_budget, limits.output_bytes_per_file_byte * size)
    if out_bytes > budget:
        raise BinFileError(
            f"{path}: {len(encoded)} images of {h}x{h} would take {out_bytes} bytes decoded, "
            f"more than {limits.output_bytes_per_file_byte} x the file's {size} bytes "
            "(refusing to allocate them)"
        )
    for i, item in enumerate(encoded):  # header sizes before allocating anything
        dims = image_dimensions(item)
        if dims is not None and dims[0] * dims[1] > limits.max_image_pixels:
            raise BinFileError(
                f"{path}: bins[{i}]: the image header declares {dims[1]}x{dims[0]} pixels "
                f"(allowed: at most {limits.max_image_pixels}; refusing to decode it)"
            )
    images = torch.empty((len(encoded), 3, h, w), dtype=torch.uint8)

    def work(i: int) -> None:
        img = decode_image(
            encoded[i], image_size, source=f"{path}: bins[{i}]", max_pixels=limits.max_image_pixels
        )
        images[i] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

    if num_threads > 1 and len(encoded) > 1:
        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(work, range(len(encoded))))
    else:
        for i in range(len(encoded)):
            work(i)
    name = os.path.splitext(os.path.basename(path))[0]
    return PairSet(name=name, images=images, issame=issame, path=path)
