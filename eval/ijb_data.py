"""Reading the IJB-B / IJB-C 1:1 verification layout.

::

    ROOT/loose_crop/*.jpg
    ROOT/meta/ijbc_face_tid_mid.txt         image template_id media_id
    ROOT/meta/ijbc_template_pair_label.txt  template_1 template_2 label
    ROOT/meta/ijbc_name_5pts_score.txt      image x1 y1 ... x5 y5 faceness

IJB-B uses the same files with the ``ijbb_`` prefix.

What :func:`read_ijb_meta` refuses, as an :class:`IJBDataError` naming the file (and the
line or row): a value that is not a number, a landmark or faceness score that is not
finite, a label that is not exactly 0 or 1, a pair file without pairs, or without
genuine or without impostor pairs, a pair naming a template that has no faces, a file
that is not text. A NaN faceness would make NaN template scores, and one kind of pair
alone a TAR of 1.0 or 0.5 at every FAR: never an answer.
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass

import cv2
import numpy as np

from common.errors import UserError
from common.face_input import ARCFACE_INPUT
from datasets.faces.align import align_face

TARGETS = {"IJBC": "ijbc", "IJBB": "ijbb"}


class IJBDataError(UserError, ValueError):
    """An IJB meta file or image that cannot be used; names the file (and line or row)."""


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
        pairs_file: the pair file (for messages; "" when built in memory).
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
    pairs_file: str = ""

    def image_path(self, i: int) -> str:
        return os.path.join(self.root, "loose_crop", self.names[i])


def meta_paths(root: str, target: str) -> dict[str, str]:
    """Paths of the three meta files for ``target`` (``IJBC`` or ``IJBB``)."""
    try:
        prefix = TARGETS[target.upper()]
    except KeyError:
        raise IJBDataError(f"unknown IJB target {target!r}; expected {list(TARGETS)}") from None
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
    with open(path, encoding="utf-8") as f:
        while True:
            try:
                block = f.read(block_bytes)
            except UnicodeDecodeError as exc:
                raise IJBDataError(f"{path}: not a text file ({exc.reason})") from None
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
        raise IJBDataError(f"{path}: expected {columns} whitespace-separated columns per line")
    return values.reshape(-1, columns)


def _parse_ints(text: str, path: str) -> np.ndarray:
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        try:
            return np.fromstring(text, dtype=np.int64, sep=" ")
        except (ValueError, DeprecationWarning) as exc:
            bad = next((t for t in text.split() if not t.lstrip("+-").isdigit()), "?")
            raise IJBDataError(f"{path}: non-integer value {bad!r:.40}") from exc


def _read_name_table(path: str, columns: int) -> tuple[list[str], list[list[str]], list[int]]:
    """``(names, other columns, line numbers)`` of a whitespace-separated table."""
    names: list[str] = []
    rows: list[list[str]] = []
    lines: list[int] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                parts = line.split()
                if not parts:
                    continue
                if len(parts) != columns:
                    raise IJBDataError(
                        f"{path}:{lineno}: expected {columns} columns, got {len(parts)}"
                    )
                names.append(parts[0])
                rows.append(parts[1:])
                lines.append(lineno)
    except UnicodeDecodeError as exc:
        raise IJBDataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    return names, rows, lines


def _int_table(path: str, rows: list[list[str]], lines: list[int]) -> np.ndarray:
    """``rows`` as int64 (else names the line and the column)."""
    for line, row in zip(lines, rows, strict=True):
        for col, value in enumerate(row, 2):
            if not re.fullmatch(r"[+-]?[0-9]+", value) or abs(int(value)) >= 1 << 63:
                raise IJBDataError(f"{path}:{line}: column {col} is {value!r:.40}, not an id")
    return np.array(rows, dtype=np.int64).reshape(len(rows), -1)


def _float_table(path: str, rows: list[list[str]], lines: list[int]) -> np.ndarray:
    """``rows`` as float32, every value finite (else names the line and the column)."""
    if not rows:
        return np.zeros((0, 0), np.float32)
    try:
        table = np.array(rows, dtype=np.float32).reshape(len(rows), -1)
    except ValueError:
        for line, row in zip(lines, rows, strict=True):
            for col, value in enumerate(row, 2):
                try:
                    float(value)
                except ValueError:
                    raise IJBDataError(
                        f"{path}:{line}: column {col} is {value!r:.40}, not a number"
                    ) from None
        raise
    bad = ~np.isfinite(table)
    if bad.any():
        r, c = (int(v[0]) for v in np.nonzero(bad))
        what = "faceness score" if c == table.shape[1] - 1 else f"landmark value (column {c + 2})"
        raise IJBDataError(
            f"{path}:{lines[r]}: the {what} is {rows[r][c]!r:.40}, not a finite number"
        )
    return table


def check_pairs(labels: np.ndarray, path: str) -> None:
    """Refuse pair labels that are not exactly 0/1, or a pair list without pairs, without
    genuine or without impostor pairs (:class:`IJBDataError` naming ``path``)."""
    labels = np.asarray(labels).reshape(-1)
    if labels.size == 0:
        raise IJBDataError(f"{path}: no pairs (an empty pair file)")
    bad = (labels != 0) & (labels != 1)
    if bad.any():
        row = int(np.argmax(bad))
        raise IJBDataError(
            f"{path}: pair row {row + 1} has label {int(labels[row])}; labels must be 0 "
            "(impostor) or 1 (genuine)"
        )
    genuine = int(np.count_nonzero(labels))
    for kind, count in (("genuine", genuine), ("impostor", labels.size - genuine)):
        if count == 0:
            raise IJBDataError(
                f"{path}: no {kind} pairs among its {labels.size}; TAR@FAR needs both "
                "genuine and impostor pairs"
            )


def read_ijb_meta(
    root: str | os.PathLike[str], target: str = "IJBC", *, pairs: bool = True
) -> IJBMeta:
    """Read and cross-check the meta files of an IJB-B/C root (without the pair file,
    and with no pairs, when ``pairs`` is false: the 1:N protocol does not use it)."""
    root = os.fspath(root)
    paths = meta_paths(root, target)
    if not pairs:
        del paths["pairs"]
    for p in paths.values():
        if not os.path.isfile(p):
            raise FileNotFoundError(f"{p}: missing IJB meta file")
    names, tm, tm_lines = _read_name_table(paths["tid_mid"], 3)
    if not names:
        raise IJBDataError(f"{paths['tid_mid']}: no face images listed")
    tid_mid = _int_table(paths["tid_mid"], tm, tm_lines).reshape(-1, 2)
    lm_names, lm_rows, lm_lines = _read_name_table(paths["landmarks"], 12)
    lm = _float_table(paths["landmarks"], lm_rows, lm_lines).reshape(-1, 11)
    if lm_names != names:
        # Same images in another order: match by name.
        index = {n: i for i, n in enumerate(lm_names)}
        if len(index) != len(lm_names):
            raise IJBDataError(f"{paths['landmarks']}: duplicate image names; cannot match rows")
        missing = [n for n in names if n not in index]
        if missing:
            raise IJBDataError(f"{paths['landmarks']}: no landmarks for {missing[0]!r}")
        lm = lm[[index[n] for n in names]]
    if not pairs:
        table = np.zeros((0, 3), np.int64)
    else:
        table = _read_int_table(paths["pairs"], 3)
        check_pairs(table[:, 2], paths["pairs"])
    known = np.unique(tid_mid[:, 0])
    for col in (0, 1):
        unknown = ~np.isin(table[:, col], known)
        if unknown.any():
            row = int(np.argmax(unknown))
            raise IJBDataError(
                f"{paths['pairs']}: pair row {row + 1} names template {int(table[row, col])}, "
                f"which has no faces in {paths['tid_mid']}"
            )
    return IJBMeta(
        root=root,
        names=names,
        templates=tid_mid[:, 0],
        medias=tid_mid[:, 1],
        landmarks=lm[:, :10].reshape(-1, 5, 2),
        faceness=lm[:, 10].copy(),
        pair_t1=table[:, 0],
        pair_t2=table[:, 1],
        labels=table[:, 2].astype(np.int8),
        pairs_file=paths.get("pairs", ""),
    )


#: The 1:N gallery files of each target (insightface's ijb_1n.py): IJB-C names them G1 and
#: G2, IJB-B S1 and S2.
GALLERY_SETS = {"IJBC": ("G1", "G2"), "IJBB": ("S1", "S2")}


@dataclass
class IJB1NMeta:
    """The 1:N protocol's sets: template ids and their subject ids.

    Attributes:
        galleries: ``{"G1": (templates, subjects), "G2": ...}``, each ``(T,)`` int64,
            templates unique and ascending.
        probe_templates, probe_subjects: the mixed probe set, the same way.
        files: ``{set name: its CSV file}`` (for messages).
    """

    galleries: dict[str, tuple[np.ndarray, np.ndarray]]
    probe_templates: np.ndarray
    probe_subjects: np.ndarray
    files: dict[str, str]


def one_n_paths(root: str, target: str) -> dict[str, str]:
    """The 1:N CSV files of ``target``: its two galleries and ``probe``."""
    prefix = meta_paths(root, target)["tid_mid"].rsplit("_face_tid_mid.txt", 1)[0]
    names = GALLERY_SETS[target.upper()]
    out = {g: f"{prefix}_1N_gallery_{g}.csv" for g in names}
    out["probe"] = f"{prefix}_1N_probe_mixed.csv"
    return out


def _read_template_subjects(path: str) -> tuple[np.ndarray, np.ndarray]:
    """``(templates, subjects)`` of a 1:N CSV (a header line, then ``TEMPLATE_ID,
    SUBJECT_ID,...`` per face): one entry per template, ascending."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing IJB 1:N meta file")
    rows: list[tuple[int, int]] = []
    try:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if lineno == 1 or not line.strip():
                    continue  # the header
                cols = line.rstrip("\r\n").split(",")
                if len(cols) < 2:
                    raise IJBDataError(f"{path}:{lineno}: expected TEMPLATE_ID,SUBJECT_ID,...")
                vals = []
                for col, value in enumerate(cols[:2], 1):
                    value = value.strip()
                    if not re.fullmatch(r"[+-]?[0-9]+", value) or abs(int(value)) >= 1 << 63:
                        raise IJBDataError(
                            f"{path}:{lineno}: column {col} is {value!r:.40}, not an id"
                        )
                    vals.append(int(value))
                rows.append((vals[0], vals[1]))
    except UnicodeDecodeError as exc:
        raise IJBDataError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if not rows:
        raise IJBDataError(f"{path}: no templates listed")
    table = np.array(rows, dtype=np.int64)
    templates, first = np.unique(table[:, 0], return_index=True)
    subjects = table[first, 1]
    mixed = table[:, 1] != subjects[np.searchsorted(templates, table[:, 0])]
    if mixed.any():
        t = int(table[np.argmax(mixed), 0])
        raise IJBDataError(f"{path}: template {t} is listed with two subjects")
    return templates, subjects


