"""Sub-centre outlier removal on the synthetic faces with injected label noise.

The "backbone" of the main test is a stand-in: it maps each image (looked up by its
pixels) to its *true* identity's prototype direction plus noise, and the head's
dominant sub-centre of a class is that class's prototype (the other K-1 point
elsewhere), which is what training with sub-centres converges to. Relabelled
samples then sit far from their (wrong) class's dominant sub-centre. The command
itself (real backbone, trainer checkpoint, ``--head-weights``) is run on the same data.
"""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
import torch

from datasets.discovery import open_dataset
from datasets.face_layout import FaceRecWriter
from partial_fc.sharding import class_range
from partial_fc.subcenter_cleaning import embed_samples
from tests.distributed import run_ranks
from tools import cleaning
from tools import subcenter_cleaning as sc

IDENTITIES, IMAGES, NOISE_RATE, K, D = 24, 10, 0.1, 3, 32
NUM_CLASSES = IDENTITIES + 1  # the last class has no samples


def _write_noisy(src, dst) -> dict:
    """Copy ``src`` (face layout) to ``dst`` relabelling NOISE_RATE of the samples to
    another class; returns true labels, noisy labels and the noisy indices (in ``dst``)."""
    ds = open_dataset(src, flip=False)
    true = ds.labels()
    rng = np.random.default_rng(7)
    noisy_src = rng.choice(len(true), int(NOISE_RATE * len(true)), replace=False)
    label = true.copy()
    for i in noisy_src:
        label[i] = (true[i] + rng.integers(1, IDENTITIES)) % IDENTITIES
    order = np.argsort(label, kind="stable")
    writer = FaceRecWriter(dst, num_classes=NUM_CLASSES)  # the last class stays empty
    for i in order.tolist():
        writer.add(int(label[i]), bytes(ds._load(i)[0]))
    writer.close()
    is_noisy = np.zeros(len(true), bool)
    is_noisy[noisy_src] = True
    return {
        "true": true[order],
        "label": label[order],
        "noisy": set(np.flatnonzero(is_noisy[order]).tolist()),
    }


def _image_key(image: torch.Tensor) -> str:
    return hashlib.sha1(image.numpy().tobytes()).hexdigest()


def _stand_in(data_dir, true: np.ndarray) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """(image hash -> embedding) of every sample, and the (C, K, D) sub-centres."""
    g = torch.Generator().manual_seed(3)
    prototypes = torch.nn.functional.normalize(torch.randn(NUM_CLASSES, D, generator=g), dim=1)
    subcenters = torch.randn(NUM_CLASSES, K, D, generator=g)
    for c in range(NUM_CLASSES):  # dominant sub-centre c % K, near the prototype
        subcenters[c, c % K] = prototypes[c] + 0.05 * torch.randn(D, generator=g)
    ds = open_dataset(data_dir, flip=False)
    table = {}
    for i in range(len(ds)):
        noise = 0.2 * torch.randn(D, generator=g)
        table[_image_key(ds[i][0])] = prototypes[int(true[i])] + noise
    return table, subcenters


class LookupEmbedding:
    """The stand-in backbone: image pixels -> precomputed embedding."""

    def __init__(self, table: dict[str, torch.Tensor]) -> None:
        self.table = table

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        return torch.stack([self.table[_image_key(im)] for im in images])


@pytest.fixture(scope="module")
def noisy_data(tmp_path_factory):
    from datasets.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("cleaning")
    cfg = SyntheticConfig(IDENTITIES, IMAGES, heldout_identities=2, pairs_per_fold=2, seed=1)
    generate(root / "clean", cfg, workers=1)
    truth = _write_noisy(root / "clean", root / "noisy")
    table, subcenters = _stand_in(root / "noisy", truth["true"])
    return {"root": root, "dir": root / "noisy", "table": table, "subcenters": subcenters, **truth}


def _removed(out_dir) -> set[int]:
    lines = (out_dir / "removed.tsv").read_text().splitlines()[1:]
    return {int(line.split("\t")[0]) for line in lines}


