"""Several datasets in one run (``data.root=[A, B, ...]``, datasets/multi.py): concatenated
label spaces, per-dataset sampling weights, mid-epoch resume, the offsets recorded in
checkpoints and the resume policy over them, bad roots, and a 2-rank training run."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch

from configs import ConfigError, load_config
from datasets.arrow_io import convert_to_shards
from datasets.discovery import open_dataset
from datasets.errors import DataError, LabelRangeError
from datasets.loader import FaceLoader
from datasets.multi import (
    KEY_STRIDE,
    ConcatFaceDataset,
    WeightedDatasetSampler,
    apportion,
    open_datasets,
    resume_problem,
)
from datasets.sampler import DistributedFaceSampler
from tests.distributed import run_ranks

# 60 images, 12 ids
GOLDEN = Path(__file__).parent.parent / "data" / "golden_recordio" / "faces.rec"

# Hand-computed from the three parts below: golden faces.rec (12 classes, 60 images), the
# Arrow shards (3 x 4) and the image folder (2 x 5), concatenated in that order.
TABLE = [
    {"name": "faces.rec", "kind": "recordio", "num_classes": 12, "num_images": 60,
     "class_offset": 0, "image_offset": 0},
    {"name": "arrow", "kind": "arrow", "num_classes": 3, "num_images": 12,
     "class_offset": 12, "image_offset": 60},
    {"name": "folder", "kind": "folder", "num_classes": 2, "num_images": 10,
     "class_offset": 15, "image_offset": 72},
]  # fmt: skip
TOTAL_CLASSES, TOTAL_IMAGES = 17, 82


def _folder_from(source: Path, out: Path) -> Path:
    """An image folder ``out/id<label>/<i>.jpg`` holding the records of ``source``."""
    ds = open_dataset(source, flip=False)
    for i in range(len(ds)):
        payload, label, _ = ds._load(i)
        (out / f"id{label:02d}").mkdir(parents=True, exist_ok=True)
        (out / f"id{label:02d}" / f"{i:03d}.jpg").write_bytes(bytes(payload))
    return out


@pytest.fixture(scope="module")
def parts(synthetic_data, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """``rec`` (the MXNet golden file), ``arrow`` and ``folder`` (synthetic faces)."""
    base = tmp_path_factory.mktemp("multi")
    arrow = base / "arrow"
    convert_to_shards(open_dataset(synthetic_data(3, 4, 2, 1, seed=11)), arrow, 5, False)
    folder = _folder_from(synthetic_data(2, 5, 2, 1, seed=12), base / "folder")
    return {"rec": GOLDEN, "arrow": arrow, "folder": folder}


def _roots(parts: dict[str, Path]) -> list[str]:
    return [str(parts["rec"]), str(parts["arrow"]), str(parts["folder"])]


# ------------------------------------------------------------------ labels and offsets
def test_concatenated_labels_and_offsets_match_each_part(parts: dict[str, Path]) -> None:
    multi = open_datasets(_roots(parts), flip=True)
    assert isinstance(multi, ConcatFaceDataset)
    table = multi.table()
    assert [{k: v for k, v in e.items() if k != "path"} for e in table] == TABLE
    assert [e["path"] for e in table] == _roots(parts)
    assert (multi.num_classes, len(multi)) == (TOTAL_CLASSES, TOTAL_IMAGES)
    # every sample against its part opened alone: same pixels and flip, label shifted
    singles = [open_dataset(r, flip=True) for r in _roots(parts)]
    labels = []
    for part, (single, entry) in enumerate(zip(singles, TABLE, strict=True)):
        for j in range(len(single)):
            g = entry["image_offset"] + j
            image, label = multi[(g, 1000 + g)]
            ref_image, ref_label = single[(j, 1000 + g)]
            assert torch.equal(image, ref_image), (part, j)
            assert label == ref_label + entry["class_offset"], (part, j)
            assert multi.sample_key(g) == part * KEY_STRIDE + single.sample_key(j)
            labels.append(label)
    # the part boundaries: first and last label of each part, read from the data by hand
    assert labels[0] == 0 and labels[59] == 11 and labels[60] == 12 and labels[71] == 14
    assert labels[72] == 15 and labels[81] == 16
    assert multi.labels().tolist() == labels  # the P x K sampler's label source


def test_config_takes_a_list_and_checks_the_sums(parts: dict[str, Path], tmp_path: Path) -> None:
    from common.dist import DistContext
    from trainer.build import build_loader

    roots = _roots(parts)
    listed = f"data.root=[{','.join(roots)}]"
    base = [listed, "data.num_workers=0", "data.batch_size=41", "eval.targets="]
    cfg = load_config("demo", [*base, "data.num_classes=17", "data.num_images=82"])
    assert cfg.data.root == roots
    toml = tmp_path / "cfg.toml"
    toml.write_text(f'base = "demo"\n[data]\nroot = {json.dumps(roots)}\n')
    assert load_config(str(toml)).data.root == roots
    loader = build_loader(cfg, DistContext())
    assert loader.dataset_table()[2]["class_offset"] == 15
    loader.set_epoch(0)
    seen = torch.cat([labels for _, labels in loader])
    assert sorted(seen.tolist()) == sorted(loader.dataset.labels().tolist())  # once each
    # weights (1, 2, 1) of 82: quotas (20.5, 41, 20.5) -> (20, 41, 20), the tie to part 0
    weighted = load_config("demo", [*base, "data.num_classes=17", "data.num_images=82",
                                    "data.weights=[1,2,1]"])  # fmt: skip
    loader = build_loader(weighted, DistContext())
    loader.set_epoch(3)
    seen = torch.cat([labels for _, labels in loader])
    parts_seen = [
        int(((seen >= lo) & (seen < hi)).sum()) for lo, hi in ((0, 12), (12, 15), (15, 17))
    ]
    assert parts_seen == [21, 41, 20]
    bad = load_config("demo", [*base, "data.num_classes=16", "data.num_images=82"])
    with pytest.raises(ConfigError, match=r"data\.num_classes=16 .* 17 = 12 \(faces\.rec\) \+ 3"):
        build_loader(bad, DistContext())
    bad = load_config("demo", [*base, "data.num_classes=17", "data.num_images=80"])
    with pytest.raises(ConfigError, match=r"data\.num_images=80 .* 82 = 60 .* \+ 10 \(folder\)"):
        build_loader(bad, DistContext())
    missing = load_config("demo", [f"data.root=[{roots[0]},{tmp_path / 'nope'}]"])
    with pytest.raises(ConfigError, match=r"data\.root\[1\]: '.*nope' does not exist"):
        build_loader(missing, DistContext())
    with pytest.raises(ConfigError, match=r"data\.root\[1\]: repeats data\.root\[0\]"):
        load_config("demo", [f"data.root=[{roots[0]},{roots[0]}]"])
    with pytest.raises(ConfigError, match=r"data\.weights: needs one weight per"):
        load_config("demo", [listed, "data.weights=[1,2]"])


def test_bad_roots_name_the_root_and_its_index(parts: dict[str, Path], tmp_path: Path) -> None:
    good = str(parts["arrow"])
    with pytest.raises(DataError, match=r"root\[1\]: '.*missing' does not exist"):
        open_datasets([good, str(tmp_path / "missing")])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match=r"root\[1\]: .*notes\.txt: training data of no known"):
        open_datasets([good, str(tmp_path / "notes.txt")])
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(DataError, match=r"root\[2\]: .*empty is training data of no known kind"):
        open_datasets([good, str(parts["folder"]), str(tmp_path / "empty")])
    small = tmp_path / "small"
    for c in range(2):
        (small / f"p{c}").mkdir(parents=True)
        cv2.imwrite(str(small / f"p{c}" / "0.jpg"), np.full((96, 96, 3), 40 * c, np.uint8))
    with pytest.raises(DataError) as info:
        open_datasets([good, str(small)], option="data.root")
    message = str(info.value)
    assert f"data.root[1] ({small}) holds 96x96 images" in message, message
    assert f"data.root[0] ({good}) holds 112x112" in message, message


def test_a_label_outside_its_part_is_refused_though_inside_the_total(
    parts: dict[str, Path],
) -> None:
    """Part 1 (3 classes) with a label 4: inside the concatenation's 17 classes after the
    shift, but wrong for its own dataset; the error names the part's shard and row."""
    single = open_dataset(parts["arrow"])
    real_load = single._load
    single._load = lambda i: (real_load(i)[0], 4, None) if i == 2 else real_load(i)
    multi = ConcatFaceDataset([open_dataset(parts["rec"]), single], option="data.root")
    with pytest.raises(LabelRangeError, match=r"row 2 .*label 4 is outside \[0, num_classes=3\)"):
        multi[(62, 0)]
    assert multi[(63, 0)][1] == 12 + real_load(3)[1]


