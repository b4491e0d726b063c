"""``data.sampler=pk``: the training loader yields P identities x K images per rank."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from common.dist import DistContext
from configs import ConfigError, load_config
from trainer.build import build_loader

IDS, PER_ID = 6, 5


@pytest.fixture
def tiny_data(synthetic_data) -> Path:
    return synthetic_data(IDS, PER_ID, 4, 2, seed=3)


def _pk_overrides(data: Path) -> list[str]:
    """The demo configuration on ``data`` with 2 identities x 3 images per batch."""
    return [
        f"data.root={data}",
        f"data.num_classes={IDS}",
        f"data.num_images={IDS * PER_ID}",
        "data.batch_size=6",
        "data.num_workers=0",
        "data.sampler=pk",
        "data.pk_images_per_identity=3",
    ]


def _config(data: Path, *extra: str):
    return load_config(
        "configs/demo",
        [
            *_pk_overrides(data),
            *extra,
        ],
    )


def _label_batches(loader, epoch: int = 0) -> list[list[int]]:
    loader.set_epoch(epoch)
    return [labels.tolist() for _, labels in loader]


def test_pk_batches_hold_p_identities_of_k_images_and_resume(tiny_data: Path) -> None:
    cfg = _config(tiny_data)
    loader = build_loader(cfg, DistContext())
    loader.set_epoch(0)
    expected = len(loader)
    batches = _label_batches(loader)
    assert len(batches) == expected >= 2
    for labels in batches:
        groups = [labels[i : i + 3] for i in range(0, 6, 3)]
        assert all(len(set(group)) == 1 for group in groups), labels  # K images of one id
        assert len({group[0] for group in groups}) == 2, labels  # P distinct identities

    resumed = build_loader(cfg, DistContext())
    resumed.set_epoch(0)
    first = next(iter(resumed))[1].tolist()
    state = resumed.state_dict()
    again = build_loader(cfg, DistContext())
    again.load_state_dict(state)
    assert [first, *_label_batches(again)] == batches
    assert torch.equal(torch.tensor(batches[0]), torch.tensor(first))


def test_pk_k_must_divide_the_batch(tiny_data: Path) -> None:
    with pytest.raises(ConfigError, match=r"data\.pk_images_per_identity"):
        _config(tiny_data, "data.pk_images_per_identity=4")


def test_pk_needs_enough_identities(tiny_data: Path) -> None:
    cfg = _config(tiny_data, "data.batch_size=21")  # P = 7 identities > 6
    with pytest.raises(ConfigError, match=r"data\.sampler=pk"):
        build_loader(cfg, DistContext())


def test_pk_training_with_aux_losses_logs_their_terms(tiny_data: Path, tmp_path: Path) -> None:
    import train_dist

    out = tmp_path / "run"
    args = [
        "configs/demo",
        *_pk_overrides(tiny_data),
        "aux.center_weight=0.1",
        "aux.triplet_weight=0.5",
        f"train.output={out}",
        "train.epochs=1",
        "log.every_steps=2",
        "eval.targets=",
        "eval.at_start=false",
    ]
    assert train_dist.main(args) == 0
    log = (out / "train.log").read_text()
    assert "aux center" in log and "triplet" in log