def test_cleaning_finds_injected_label_noise(noisy_data, tmp_path) -> None:
    ds = open_dataset(noisy_data["dir"], flip=False)
    report = cleaning.clean_dataset(
        ds, noisy_data["subcenters"], NUM_CLASSES, LookupEmbedding(noisy_data["table"]),
        tmp_path, batch_size=32,
    )  # fmt: skip
    removed, noisy = _removed(tmp_path), noisy_data["noisy"]
    precision = len(removed & noisy) / max(len(removed), 1)
    recall = len(removed & noisy) / len(noisy)
    print(f"precision {precision:.3f} recall {recall:.3f} ({len(removed)} removed)")
    assert recall >= 0.8 and precision >= 0.8
    # report
    saved = json.loads((tmp_path / "report.json").read_text())
    assert saved == json.loads(json.dumps(report))
    assert report["num_removed"] == len(removed)
    assert report["num_kept"] + report["num_removed"] == len(ds)
    per_class = report["per_class"]
    assert per_class["samples"] == np.bincount(noisy_data["label"], minlength=NUM_CLASSES).tolist()
    assert per_class["dominant"][:IDENTITIES] == [c % K for c in range(IDENTITIES)]
    assert per_class["dominant"][IDENTITIES] == -1 and report["classes_without_samples"] == 1
    assert sum(per_class["removed"]) == len(removed)
    assert sum(report["angle_histogram"]["counts"]) == len(ds)
    assert (tmp_path / "angles.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # the cleaned data: same classes, the kept samples in class order, readable
    cleaned = open_dataset(tmp_path, flip=False)
    assert cleaned.num_classes == NUM_CLASSES and len(cleaned) == len(ds) - len(removed)
    kept = [i for i in range(len(ds)) if i not in removed]
    assert cleaned.labels().tolist() == noisy_data["label"][kept].tolist()
    assert bytes(cleaned._load(0)[0]) == bytes(ds._load(kept[0])[0])


def _run_sharded(rank: int, world_size: int, data: dict, out_dir: str) -> dict:
    ds = open_dataset(data["dir"], flip=False)
    start, count = class_range(NUM_CLASSES, rank, world_size)
    return cleaning.clean_dataset(
        ds, data["subcenters"][start : start + count], NUM_CLASSES,
        LookupEmbedding(data["table"]), out_dir, threshold_degrees=70.0, batch_size=16,
    )  # fmt: skip


def test_cleaning_sharded_over_ranks_equals_one_process(noisy_data, tmp_path) -> None:
    data = {k: noisy_data[k] for k in ("dir", "table", "subcenters")}
    single = _run_sharded(0, 1, data, str(tmp_path / "one"))
    reports = run_ranks(_run_sharded, 3, data, str(tmp_path / "three"))
    for got in reports:
        assert {**got, "world_size": 1} == single
    for name in ("train.rec", "train.idx", "removed.tsv", "report.json"):
        one = (tmp_path / "one" / name).read_bytes()
        three = (tmp_path / "three" / name).read_bytes()
        assert one == three.replace(b'"world_size": 3', b'"world_size": 1'), name


def test_cleaning_command_with_trainer_checkpoint_and_head_weights(noisy_data, tmp_path) -> None:
    """The CLI end to end with a real (random) backbone: head rows from a 2-shard trainer
    checkpoint (read back for 1 rank) or from a (C*K, D) file give the same report."""
    from backbones.registry import get_model
    from common.digest import sha256_file
    from trainer.checkpoint import FORMAT_VERSION, shard_state

    # a small copy (4 classes x 5 images): the backbone's CPU forward dominates the time
    classes, per_class = 4, 5
    small = tmp_path / "small"
    source = open_dataset(noisy_data["root"] / "clean", flip=False)
    writer = FaceRecWriter(small)
    for c in range(classes):
        for i in range(c * IMAGES, c * IMAGES + per_class):
            writer.add(c, bytes(source._load(i)[0]))
    writer.close()
    torch.manual_seed(0)
    dim = 16
    backbone = get_model("mbf_tiny", embedding_size=dim).eval()
    ds = open_dataset(small, flip=False)
    labels = torch.from_numpy(ds.labels())
    with torch.no_grad():
        emb = torch.nn.functional.normalize(
            embed_samples(ds, np.arange(len(ds)), backbone, 64, 0), dim=1
        )
    # sub-centre 0 of each class at its mean embedding, the others elsewhere
    weight = torch.randn(classes, K, dim)
    weight[:, 0] = torch.zeros(classes, dim).index_add_(0, labels, emb)
    ckpt = tmp_path / "run" / "checkpoints" / "step-00000010"
    ckpt.mkdir(parents=True)
    torch.save({"backbone": backbone.state_dict()}, ckpt / "trainer.pt")
    shards = []
    for r in range(2):
        start, count = class_range(classes, r, 2)
        head = torch.nn.Module()
        head.weight = torch.nn.Parameter(weight[start : start + count].reshape(count * K, dim))
        opt = torch.optim.SGD([head.weight], lr=0.1)
        torch.save(shard_state(head, opt, start, count, K), ckpt / f"head-{r:05d}.pt")
        shards.append(
            {"file": f"head-{r:05d}.pt", "class_start": start, "num_local": count, "K": K}
        )
    files = {p.name: p.stat().st_size for p in ckpt.iterdir()}
    sha256 = {p.name: sha256_file(p) for p in ckpt.iterdir()}
    meta = {"format": FORMAT_VERSION, "shards": shards, "files": files, "sha256": sha256}
    (ckpt / "meta.json").write_text(json.dumps(meta))

    common = ["--data", str(small), "--network", "mbf_tiny", "--num-workers", "0"]
    assert sc.main(["--checkpoint-dir", str(tmp_path / "run"), *common, "--output",
                    str(tmp_path / "a"), "--threshold-degrees", "30"]) == 0  # fmt: skip
    torch.save(weight.reshape(classes * K, dim), tmp_path / "head.pt")
    assert sc.main(["--head-weights", str(tmp_path / "head.pt"), "--num-subcenters", str(K),
                    "--backbone-checkpoint", str(ckpt / "trainer.pt"), *common, "--output",
                    str(tmp_path / "b"), "--threshold-degrees", "30"]) == 0  # fmt: skip
    a = json.loads((tmp_path / "a" / "report.json").read_text())
    b = json.loads((tmp_path / "b" / "report.json").read_text())
    assert a == b
    assert a["per_class"]["dominant"] == [0] * classes and a["num_samples"] == len(ds)
    assert a["num_kept"] == len(open_dataset(tmp_path / "a"))
    with pytest.raises(FileNotFoundError, match="no complete checkpoint"):
        sc.main(["--checkpoint-dir", str(tmp_path / "b"), *common, "--output", str(tmp_path)])
    with pytest.raises(ValueError, match="needs --num-subcenters"):
        sc.main(["--head-weights", str(tmp_path / "head.pt"), "--backbone-checkpoint",
                 str(ckpt / "trainer.pt"), *common, "--output", str(tmp_path / "c")])  # fmt: skip
