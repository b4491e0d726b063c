"""``make distill-demo`` end to end on a small synthetic set, one rank, 2 steps a run:
the teacher is trained and stored, its cache covers every record, and the table has
the teacher and the four students, each verified on the held-out pairs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from datasets.teacher_cache import TeacherCache
from tools.distill_demo import main

pytestmark = pytest.mark.usefixtures("one_thread")


def test_distill_demo_runs_every_row(synthetic_data, tmp_path: Path) -> None:
    data = synthetic_data(8, 8, 4, 2, seed=3)  # 64 records
    out = tmp_path / "demo"
    argv = ["--data", str(data), "--out", str(out), "--max-steps", "2"]
    assert main([*argv, "--student-batch-size", "8"]) == 0
    report = json.loads((out / "distill_demo.json").read_text())
    assert list(report["accuracy"]) == [
        "teacher (mbf_tiny, 512-d)",
        "student alone",
        "+ embedding distillation",
        "+ relation distillation",
        "+ embedding distillation, cached",
    ]
    for row in report["accuracy"].values():
        assert 0.0 <= row["accuracy"] <= 1.0 and row["std"] >= 0.0
    assert (out / "teacher" / "backbone.pt").is_file()
    cache = TeacherCache.open(out / "cache")
    assert cache.records == 64 and cache.embedding_size == 512
    assert len(cache.manifest["shards"]) == 2  # two shards per rank
