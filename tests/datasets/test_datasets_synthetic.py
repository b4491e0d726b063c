"""Synthetic face generator: determinism, layout, LFW-format held-out pairs; loader end to end."""

from __future__ import annotations

import hashlib
import pickle
from pathlib import Path

import numpy as np
import torch

from datasets.dataset import RecordIODataset
from datasets.discovery import open_dataset
from datasets.loader import FaceLoader
from datasets.recordio import IndexedRecordIO, unpack
from datasets.synthetic import SyntheticConfig, generate
from tests.tolerances import U32, gamma

CFG = SyntheticConfig(identities=6, images_per_identity=4, heldout_identities=5, pairs_per_fold=4)


def _digest(d: Path) -> dict[str, str]:
    return {
        f: hashlib.sha256((d / f).read_bytes()).hexdigest()
        for f in ("train.rec", "train.idx", "property", "heldout.bin")
    }


def test_generator_is_deterministic_for_any_worker_count(tmp_path: Path) -> None:
    generate(tmp_path / "a", CFG, workers=1)
    generate(tmp_path / "b", CFG, workers=2)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    generate(tmp_path / "c", SyntheticConfig(**{**CFG.__dict__, "seed": 1}), workers=1)
    assert _digest(tmp_path / "a")["train.rec"] != _digest(tmp_path / "c")["train.rec"]


def test_layout_property_and_bin(tmp_path: Path) -> None:
    generate(tmp_path, CFG, workers=1)
    assert (tmp_path / "property").read_text().strip() == "6,112,112"
    ds = RecordIODataset(tmp_path / "train.rec", flip=False)
    assert len(ds) == 24 and ds.num_classes == 6 and ds.face_layout
    assert [ds.label_of(i) for i in range(len(ds))] == [c for c in range(6) for _ in range(4)]
    r = IndexedRecordIO(tmp_path / "train.idx", tmp_path / "train.rec", "r")
    h0, _ = unpack(r.read_idx(0))
    assert h0.label.tolist() == [25.0, 31.0]
    assert unpack(r.read_idx(27))[0].label.tolist() == [9.0, 13.0]
    img, _ = ds[0]
    assert img.shape == (3, 112, 112) and img.dtype == torch.float32

    bins, issame = pickle.loads((tmp_path / "heldout.bin").read_bytes())
    assert len(bins) == 2 * len(issame) == 2 * 40
    folds = np.asarray(issame).reshape(10, 4)
    assert (folds.sum(1) == 2).all()  # each fold: equal same / different counts
    import cv2

    im = cv2.imdecode(np.frombuffer(bins[0], np.uint8), cv2.IMREAD_COLOR)
    assert im.shape == (112, 112, 3)


def test_loader_end_to_end_and_resume(tmp_path: Path) -> None:
    generate(tmp_path, CFG, workers=1)
    ds = open_dataset(tmp_path)
    loader = FaceLoader(ds, batch_size=4, rank=0, world_size=1, seed=5, num_workers=0)
    loader.set_epoch(0)
    assert len(loader) == 6
    batches = []
    state = None
    for k, (x, y) in enumerate(loader):
        assert x.shape == (4, 3, 112, 112) and x.dtype == torch.float32 and x.is_contiguous()
        assert y.shape == (4,) and y.dtype == torch.int64
        assert -1.0 <= float(x.min()) and float(x.max()) <= 1.0
        batches.append((x, y))
        if k == 2:
            state = loader.state_dict()
    # resume after 3 batches in a fresh loader (with workers): the same remaining batches
    again = FaceLoader(
        open_dataset(tmp_path), batch_size=4, rank=0, world_size=1, seed=5, num_workers=2
    )
    again.load_state_dict(state)
    again.set_epoch(0)
    rest = list(again)
    assert len(rest) == 3
    for (x0, y0), (x1, y1) in zip(batches[3:], rest, strict=True):
        assert torch.equal(y0, y1) and torch.equal(x0, x1)  # flips are deterministic too
    # the float Dataset path equals the loader's uint8 + batched normalisation path
    x_ds = torch.stack([ds[i][0] for i in range(2)])
    ds_nf = open_dataset(tmp_path, flip=False)
    ref = FaceLoader(ds_nf, batch_size=2, rank=0, world_size=1, shuffle=False, num_workers=0)
    x_ld, _ = next(iter(ref))
    x_ds = torch.stack([ds_nf[i][0] for i in range(2)])
    # pixel * (1 / 127.5) - 1 in fp32: the scale, the product (<= 2) and the difference
    # round (2 gamma_3); cv2's single-pass result rounds once more (u, |x| <= 1).
    atol = 2 * gamma(3, torch.float32) + U32
    torch.testing.assert_close(x_ld, x_ds, rtol=0, atol=atol)