# ------------------------------------------------------------------------ weights
def test_apportion_is_the_largest_remainder_split() -> None:
    # by hand: 10 * (1/3, 2/3) = (3.33, 6.67) -> floors (3, 6), the left unit to 6.67
    assert apportion(10, [1, 2]) == [3, 7]
    assert apportion(15, [1, 1, 1]) == [5, 5, 5]
    # 7 * (0.2, 0.3, 0.5) = (1.4, 2.1, 3.5) -> (1, 2, 3) + 1 to the 0.5 remainder
    assert apportion(7, [0.2, 0.3, 0.5]) == [1, 2, 4]
    # ties go to the lower index: 5 * (1/2, 1/2) = (2.5, 2.5)
    assert apportion(5, [1, 1]) == [3, 2]
    with pytest.raises(ValueError, match="finite and > 0"):
        apportion(5, [1, 0])


def test_weighted_epoch_draws_the_exact_counts() -> None:
    """Sizes (7, 5, 3), weights (1, 1, 1): 15 samples, 5 from each. Dataset 0 gives 5
    distinct of its 7 images, dataset 1 each image once, dataset 2 each image once plus 2
    distinct ones twice."""
    sizes = [7, 5, 3]
    sampler = WeightedDatasetSampler(sizes, [1, 1, 1], batch_size=5, rank=0, world_size=1)
    per_epoch = []
    for epoch in range(4):
        sampler.set_epoch(epoch)
        drawn = [i for i, _ in sampler]
        assert drawn == sampler.permutation(epoch).tolist()  # 15 = 3 whole batches
        counts = Counter(drawn)
        part = [sum(counts[i] for i in range(lo, lo + n)) for lo, n in ((0, 7), (7, 5), (12, 3))]
        assert part == [5, 5, 5]
        assert sorted(counts[i] for i in range(7)) == [0, 0, 1, 1, 1, 1, 1]
        assert [counts[i] for i in range(7, 12)] == [1] * 5
        assert sorted(counts[i] for i in range(12, 15)) == [1, 2, 2]
        per_epoch.append(drawn)
    assert len({tuple(sorted(d)) for d in per_epoch}) > 1  # other images subsampled per epoch
    again = WeightedDatasetSampler(sizes, [1, 1, 1], batch_size=5, rank=0, world_size=1)
    again.set_epoch(3)
    assert [i for i, _ in again] == per_epoch[3]  # a function of (seed, epoch)
    # weights (1, 3) over sizes (30, 10): 10 from dataset 0, 30 = 3 x 10 from dataset 1
    heavy = WeightedDatasetSampler([30, 10], [1, 3], batch_size=8, rank=0, world_size=1, seed=4)
    counts = Counter(heavy.permutation(0).tolist())
    assert sum(counts[i] for i in range(30)) == 10 and max(counts[i] for i in range(30)) == 1
    assert [counts[i] for i in range(30, 40)] == [3] * 10
    # the draws are shuffled as one epoch, not served dataset by dataset
    for batch in _global_batches([heavy]):
        assert min(batch) < 30 <= max(batch), batch


