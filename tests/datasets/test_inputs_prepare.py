"""Hostile and unlucky inputs of ``datasets.prepare`` and of the photo reader that
``eval.compare``/``eval.embed`` share (issue 24: items 1, 3, 9, 10, 13, 14-17).

OUT_DIR is owned (a foreign dataset is refused, never deleted; one run at a time; the
manifest is written last and readers check it); decompression bombs are refused from
their headers with peak memory measured; FIFOs and devices are ``not_a_file`` without
hanging; every failure of the command is one line; names are escaped unambiguously and
``report.json`` is strict UTF-8 JSON; symlinked folders are not followed, and listed."""

from __future__ import annotations

import errno
import json
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import cv2
import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import common.outdir
from common.cli import run_main
from common.outdir import MANIFEST_NAME, OutputDirError, OwnedDir, check_complete
from datasets import preparation
from datasets import prepare as prep
from datasets.discovery import open_dataset
from datasets.face_layout import FaceRecWriter
from datasets.faces.arguments import face_options
from datasets.faces.finder import FaceFinder
from datasets.faces.options import FaceOptions
from datasets.faces.photos import PhotoError, read_photo, read_photo_bytes
from datasets.faces.pool import iter_faces
from datasets.faces.scrfd import SCRFD
from tests.face_photos import noise_photo, source, write_photo

REPO = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60  # a FIFO read that blocks: the test fails after this, never hangs


def _cli(argv: list[str], capsys) -> tuple[int, str]:
    """``python -m datasets.prepare argv`` in this process: exit code and stderr, which
    must be one line without a traceback."""
    code = run_main(prep.main, [*argv, "--workers", "1", "--no-progress"], prog="datasets.prepare")
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    return code, lines[0]


@pytest.fixture(scope="module")
def raw_face(tmp_path_factory) -> Path:
    """One identity, one photo with a face."""
    root = tmp_path_factory.mktemp("raw_face")
    write_photo(root / "alice" / "a1.jpg", source("astronaut"))
    return root


@pytest.fixture(scope="module")
def raw_noface(tmp_path_factory) -> Path:
    """One identity, one small photo without a face (fast to detect on)."""
    root = tmp_path_factory.mktemp("raw_noface")
    write_photo(root / "dave" / "noise.png", noise_photo((64, 64), 0))
    return root


def _foreign_dataset(root: Path) -> dict[str, bytes]:
    """A training set that ``datasets.prepare`` did not make (``cp -r data/synthetic V``)."""
    w = FaceRecWriter(root)
    for c in range(2):
        w.add(c, cv2.imencode(".jpg", np.full((112, 112, 3), 60 * c, np.uint8))[1].tobytes())
    w.close()
    (root / "notes.txt").write_text("mine\n")
    return {p.name: p.read_bytes() for p in root.iterdir()}


def _unchanged(root: Path, before: dict[str, bytes]) -> None:
    for name, data in before.items():
        assert (root / name).read_bytes() == data, name


# ------------------------------------------------------ item 1: OUT_DIR is owned


def test_a_dataset_prepare_did_not_make_is_refused_and_left_intact(
    raw_face, raw_noface, tmp_path, capsys
):
    v = tmp_path / "V"
    before = _foreign_dataset(v)
    for raw in (raw_noface, raw_face):  # no face found (deleted it) / faces (overwrote it)
        code, line = _cli([str(raw), str(v)], capsys)
        assert code == 1
        assert line == (
            f"datasets.prepare: error: OUT_DIR={str(v)!r} is not empty and was not made by "
            "datasets.prepare (it holds notes.txt, property, train.idx, train.rec); choose a "
            "new or empty directory, or pass --overwrite to write into it (files this run "
            "does not write are kept)"
        )
        _unchanged(v, before)
        assert sorted(p.name for p in v.iterdir()) == sorted(before)
    # --overwrite: written into, but a file this command did not write is never deleted
    code, line = _cli([str(raw_noface), str(v), "--overwrite"], capsys)
    assert code == 1 and line.endswith(f"no face kept: see {v / 'rejected.tsv'}")
    _unchanged(v, before)
    assert (v / "report.json").is_file() and json.loads((v / MANIFEST_NAME).read_text())["complete"]


