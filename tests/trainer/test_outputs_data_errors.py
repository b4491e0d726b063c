"""Bad training data stops the job cleanly: the rank that read the bad record prints
one line naming file, key and offset (no DataLoader worker traceback), the other ranks
stop with a short line instead of hanging or printing tracebacks, the exit code is 1."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import pytest

import train_dist
from datasets.recordio import read_idx_file
from tests.torchrun_jobs import IDS, PER_ID, Job, tiny_dataset, train_args

BAD_KEY = 5
HEADER = 8 + 24  # RecordIO head + IRHeader (a scalar label): the JPEG starts here


def _corrupt(root: Path, key: int) -> int:
    """Overwrite record ``key``'s JPEG with bytes OpenCV cannot decode; its offset."""
    _, offsets = read_idx_file(root / "train.idx")
    rec = root / "train.rec"
    data = bytearray(rec.read_bytes())
    start = offsets[key]
    length = int.from_bytes(data[start + 4 : start + 8], "little") & ((1 << 29) - 1)
    data[start + HEADER : start + 8 + length] = b"\x5a" * (length - 24)
    rec.write_bytes(bytes(data))
    return start


@pytest.fixture(scope="module")
def bad_data(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    good = tiny_dataset(tmp_path_factory.mktemp("data-good"))
    root = tmp_path_factory.mktemp("data-bad") / "data"
    shutil.copytree(good, root)
    return root, _corrupt(root, BAD_KEY)


def _error_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("error (rank")]


def test_corrupt_record_in_a_loader_worker_is_one_line(
    bad_data: tuple[Path, int], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    root, offset = bad_data
    args = train_args(root, tmp_path / "run", 8, "data.num_workers=1")[1:]
    assert train_dist.main(args) == 1
    err = capsys.readouterr().err
    lines = _error_lines(err)
    assert len(lines) == 1, err
    assert str(root / "train.rec") in lines[0] and f"key {BAD_KEY}" in lines[0], lines[0]
    assert str(offset) in lines[0], lines[0]
    assert "Traceback" not in err and "DataLoader worker" not in err


def test_corrupt_record_on_one_rank_stops_every_rank(
    bad_data: tuple[Path, int], tmp_path: Path
) -> None:
    """2 ranks under torchrun: exit code non-zero, one line from the rank that read the
    bad record naming file and key, a short line from the other, no hang."""
    root, _ = bad_data
    log = tmp_path / "torchrun.log"
    args = train_args(root, tmp_path / "run", 4, "data.num_workers=1")
    with Job(["--standalone", "--nproc_per_node=2"], args, log) as job:
        code = job.wait(timeout=180)
        text = job.tail(10_000)
    assert code != 0, text[-3000:]
    lines = _error_lines(text)
    bad = [line for line in lines if f"key {BAD_KEY}" in line]
    assert len(bad) == 1 and str(root / "train.rec") in bad[0], text[-3000:]
    failing = int(re.match(r"error \(rank (\d)\)", bad[0]).group(1))
    others = [line for line in lines if not line.startswith(f"error (rank {failing})")]
    assert len(others) <= 1 and all("peer rank" in line for line in others), text[-3000:]
    # no worker traceback on any rank; only torchrun's own summary may show one
    assert "Original Traceback" not in text and "DataLoader worker" not in text, text[-3000:]
    worker_tracebacks = text.count("Traceback (most recent call last)") - text.count(
        "ChildFailedError"
    )
    assert worker_tracebacks <= 0, text[-3000:]
    assert IDS * PER_ID == 64  # the dataset the keys refer to
