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
"""

from __future__ import annotations

import io
import os
import pickle
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import cv2
import numpy as np
import torch


def _latin1_encode(obj: str, encoding: str = "latin1", errors: str = "strict") -> bytes:
    """Stand-in for ``_codecs.encode`` that only does what protocol-2 ``bytes`` need."""
    if not isinstance(obj, str) or encoding.lower().replace("_", "-") not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return obj.encode("latin-1", errors="strict")


def _allowed_globals() -> dict[tuple[str, str], Any]:
    reconstruct = np.zeros(1).__reduce__()[0]  # numpy(._core).multiarray._reconstruct
    scalar = np.bool_(True).__reduce__()[0]  # numpy(._core).multiarray.scalar
    allowed: dict[tuple[str, str], Any] = {
        ("numpy", "ndarray"): np.ndarray,
        ("numpy", "dtype"): np.dtype,
        ("_codecs", "encode"): _latin1_encode,
        ("builtins", "bytearray"): bytearray,
        ("__builtin__", "bytearray"): bytearray,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = reconstruct
        allowed[(module, "scalar")] = scalar
    frombuffer = np.zeros(1).__reduce_ex__(5)[0]  # numpy(._core).numeric._frombuffer
    for module in ("numpy.core.numeric", "numpy._core.numeric"):
        allowed[(module, "_frombuffer")] = frombuffer
    return allowed


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that resolves only the globals ``.bin`` files contain.

    ``find_class`` is the only way a pickle can reach a callable, so refusing
    everything outside an explicit allow-list means a crafted file raises
    :class:`pickle.UnpicklingError` and runs nothing.
    """

    def __init__(self, file: io.BufferedIOBase, *, source: str = "<stream>") -> None:
        super().__init__(file, encoding="bytes")
        self._source = source
        self._allowed = _allowed_globals()

    def find_class(self, module: str, name: str) -> Any:
        try:
            return self._allowed[(module, name)]
        except KeyError:
            raise pickle.UnpicklingError(
                f"{self._source}: global {module}.{name} is not allowed in a verification "
                "pair file (refusing to load it)"
            ) from None

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError(f"{self._source}: persistent ids are not allowed")


def restricted_loads(data: bytes, *, source: str = "<bytes>") -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler`."""
    return RestrictedUnpickler(io.BytesIO(data), source=source).load()


@dataclass
class PairSet:
    """One verification target held in memory.

    Attributes:
        name: target name (file stem, e.g. ``"lfw"``).
        images: ``(2P, 3, H, W)`` uint8 RGB; pair ``i`` is rows ``2i``, ``2i+1``.
        issame: ``(P,)`` bool.
    """

    name: str
    images: torch.Tensor
    issame: np.ndarray

    def __len__(self) -> int:
        return int(self.issame.size)


def _as_encoded_bytes(item: Any, path: str, index: int) -> bytes:
    if isinstance(item, (bytes, bytearray)):
        return bytes(item)
    if isinstance(item, np.ndarray) and item.dtype == np.uint8 and item.ndim == 1:
        return item.tobytes()
    if isinstance(item, str):  # a Python 2 str unpickled as text: its code points are bytes
        return item.encode("latin-1")
    raise ValueError(
        f"{path}: bins[{index}] is {type(item).__name__}"
        f"{'' if not isinstance(item, np.ndarray) else f' {item.dtype}{item.shape}'}, "
        "expected encoded image bytes"
    )


def decode_image(data: bytes, image_size: tuple[int, int], *, source: str = "") -> np.ndarray:
    """Decode JPEG/PNG bytes to ``(H, W, 3)`` uint8 RGB, resized to ``image_size`` ``(H, W)``."""
    buf = np.frombuffer(data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise ValueError(f"{source}: could not decode image ({len(data)} bytes)")
    h, w = image_size
    if img.shape[0] != h or img.shape[1] != w:
        img = cv2.resize(img, (w, h), interpolation=cv2.INTER_AREA)
    return cv2.cvtColor(img, cv2.COLOR_BGR2RGB)


def load_bin(
    path: str | os.PathLike[str],
    image_size: tuple[int, int] = (112, 112),
    *,
    num_threads: int = 4,
) -> PairSet:
    """Load a verification ``.bin`` file safely.

    Args:
        path: the ``.bin`` file.
        image_size: ``(H, W)`` of the returned images; others are resized.
        num_threads: JPEG decoding threads.
    Returns:
        A :class:`PairSet` with ``images (2P, 3, H, W)`` uint8 RGB and
        ``issame (P,)`` bool.
    Raises:
        pickle.UnpicklingError: the file references a global that is not allowed.
        ValueError: the structure is not ``(bins, issame_list)`` with ``len(bins) == 2P``,
            or an image does not decode.
    """
    path = os.fspath(path)
    with open(path, "rb") as f:
        obj = RestrictedUnpickler(f, source=path).load()  # type: ignore[arg-type]
    if not isinstance(obj, (tuple, list)) or len(obj) != 2:
        raise ValueError(f"{path}: expected a pickled (bins, issame_list) pair")
    bins, issame_raw = obj
    try:
        issame = np.asarray(list(issame_raw)).astype(bool).reshape(-1)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"{path}: issame_list is not a sequence of booleans") from exc
    if not isinstance(bins, (list, tuple, np.ndarray)):
        raise ValueError(f"{path}: bins is {type(bins).__name__}, expected a list")
    if len(bins) != 2 * issame.size:
        raise ValueError(
            f"{path}: {len(bins)} images for {issame.size} pairs (expected {2 * issame.size})"
        )
    encoded = [_as_encoded_bytes(b, path, i) for i, b in enumerate(bins)]
    h, w = image_size
    images = torch.empty((len(encoded), 3, h, w), dtype=torch.uint8)

    def work(i: int) -> None:
        img = decode_image(encoded[i], image_size, source=f"{path}: bins[{i}]")
        images[i] = torch.from_numpy(np.ascontiguousarray(img.transpose(2, 0, 1)))

    if num_threads > 1 and len(encoded) > 1:
        with ThreadPoolExecutor(num_threads) as pool:
            list(pool.map(work, range(len(encoded))))
    else:
        for i in range(len(encoded)):
            work(i)
    name = os.path.splitext(os.path.basename(path))[0]
    return PairSet(name=name, images=images, issame=issame)
