"""From a folder of raw photos to face-recognition training data: the library of the
``datasets.prepare`` command (see it for the outputs, the owned output directory, the
resumable chunk cache and the near-duplicate report), which imports it after parsing
its arguments so that ``--help`` stays fast.

::

    from datasets.faces.options import FaceOptions
    from datasets.preparation import PrepareOptions, prepare

    result = prepare("raw/", "data/mine", PrepareOptions(face=FaceOptions(policy="central")))

Names (identities, files) are written escaped (:func:`escape_name`, :func:`unescape_name`).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import os
import re
import stat
import struct
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import cv2
import numpy as np

from common.atomic import write_bytes, write_json, write_text
from common.errors import UsageError, UserError
from common.outdir import OwnedDir, probe_directory
from datasets.arrow_io import MANIFEST, convert_to_shards
from datasets.dataset import RecordIODataset
from datasets.face_layout import FaceRecWriter
from datasets.faces.finder import REASONS, FaceResult, open_detector
from datasets.faces.options import FaceOptions
from datasets.faces.photos import PHOTO_SUFFIXES
from datasets.faces.pool import pool_context, start_worker, stop_worker, worker_finder

COMMAND = "datasets.prepare"
CACHE_DIR = ".prepare_cache"
CHUNK_PHOTOS = 32
#: Bump when the per-photo results change for the same inputs (invalidates old chunks).
PIPELINE_VERSION = 2
_CHUNK_MAGIC = b"FACEPREP1\n"
_LAYOUT_FILES = ("train.rec", "train.idx", "property")
_REPORT_FILES = ("labels.tsv", "faces.tsv", "rejected.tsv", "report.json")
_CACHE_FILE = re.compile(r"[0-9a-f]{64}\.chunk")


class PrepareError(UserError, ValueError):
    """``datasets.prepare`` cannot go on; one line naming the file and the reason (exit 1)."""


class PrepareArgumentError(UsageError, ValueError):
    """A bad RAW_DIR, OUT_DIR or option; one line naming it (exit 2)."""


class NoFaceKept(PrepareError):
    """No photo of RAW_DIR kept a face (the reports are written, no training files)."""


# ---------------------------------------------------------------------------- options


@dataclass(frozen=True)
class PrepareOptions:
    """Everything ``datasets.prepare`` can be told (the face options plus packing).

    Attributes:
        face: how faces are found and aligned (:class:`FaceOptions`).
        format: ``jpg`` or ``png`` for the crops stored in ``train.rec``.
        quality: JPEG quality (1..100) of ``jpg`` crops.
        dup_distance: near-duplicate threshold, in differing bits of :func:`phash`
            (0..63; -1 turns the check off).
        arrow: also write Arrow shards to ``OUT_DIR/arrow``.
        shard_size: rows per Arrow shard.
    """

    face: FaceOptions = field(default_factory=FaceOptions)
    format: str = "jpg"
    quality: int = 95
    dup_distance: int = 6
    arrow: bool = False
    shard_size: int = 100_000

    def __post_init__(self) -> None:
        if self.format not in ("jpg", "png"):
            raise ValueError(f"--format must be jpg or png, got {self.format!r}")
        if not 1 <= self.quality <= 100:
            raise ValueError(f"--quality must be in [1, 100], got {self.quality}")
        if not -1 <= self.dup_distance <= 63:
            raise ValueError(f"--dup-distance must be in [-1, 63], got {self.dup_distance}")
        if self.shard_size < 1:
            raise ValueError(f"--shard-size must be >= 1, got {self.shard_size}")

    def fingerprint(self) -> str:
        """Hash of everything that changes a photo's result (not packing-only options)."""
        import onnxruntime

        detector = self.face.detector
        if detector != "mtcnn":  # a file: its content, wherever it lives
            detector = hashlib.sha256(Path(detector).read_bytes()).hexdigest()
        facts = {
            "pipeline": PIPELINE_VERSION,
            "face": {**self.face.as_dict(), "detector": detector},
            "format": self.format,
            "quality": self.quality,
            "opencv": cv2.__version__,
            "onnxruntime": onnxruntime.__version__,
        }
        return hashlib.sha256(json.dumps(facts, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------- photo results


def phash(crop: np.ndarray) -> int:
    """63-bit perceptual hash of an image: grey, 32x32 (area), 2-D DCT-II, the 8x8
    lowest frequencies without the DC term, each bit = coefficient > their median."""
    grey = crop if crop.ndim == 2 else cv2.cvtColor(crop, cv2.COLOR_BGR2GRAY)
    small = cv2.resize(grey, (32, 32), interpolation=cv2.INTER_AREA).astype(np.float32)
    coeffs = cv2.dct(small)[:8, :8].ravel()[1:].astype(np.float64)
    bits = coeffs > np.median(coeffs)
    return int(sum(1 << i for i in np.flatnonzero(bits)))


def hamming_pairs(hashes: Sequence[int], max_distance: int) -> list[tuple[int, int, int]]:
    """``(i, j, distance)`` for ``i < j`` whose hashes differ in at most ``max_distance``
    bits, in ``(i, j)`` order. Vectorised per row (identities have up to thousands)."""
    if max_distance < 0 or len(hashes) < 2:
        return []
    h = np.asarray(hashes, dtype=np.uint64)
    bits = np.unpackbits(h.view(np.uint8).reshape(-1, 8), axis=1)  # (n, 64)
    out = []
    for i in range(len(h) - 1):
        d = np.count_nonzero(bits[i + 1 :] != bits[i], axis=1)
        for j in np.flatnonzero(d <= max_distance):
            out.append((i, i + 1 + int(j), int(d[j])))
    return out


def _encode(crop: np.ndarray, options: PrepareOptions) -> bytes:
    if options.format == "png":
        ok, buf = cv2.imencode(".png", crop, [cv2.IMWRITE_PNG_COMPRESSION, 3])
    else:
        ok, buf = cv2.imencode(".jpg", crop, [cv2.IMWRITE_JPEG_QUALITY, options.quality])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {crop.shape} crop as {options.format}")
    return buf.tobytes()


@dataclass
class PhotoRecord:
    """One photo's result as cached and packed (JSON-able, plus the encoded crop)."""

    file: str
    reason: str | None
    detail: str = ""
    faces: int = 0
    score: float | None = None
    box: list[float] | None = None
    landmarks: list[float] | None = None
    phash: int | None = None
    image: bytes = b""

    @property
    def ok(self) -> bool:
        return self.reason is None

    @staticmethod
    def from_result(file: str, r: FaceResult, options: PrepareOptions) -> PhotoRecord:
        if not r.ok:
            return PhotoRecord(file, r.reason, r.detail, r.faces)
        assert r.crop is not None and r.box is not None and r.landmarks is not None
        image = _encode(r.crop, options)
        stored = cv2.imdecode(np.frombuffer(image, np.uint8), cv2.IMREAD_COLOR)
        return PhotoRecord(
            file,
            None,
            "",
            r.faces,
            float(r.score),
            [float(v) for v in r.box],
            [float(v) for v in r.landmarks.ravel()],
            phash(stored),  # of the image as stored: reproducible from train.rec
            image,
        )


def _pack_chunk(key: str, records: list[PhotoRecord]) -> bytes:
    meta = []
    for r in records:
        m = {k: v for k, v in r.__dict__.items() if k != "image"}
        m["image_bytes"] = len(r.image)
        meta.append(m)
    header = json.dumps({"key": key, "records": meta}, sort_keys=True).encode()
    payload = b"".join(r.image for r in records)
    return _CHUNK_MAGIC + struct.pack("<Q", len(header)) + header + payload


def _read_chunk(path: Path, chunk: Chunk, images: bool = True) -> list[PhotoRecord] | None:
    """The records of a cached chunk file, or ``None`` if it is not a complete chunk for
    ``chunk`` (then it is computed again). ``images=False`` reads only the header (and
    checks the file's size against it)."""
    try:
        with open(path, "rb") as f:
            if f.read(len(_CHUNK_MAGIC)) != _CHUNK_MAGIC:
                return None
            (n,) = struct.unpack("<Q", f.read(8))
            if n > os.fstat(f.fileno()).st_size:
                return None
            header = json.loads(f.read(n))
            if header.get("key") != chunk.key:
                return None
            sizes = [int(m.pop("image_bytes")) for m in header["records"]]
            records = [PhotoRecord(**m) for m in header["records"]]
            end = len(_CHUNK_MAGIC) + 8 + n + sum(sizes)
            if end != os.fstat(f.fileno()).st_size or [r.file for r in records] != chunk.files:
                return None
            if images:
                for r, size in zip(records, sizes, strict=True):
                    r.image = f.read(size)
                    if len(r.image) != size:
                        return None
        return records
    except (OSError, ValueError, KeyError, TypeError, struct.error):
        return None


# ------------------------------------------------------------------------- scanning


@dataclass
class Chunk:
    identity: str
    files: list[str]  # paths relative to RAW_DIR, POSIX separators
    key: str = ""


@dataclass
class Scan:
    identities: list[str]
    chunks: list[Chunk]
    ignored: list[str]

    @property
    def num_photos(self) -> int:
        return sum(len(c.files) for c in self.chunks)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _links_to_folder(path: str) -> bool:
    """Whether the symlink ``path`` leads to a folder (a loop or a dangling link: no)."""
    try:
        return stat.S_ISDIR(os.stat(path).st_mode)
    except OSError:
        return False


def scan_raw_dir(raw: Path, chunk_photos: int = CHUNK_PHOTOS) -> Scan:
    """Identities (sorted sub-folder names), their photos (sorted relative paths, any
    depth, hidden files and folders skipped) in chunks, and what is ignored: files that
    are not a photo suffix or not inside an identity folder, and folders that are not
    entered (``name/``): a symlinked folder, at any level, is never followed (so RAW_DIR
    cannot pull in files from elsewhere, and no symlink loop is walked), and a folder
    that cannot be listed."""
    identities, chunks, ignored = [], [], []
    for entry in sorted(os.scandir(raw), key=lambda e: e.name):
        if _hidden(entry.name):
            continue
        if entry.is_symlink():  # never followed; one to a folder is listed as "name/"
            ignored.append(entry.name + ("/" if _links_to_folder(entry.path) else ""))
            continue
        if not entry.is_dir(follow_symlinks=False):
            ignored.append(entry.name)
            continue
        identities.append(entry.name)
        files = []

        def unlisted(exc: OSError, top: str = entry.path) -> None:
            where = exc.filename if exc.filename is not None else top
            ignored.append(Path(os.fsdecode(where)).relative_to(raw).as_posix() + "/")

        for root, dirs, names in os.walk(entry.path, onerror=unlisted):
            kept = []
            for d in sorted(dirs):
                if _hidden(d):
                    continue
                if os.path.islink(os.path.join(root, d)):
                    ignored.append(Path(root, d).relative_to(raw).as_posix() + "/")
                else:
                    kept.append(d)
            dirs[:] = kept
            for name in names:
                if _hidden(name):
                    continue
                rel = Path(root, name).relative_to(raw).as_posix()
                (files if name.lower().endswith(PHOTO_SUFFIXES) else ignored).append(rel)
        files.sort()
        for i in range(0, len(files), chunk_photos):
            chunks.append(Chunk(entry.name, files[i : i + chunk_photos]))
    ignored.sort()
    return Scan(identities, chunks, ignored)


def _chunk_key(raw: Path, chunk: Chunk, fingerprint: str) -> str:
    h = hashlib.sha256(fingerprint.encode())
    h.update(chunk.identity.encode("utf-8", "surrogateescape") + b"\0")
    for rel in chunk.files:
        try:
            st = os.stat(raw / rel)
            stamp = f"{st.st_size}:{st.st_mtime_ns}"
        except OSError:
            stamp = "missing"  # reported as unreadable; retried next run
        h.update(rel.encode("utf-8", "surrogateescape") + b"\0" + stamp.encode() + b"\0")
    return h.hexdigest()


# -------------------------------------------------------------------------- workers

_worker: dict[str, Any] = {}


def _init_worker(raw: str, options: PrepareOptions) -> None:
    start_worker(options.face)  # this process's face finder, on one core
    _worker["raw"] = Path(raw)
    _worker["options"] = options


def _process_chunk(item: tuple[int, Chunk]) -> tuple[int, bytes]:
    """Worker: the packed result of one chunk."""
    finder = worker_finder()  # raises the error the finder met when it started
    index, chunk = item
    raw, options = _worker["raw"], _worker["options"]
    records = [
        PhotoRecord.from_result(rel, finder.find_file(raw / rel), options) for rel in chunk.files
    ]
    return index, _pack_chunk(chunk.key, records)


class PrepareInterrupted(RuntimeError):
    """Raised by the ``interrupt_after`` test hook of :func:`prepare`."""


def _compute(
    raw: Path,
    options: PrepareOptions,
    jobs: list[tuple[int, Chunk]],
    workers: int,
    done: Callable[[int, bytes], None],
) -> None:
    if not jobs:
        return
    if workers <= 1:
        _init_worker(str(raw), options)
        try:
            for job in jobs:
                done(*_process_chunk(job))
        finally:
            _worker.clear()
            stop_worker()
        return
    ctx = pool_context()
    with ctx.Pool(min(workers, len(jobs)), _init_worker, (str(raw), options)) as pool:
        for index, data in pool.imap_unordered(_process_chunk, jobs, chunksize=1):
            done(index, data)


# -------------------------------------------------------------------------- outputs


_NEEDS_ESCAPE = re.compile("[\\\\\t\n\r\ud800-\udfff]")
_ESCAPES = {"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"}
_UNESCAPE = re.compile(r"\\(?:x([89a-f][0-9a-f])|u([0-9a-f]{4})|(.))", re.DOTALL)
_UNESCAPES = {"\\": "\\", "t": "\t", "n": "\n", "r": "\r"}


def _escape_char(m: re.Match[str]) -> str:
    ch = m.group()
    if ch in _ESCAPES:
        return _ESCAPES[ch]
    code = ord(ch)
    if 0xDC80 <= code <= 0xDCFF:  # a byte that is not UTF-8 (os.fsdecode's surrogateescape)
        return f"\\x{code - 0xDC00:02x}"
    return f"\\u{code:04x}"  # any other lone surrogate


def escape_name(name: str) -> str:
    """A file or identity name as written in the TSV files and ``report.json``: valid
    UTF-8 text on one line, unambiguous.

    A backslash becomes ``\\\\``, tab, newline and carriage return ``\\t``, ``\\n``,
    ``\\r``, a byte that is not UTF-8 (a lone surrogate of ``os.fsdecode``) ``\\xNN``
    (two lower-case hex digits), any other lone surrogate ``\\uNNNN``. Since the backslash
    itself is escaped, a name that is literally ``\\xff`` (four characters) is written
    ``\\\\xff`` and cannot be mistaken for the byte 0xFF. :func:`unescape_name` inverts it.
    """
    return _NEEDS_ESCAPE.sub(_escape_char, name)


def _unescape_match(m: re.Match[str]) -> str:
    hex2, hex4, other = m.groups()
    if hex2 is not None:
        return chr(0xDC00 + int(hex2, 16))
    if hex4 is not None:
        return chr(int(hex4, 16))
    if other in _UNESCAPES:
        return _UNESCAPES[other]
    raise ValueError(f"unknown escape \\{other} in a name")


def unescape_name(text: str) -> str:
    """The name :func:`escape_name` wrote (undecodable bytes as ``os.fsdecode`` gives
    them: ``os.fsencode`` of the result is the name's bytes)."""
    return _UNESCAPE.sub(_unescape_match, text)


_text = escape_name


def _fmt(values: Sequence[float] | None) -> str:
    return "" if values is None else ",".join(f"{v:.2f}" for v in values)


@dataclass
class PrepareResult:
    """What :func:`prepare` did: ``report.json``'s content plus facts of this run."""

    report: dict[str, Any]
    photos: int
    kept: int
    computed_chunks: int
    cached_chunks: int


def _identity_records(cache: Path, scan: Scan) -> Iterator[tuple[str, list[PhotoRecord]]]:
    """``(identity, records)`` in order, read chunk by chunk from the cache (one
    identity in memory at a time)."""
    chunks = iter(scan.chunks)
    pending = next(chunks, None)
    for name in scan.identities:
        records: list[PhotoRecord] = []
        while pending is not None and pending.identity == name:
            got = _read_chunk(cache / f"{pending.key}.chunk", pending)
            if got is None:
                raise PrepareError(
                    f"{cache / (pending.key + '.chunk')}: cache chunk vanished or changed "
                    "while packing; rerun the same command"
                )
            records.extend(got)
            pending = next(chunks, None)
        yield name, records


def _write_outputs(
    owned: OwnedDir, earlier: set[str], cache: Path, scan: Scan, options: PrepareOptions
) -> dict[str, Any]:
    """Write the face layout and the reports into ``owned.path``; ``earlier``: the
    outputs an earlier run of this command wrote there (the only files it may delete)."""
    out = owned.path
    size = options.face.image_size
    identities: dict[str, Any] = {}
    reasons = dict.fromkeys(REASONS, 0)
    rejected = ["file\treason\tdetail"]
    faces = ["key\tlabel\tfile\tscore\tfaces\tbox\tlandmarks"]
    labels = ["label\tidentity\timages"]
    duplicates: list[dict[str, Any]] = []
    writer = FaceRecWriter(out, image_size=(size, size))
    label = 0
    try:
        for name, records in _identity_records(cache, scan):
            kept = [r for r in records if r.ok]
            counts = dict.fromkeys(REASONS, 0)
            for r in records:
                if not r.ok:
                    counts[r.reason] += 1
                    reasons[r.reason] += 1
                    rejected.append(f"{_text(r.file)}\t{r.reason}\t{_text(r.detail)}")
            for r in kept:
                key = writer.add(label, r.image)
                faces.append(
                    f"{key}\t{label}\t{_text(r.file)}\t{r.score:.4f}\t{r.faces}\t"
                    f"{_fmt(r.box)}\t{_fmt(r.landmarks)}"
                )
            pairs = hamming_pairs([r.phash for r in kept], options.dup_distance)
            for i, j, d in pairs:
                duplicates.append(
                    {
                        "identity": _text(name),
                        "a": _text(kept[i].file),
                        "b": _text(kept[j].file),
                        "distance": d,
                    }
                )
            identities[_text(name)] = {
                "label": label if kept else None,
                "photos": len(records),
                "kept": len(kept),
                "rejected": {k: v for k, v in counts.items() if v},
                "several_faces_found": sum(1 for r in kept if r.faces > 1),
                "near_duplicate_pairs": len(pairs),
            }
            if kept:
                labels.append(f"{label}\t{_text(name)}\t{len(kept)}")
                label += 1
        if label:
            owned.record(*_LAYOUT_FILES)  # before they appear: a crash leaves them ours
            writer.close()
        else:  # nothing to train on: no face-layout files, not even those of an earlier run
            writer.abort()
            for stale in _LAYOUT_FILES:
                if stale in earlier:  # ours; a file this command did not write is kept
                    with contextlib.suppress(FileNotFoundError):
                        (out / stale).unlink()
                    owned.files.remove(stale)
    except BaseException:
        writer.abort()
        raise

    n_kept = sum(v["kept"] for v in identities.values())
    report = {
        "options": {
            **options.face.as_dict(),
            "detector": _text(options.face.detector),
            "format": options.format,
            "quality": options.quality,
            "dup_distance": options.dup_distance,
        },
        "totals": {
            "identities": len(scan.identities),
            "labelled_identities": label,
            "photos": scan.num_photos,
            "kept": n_kept,
            "rejected": scan.num_photos - n_kept,
            "reasons": reasons,
            "several_faces_found": sum(v["several_faces_found"] for v in identities.values()),
            "near_duplicate_pairs": len(duplicates),
            "ignored_files": len(scan.ignored),
        },
        "identities": identities,
        "near_duplicates": duplicates,
        "ignored_files": [_text(f) for f in scan.ignored],
    }
    owned.record(*_REPORT_FILES)
    write_text(out / "labels.tsv", "\n".join(labels) + "\n")
    write_text(out / "faces.tsv", "\n".join(faces) + "\n")
    write_text(out / "rejected.tsv", "\n".join(rejected) + "\n")
    write_json(out / "report.json", report)
    return report


def _write_arrow(
    owned: OwnedDir, earlier: set[str], options: PrepareOptions, progress: bool
) -> None:

    out = owned.path
    shards = out / "arrow"
    if shards.is_symlink() or (shards.exists() and "arrow/" not in earlier):
        raise PrepareError(
            f"{shards} exists and was not written by {COMMAND}; move it away to write "
            "Arrow shards there (a file this command did not write is never deleted)"
        )
    owned.record("arrow/")
    if shards.is_dir():  # shards of an earlier run may hold other images: start afresh
        for p in shards.iterdir():
            if p.name == MANIFEST or p.name.endswith(".arrow") or _temporary(p.name):
                p.unlink()
    convert_to_shards(RecordIODataset(out / "train.rec"), shards, options.shard_size, progress)


def _temporary(name: str, of: Sequence[str] | None = None) -> bool:
    """A temporary file of :mod:`common.atomic` (``.<name>.<random>.tmp``), of one of
    ``of`` if given."""
    if not (name.startswith(".") and name.endswith(".tmp")):
        return False
    return of is None or any(name.startswith(f".{o}.") for o in of)


def _progress_bar(total: int, enabled: bool) -> Any:
    if not (enabled and sys.stderr.isatty()):  # a log file gets no bar, as in the trainer
        return None
    from tqdm import tqdm

    return tqdm(total=total, unit="photo", desc="prepare", file=sys.stderr, dynamic_ncols=True)


def _check_paths(raw: Path, out: Path) -> None:
    """RAW_DIR exists and is a directory, OUT_DIR is not a symlink loop and not inside
    RAW_DIR (:class:`PrepareArgumentError` otherwise)."""
    for what, path in (("RAW_DIR", raw), ("OUT_DIR", out)):
        if os.path.islink(path):
            try:
                os.stat(path)
            except OSError as exc:
                if exc.errno == errno.ELOOP:
                    raise PrepareArgumentError(
                        f"{what} {path}: a symlink loop ({exc.strerror})"
                    ) from None
                if what == "OUT_DIR":
                    raise PrepareArgumentError(f"{what} {path}: a dangling symlink") from None
    try:
        st = os.stat(raw)
    except FileNotFoundError:
        raise PrepareArgumentError(f"{raw}: no such directory") from None
    except OSError as exc:
        raise PrepareArgumentError(f"RAW_DIR {raw}: {exc.strerror or exc}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise PrepareArgumentError(f"RAW_DIR {raw} is not a directory")
    real_raw, real_out = os.path.realpath(raw), os.path.realpath(out)
    if real_out == real_raw or real_out.startswith(real_raw.rstrip(os.sep) + os.sep):
        raise PrepareArgumentError(f"{out}: the output directory must not be inside RAW_DIR {raw}")


def prepare(
    raw_dir: str | os.PathLike[str],
    out_dir: str | os.PathLike[str],
    options: PrepareOptions | None = None,
    *,
    workers: int = 1,
    progress: bool = True,
    chunk_photos: int = CHUNK_PHOTOS,
    overwrite: bool = False,
    interrupt_after: int | None = None,
) -> PrepareResult:
    """Build the training data of ``raw_dir`` in ``out_dir`` (see the module docstring).

    Args:
        workers: processes detecting faces (<= 1: in this process).
        progress: show a progress bar (only when stderr is a terminal).
        chunk_photos: photos per cached chunk.
        overwrite: write into a non-empty ``out_dir`` that this command did not make
            (``--overwrite``); files of other names there are kept.
        interrupt_after: test hook: raise :class:`PrepareInterrupted` after this many
            chunks were computed and cached (workers are terminated mid-chunk).
    Raises:
        PrepareArgumentError: ``raw_dir`` is missing, has no identity folder, or contains
            ``out_dir``; ``out_dir`` is a symlink loop.
        common.outdir.OutputDirError: ``out_dir`` is not a directory, cannot be written,
            was not made by this command (without ``overwrite``), or is in use by another
            run (``OutputLockedError``).
        OSError: a file could not be read or written (named in the message).
    """
    options = options or PrepareOptions()
    raw, out = Path(raw_dir), Path(out_dir)
    _check_paths(raw, out)
    scan = scan_raw_dir(raw, chunk_photos)
    if not scan.identities:
        raise PrepareArgumentError(
            f"{raw}: no identity sub-folders (expected RAW_DIR/<identity>/<photo>)"
        )
    if out.exists() and not out.is_dir():
        raise PrepareArgumentError(f"OUT_DIR {out} exists and is not a directory")
    # a read-only or full file system: one line naming OUT_DIR, before any work
    probe_directory(out, f"OUT_DIR={str(out)!r}")
    with OwnedDir(out, COMMAND, "OUT_DIR", overwrite=overwrite) as owned:
        if owned.stale:
            print(f"{COMMAND}: note: took over the lock of {owned.stale} (gone)", file=sys.stderr)
        earlier = set(owned.files)  # outputs an earlier run of this command wrote
        return _prepare_locked(
            raw, owned, earlier, scan, options, workers, progress, interrupt_after
        )


def _prepare_locked(
    raw: Path,
    owned: OwnedDir,
    earlier: set[str],
    scan: Scan,
    options: PrepareOptions,
    workers: int,
    progress: bool,
    interrupt_after: int | None,
) -> PrepareResult:
    out = owned.path
    cache = out / CACHE_DIR
    if cache.is_symlink() or (cache.exists() and not cache.is_dir()):
        raise PrepareError(f"{cache}: the cache folder is a symlink or not a directory")
    owned.record(CACHE_DIR + "/")
    cache.mkdir(exist_ok=True)
    fingerprint = options.fingerprint()
    jobs = []
    for i, chunk in enumerate(scan.chunks):
        chunk.key = _chunk_key(raw, chunk, fingerprint)
        path = cache / f"{chunk.key}.chunk"
        if not (path.is_file() and _read_chunk(path, chunk, images=False) is not None):
            jobs.append((i, chunk))
    cached = len(scan.chunks) - len(jobs)

    bar = _progress_bar(scan.num_photos, progress)
    if bar is not None:
        bar.update(scan.num_photos - sum(len(c.files) for _, c in jobs))
    computed = 0

    def done(index: int, data: bytes) -> None:
        nonlocal computed
        chunk = scan.chunks[index]
        write_bytes(cache / f"{chunk.key}.chunk", data)
        computed += 1
        if bar is not None:
            bar.update(len(chunk.files))
        if interrupt_after is not None and computed >= interrupt_after:
            raise PrepareInterrupted(f"interrupted after {computed} chunks (test hook)")

    try:
        _compute(raw, options, jobs, workers, done)
    finally:
        if bar is not None:
            bar.close()
    report = _write_outputs(owned, earlier, cache, scan, options)
    if options.arrow and report["totals"]["kept"]:
        _write_arrow(owned, earlier, options, progress and sys.stderr.isatty())
    # the cache now matches RAW_DIR: drop chunks of photos that are gone or changed, and
    # temporary files of writes a kill interrupted; nothing else is touched
    wanted = {f"{c.key}.chunk" for c in scan.chunks}
    for p in cache.iterdir():
        if p.name not in wanted and (_CACHE_FILE.fullmatch(p.name) or _temporary(p.name)):
            with contextlib.suppress(OSError):
                p.unlink()
    for name in os.listdir(out):  # a killed run's temporaries of the outputs
        if _temporary(name, _LAYOUT_FILES + _REPORT_FILES):
            with contextlib.suppress(OSError):
                os.unlink(out / name)
    owned.commit()  # the last write: the outputs are complete
    return PrepareResult(report, scan.num_photos, report["totals"]["kept"], computed, cached)


def check_detector(options: FaceOptions) -> None:
    """Open an ``.onnx`` detector once here, so that a bad file is one line naming it
    (exit 2) before any worker starts."""
    if options.detector == "mtcnn":
        return

    try:
        open_detector(options.detector, min_face_size=options.min_size)
    except ValueError as exc:
        raise PrepareArgumentError(f"--detector {exc}") from None
