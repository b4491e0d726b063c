"""Comparing the faces of two photos: find and align each face, embed both, and the
threshold calibrated on a ``.bin`` on the spot. The library of ``eval.compare`` (which
imports it after parsing its arguments, so that ``--help`` stays fast).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np

from common.face_input import ARCFACE_INPUT
from datasets.faces.finder import FaceFinder, FaceResult
from datasets.faces.photos import PhotoError, read_photo
from eval.bin_io import BinFileError, load_bin
from eval.errors import NoFaceError
from eval.extract import Embedder
from eval.faces import embed_aligned, resize_crop
from eval.jsonio import printable
from eval.metrics import VAL_THRESHOLDS_STEP, pair_distances, threshold_at_far


@dataclass
class Calibration:
    """A cosine threshold calibrated on a ``.bin`` at a target false-accept rate.

    Attributes:
        threshold: cosine similarity above which two faces are the same person.
        far_target: the false-accept rate asked for.
        far: the rate measured on the ``.bin``'s impostor pairs at ``threshold``.
        tar: the true-accept rate measured on its genuine pairs (None without any).
        genuine, impostor: pair counts.
        name: the ``.bin``'s name.
    """

    threshold: float
    far_target: float
    far: float
    tar: float | None
    genuine: int
    impostor: int
    name: str


def calibrate(
    embed: Embedder,
    bin_path: str | os.PathLike[str],
    far: float,
    image_size: int = ARCFACE_INPUT.size,
    batch_size: int = 64,
) -> Calibration:
    """The cosine threshold at which impostor pairs of ``bin_path`` reach ``far`` (see
    the module docstring). Raises :class:`~eval.bin_io.BinFileError` if the ``.bin`` has
    no impostor pairs, :class:`~eval.errors.NonFiniteEmbeddingError` naming its images."""
    path = os.fspath(bin_path)
    pairs = load_bin(bin_path, (image_size, image_size))
    same = np.asarray(pairs.issame, dtype=bool)
    if not (~same).any():
        raise BinFileError(f"{path}: no impostor pairs to calibrate a FAR on")
    crops = pairs.images.numpy().transpose(0, 2, 3, 1)[..., ::-1]  # RGB NCHW -> BGR NHWC
    names = [f"{printable(path)}: bins[{i}]" for i in range(len(crops))]
    emb = embed_aligned(embed, np.ascontiguousarray(crops), batch_size, names=names)
    dist = pair_distances(emb.astype(np.float64))
    thresholds = np.arange(0, 4, VAL_THRESHOLDS_STEP)
    impostor = np.sort(dist[~same])
    far_curve = np.searchsorted(impostor, thresholds, side="left") / impostor.size
    t = threshold_at_far(thresholds, far_curve, far)
    return Calibration(
        threshold=1.0 - t / 2.0,
        far_target=far,
        far=float(np.mean(dist[~same] < t)),
        tar=float(np.mean(dist[same] < t)) if same.any() else None,
        genuine=int(same.sum()),
        impostor=int((~same).sum()),
        name=printable(pairs.name),
    )


def face_of(finder: FaceFinder | None, path: str, image_size: int) -> FaceResult:
    """The aligned face of one photo (``finder=None``: the photo is an aligned crop)."""
    if finder is None:
        try:
            crop = resize_crop(read_photo(path), image_size)
        except PhotoError as exc:
            raise NoFaceError(str(exc)) from exc
        return FaceResult(None, crop=crop, photo_size=crop.shape[:2])
    r = finder.find_file(path)
    if not r.ok:
        raise NoFaceError(f"{path}: {r.reason}: {r.detail}")
    return r


def compare(
    embed: Embedder, finder: FaceFinder | None, a: str, b: str, image_size: int = ARCFACE_INPUT.size
) -> tuple[float, FaceResult, FaceResult]:
    """``(cosine similarity, face of a, face of b)``.

    Raises:
        NoFaceError: a photo without a face.
        NonFiniteEmbeddingError: the model gave NaN or infinity (names it and the photo).
    """
    fa, fb = face_of(finder, a, image_size), face_of(finder, b, image_size)
    assert fa.crop is not None and fb.crop is not None
    emb = embed_aligned(embed, np.stack([fa.crop, fb.crop]), names=[printable(a), printable(b)])
    return float(np.dot(emb[0].astype(np.float64), emb[1].astype(np.float64))), fa, fb


def describe_face(path: str, r: FaceResult, policy: str) -> str:
    """One line: the photo and the face kept in it."""
    path = printable(path)
    if r.box is None:
        return f"{path}: aligned crop"
    box = ",".join(f"{v:.0f}" for v in r.box)
    several = f"; {r.faces} faces, kept the {policy} one" if r.faces > 1 else ""
    return f"{path}: face score {r.score:.3f} at box {box}{several}"
