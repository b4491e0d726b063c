"""common.atomic: a file appears whole or not at all, and an old one survives a failure."""

from __future__ import annotations

import json
import stat
from pathlib import Path

import pytest
import torch

from common import atomic


def _leftovers(directory: Path) -> list[str]:
    """Temporary files the module left behind (its names are ``.<name>.<random>.tmp``)."""
    return sorted(p.name for p in directory.iterdir() if p.name.endswith(".tmp"))


def test_atomic_open_replaces_readable_file(tmp_path: Path) -> None:
    target = tmp_path / "sub" / "out.txt"  # the parent is created
    with atomic.atomic_open(target) as f:
        f.write("new\n")
        assert not target.exists()  # nothing under the real name before the commit
    assert target.read_text() == "new\n"
    assert stat.S_IMODE(target.stat().st_mode) == 0o644
    assert _leftovers(target.parent) == []


def test_error_keeps_the_previous_file(tmp_path: Path) -> None:
    target = tmp_path / "out.json"
    target.write_text("old")
    with pytest.raises(RuntimeError, match="crash"):
        with atomic.atomic_open(target, "w") as f:
            f.write("half")
            raise RuntimeError("crash")
    with pytest.raises(TypeError):  # not JSON-serialisable, fails mid-dump
        atomic.write_json(target, {"a": object()})
    assert target.read_text() == "old"
    assert _leftovers(tmp_path) == []


def test_atomic_file_commit_and_discard(tmp_path: Path) -> None:
    target = tmp_path / "a.bin"
    out = atomic.AtomicFile(target, "wb")
    out.file.write(b"\x00\x01")
    assert Path(out.tmp).parent == tmp_path and not target.exists()
    out.commit()
    assert target.read_bytes() == b"\x00\x01"
    with pytest.raises(ValueError, match=r"a\.bin: atomic write already committed"):
        out.commit()
    again = atomic.AtomicFile(target, "wb")
    again.file.write(b"replacement")
    again.discard()
    again.discard()  # harmless twice
    assert target.read_bytes() == b"\x00\x01" and _leftovers(tmp_path) == []


def test_atomic_path_for_writers_that_open_by_name(tmp_path: Path) -> None:
    target = tmp_path / "shard.bin"
    with atomic.atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".shard.bin.")
        tmp.write_bytes(b"by name")
    assert target.read_bytes() == b"by name"
    with pytest.raises(OSError):
        with atomic.atomic_path(target) as tmp:
            tmp.write_bytes(b"partial")
            raise OSError("disk full")
    assert target.read_bytes() == b"by name" and _leftovers(tmp_path) == []


def test_one_call_writers(tmp_path: Path) -> None:
    atomic.write_text(tmp_path / "t.txt", "a\tb\n")
    assert (tmp_path / "t.txt").read_bytes() == b"a\tb\n"
    atomic.write_bytes(tmp_path / "b.bin", b"\xff")
    assert (tmp_path / "b.bin").read_bytes() == b"\xff"
    atomic.write_json(tmp_path / "s.json", {"b": 1, "a": 2})
    assert (tmp_path / "s.json").read_text() == '{\n  "a": 2,\n  "b": 1\n}\n'
    atomic.write_json(
        tmp_path / "u.json", {"b": {1, 2}, "a": 0}, indent=None, sort_keys=False, default=sorted
    )
    assert (tmp_path / "u.json").read_text() == '{"b": [1, 2], "a": 0}\n'
    assert json.loads((tmp_path / "u.json").read_text()) == {"b": [1, 2], "a": 0}
    atomic.write_torch(tmp_path / "w.pt", {"w": torch.arange(3)})
    loaded = torch.load(tmp_path / "w.pt", weights_only=True)
    assert loaded["w"].tolist() == [0, 1, 2]
    assert _leftovers(tmp_path) == []