def test_without_weights_the_order_is_one_concatenated_dataset(parts: dict[str, Path]) -> None:
    multi = open_datasets(_roots(parts))
    loader = FaceLoader(multi, batch_size=8, rank=0, world_size=1, seed=5, num_workers=0)
    loader.set_epoch(1)
    keys = []
    for _ in loader:
        keys += loader.last_keys.tolist()
    reference = DistributedFaceSampler(TOTAL_IMAGES, 8, 0, 1, seed=5)
    reference.set_epoch(1)
    assert keys == [multi.sample_key(i) for i, _ in reference]


# ------------------------------------------------------------------------- resume
def _global_batches(samplers: list, steps: int | None = None) -> list[list[int]]:
    """The global batches (rank slices concatenated) the ranks' samplers yield."""
    per_rank = [[i for i, _ in s] for s in samplers]
    b = samplers[0].batch_size
    n = len(per_rank[0]) // b
    n = n if steps is None else min(n, steps)
    return [[i for r in per_rank for i in r[k * b : (k + 1) * b]] for k in range(n)]


def _weighted(world: int, batch: int, rank: int = 0) -> WeightedDatasetSampler:
    return WeightedDatasetSampler([60, 12, 10], [1, 2, 1], batch, rank, world, seed=9)


@pytest.mark.parametrize(("w0", "b0", "w1", "b1"), [(1, 6, 1, 6), (2, 3, 2, 3), (2, 3, 3, 2)])
def test_weighted_mid_epoch_resume_continues_the_same_order(w0, b0, w1, b1) -> None:
    """Stop after 4 global batches of epoch 2, resume (also at another world size):
    the remaining global batches are those of an uninterrupted run."""
    reference = _weighted(1, 6)
    reference.set_epoch(2)
    full = _global_batches([reference])
    first = [_weighted(w0, b0, r) for r in range(w0)]
    for s in first:
        s.set_epoch(2)
    assert _global_batches(first, 4) == full[:4]
    state = first[0].state_dict(batches_done=4)
    resumed = [_weighted(w1, b1, r) for r in range(w1)]
    for s in resumed:
        s.load_state_dict(state)
        s.set_epoch(state["epoch"])
    assert _global_batches(resumed) == full[4:]
    with pytest.raises(ValueError, match="weights"):
        WeightedDatasetSampler([60, 12, 10], [1, 1, 1], 6, 0, 1, seed=9).load_state_dict(state)