# ------------------------------------- item 3: one run at a time, outputs complete


def test_a_second_run_is_refused_while_the_first_holds_out_dir(raw_face, tmp_path, capsys):
    out = tmp_path / "out"
    first = OwnedDir(out, "datasets.prepare", "OUT_DIR").open()  # a run in progress
    try:
        chunk = out / preparation.CACHE_DIR / ("0" * 64 + ".chunk")  # its work so far
        chunk.parent.mkdir()
        chunk.write_bytes(b"first run's chunk")
        code, line = _cli([str(raw_face), str(out)], capsys)
        assert code == 1
        assert re.fullmatch(
            rf"datasets\.prepare: error: OUT_DIR={re.escape(repr(str(out)))} is in use by job "
            rf"PID {os.getpid()} on .* since .* \(lock file {re.escape(str(out / '.lock'))}\).*",
            line,
        ), line
        assert chunk.read_bytes() == b"first run's chunk"
        assert not (out / "train.rec").exists()
    finally:
        first.close()


def _fail_fsync_of(fragment: str, monkeypatch) -> None:
    """A full disk while ``fragment`` is written: its fsync gives ENOSPC."""
    real = os.fsync

    def fsync(fd: int) -> None:
        if fragment in os.readlink(f"/proc/self/fd/{fd}"):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd)

    monkeypatch.setattr(os, "fsync", fsync)


def test_full_disk_is_one_line_and_readers_refuse_the_incomplete_output(
    raw_face, tmp_path, capsys, monkeypatch
):
    out = tmp_path / "out"
    with monkeypatch.context() as m:
        _fail_fsync_of(".report.json.", m)  # after train.rec is in place
        code, line = _cli([str(raw_face), str(out)], capsys)
    assert code == 1
    assert line == (
        f"datasets.prepare: error: cannot write {out / 'report.json'}: No space left on device"
    )
    assert (out / "train.rec").is_file() and not (out / "report.json").exists()
    assert not [p.name for p in out.iterdir() if p.name.endswith(".tmp")]
    assert not (out / ".lock").exists()  # released: the rerun needs no clean-up
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is False and "train.rec" in manifest["files"]
    for data in (out, out / "train.rec"):  # what training opens
        with pytest.raises(OutputDirError, match=r"incomplete output of datasets\.prepare"):
            open_dataset(data)
    # disk freed: the same command finishes the job, and readers accept it
    code = run_main(prep.main, [str(raw_face), str(out), "--workers", "1", "--no-progress"])
    assert code == 0
    check_complete(out)
    assert len(open_dataset(out)) == 1
    manifest = json.loads((out / MANIFEST_NAME).read_text())
    assert manifest["complete"] is True
    assert {"train.rec", "report.json", ".prepare_cache/"} <= set(manifest["files"])


# ------------------------------------------------ items 9 and 10: bounded cost