def read_1n_meta(root: str | os.PathLike[str], meta: IJBMeta, target: str = "IJBC") -> IJB1NMeta:
    """Read the 1:N gallery and probe CSV files, each template checked to have faces in
    ``meta`` (:func:`read_ijb_meta` of the same root)."""
    files = one_n_paths(os.fspath(root), target)
    known = np.unique(meta.templates)
    sets = {}
    for name, path in files.items():
        templates, subjects = _read_template_subjects(path)
        unknown = ~np.isin(templates, known)
        if unknown.any():
            raise IJBDataError(
                f"{path}: template {int(templates[np.argmax(unknown)])} has no faces in the "
                f"face list ({int(unknown.sum())} of {len(templates)} templates)"
            )
        sets[name] = (templates, subjects)
    probe = sets.pop("probe")
    return IJB1NMeta(sets, probe[0], probe[1], files)


def load_aligned(
    meta: IJBMeta, i: int, size: tuple[int, int] = (ARCFACE_INPUT.size, ARCFACE_INPUT.size)
) -> np.ndarray:
    """Image ``i`` read with OpenCV, aligned by its landmarks: ``(H, W, 3)`` uint8 RGB."""
    path = meta.image_path(i)
    img = cv2.imread(path, cv2.IMREAD_COLOR)
    if img is None:
        raise IJBDataError(f"{path}: cannot read image (missing, or not an image OpenCV reads)")
    aligned = align_face(img, meta.landmarks[i], size)
    return cv2.cvtColor(aligned, cv2.COLOR_BGR2RGB)