def test_loader_mid_epoch_resume_over_mixed_datasets(parts: dict[str, Path]) -> None:
    multi = open_datasets(_roots(parts))

    def loader() -> FaceLoader:
        sampler = WeightedDatasetSampler(multi.sizes, [1, 2, 1], 8, 0, 1, seed=2)
        return FaceLoader(multi, 8, 0, 1, seed=2, num_workers=0, sampler=sampler)

    full = loader()
    full.set_epoch(1)
    batches = [(labels.tolist(), full.last_keys.tolist()) for _, labels in full]
    split = loader()
    split.set_epoch(1)
    it = iter(split)
    head = [(next(it)[1].tolist(), split.last_keys.tolist()) for _ in range(3)]
    state = split.state_dict()
    resumed = loader()
    resumed.load_state_dict(state)
    resumed.set_epoch(state["epoch"])
    rest = [(labels.tolist(), resumed.last_keys.tolist()) for _, labels in resumed]
    assert head + rest == batches and len(batches) == TOTAL_IMAGES // 8


# ------------------------------------------------------------- checkpoints and policy
def test_resume_policy_over_the_recorded_table() -> None:
    a = {"name": "a", "num_classes": 3, "num_images": 30, "class_offset": 0, "path": "/x/a"}
    b = {"name": "b", "num_classes": 2, "num_images": 20, "class_offset": 3, "path": "/x/b"}
    moved = [{**a, "path": "/y/a"}, {**b, "path": "/y/b"}]
    assert resume_problem([a, b], moved) is None  # only the directories moved
    b0 = {**b, "class_offset": 0}
    a2 = {**a, "class_offset": 2}
    assert "order" in resume_problem([a, b], [b0, a2])
    assert resume_problem([a, b], [a]) is not None  # a dataset left out
    assert resume_problem([a, b], [a, {**b, "num_images": 21}]) is not None
    assert resume_problem([a, b], [a, {**b, "name": "c"}]) is not None
    assert resume_problem([a], [{**a, "name": "z", "path": "/z"}]) is None  # single: free
    assert resume_problem(None, [a]) is None  # older checkpoints: one dataset
    assert "one dataset" in resume_problem(None, [a, b])


