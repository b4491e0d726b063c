"""Teacher-embedding caches: the behaviours mutation testing found unguarded in
``datasets/teacher_cache.py``.

A cache of no records still has its one (empty) shard, as the module documents; an
embedding size of 1 is a valid cache and one below 1 is refused naming the manifest; a
record index outside ``[0, records)`` (negative, or the record count itself) is refused
naming the range and the directory. Every expectation comes from the rows the test
wrote, not from the code under test.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from datasets.teacher_cache import (
    MANIFEST,
    TeacherCache,
    TeacherCacheError,
    cache_files,
    write_cache,
)

SHARD0 = "embeddings-00000.arrow"  # the documented name of the first shard


def _facts(records: int) -> dict:
    return {"teacher_sha256": "0" * 64, "flip": False, "dataset": {"records": records}}


def test_cache_of_no_records_holds_one_empty_shard(tmp_path: Path) -> None:
    assert cache_files(0) == [SHARD0, MANIFEST]
    manifest = write_cache(tmp_path, np.zeros((0, 3), np.float32), _facts(0))
    assert sorted(p.name for p in tmp_path.iterdir()) == [SHARD0, MANIFEST]
    assert manifest["shards"] == [{"name": SHARD0, "rows": 0}]
    opened = TeacherCache.open(tmp_path)
    assert opened.records == 0
    assert opened.lookup([]).shape == (0, 3)


def test_cache_of_embedding_size_one_opens_and_serves_its_rows(tmp_path: Path) -> None:
    rows = np.arange(5, dtype=np.float32).reshape(5, 1) / 4
    write_cache(tmp_path, rows, _facts(5))
    opened = TeacherCache.open(tmp_path)
    assert opened.embedding_size == 1
    assert np.array_equal(opened.lookup([4, 0, 2]), rows[[4, 0, 2]])


@pytest.mark.parametrize("size", [0, -2])
def test_embedding_size_below_one_is_refused_naming_the_manifest(tmp_path: Path, size: int) -> None:
    write_cache(tmp_path, np.zeros((2, 1), np.float32), _facts(2))
    path = tmp_path / MANIFEST
    manifest = json.loads(path.read_text())
    manifest["embedding_size"] = size
    path.write_text(json.dumps(manifest))
    with pytest.raises(TeacherCacheError, match=rf"embedding_size {size} is not >= 1") as info:
        TeacherCache.open(tmp_path)
    assert str(path) in str(info.value)


@pytest.mark.parametrize("shard_rows", [8, 2])  # one shard; several
@pytest.mark.parametrize("indices", [[-1], [0, -1], [3], [1, 3], [-1, 3]])
def test_lookup_outside_the_records_is_refused_naming_the_range(
    tmp_path: Path, shard_rows: int, indices: list[int]
) -> None:
    rows = np.arange(6, dtype=np.float32).reshape(3, 2)
    write_cache(tmp_path, rows, _facts(3), shard_rows=shard_rows)
    opened = TeacherCache.open(tmp_path)
    assert np.array_equal(opened.lookup([2, 0, 1]), rows[[2, 0, 1]])  # inside: served
    with pytest.raises(IndexError, match=r"record index out of \[0, 3\) in ") as info:
        opened.lookup(indices)
    assert str(tmp_path) in str(info.value)
