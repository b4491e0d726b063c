"""Cached teachers (issue 28): ``python -m tools.teacher_embed`` writes a teacher's
embeddings of every record; the loader serves them with each batch (``distill.cache``).

References: the teacher run by hand on the same decoded images (the same ops on the
same batch, so equality is exact), the cache's rows looked up against the array
written, and the refusals of a cache of other data, another record count or another
teacher, each naming the option and the mismatch."""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from backbones.registry import get_model, input_spec
from backbones.weights import save_backbone_weights
from common.digest import sha256_file
from common.dist import DistContext
from configs import load_config
from datasets.dataset import RecordIODataset
from datasets.loader import FaceLoader, collate_uint8
from datasets.teacher_cache import (
    MANIFEST,
    TeacherCache,
    TeacherCacheError,
    dataset_signature,
    shard_name,
    write_cache,
    write_shard,
)
from datasets.transforms import normalize_batch
from tests.distributed import run_ranks
from tests.trainer.test_trainer import TensorLoader, dataset
from tests.trainer.test_trainer_distill import distill_cfg, make_distill_trainer, make_distillation
from tools.teacher_embed import main as teacher_embed
from trainer.build import build_trainer, open_teacher_cache
from trainer.teacher import Teacher

pytestmark = pytest.mark.usefixtures("one_thread")

IDS, PER_ID = 8, 4  # 32 records
TEACHER_DIM = 16


@pytest.fixture(scope="module")
def teacher_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    save_backbone_weights(get_model("mbf_tiny", embedding_size=TEACHER_DIM).state_dict(), path)
    return path


@pytest.fixture(scope="module")
def data(synthetic_data) -> Path:
    return synthetic_data(IDS, PER_ID, 4, 2, seed=1)


@pytest.fixture(scope="module")
def cache(data: Path, teacher_file: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("cache") / "emb"
    argv = [str(data), "--teacher", str(teacher_file), "--teacher-network", "mbf_tiny"]
    teacher_embed([*argv, "--out", str(out), "--num-workers", "0", "--no-progress"])
    return out


def _teacher(teacher_file: Path) -> Teacher:
    return Teacher.from_file(teacher_file, "mbf_tiny", input_spec("mbf_tiny"), torch.device("cpu"))


def _images(data: Path, indices: list[int]) -> torch.Tensor:
    """The records' images as the loader delivers them (uint8 decode, no flip)."""
    ds = RecordIODataset(data / "train.rec", flip=False, output="uint8")
    return normalize_batch(collate_uint8([ds[i] for i in indices])[0])


# ------------------------------------------------------------ the cache itself
def test_teacher_embed_writes_the_teachers_embedding_of_every_record(
    data: Path, cache: Path, teacher_file: Path
) -> None:
    opened = TeacherCache.open(cache)
    n = IDS * PER_ID
    assert opened.records == n and opened.embedding_size == TEACHER_DIM
    manifest = json.loads((cache / MANIFEST).read_text())
    assert manifest["teacher_sha256"] == sha256_file(teacher_file)
    assert manifest["teacher_network"] == "mbf_tiny" and manifest["flip"] is False
    # one batch of all records through the same ops: the same numbers, bit for bit
    expected = _teacher(teacher_file)(_images(data, list(range(n))))
    assert np.array_equal(opened.lookup(np.arange(n)), expected.numpy())


def test_flip_averaged_cache(data: Path, teacher_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "flip"
    argv = [str(data), "--teacher", str(teacher_file), "--teacher-network", "mbf_tiny"]
    teacher_embed([*argv, "--out", str(out), "--num-workers", "0", "--no-progress", "--flip"])
    teacher = _teacher(teacher_file)
    x = _images(data, list(range(IDS * PER_ID)))
    expected = (teacher(x) + teacher(x.flip(3))) / 2
    got = TeacherCache.open(out).lookup(np.arange(IDS * PER_ID))
    assert np.array_equal(got, expected.numpy())


def test_lookup_across_shards_matches_the_rows_written(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    rows = rng.standard_normal((23, 5)).astype(np.float32)
    facts = {"teacher_sha256": "0" * 64, "flip": False, "dataset": {"records": 23}}
    write_cache(tmp_path, rows, facts, shard_rows=4)
    opened = TeacherCache.open(tmp_path)
    assert len(opened.manifest["shards"]) == 6  # 4+4+4+4+4+3
    idx = rng.integers(0, 23, 64)
    assert np.array_equal(opened.lookup(idx), rows[idx])
    with pytest.raises(IndexError):
        opened.lookup([23])


def test_non_finite_teacher_embedding_is_refused_naming_the_record(tmp_path: Path) -> None:
    rows = np.array([[0, 0], [np.nan, 0]], np.float32)
    with pytest.raises(TeacherCacheError, match="record 3 is not finite"):
        write_shard(tmp_path, 1, 2, rows)  # shard 1 holds records 2 and 3
    assert not list(tmp_path.iterdir())  # nothing written


# ------------------------------------------------------------------- refusals
def test_cache_of_another_record_count_is_refused(cache: Path, synthetic_data) -> None:
    other = RecordIODataset(synthetic_data(IDS, PER_ID + 1, 4, 2, seed=1) / "train.rec")
    with pytest.raises(TeacherCacheError, match=r"distill\.cache: .* 32 records.* 40 records"):
        TeacherCache.open(cache).check_matches(dataset_signature(other), None)


def test_cache_of_other_data_files_is_refused(cache: Path, synthetic_data) -> None:
    other = RecordIODataset(synthetic_data(IDS, PER_ID, 4, 2, seed=2) / "train.rec")
    signature = dataset_signature(other)
    assert signature["records"] == IDS * PER_ID  # same count: the files tell them apart
    with pytest.raises(TeacherCacheError, match=r"distill\.cache: .*other data"):
        TeacherCache.open(cache).check_matches(signature, None)


def test_cache_of_other_labels_is_refused(cache: Path, data: Path) -> None:
    signature = dataset_signature(RecordIODataset(data / "train.rec"))
    signature["labels_sha256"] = "f" * 64
    with pytest.raises(TeacherCacheError, match="labels_sha256"):
        TeacherCache.open(cache).check_matches(signature, None)


def test_cache_of_another_teacher_is_refused(cache: Path, data: Path) -> None:
    signature = dataset_signature(RecordIODataset(data / "train.rec"))
    opened = TeacherCache.open(cache)
    opened.check_matches(signature, opened.manifest["teacher_sha256"])  # its own: accepted
    with pytest.raises(TeacherCacheError, match="another teacher: teacher_sha256"):
        opened.check_matches(signature, "a" * 64)


def _copy_cache(cache: Path, tmp_path: Path) -> Path:
    out = tmp_path / "copy"
    out.mkdir()
    for f in cache.iterdir():
        (out / f.name).write_bytes(f.read_bytes())
    return out


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda d: (d / MANIFEST).unlink(), "teacher_cache.json: no such file"),
        (lambda d: (d / shard_name(0)).unlink(), "missing shard"),
        (lambda d: (d / shard_name(0)).write_bytes(b"junk"), "not an Arrow IPC file"),
        (lambda d: _edit(d, format="teacher-embeddings/0"), "format"),
        (lambda d: _edit(d, embedding_size=8), "schema"),
        (lambda d: _edit(d, shards=[{"name": "../x.arrow", "rows": 32}]), "bad shard entry"),
        (lambda d: _edit(d, shards=[{"name": shard_name(0), "rows": 31}]), "32 rows"),
        (lambda d: _edit(d, shards=[{"name": shard_name(0), "rows": "32"}]), "bad shard entry"),
        (lambda d: _edit(d, teacher_sha256=None), "'teacher_sha256' is missing"),
    ],
)
def test_damaged_cache_is_refused_naming_the_file(cache: Path, tmp_path: Path, damage, named):
    copy_dir = _copy_cache(cache, tmp_path)
    damage(copy_dir)
    with pytest.raises(TeacherCacheError, match=named) as info:
        TeacherCache.open(copy_dir)
    assert str(copy_dir) in str(info.value)


