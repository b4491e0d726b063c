"""Reading the IJB-B / IJB-C 1:1 verification layout.

::

    ROOT/loose_crop/*.jpg
    ROOT/meta/ijbc_face_tid_mid.txt         image template_id media_id
    ROOT/meta/ijbc_template_pair_label.txt  template_1 template_2 label
    ROOT/meta/ijbc_name_5pts_score.txt      image x1 y1 ... x5 y5 faceness

IJB-B uses the same files with the ``ijbb_`` prefix.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import cv2
import numpy as np

from eval.align import align_face

TARGETS = {"IJBC": "ijbc", "IJBB": "ijbb"}


@dataclass
class IJBMeta:
    """Everything the 1:1 protocol needs, row-aligned per face image.

    Attributes:
        root: dataset root.
        names: ``(N,)`` image file names under ``loose_crop/``.
        templates: ``(N,)`` int64 template id of each image.
        medias: ``(N,)`` int64 media id of each image.
        landmarks: ``(N, 5, 2)`` float32 pixel coordinates.
        faceness: ``(N,)`` float32 detector scores.
        pair_t1, pair_t2: ``(M,)`` int64 template ids of each pair.
        labels: ``(M,)`` int8, 1 for genuine pairs.
    """

    root: str
    names: list[str]
    templates: np.ndarray
    medias: np.ndarray
    landmarks: np.ndarray
    faceness: np.ndarray
    pair_t1: np.ndarray
    pair_t2: np.ndarray
    labels: np.ndarray

    def image_path(self, i: int) -> str:
        return os.path.join(self.root, "loose_crop", self.names[i])


def meta_paths(root: str, target: str) -> dict[str, str]:
    """Paths of the three meta files for ``target`` (``IJBC`` or ``IJBB``)."""
    try:
        prefix = TARGETS[target.upper()]
    except KeyError:
        raise ValueError(f"unknown IJB target {target!r}; expected {list(TARGETS)}") from None
    meta = os.path.join(root, "meta")
    return {
        "tid_mid": os.path.join(meta, f"{prefix}_face_tid_mid.txt"),
        "pairs": os.path.join(meta, f"{prefix}_template_pair_label.txt"),
        "landmarks": os.path.join(meta, f"{prefix}_name_5pts_score.txt"),
    }


def _read_int_table(path: str, columns: int, block_bytes: int = 1 << 26) -> np.ndarray:
    """Whitespace-separated integer table -> ``(rows, columns)`` int64, read in blocks.

    IJB-C's pair file has 15.7M lines: it is parsed by NumPy block by block
    instead of being split into Python strings.
    """
    parts: list[np.ndarray] = []
    tail = ""
    with open(path) as f:
        while True:
            block = f.read(block_bytes)
            text = tail + block
            if block:
                cut = text.rfind("\n") + 1
                text, tail = text[:cut], text[cut:]
            if text.strip():
                parts.append(_parse_ints(text, path))
            if not block:
                break
    values = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    if values.size % columns:
        raise ValueError(f"{path}: expected {columns} whitespace-separated columns per line")
    return values.reshape(-1, columns)


def _parse_ints(text: str, path: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return np.fromstring(text, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning) as exc:
            bad = next((t for t in text.split() if not t.lstrip("+-").isdigit()), "?")
            raise ValueError(f"{path}: non-integer value {bad!r}") from exc


def _read_name_table(path: str, columns: int) -> tuple[list[str], list[list[str]]]:
    names: list[str] = []
    rows: list[list[str]] = []
    with open(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != columns:
                raise ValueError(f"{path}:{lineno}: expected {columns} columns, got {len(parts)}")
            names.append(parts[0])
            rows.append(parts[1:])
    return names, rows


def read_ijb_meta(root: str | os.PathLike[str], target: str = "IJBC") -> IJBMeta:
    """Read and cross-check the meta files of an IJB-B/C root."""
    root = os.fspath(root)
    paths = meta_paths(root, target)
    for p in paths.values():
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing IJB meta file")
    names, tm = _read_name_table(paths["tid_mid"], 3)
    try:
        tid_mid = np.array(tm, dtype=np.int64).reshape(-1, 2)
    except ValueError as exc:
        raise ValueError(f"{paths['tid_mid']}: non-integer template/media id ({exc})") from exc
    lm_names, lm_rows = _read_name_table(paths["landmarks"], 12)
    try:
        lm = np.array(lm_rows, dtype=np.float32).reshape(-1, 11)
    except ValueError as exc:
        raise ValueError(f"{paths['landmarks']}: non-numeric landmark/score ({exc})") from exc
    if lm_names != names:
        # Same images in another order: match by name.
        index = {n: i for i, n in enumerate(lm_names)}
        if len(index) != len(lm_names):
            raise ValueError(f"{paths['landmarks']}: duplicate image names; cannot match rows")
        missing = [n for n in names if n not in index]
        if missing:
            raise ValueError(f"{paths['landmarks']}: no landmarks for {missing[0]!r}")
        lm = lm[[index[n] for n in names]]
    pairs = _read_int_table(paths["pairs"], 3)
    return IJBMeta(
        root=root,
        names=names,
        templates=tid_mid[:, 0],
        medias=tid_mid[:, 1],
        landmarks=lm[:, :10].reshape(-1, 5, 2),
        faceness=lm[:, 10].copy(),
        pair_t1=pairs[:, 0],
        pair_t2=pairs[:, 1],
        labels=pairs[:, 2].astype(np.int8),
    )


def load_aligned(meta: IJBMeta, i: int, size: tuple[int, int] = (112, 112)) -> np.ndarray:
    """Image ``i`` read with OpenCV, aligned by its landmarks: ``(H, W, 3)`` uint8 RGB."""
    path = meta.image_path(i)
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise ValueError(f"{path}: cannot read image")
    aligned = align_face(img, meta.landmarks[i], size)
    return cv2.cvtColor(aligned, cv2.COLOR_BGR2RGB)