def _png_bomb(width: int, height: int) -> bytes:
    """A 100-byte PNG whose IHDR announces ``width x height`` RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = struct.pack(">I", zlib.crc32(kind + body))
        return struct.pack(">I", len(body)) + kind + body + crc

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\0" * 1024, 9)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _jpeg_bomb(width: int, height: int) -> bytes:
    """A real 16x16 JPEG whose frame header (SOF0) is forged to ``width x height``."""
    data = bytearray(cv2.imencode(".jpg", np.full((16, 16, 3), 128, np.uint8))[1].tobytes())
    at = data.index(b"\xff\xc0")
    data[at + 5 : at + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def _webp_bomb(width: int, height: int) -> bytes:
    """A real 16x16 lossy WebP whose VP8 frame header is forged to ``width x height``."""
    img = np.full((16, 16, 3), 128, np.uint8)
    data = bytearray(cv2.imencode(".webp", img, [cv2.IMWRITE_WEBP_QUALITY, 90])[1].tobytes())
    at = data.index(b"VP8 ")
    data[at + 14 : at + 18] = struct.pack("<HH", width, height)
    return bytes(data)


# The child: one prepare worker's work (MTCNN built, then find_file on each photo), its
# peak RSS before and after. Address space capped at 3 GiB: a regression fails fast
# instead of taking the shared machine's memory; SIGALRM: it never hangs.
_CHILD = """
import json, resource, signal, sys
signal.alarm(60)
resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))
from datasets.faces.finder import FaceFinder
from datasets.faces.options import FaceOptions
def peak():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
out = {}
finder = FaceFinder(FaceOptions(max_pixels=int(sys.argv[1])))
out["baseline"] = peak()
out["bombs"] = [finder.find_file(p).reason for p in sys.argv[3:]]
out["after_bombs"] = peak()
out["photo"] = finder.find_file(sys.argv[2]).reason
out["after_photo"] = peak()
print(json.dumps(out))
"""

#: Documented bound (datasets/photos.py): one photo costs a worker at most its file
#: (<= 4 bytes per pixel of the cap) plus 8 bytes per pixel of the cap (decoded BGR image
#: and its EXIF-turned copy; decoder buffers and the detection copy are far smaller).
BYTES_PER_CAP_PIXEL = 12


def test_decompression_bombs_are_refused_from_their_headers_with_bounded_memory(tmp_path):
    bombs = {
        "png.png": _png_bomb(30000, 30000),  # 900 MP: 2.7 GB decoded
        "jpeg.jpg": _jpeg_bomb(32000, 32000),  # 1 GP: 3 GB
        "webp.webp": _webp_bomb(16383, 16383),  # 268 MP
    }
    for name, data in bombs.items():
        (tmp_path / name).write_bytes(data)
    (tmp_path / "zero.jpg").symlink_to("/dev/zero")  # endless bytes
    cap = 4_000_000  # small, so the accepted photo below is quick
    photo = tmp_path / "photo.jpg"  # a photo at the cap: 2000 x 2000
    rng = np.random.default_rng(0)
    write_photo(photo, cv2.resize(rng.integers(0, 256, (250, 250, 3), np.uint8), (2000, 2000)))
    log = tmp_path / "child.json"
    with open(log, "w") as f:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(cap), str(photo)]
            + [str(tmp_path / n) for n in [*bombs, "zero.jpg"]],
            cwd=REPO,
            stdout=f,
            env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)},
        )
        _, status, usage = os.wait4(child.pid, 0)  # this child's own rusage
    child.returncode = os.waitstatus_to_exitcode(status)
    assert child.returncode == 0, log.read_text()
    got = json.loads(log.read_text())
    assert got["bombs"] == ["too_large", "too_large", "too_large", "not_a_file"]
    assert got["photo"] in ("no_face", "low_score")  # decoded and searched: within the cap
    # refusing a bomb costs nothing measurable; the largest accepted photo stays in bound
    assert got["after_bombs"] - got["baseline"] < 8 << 20
    bound = BYTES_PER_CAP_PIXEL * cap
    assert got["after_photo"] - got["baseline"] < bound
    assert usage.ru_maxrss * 1024 < got["baseline"] + bound  # the child's whole life


def _in_thread(fn, fifo: Path):
    """``fn()`` with a timeout: if it blocks (on the FIFO), unblock it and fail."""
    result: dict[str, object] = {}

    def run() -> None:
        try:
            result["value"] = fn()
        except BaseException as exc:  # handed to the test
            result["error"] = exc

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(TIMEOUT_S)
    if t.is_alive():  # a writer that closes at once: the blocked reader sees end of file
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        t.join(10)
        pytest.fail(f"blocked for {TIMEOUT_S} s reading the FIFO {fifo}")
    if "error" in result:
        raise result["error"]  # type: ignore[misc]
    return result.get("value")


def test_a_fifo_photo_is_not_a_file_and_prepare_does_not_hang(raw_face, tmp_path, capsys):
    raw = tmp_path / "raw"
    (raw / "alice").mkdir(parents=True)
    (raw / "alice" / "a1.jpg").write_bytes((raw_face / "alice" / "a1.jpg").read_bytes())
    os.mkfifo(raw / "alice" / "pipe.jpg")
    (raw / "alice" / "link.jpg").symlink_to(raw / "alice" / "a1.jpg")  # a symlinked photo: read
    out = tmp_path / "out"
    argv = [str(raw), str(out), "--workers", "1", "--no-progress"]
    assert _in_thread(lambda: run_main(prep.main, argv), raw / "alice" / "pipe.jpg") == 0
    rejected = (out / "rejected.tsv").read_text().splitlines()
    assert rejected[1:] == [
        "alice/pipe.jpg\tnot_a_file\ta FIFO (named pipe), not a regular file: not read"
    ]
    faces = [r.split("\t")[2] for r in (out / "faces.tsv").read_text().splitlines()[1:]]
    assert faces == ["alice/a1.jpg", "alice/link.jpg"]
    assert json.loads((out / "report.json").read_text())["totals"]["reasons"]["not_a_file"] == 1


def test_the_photo_reader_of_eval_refuses_fifos_sockets_and_folders(tmp_path):
    fifo = tmp_path / "x.jpg"
    os.mkfifo(fifo)
    with pytest.raises(PhotoError) as info:
        _in_thread(lambda: read_photo(fifo), fifo)  # eval.compare --aligned
    assert info.value.reason == "not_a_file"
    assert str(info.value) == f"{fifo}: a FIFO (named pipe), not a regular file: not read"
    r = _in_thread(lambda: FaceFinder(FaceOptions()).find_file(fifo), fifo)  # eval.compare
    assert (r.reason, r.detail) == (
        "not_a_file",
        "a FIFO (named pipe), not a regular file: not read",
    )
    found = _in_thread(lambda: list(iter_faces([fifo], FaceOptions())), fifo)  # eval.embed
    assert [f.reason for f in found] == ["not_a_file"]
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(str(tmp_path / "s.jpg"))
        with pytest.raises(PhotoError, match=r"s\.jpg: a socket, not a regular file") as info:
            read_photo(tmp_path / "s.jpg")
        assert info.value.reason == "not_a_file"
    finally:
        sock.close()
    (tmp_path / "d.jpg").mkdir()
    with pytest.raises(PhotoError, match=r"d\.jpg: a directory, not a regular file"):
        read_photo(tmp_path / "d.jpg")


def test_pixel_cap_is_an_option_and_refuses_before_decoding(tmp_path):
    (tmp_path / "bomb.png").write_bytes(_png_bomb(30000, 30000))
    with pytest.raises(PhotoError) as info:
        read_photo(tmp_path / "bomb.png")
    assert info.value.reason == "too_large"
    assert str(info.value) == (
        f"{tmp_path / 'bomb.png'}: 30000x30000 pixels (900.0 MP) is over the --max-pixels cap "
        "of 40000000 (40 MP); not decoded"
    )
    write_photo(tmp_path / "p.png", noise_photo((100, 100), 0))
    assert read_photo(tmp_path / "p.png").shape == (100, 100, 3)
    with pytest.raises(PhotoError, match=r"100x100 pixels .* cap of 9999 "):
        read_photo(tmp_path / "p.png", max_pixels=9999)
    size = (tmp_path / "p.png").stat().st_size  # the byte cap: checked before reading
    with pytest.raises(PhotoError, match=rf"p\.png: {size} bytes is over the 100-byte cap"):
        read_photo_bytes(tmp_path / "p.png", max_bytes=100)
    args = prep.build_parser().parse_args(["r", "o", "--max-pixels", "5000"])
    assert face_options(args).max_pixels == 5000
    with pytest.raises(ValueError, match=r"--max-pixels must be in \[4096, "):
        FaceOptions(max_pixels=10)


# ---------------------------------------------- item 13: one line for every failure


def test_out_dir_that_is_a_file_is_one_line_from_the_command(raw_noface, tmp_path):
    """Through ``python -m`` (the ``__main__`` block goes through ``run_main``)."""
    out = tmp_path / "out"
    out.write_text("a file")
    p = subprocess.run(
        [sys.executable, "-m", "datasets.prepare", str(raw_noface), str(out)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert p.stderr.splitlines() == [
        f"datasets.prepare: error: OUT_DIR {out} exists and is not a directory"
    ]
    assert out.read_text() == "a file"


def test_read_only_out_dir_is_one_line(raw_noface, tmp_path, capsys, monkeypatch):
    out = tmp_path / "ro"
    out.mkdir()
    real = common.outdir.open_nofollow

    def read_only(path, flags, mode=0o644):
        if str(path).startswith(str(out)) and flags & (os.O_WRONLY | os.O_RDWR | os.O_CREAT):
            raise OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))
        return real(path, flags, mode)

    monkeypatch.setattr(common.outdir, "open_nofollow", read_only)
    code, line = _cli([str(raw_noface), str(out)], capsys)
    assert code == 1
    assert line == (
        f"datasets.prepare: error: OUT_DIR={str(out)!r} is not writable: Read-only file system"
    )
    assert list(out.iterdir()) == []


def test_symlink_loops_are_one_line_or_reported(raw_noface, tmp_path, capsys):
    loop = tmp_path / "loop"
    loop.symlink_to(loop)
    code, line = _cli([str(loop), str(tmp_path / "out")], capsys)
    assert code == 2
    assert line == (
        f"datasets.prepare: error: RAW_DIR {loop}: a symlink loop (Too many levels of "
        "symbolic links)"
    )
    code, line = _cli([str(raw_noface), str(loop)], capsys)
    assert code == 2 and line.startswith(f"datasets.prepare: error: OUT_DIR {loop}: a symlink loop")
    # loops inside RAW_DIR: a looping photo is unreadable, looping folders are not entered
    raw = tmp_path / "raw"
    write_photo(raw / "dave" / "noise.png", noise_photo((64, 64), 0))
    (raw / "dave" / "self.jpg").symlink_to(raw / "dave" / "self.jpg")
    (raw / "dave" / "again").symlink_to(raw / "dave")
    (raw / "circle").symlink_to(raw / "circle")
    out = tmp_path / "out"
    code, line = _cli([str(raw), str(out)], capsys)
    assert code == 1 and line.endswith("no face kept: see " + str(out / "rejected.tsv"))
    report = json.loads((out / "report.json").read_text())
    assert report["ignored_files"] == ["circle", "dave/again/"]
    rows = (out / "rejected.tsv").read_text().splitlines()[1:]
    assert "dave/self.jpg\tunreadable\tcannot read: Too many levels of symbolic links" in rows


# ------------------------------------------- item 14: detector errors name the file


def _fixed_input_detector(path: Path, side: int) -> Path:
    outputs = [
        (f"{kind}_{s}", np.zeros((8, width), np.float32))
        for kind, width in (("score", 1), ("bbox", 4), ("kps", 10))
        for s in (8, 16, 32)
    ]
    nodes = [
        helper.make_node("Constant", [], [n], value=numpy_helper.from_array(a, n + "_v"))
        for n, a in outputs
    ]
    graph = helper.make_graph(
        nodes,
        "fixed",
        [helper.make_tensor_value_info("input.1", TensorProto.FLOAT, [1, 3, side, side])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, list(a.shape)) for n, a in outputs],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_detector_input_size_errors_name_the_model(raw_noface, tmp_path, capsys):
    odd = _fixed_input_detector(tmp_path / "odd.onnx", 100)
    with pytest.raises(ValueError) as info:
        SCRFD(odd)
    assert str(info.value) == (
        f"{odd}: detector input size must be positive multiples of 32, got 100x100"
    )
    huge = _fixed_input_detector(tmp_path / "huge.onnx", 8192)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(huge))}: detector input size "):
        SCRFD(huge)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(odd))}: detector input is fixed"):
        SCRFD(odd, input_size=(640, 640))
    code, line = _cli([str(raw_noface), str(tmp_path / "out"), "--detector", str(odd)], capsys)
    assert code == 2
    assert line == (
        f"datasets.prepare: error: --detector {odd}: detector input size must be positive "
        "multiples of 32, got 100x100"
    )


# ------------------------------- items 15-17: names, strict JSON, symlinked folders

BYTE_NAME = os.fsdecode(b"\xff")  # a folder name that is not UTF-8
TEXT_NAME = "\\xff"  # a folder literally named backslash, x, f, f


@pytest.fixture(scope="module")
def odd(raw_face, tmp_path_factory) -> Path:
    """Identities named by the byte 0xFF and by the text ``\\xff``; a symlinked identity
    folder and a symlinked sub-folder (neither followed)."""
    root = tmp_path_factory.mktemp("odd")
    photo = (raw_face / "alice" / "a1.jpg").read_bytes()
    for name in (BYTE_NAME, TEXT_NAME):
        (root / name).mkdir()
        (root / name / "a.jpg").write_bytes(photo)
    (root / "linked").symlink_to(root / BYTE_NAME)
    (root / TEXT_NAME / "sub").symlink_to(root / BYTE_NAME)
    out = tmp_path_factory.mktemp("odd_out")
    preparation.prepare(root, out, workers=1, progress=False)
    return out


@pytest.mark.parametrize(
    "name",
    [
        "plain",
        "tab\there",
        "line\nbreak\rcr",
        "back\\slash",
        "\\",
        "\\\\",
        TEXT_NAME,
        BYTE_NAME,
        "\\" + BYTE_NAME,
        BYTE_NAME + "\\xff",
        "\\t",
        "é ü",
        os.fsdecode(b"caf\xc3"),  # a UTF-8 sequence cut short
        "\ud800",  # a lone surrogate that no file system name gives
    ],
)
def test_escaped_names_round_trip(name):
    text = preparation.escape_name(name)
    assert preparation.unescape_name(text) == name
    text.encode("utf-8")  # strict: no lone surrogate left
    assert "\t" not in text and "\n" not in text and "\r" not in text


def test_escaping_tells_a_byte_from_its_escaped_text():
    assert preparation.escape_name(BYTE_NAME) == "\\xff"
    assert preparation.escape_name(TEXT_NAME) == "\\\\xff"
    names = [BYTE_NAME, TEXT_NAME, "\\" + BYTE_NAME, "\\\\xff", "\t", "\\t"]
    assert len({preparation.escape_name(n) for n in names}) == len(names)


def test_labels_tsv_names_are_unambiguous(odd):
    rows = [r.split("\t") for r in (odd / "labels.tsv").read_text("utf-8").splitlines()[1:]]
    assert rows == [["0", "\\\\xff", "1"], ["1", "\\xff", "1"]]
    assert [os.fsencode(preparation.unescape_name(r[1])) for r in rows] == [b"\\xff", b"\xff"]
    files = [r.split("\t")[2] for r in (odd / "faces.tsv").read_text("utf-8").splitlines()[1:]]
    names = [os.fsencode(preparation.unescape_name(f)) for f in files]
    assert names == [b"\\xff/a.jpg", b"\xff/a.jpg"]


def _strings(value):
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for k, v in value.items():
            yield k
            yield from _strings(v)
    elif isinstance(value, list):
        for v in value:
            yield from _strings(v)


def test_report_json_is_strict_utf8_json(odd):
    text = (odd / "report.json").read_bytes().decode("utf-8")  # strict
    assert not re.search(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}", text)  # no surrogate escapes
    report = json.loads(text)
    for s in _strings(report):
        s.encode("utf-8")  # every string valid Unicode
    assert sorted(report["identities"]) == ["\\\\xff", "\\xff"]


def test_symlinked_folders_are_not_followed_and_are_listed(odd):
    report = json.loads((odd / "report.json").read_text())
    assert report["totals"]["identities"] == 2 and report["totals"]["kept"] == 2
    assert report["ignored_files"] == ["\\\\xff/sub/", "linked/"]
    assert report["totals"]["ignored_files"] == 2