def _edit(directory: Path, **changes) -> None:
    manifest = json.loads((directory / MANIFEST).read_text())
    manifest.update(changes)
    (directory / MANIFEST).write_text(json.dumps(manifest))


def test_shard_with_a_wrong_index_column_is_refused(tmp_path: Path) -> None:
    import pyarrow as pa

    facts = {"teacher_sha256": "0" * 64, "flip": False, "dataset": {"records": 3}}
    write_cache(tmp_path, np.zeros((3, 2), np.float32), facts)
    values = pa.array(np.zeros(6, np.float32))
    table = pa.table(
        {
            "index": pa.array(np.array([0, 2, 1], np.int64)),
            "embedding": pa.FixedSizeListArray.from_arrays(values, 2),
        }
    )
    with pa.OSFile(str(tmp_path / shard_name(0)), "wb") as sink:
        with pa.ipc.new_file(sink, table.schema) as w:
            w.write_table(table)
    with pytest.raises(TeacherCacheError, match="row 1 has index 2, expected 1"):
        TeacherCache.open(tmp_path)


# ---------------------------------------------------------------- the loader
def test_loader_serves_each_images_own_cached_row(data: Path, cache: Path, teacher_file):
    """Shuffled batches: each yielded image's cached row is the teacher's embedding of
    that very image (no flip, no augmentation, so the rows must match exactly)."""
    ds = RecordIODataset(data / "train.rec", flip=False)
    loader = FaceLoader(ds, 8, 0, 1, seed=4, num_workers=0, targets=TeacherCache.open(cache))
    teacher = _teacher(teacher_file)
    batches = list(loader)
    assert len(batches) == IDS * PER_ID // 8
    for images, _, rows in batches:
        assert rows.shape == (8, TEACHER_DIM) and rows.dtype == torch.float32
        torch.testing.assert_close(rows, teacher(images), rtol=0, atol=0)