def _trainer_cfg(roots: list[str], out: Path, *extra: str):
    return load_config(
        "configs/demo",
        [
            f"data.root=[{','.join(roots)}]",
            "data.num_classes=17",
            "data.num_images=82",
            "data.batch_size=4",
            "data.num_workers=0",
            "model.embedding_size=64",
            f"train.output={out}",
            "train.max_steps=2",
            "eval.targets=",
            "eval.at_start=false",
            "log.tensorboard=false",
            "log.progress_bar=false",
            "checkpoint.every_steps=0",
            *extra,
        ],
    )


def test_checkpoint_records_the_offsets_and_refuses_another_list(
    parts: dict[str, Path], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from common.dist import DistContext
    from trainer.build import build_trainer

    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    roots = _roots(parts)
    out = tmp_path / "run"
    build_trainer(_trainer_cfg(roots, out), DistContext()).fit()
    ckpt = out / "checkpoints" / "step-00000002"
    meta = json.loads((ckpt / "meta.json").read_text())
    assert [{k: v for k, v in e.items() if k != "path"} for e in meta["datasets"]] == TABLE
    assert [e["path"] for e in meta["datasets"]] == roots
    saved = torch.load(ckpt / "trainer.pt", weights_only=True)["config"]
    assert json.loads(saved)["data"]["root"] == roots
    # another order: refused before anything is loaded, naming data.root and the lists
    swapped = [roots[1], roots[0], roots[2]]
    with pytest.raises(ConfigError, match=r"data\.root: the checkpoint was trained on \[0\]"):
        build_trainer(_trainer_cfg(swapped, out), DistContext())
    # a dataset left out (and the sums adjusted): refused too
    fewer = _trainer_cfg(roots[:2], out, "data.num_classes=15", "data.num_images=72")
    with pytest.raises(ConfigError, match=r"data\.root: .*only their directories may move"):
        build_trainer(fewer, DistContext())
    # the same datasets moved elsewhere: resumed, and training goes on
    moved = tmp_path / "moved"
    shutil.copytree(parts["arrow"], moved / "arrow")
    shutil.copytree(parts["folder"], moved / "folder")
    t = build_trainer(_trainer_cfg([roots[0], str(moved / "arrow"), str(moved / "folder")],
                                   out, "train.max_steps=3"), DistContext())  # fmt: skip
    assert t.step == 2
    t.fit()
    assert t.step == 3


# --------------------------------------------------------------- 2 ranks end to end
def _two_rank_run(rank: int, world: int, roots: list[str], tmp: str) -> dict:
    from common.dist import DistContext
    from trainer.build import build_trainer

    def run(out: str, *extra: str) -> dict[str, torch.Tensor]:
        t = build_trainer(_trainer_cfg(roots, Path(out), "data.weights=[1,2,1]", *extra),
                          DistContext.current())  # fmt: skip
        t.fit()
        return {k: v.detach().clone() for k, v in t.backbone.state_dict().items()}

    full = run(f"{tmp}/full", "train.max_steps=4")
    run(f"{tmp}/split", "train.max_steps=2")  # stops mid-epoch (10 steps per epoch)
    resumed = run(f"{tmp}/split", "train.max_steps=4")
    meta = json.loads(Path(f"{tmp}/split/checkpoints/step-00000004/meta.json").read_text())
    same = all(torch.equal(full[k], resumed[k]) for k in full)
    return {"same": same, "table": meta["datasets"], "world": meta["world_size"]}


def test_two_rank_training_over_mixed_datasets_resumes_exactly(
    parts: dict[str, Path], tmp_path: Path
) -> None:
    results = run_ranks(_two_rank_run, 2, _roots(parts), str(tmp_path))
    for r in results:
        assert r["same"], "a resumed 2-rank run differs from the uninterrupted one"
    assert results[0]["world"] == 2
    assert [{k: v for k, v in e.items() if k != "path"} for e in results[0]["table"]] == TABLE
