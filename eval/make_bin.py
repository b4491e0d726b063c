"""A verification ``.bin`` from your own people: balanced, seeded, in 10 folds.

::

    python -m eval.make_bin DIR --out mine.bin --pairs 600 [--seed 0] [--folds 10]

``DIR`` is a prepared dataset (a ``.rec`` file or a folder holding ``train.rec``, a
folder of ``*.arrow`` shards, from ``datasets.prepare``) or a folder of aligned faces,
one folder per identity (``DIR/<identity>/<image>``), opened by
:func:`datasets.discovery.open_dataset`.

The output is the LFW-style file that this project (:func:`eval.bin_io.load_bin`),
arcface_torch and insightface read: a pickle (protocol 4) of ``(bins, issame_list)``,
``bins`` a list of ``2P`` ``bytes`` (pair ``i`` is items ``2i`` and ``2i+1``, each a
JPEG/PNG/BMP file as stored in ``DIR``; other formats are re-encoded as PNG) and
``issame_list`` ``P`` Python ``bool``. The pairs are laid out as LFW's: ``--folds``
contiguous folds of ``P / folds`` pairs (the folds the protocol's k-fold accuracy cuts),
each with as many genuine pairs (first) as impostor pairs (then).

No pair holds a photo twice, or a photo and a near-duplicate of it: two photos are the
same photo when their bytes, their decoded pixels or a 16x16 average hash of their
grey levels are equal (a re-encoded or re-saved copy); no pair appears twice. Asking
for more pairs than the photos allow is a :class:`MakeBinError` with the numbers.

Next to the ``.bin``, ``<out>.pairs.json`` records how it was made (source, seed, folds,
counts, the photos of every pair, the ``.bin``'s SHA-256). An existing ``--out`` is
replaced only if that record says this command made it (its hash matches), or with
``--overwrite``. Both files are written atomically (:mod:`common.atomic`).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import pickle
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.atomic import write_bytes, write_json
from common.cli import run_main
from common.digest import sha256_file
from common.errors import UsageError, UserError

#: The protocol's fold count (LFW: 10 folds of 300 genuine and 300 impostor pairs).
DEFAULT_FOLDS = 10
#: The pickle protocol: read by every Python 3 reader (insightface, arcface_torch, ours).
PICKLE_PROTOCOL = 4
#: Side of the average hash that finds near-duplicates (bits: its square).
HASH_SIDE = 16
_MAGICS = (b"\xff\xd8", b"\x89PNG\r\n\x1a\n", b"BM")


class MakeBinError(UserError, ValueError):
    """Too few identities or photos for the pairs asked, or an unreadable photo."""


@dataclass
class Photo:
    """One photo of the source: its identity, its encoded bytes and where it lives."""

    label: int
    data: bytes
    where: str


def manifest_path(out: str | os.PathLike[str]) -> str:
    """The record written next to ``out``: ``<out>.pairs.json``."""
    return os.fspath(out) + ".pairs.json"


def made_by_us(out: str | os.PathLike[str]) -> bool:
    """Whether ``out`` is a file this command wrote (its record's hash matches it)."""
    try:
        with open(manifest_path(out), encoding="utf-8") as f:
            record = json.load(f)
        return record.get("made_by") == "eval.make_bin" and record.get("sha256") == sha256_file(out)
    except (OSError, ValueError, AttributeError):
        return False


def decode(photo: Photo) -> np.ndarray:
    """``photo``'s pixels as uint8 BGR; a :class:`MakeBinError` naming it if unreadable."""
    import cv2

    buf = np.frombuffer(photo.data, dtype=np.uint8)
    img = cv2.imdecode(buf, cv2.IMREAD_COLOR) if buf.size else None
    if img is None:
        raise MakeBinError(f"{photo.where}: not a readable image ({len(photo.data)} bytes)")
    return img


def duplicate_keys(photo: Photo, pixels: np.ndarray) -> tuple[bytes, bytes, bytes]:
    """What makes two photos the same photo: their bytes, their pixels, their 16x16
    average hash (see the module docstring)."""
    import cv2

    grey = cv2.cvtColor(pixels, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(grey, (HASH_SIDE, HASH_SIDE), interpolation=cv2.INTER_AREA)
    bits = np.packbits(small.astype(np.float64) > small.mean()).tobytes()
    return (
        b"b" + hashlib.sha256(photo.data).digest(),
        b"p" + hashlib.sha256(pixels.tobytes() + str(pixels.shape).encode()).digest(),
        b"h" + bits,
    )


def duplicate_groups(keys: Sequence[Sequence[bytes]]) -> np.ndarray:
    """Group id of each photo: photos sharing any key (transitively) share a group."""
    parent = list(range(len(keys)))

    def root(i: int) -> int:
        while parent[i] != i:
            parent[i] = parent[parent[i]]
            i = parent[i]
        return i

    first: dict[bytes, int] = {}
    for i, ks in enumerate(keys):
        for k in ks:
            j = first.setdefault(k, i)
            if j != i:
                parent[root(i)] = root(j)
    return np.array([root(i) for i in range(len(keys))], dtype=np.int64)


def make_pairs(
    labels: np.ndarray, groups: np.ndarray, n_pairs: int, folds: int, seed: int
) -> list[tuple[int, int, bool]]:
    """``n_pairs`` pairs ``(photo a, photo b, same)`` in ``folds`` contiguous folds, each
    its genuine pairs then as many impostor pairs; no photo with itself or its duplicate
    group, no pair of photos twice (whichever copies of them); seeded.

    Raises:
        UsageError: ``n_pairs`` is not a positive multiple of ``2 * folds``.
        MakeBinError: too few identities or photos (the message gives the numbers).
    """
    labels = np.asarray(labels, dtype=np.int64)
    groups = np.asarray(groups, dtype=np.int64)
    if folds < 1 or n_pairs < 1 or n_pairs % (2 * folds):
        raise UsageError(
            f"--pairs {n_pairs}: must be a positive multiple of 2 x --folds {folds} "
            "(each fold holds as many genuine as impostor pairs)"
        )
    half = n_pairs // 2
    rng = np.random.default_rng(seed)
    n_photos, ids = len(labels), np.unique(labels)
    genuine = _genuine_candidates(labels, groups)
    if len(ids) < 2 or len(genuine) < half:
        usable = sum(len(np.unique(groups[labels == i])) >= 2 for i in ids)
        dups = n_photos - len(np.unique(groups))
        raise MakeBinError(
            f"{n_pairs} pairs need {half} genuine and {half} impostor pairs from at least 2 "
            f"identities; the source has {len(ids)} identities, {n_photos} photos "
            f"({dups} near-duplicates), {usable} identities with 2 or more distinct photos, "
            f"which give {len(genuine)} distinct genuine pairs"
        )
    chosen = rng.choice(len(genuine), size=half, replace=False)
    same_pairs = [genuine[i] for i in chosen]
    other_pairs = _impostor_pairs(labels, groups, half, rng)
    out: list[tuple[int, int, bool]] = []
    per_fold = half // folds
    for k in range(folds):
        for part, same in ((same_pairs, True), (other_pairs, False)):
            for a, b in part[k * per_fold : (k + 1) * per_fold]:
                a, b = (a, b) if rng.random() < 0.5 else (b, a)
                out.append((int(a), int(b), same))
    return out


def _genuine_candidates(labels: np.ndarray, groups: np.ndarray) -> list[tuple[int, int]]:
    """Every pair of distinct photos (duplicate groups) of one identity, each photo as the
    first member of its group."""
    found = []
    for ident in np.unique(labels):
        members = np.flatnonzero(labels == ident)
        _, first = np.unique(groups[members], return_index=True)
        reps = members[np.sort(first)]
        for x in range(len(reps)):
            for y in range(x + 1, len(reps)):
                found.append((int(reps[x]), int(reps[y])))
    return found


def _impostor_pairs(
    labels: np.ndarray, groups: np.ndarray, count: int, rng: np.random.Generator
) -> list[tuple[int, int]]:
    """``count`` distinct pairs of photos of different identities and duplicate groups."""
    n = len(labels)
    per_label = np.bincount(np.unique(labels, return_inverse=True)[1])
    possible = (n * n - int((per_label.astype(np.int64) ** 2).sum())) // 2
    if possible < count:
        raise MakeBinError(
            f"{2 * count} pairs need {count} impostor pairs; {n} photos of "
            f"{len(per_label)} identities give only {possible}"
        )
    seen: set[tuple[int, int]] = set()
    found: list[tuple[int, int]] = []
    for _ in range(100 * count + 10_000):
        a, b = (int(v) for v in rng.integers(0, n, 2))
        key = (int(min(groups[a], groups[b])), int(max(groups[a], groups[b])))
        if labels[a] == labels[b] or groups[a] == groups[b] or key in seen:
            continue
        seen.add(key)  # a pair of photos, whichever copies of them
        found.append((a, b))
        if len(found) == count:
            return found
    raise MakeBinError(
        f"{2 * count} pairs need {count} impostor pairs; only {len(found)} distinct ones were "
        f"found among {n} photos of {len(per_label)} identities (too many near-duplicates)"
    )


def encoded(photo: Photo, pixels: np.ndarray) -> bytes:
    """The photo's bytes if every reader decodes them (JPEG, PNG, BMP), else PNG."""
    if photo.data.startswith(_MAGICS):
        return photo.data
    import cv2

    ok, buf = cv2.imencode(".png", pixels)
    if not ok:
        raise MakeBinError(f"{photo.where}: cannot be re-encoded as PNG")
    return buf.tobytes()


def build_bin(
    photos: Sequence[Photo], n_pairs: int, folds: int = DEFAULT_FOLDS, seed: int = 0
) -> tuple[bytes, list[tuple[int, int, bool]]]:
    """``(pickled .bin, pairs)`` from ``photos`` (see the module docstring)."""
    pixels = [decode(p) for p in photos]
    groups = duplicate_groups([duplicate_keys(p, x) for p, x in zip(photos, pixels, strict=True)])
    labels = np.array([p.label for p in photos], dtype=np.int64)
    pairs = make_pairs(labels, groups, n_pairs, folds, seed)
    cache: dict[int, bytes] = {}
    bins: list[bytes] = []
    for a, b, _ in pairs:
        for i in (a, b):
            if i not in cache:
                cache[i] = encoded(photos[i], pixels[i])
            bins.append(cache[i])
    issame = [bool(same) for _, _, same in pairs]
    return pickle.dumps((bins, issame), protocol=PICKLE_PROTOCOL), pairs


def write_bin(
    out: str | os.PathLike[str],
    data: bytes,
    record: dict[str, Any],
    *,
    overwrite: bool = False,
) -> None:
    """Write the ``.bin`` and its record atomically; an existing ``out`` that this command
    did not make is refused (a :class:`~common.errors.UsageError`) without ``overwrite``."""
    out = os.fspath(out)
    if os.path.isdir(out):
        raise UsageError(f"--out {out}: is a directory")
    if os.path.exists(out) and not overwrite and not made_by_us(out):
        raise UsageError(
            f"--out {out}: exists and was not made by eval.make_bin (no matching "
            f"{os.path.basename(manifest_path(out))}); give --overwrite to replace it"
        )
    write_bytes(out, data)
    write_json(
        manifest_path(out),
        {**record, "made_by": "eval.make_bin", "sha256": hashlib.sha256(data).hexdigest()},
    )


def read_source(ds: Any, path: str) -> list[Photo]:
    """Every photo of ``ds``, a :class:`datasets.dataset.FaceDataset` opened from ``path``
    by :func:`datasets.discovery.open_dataset`."""
    labels = ds.labels()
    photos = []
    for i in range(len(ds)):
        data, _, where = ds._load(i)
        photos.append(Photo(int(labels[i]), bytes(data), where or f"{path}[{i}]"))
    return photos


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m eval.make_bin",
        description="An LFW-style verification .bin of balanced genuine/impostor pairs from "
        "your own people.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("dir", help="prepared dataset (.rec / Arrow shards) or DIR/<identity>/<face>")
    p.add_argument("--out", required=True, help="the .bin file to write")
    p.add_argument("--pairs", type=int, required=True, help="pairs: a multiple of 2 x --folds")
    p.add_argument("--seed", type=int, default=0, help="random seed of the pair choice")
    p.add_argument("--folds", type=int, default=DEFAULT_FOLDS, help="contiguous folds")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an --out not made by this command"
    )
    args = p.parse_args(argv)
    if args.folds < 1:
        p.error(f"--folds must be >= 1, got {args.folds}")
    if args.pairs < 1 or args.pairs % (2 * args.folds):
        p.error(f"--pairs {args.pairs}: must be a positive multiple of 2 x --folds {args.folds}")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Command-line entry point; returns the record written next to the ``.bin``."""
    args = _parse_args(argv)
    out = os.fspath(args.out)
    if os.path.exists(out) and not args.overwrite and not made_by_us(out):
        raise UsageError(
            f"--out {out}: exists and was not made by eval.make_bin; give --overwrite to replace it"
        )
    from datasets.discovery import open_dataset

    photos = read_source(open_dataset(args.dir), args.dir)
    data, pairs = build_bin(photos, args.pairs, args.folds, args.seed)
    record = {
        "source": os.path.abspath(args.dir),
        "seed": args.seed,
        "folds": args.folds,
        "pairs": len(pairs),
        "genuine": sum(s for _, _, s in pairs),
        "impostor": sum(not s for _, _, s in pairs),
        "identities": len({p.label for p in photos}),
        "photos": len(photos),
        "pair_photos": [[photos[a].where, photos[b].where, s] for a, b, s in pairs],
    }
    write_bin(out, data, record, overwrite=args.overwrite)
    print(
        f"{len(pairs)} pairs ({record['genuine']} genuine, {record['impostor']} impostor) in "
        f"{args.folds} folds from {record['photos']} photos of {record['identities']} "
        f"identities -> {out}"
    )
    return {k: v for k, v in record.items() if k != "pair_photos"} | {"out": out}


if __name__ == "__main__":
    sys.exit(run_main(main, prog="eval.make_bin"))