# ------------------------------------------------------------ the training step
def test_cached_step_equals_the_online_step(tmp_path: Path) -> None:
    """A batch carrying the teacher's rows trains exactly as the online teacher does."""
    cfg = distill_cfg(tmp_path)
    x, y = dataset()

    torch.manual_seed(0)
    online = make_distill_trainer(cfg, TensorLoader(x, y, 8, 0, 1), make_distillation(cfg))
    torch.manual_seed(0)
    cached = make_distill_trainer(cfg, TensorLoader(x, y, 8, 0, 1), make_distillation(cfg))
    xb, yb = x[:8], y[:8]
    rows = cached.distill.teacher(xb)
    cached.distill.teacher = None  # a cached run has no teacher: the rows must be used
    a = online.train_step([(xb, yb)])
    b = cached.train_step([(xb, yb, rows)])
    assert torch.equal(a.loss, b.loss)
    for name in a.aux:
        assert torch.equal(a.aux[name], b.aux[name])
    for p, q in zip(online.backbone.parameters(), cached.backbone.parameters(), strict=True):
        assert torch.equal(p, q)


def _cfg(data: Path, out: Path, *overrides: str):
    return load_config(
        "configs/demo",
        [
            f"data.root={data}",
            f"data.num_classes={IDS}",
            f"data.num_images={IDS * PER_ID}",
            "data.batch_size=4",
            "data.num_workers=0",
            "model.embedding_size=16",
            f"train.output={out}",
            "train.max_steps=3",
            "log.every_steps=1",
            "log.tensorboard=false",
            "log.progress_bar=false",
            "eval.targets=",
            "eval.at_start=false",
            "checkpoint.every_steps=0",
            *overrides,
        ],
    )


def test_training_from_the_cache_runs_no_teacher(
    data: Path, cache: Path, teacher_file: Path, tmp_path: Path, caplog
) -> None:
    cfg = _cfg(
        data,
        tmp_path / "run",
        f"distill.cache={cache}",
        f"distill.teacher={teacher_file}",  # optional: its hash is checked
        "distill.embedding_weight=1",
        "distill.relation_weight=1",
        "distill.logit_weight=1",
        "distill.temperature=2",
    )
    t = build_trainer(cfg, DistContext())
    assert t.distill is not None and t.distill.teacher is None
    with caplog.at_level(logging.INFO, logger="trainer"):
        t.fit()
    lines = [r.getMessage() for r in caplog.records if " aux " in r.getMessage()]
    assert len(lines) == 3, lines
    for line in lines:
        words = line.split()
        for name in ("distill_embedding", "distill_relation", "distill_logit"):
            assert math.isfinite(float(words[words.index(name) + 1])), line


def test_cache_of_other_data_is_refused_at_start_up(
    cache: Path, synthetic_data, tmp_path: Path
) -> None:
    other = synthetic_data(IDS, PER_ID, 4, 2, seed=2)
    cfg = _cfg(other, tmp_path / "run", f"distill.cache={cache}", "distill.embedding_weight=1")
    with pytest.raises(TeacherCacheError, match=r"^distill\.cache: .*other data files"):
        build_trainer(cfg, DistContext())


def test_cache_with_another_teacher_file_is_refused(cache: Path, data: Path, tmp_path: Path):
    other = tmp_path / "other.pt"
    torch.manual_seed(9)
    save_backbone_weights(get_model("mbf_tiny", embedding_size=TEACHER_DIM).state_dict(), other)
    cfg = _cfg(data, tmp_path / "run", f"distill.cache={cache}", f"distill.teacher={other}")
    with pytest.raises(TeacherCacheError, match="another teacher"):
        open_teacher_cache(cfg, RecordIODataset(data / "train.rec"))


def test_logit_term_needs_the_students_embedding_size(data: Path, cache: Path, tmp_path: Path):
    from configs import ConfigError

    cfg = _cfg(
        data,
        tmp_path / "run",
        "model.embedding_size=32",
        f"distill.cache={cache}",
        "distill.logit_weight=1",
    )
    with pytest.raises(ConfigError, match=r"distill\.logit_weight: .*16 dimensions.*=32"):
        build_trainer(cfg, DistContext())


def _embed_on_ranks(rank: int, world: int, data: str, teacher: str, out: str) -> int:
    argv = [data, "--teacher", teacher, "--teacher-network", "mbf_tiny", "--out", out]
    teacher_embed([*argv, "--num-workers", "0", "--no-progress", "--shard-rows", "10"])
    return rank


def test_teacher_embed_on_two_ranks_splits_the_shards(
    data: Path, cache: Path, teacher_file: Path, tmp_path: Path
) -> None:
    out = tmp_path / "two"
    run_ranks(_embed_on_ranks, 2, str(data), str(teacher_file), str(out))
    two = TeacherCache.open(out)
    assert [s["rows"] for s in two.manifest["shards"]] == [10, 10, 10, 2]
    one = TeacherCache.open(cache).lookup(np.arange(IDS * PER_ID))
    got = two.lookup(np.arange(IDS * PER_ID))
    # the same network on batches of other sizes: equal up to float32 rounding, bounded
    # by depth x fan-in x u (see test_trainer_teacher_onnx.REL_TOL)
    rel = np.linalg.norm(got - one) / np.linalg.norm(one)
    assert rel <= 20 * 576 * 2.0**-24, rel
